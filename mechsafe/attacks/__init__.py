"""The attack bench: what it costs to remove a model's safety, measured the same way for every model and defense.

    import mechsafe as ms
    from mechsafe import attacks

    model = ms.load_model("smollm2-135m-aligned")
    base = ms.load_model("smollm2-135m-instruct")
    harmful, _ = ms.data.load_texts("harmful", "test")
    harmless, _ = ms.data.load_texts("harmless", "test")
    result = attacks.run_bench(model, base, harmful, harmless, attacks.BenchConfig(attacks=("harmful-lora", "direction")))
    result["summary"]["harmful-lora"]["cost_to_break"]
"""

from mechsafe.attacks.bench import Defense, align_build_flops, first_break, run_bench
from mechsafe.attacks.config import ATTACKS, BenchConfig, ThreatModel
from mechsafe.attacks.data import benign_pairs, check_disjoint, compliant_pairs, harmful_requests
from mechsafe.attacks.evaluate import FastEval
from mechsafe.attacks.flops import count_flops, dense_estimate

__all__ = ["ATTACKS", "BenchConfig", "Defense", "FastEval", "ThreatModel", "align_build_flops", "benign_pairs",
           "check_disjoint", "compliant_pairs", "count_flops", "dense_estimate", "first_break", "harmful_requests",
           "run_bench"]
