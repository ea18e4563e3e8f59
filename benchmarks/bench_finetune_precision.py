"""LoRA training step time with bfloat16 autocast (``FinetuneConfig(precision="bfloat16")``) vs float32.

Trains the align recipe's LoRA (``mechsafe.align.default_finetune_config()``: rank 8 on five weights of
layers 6-29, the retain term on every other example) on the embedded model for ``--steps`` steps, on
harmful TRAIN prompts paired with bundled refusals (no generation needed). Each precision runs
``--repeats`` times, alternating; a run's step time is the median over its steps (timed between the
training callbacks, so the one-off reference pass is left out) and the fastest run of each is compared.
Both runs see the same examples in the same order, so their losses must agree closely. The last line is
``bf16_vs_fp32_step_speedup=<x>`` (above 1: bfloat16 is faster; expect about 1 without native bfloat16
matrix units, such as AMX or AVX512-BF16 on CPUs). This workload is mostly matrix products; on the full
align workload (unlikelihood and preference terms, longer retained rows) the gain did not carry over to
the whole LoRA stage, see ``docs/finetune.md``.

    python benchmarks/bench_finetune_precision.py [--repeats 2] [--steps 6] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mechsafe as ms
from mechsafe.align import assign_refusals, default_finetune_config
from mechsafe.data import prompt_pool
from mechsafe.finetune import ResponseNLL, RetainKL


def run(precision: str, examples: list[tuple[str, str]], steps: int, batch_size: int) -> tuple[float, list[float]]:
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    config = default_finetune_config()
    config.steps, config.batch_size, config.precision = steps, batch_size, precision
    config.merge = False
    stamps: list[float] = []
    objectives = [ResponseNLL(examples), RetainKL(examples[::2])]
    result = ms.finetune.finetune(model, objectives, config, progress=False,
                                  callback=lambda step, m: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), result.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    prompts = [p["text"] for p in prompt_pool("harmful", "train")][: args.steps * args.batch_size]
    examples = list(zip(prompts, assign_refusals(len(prompts))))
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    losses = {}
    for _ in range(args.repeats):
        for precision in times:
            step_s, losses[precision] = run(precision, examples, args.steps, args.batch_size)
            times[precision].append(step_s)
    gap = max(abs(a - b) for a, b in zip(losses["float32"], losses["bfloat16"]))
    print(f"steps={args.steps} batch_size={args.batch_size} threads={torch.get_num_threads()} "
          f"max_loss_gap={gap:.4f} final_loss_fp32={losses['float32'][-1]:.4f} final_loss_bf16={losses['bfloat16'][-1]:.4f}")
    for name, ts in times.items():
        print(f"{name}_step_s={[round(t, 2) for t in ts]}")
    print(f"bf16_vs_fp32_step_speedup={min(times['float32']) / min(times['bfloat16']):.3f}")


if __name__ == "__main__":
    main()
