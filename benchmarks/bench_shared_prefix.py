"""Greedy generation with the prompts' common prefix run once per batch (``generate(share_prefix=True)``) vs whole prompts.

Every chat-formatted prompt starts with the same system turn (24 of SmolLM2-135M-Instruct's ~50 prompt tokens
on the bundled prompts). ``share_prefix`` runs those tokens once per batch into the key-value cache and
left-pads the rest of each prompt after them; the reference runs each whole prompt in one left-padded pass,
timed on the same prompts in the same run. Each side runs ``--repeats`` times, alternating, and the fastest
run of each is compared. Both compute the same function up to float summation order, so greedy responses may
differ only where two tokens nearly tie; their count is printed. The last line is
``shared_prefix_vs_whole_prompt_speedup=<x>`` (above 1: sharing the prefix is faster).

    python benchmarks/bench_shared_prefix.py [--repeats 2] [--n-prompts 64] [--max-new-tokens 24] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time

import torch

import mechsafe as ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    prompts = ms.data.load("harmful_vs_harmless").texts[: args.n_prompts]
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    ms.evaluation.generate(model, prompts[:2], max_new_tokens=2, progress=False)  # warm-up

    times: dict[str, list[float]] = {"whole_prompt": [], "shared_prefix": []}
    outputs = {}
    for _ in range(args.repeats):
        for name in times:
            t0 = time.perf_counter()
            outputs[name] = ms.evaluation.generate(model, prompts, share_prefix=name == "shared_prefix", **kw)
            times[name].append(time.perf_counter() - t0)
    differ = sum(a != b for a, b in zip(outputs["shared_prefix"], outputs["whole_prompt"]))
    print(f"prompts={len(prompts)} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size} "
          f"threads={torch.get_num_threads()} differing_responses={differ}")
    for name, ts in times.items():
        print(f"{name}_s={[round(t, 2) for t in ts]}")
    print(f"shared_prefix_vs_whole_prompt_speedup={min(times['whole_prompt']) / min(times['shared_prefix']):.3f}")


if __name__ == "__main__":
    main()
