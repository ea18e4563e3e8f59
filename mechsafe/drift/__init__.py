"""Safety-neuron drift during fine-tuning, and the freezing experiment (``mechsafe drift``).

Do SNIP's safety-critical neurons move more than others when a model is fine-tuned (H1, "fragile safety"), or
about as much while fine-tuning builds new pathways (H2)? :func:`run_study` fine-tunes benign and harmful, records
every neuron's and head's drift from LoRA factors or weight copies (:mod:`mechsafe.drift.track`), tests the groups
against random and utility groups (:mod:`mechsafe.drift.stats`) and freezes safety groups during the harmful
fine-tune.
"""

from mechsafe.drift.config import DriftConfig
from mechsafe.drift.stats import cohen_d, compare, comparisons, holm, verdict
from mechsafe.drift.study import analyze, drift_run, freeze_run, freeze_units, run_study
from mechsafe.drift.track import drift_metrics, initial_state, unit_terms

__all__ = ["DriftConfig", "analyze", "cohen_d", "compare", "comparisons", "drift_metrics", "drift_run", "freeze_run",
           "freeze_units", "holm", "initial_state", "run_study", "unit_terms", "verdict"]
