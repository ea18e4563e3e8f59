"""WaRP against its peers on one model: does protecting safety-important weight directions keep safety through a
utility fine-tune, and does it raise the cost of a fine-tuning attack?

The comparison of ``mechsafe warp compare`` (:func:`mechsafe.warp.compare.run_compare`): WaRP's three phases
(covariance basis of each protected weight's inputs on safety data, importance of the rotated coefficients, masked
fine-tuning) at several keep ratios against plain full fine-tuning, the same weights unmasked, LoRA, SafeLoRA and
the importance rule in the original weight space, all on the same utility problems, steps and batches; each result
measured for refusal and over-refusal on held-out prompts, task accuracy and NLL, and attacked with the attack
bench's harmful LoRA fine-tune. The verdict follows the rule of docs/warp.md.

Writes ``report.md``, ``pareto.png``, ``keep-ratio.png``, ``results.json`` and ``run.json`` into
``runs/warp-compare-<time>/``; finished runs are kept under ``$MECHSAFE_CACHE/warp/compare`` and reused, so a
killed comparison resumes.

    python analyses/warp_safety.py [MODEL] [any mechsafe warp compare flag]
"""

from __future__ import annotations

import sys

from mechsafe.cli import main

if __name__ == "__main__":
    sys.exit(main(["warp", "compare", *sys.argv[1:]]))
