"""The seed's four MFS claims measured against an adaptive attacker, on the embedded default model.

The study of ``mechsafe mfs claims`` (:func:`mechsafe.mfs.claims.run_claims`): embedded MFS models of several sizes
built from ``smollm2-135m-instruct`` with the align recipe's mix, the same attack bench run on the largest one and
on ``smollm2-135m-aligned`` (fine-tuning, refusal-direction ablation, SNIP pruning, prefill), the attacks that know
MFS (random removal, layout truncation, diff against the public base model, weight-statistics search, SAE
discovery), the cost to break each against the FLOPs of building MFS and of retraining, the log-log scaling of
attack and build cost with the number of features, and utility, latency and memory. The four criteria (attack cost
>= 100x the aligned model's, safety survives removing 90% of the features, < 10% performance cost, SAE attack
costlier than retraining) are reported as met or not met with the measured figure.

Writes ``report.md``, ``claims.png``, ``results.json`` and ``run.json`` into ``runs/mfs-claims-<time>/``; every
stage is cached (built models under ``$MECHSAFE_CACHE/mfs/embedded``, bench trials under
``$MECHSAFE_CACHE/attacks``), so a killed study resumes.

    python analyses/mfs_claims.py [--quick] [any mechsafe mfs claims flag]
"""

from __future__ import annotations

import sys

from mechsafe.cli import main

if __name__ == "__main__":
    sys.exit(main(["mfs", "claims", *sys.argv[1:]]))
