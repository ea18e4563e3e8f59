"""LoRA step time with each prompt run once per micro-batch (``FinetuneConfig(share_prompts=True)``) vs one pass per row.

The align recipe's steps carry, next to each example's own response, up to two more rows on the same
prompt: the unlikelihood negative and the preference term's rejected response. With ``share_prompts`` the
distinct prompts run once into a key-value cache and every row continues from it
(:func:`mechsafe.forward.shared_prompt_resid`); the reference is the per-row path (one pass for
the examples, one for their negatives and rejected responses), timed on the same steps in the same run.

The workload has the align recipe's shape (``mechsafe.align.default_finetune_config()``, its retain,
unlikelihood and preference terms): harmful TRAIN prompts paired with bundled refusals and rejecting the
base model's own answer; harmless TRAIN prompts paired with the base model's answer (24 greedy tokens,
generated first), retained, with a one-word refusal opening as negative and rejected response. Each path
runs ``--repeats`` times, alternating, from a fresh model; a run's step time is the median over its steps
after the first (timed between training callbacks); the fastest run of each is compared. Both paths compute
the same losses up to float summation order, so their per-step losses must agree closely. The last line is
``shared_vs_per_row_step_speedup=<x>`` (above 1: sharing the prompts is faster).

    python benchmarks/bench_shared_prompts.py [--repeats 2] [--steps 6] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mechsafe as ms
from mechsafe.align import assign_refusals, default_finetune_config, refusal_openings
from mechsafe.data import prompt_pool
from mechsafe.evaluation import generate
from mechsafe.finetune import Objective, Preference, ResponseNLL, RetainKL, Unlikelihood


def workload(n: int) -> list[Objective]:
    """The four objectives of ``n`` harmful and ``n`` harmless examples."""
    harmful = [p["text"] for p in prompt_pool("harmful", "train")][:n]
    harmless = [p["text"] for p in prompt_pool("harmless", "train")][:n]
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    answers = [a.strip() for a in generate(model, harmful + harmless, max_new_tokens=24, batch_size=32, progress=False)]
    refused, answered = list(zip(harmful, assign_refusals(n))), list(zip(harmless, answers[n:]))
    openings = refusal_openings(n, 1)
    chosen = [(ex, a) for ex, a in zip(refused, answers[:n]) if a]
    return [ResponseNLL(refused + answered), RetainKL(answered, 1.0), Unlikelihood(answered, openings, 4.0),
            Preference([ex for ex, _ in chosen] + answered, [a for _, a in chosen] + openings, 4.0)]


def run(share: bool, objectives: list[Objective], steps: int, batch_size: int) -> tuple[float, list[float]]:
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    config = default_finetune_config()
    config.steps, config.batch_size, config.share_prompts, config.merge = steps, batch_size, share, False
    stamps: list[float] = []
    result = ms.finetune.finetune(model, objectives, config, progress=False,
                                  callback=lambda step, m: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in list(zip(stamps, stamps[1:]))[1:]), result.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    data = workload(args.steps * args.batch_size // 2)
    times: dict[str, list[float]] = {"per_row": [], "shared": []}
    losses = {}
    for _ in range(args.repeats):
        for name in times:
            step_s, losses[name] = run(name == "shared", data, args.steps, args.batch_size)
            times[name].append(step_s)
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses["shared"], losses["per_row"]))
    print(f"steps={args.steps} batch_size={args.batch_size} threads={torch.get_num_threads()} "
          f"max_relative_loss_gap={gap:.2e}")
    for name, ts in times.items():
        print(f"{name}_step_s={[round(t, 2) for t in ts]}")
    print(f"shared_vs_per_row_step_speedup={min(times['per_row']) / min(times['shared']):.3f}")


if __name__ == "__main__":
    main()
