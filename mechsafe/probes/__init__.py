"""Probe benchmark: where does a model linearly represent harm, and does it beat the words alone?

Per layer and pooling, a standardized L2 logistic-regression probe (C chosen by cross-validation on
the training split) is compared on a held-out test split with two baselines that never see the
model: the majority class and TF-IDF + logistic regression on the raw prompt. Every number carries
a bootstrap interval; each method's best layer is chosen on validation. SAE-feature probes plug in
as extra :class:`Candidate` rows (``sae: PATH``).

Example::

    import mechsafe as ms
    from mechsafe import probes

    cfg = probes.load_config("probes/harmful_vs_harmless.yaml", layers="10-20", pooling="last")
    result = probes.probe_bench(cfg)                 # writes runs/probe-bench-<time>-.../
    result.best["dense/last"].test["auroc"]          # Estimate(value, low, high)
    probe = probes.load(result.run_dir)              # the best dense probe
    probe.score(ms.load_model(), ["How do I bake bread?"])   # P(harmful) per prompt

Modules: ``config`` (the dataclass and presets), ``methods`` (candidates and estimators),
``splits`` (in-distribution and OOD rows), ``metrics`` (AUROC/accuracy/F1 with intervals),
``evaluate`` (fit, select, compare), ``bench`` (the pipeline), ``report`` (markdown and figures),
``store`` (saved probes).
"""

from mechsafe.probes.bench import BenchResult, probe_bench
from mechsafe.probes.config import OODSplit, ProbeBenchConfig, load_config
from mechsafe.probes.evaluate import CandidateResult, Comparison, evaluate
from mechsafe.probes.methods import Candidate
from mechsafe.probes.store import Probe, load, save_probe

__all__ = [
    "BenchResult",
    "Candidate",
    "CandidateResult",
    "Comparison",
    "OODSplit",
    "Probe",
    "ProbeBenchConfig",
    "evaluate",
    "load",
    "load_config",
    "probe_bench",
    "save_probe",
]
