"""Full-parameter training step vs LoRA step on the same batches (for the record).

Both runs train the embedded model with the trainer (:func:`mechsafe.finetune.finetune`) on harmful TRAIN
prompts paired with bundled refusals (the response NLL only), with the align recipe's settings
(``mechsafe.align.default_finetune_config()``): LoRA rank 8 on five weights of layers 6-29, against
``method="full"`` (every parameter, AdamW state for all of them). Both see the same examples in the same
order. Each method runs ``--repeats`` times, alternating, from a fresh model; a run's step time is the median
over its steps after the first (timed between training callbacks); the fastest run of each is compared. The
last line is ``full_vs_lora_step_ratio=<x>`` (above 1: a full step costs x LoRA steps).

    python benchmarks/bench_full_vs_lora.py [--repeats 2] [--steps 5] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import mechsafe as ms
from mechsafe.align import assign_refusals, default_finetune_config
from mechsafe.data import prompt_pool
from mechsafe.finetune import ResponseNLL


def run(method: str, examples: list[tuple[str, str]], steps: int, batch_size: int) -> tuple[float, list[float]]:
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    config = dataclasses.replace(default_finetune_config(), method=method, steps=steps, batch_size=batch_size,
                                 lr=1e-5 if method == "full" else 1e-3, warmup_steps=0, merge=False)
    stamps: list[float] = []
    result = ms.finetune.finetune(model, [ResponseNLL(examples)], config, progress=False,
                                  callback=lambda step, m: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in list(zip(stamps, stamps[1:]))[1:]), result.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    prompts = [p["text"] for p in prompt_pool("harmful", "train")][: args.steps * args.batch_size]
    examples = list(zip(prompts, assign_refusals(len(prompts))))
    times: dict[str, list[float]] = {"lora": [], "full": []}
    losses = {}
    for _ in range(args.repeats):
        for method in times:
            step_s, losses[method] = run(method, examples, args.steps, args.batch_size)
            times[method].append(step_s)
    print(f"steps={args.steps} batch_size={args.batch_size} threads={torch.get_num_threads()} "
          f"first_loss_lora={losses['lora'][0]:.4f} first_loss_full={losses['full'][0]:.4f}")
    for name, ts in times.items():
        print(f"{name}_step_s={[round(t, 2) for t in ts]}")
    print(f"full_vs_lora_step_ratio={min(times['full']) / min(times['lora']):.3f}")


if __name__ == "__main__":
    main()
