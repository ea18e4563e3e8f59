"""Safety-neuron drift during fine-tuning and the freezing experiment, on one model.

The study of ``mechsafe drift`` (:func:`mechsafe.drift.run_study`): benign and harmful fine-tunes of the model with
every MLP neuron's and attention head's drift recorded (cosine to the initial weights, L2 distance, relative change
of the effective weights), the SNIP groups (top safety, set difference, top utility, matched random) compared with
bootstrap intervals, Cohen's d, Welch's t and Mann-Whitney U tests under Holm correction, the H1/H2 verdict by the
rule of docs/drift.md, and the freezing experiment (safety groups frozen exactly during the harmful fine-tune
against random groups of the same size).

Writes ``report.md``, ``drift.png``, ``drift-heads.png``, ``final.png``, ``freezing.png``, ``results.json`` and
``run.json`` into ``runs/drift-<time>/``; finished runs are kept under ``$MECHSAFE_CACHE/drift`` and reused, so a
killed study resumes.

    python analyses/safety_neuron_drift.py [MODEL] [any mechsafe drift flag]
"""

from __future__ import annotations

import sys

from mechsafe.cli import main

if __name__ == "__main__":
    sys.exit(main(["drift", *sys.argv[1:]]))
