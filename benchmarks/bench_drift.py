"""Drift tracking's cost against the fine-tuning it watches, at the study's default settings.

The embedded model is fine-tuned with the drift study's defaults (:class:`mechsafe.drift.DriftConfig`: LoRA on the
trainer's default targets, 4 pairs per step) on benign TRAIN instruction pairs for ``--steps`` steps, recording
every neuron's and head's drift terms (:func:`mechsafe.drift.track.unit_terms`) every ``--every`` steps (and at step
0), as :func:`mechsafe.drift.drift_run` does; the same is done with ``--method full`` against weight copies. Each
record is timed inside the run, so the ratio compares tracking with the training steps of the same run:
``drift_tracking_overhead = tracking seconds / training seconds`` (target <= 0.10 at N = 10). The refusal score and
NLL the study also records at each point are timed too and printed separately (``drift_eval_overhead``), as is the
tracking overhead of full-parameter fine-tuning.

    python benchmarks/bench_drift.py [--steps 20] [--every 10]
"""

from __future__ import annotations

import argparse
import time

import mechsafe as ms
from mechsafe.attacks.data import benign_pairs
from mechsafe.attacks.evaluate import FastEval, eval_subsets
from mechsafe.data import prompt_pool
from mechsafe.drift import DriftConfig
from mechsafe.drift.track import initial_state, unit_terms
from mechsafe.finetune import FinetuneConfig, finetune


def run(method: str, steps: int, every: int, fast: FastEval | None) -> tuple[float, float, float]:
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    defaults = DriftConfig()
    initial = initial_state(model, copy=method != "lora")
    spent = {"track": 0.0, "eval": 0.0}

    def record(step, m):
        t0 = time.perf_counter()
        unit_terms(m, initial)
        t1 = time.perf_counter()
        if fast is not None:
            fast(m)
        spent["track"] += t1 - t0
        spent["eval"] += time.perf_counter() - t1

    config = FinetuneConfig(method=method, lr=1e-4 if method == "full" else defaults.lr, steps=steps,
                            batch_size=defaults.batch_size, callback_every=every, checkpoint_every=0)
    t0 = time.perf_counter()
    finetune(model, benign_pairs()[:defaults.n_examples], config, progress=False, callback=record)
    total = time.perf_counter() - t0
    return spent["track"], spent["eval"], total - spent["track"] - spent["eval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    defaults = DriftConfig()
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    harmful, harmless = eval_subsets([p["text"] for p in prompt_pool("harmful", "test")],
                                     [p["text"] for p in prompt_pool("harmless", "test")], defaults.eval_limit,
                                     defaults.seed)
    fast = FastEval(model, harmful, harmless, [])
    del model
    track, evaluation, train = run("lora", args.steps, args.every, fast)
    full_track, _, full_train = run("full", args.steps, args.every, None)
    print(f"steps={args.steps} every={args.every} records={args.steps // args.every + 1}")
    print(f"lora: training_s={train:.1f} tracking_s={track:.2f} eval_s={evaluation:.1f}; "
          f"full: training_s={full_train:.1f} tracking_s={full_track:.2f}")
    print(f"drift_eval_overhead={evaluation / train:.4f}")
    print(f"drift_tracking_overhead_full={full_track / full_train:.4f}")
    print(f"drift_tracking_overhead={track / train:.4f}")


if __name__ == "__main__":
    main()
