"""Greedy generation throughput: mechsafe's weight layout vs row-major weights, and the shared prompt prefix vs whole prompts.

1. **Layout.** ``load_model`` stores the MLP, attention-output and unembedding weights in the layout
   TransformerLens's forward hands to ``F.linear`` (:func:`mechsafe.models.linear_layout`), so it no longer
   copies them on every forward pass. The reference is the same model with every parameter made row-major
   contiguous again (what a plain ``HookedTransformer`` holds). The responses must be identical.
2. **Shared prefix.** Every chat-formatted prompt starts with the same system turn (24 of SmolLM2-135M-Instruct's
   ~50 prompt tokens on the bundled prompts). ``generate(share_prefix=True)`` (the default) runs those tokens once
   per batch into the key-value cache and left-pads the rest of each prompt after them; the reference runs each
   whole prompt in one left-padded pass (``share_prefix=False``). Both compute the same function up to float
   summation order, so greedy responses may differ only where two tokens nearly tie; their count is printed.

Each comparison times both sides on the same prompts in the same run, ``--repeats`` times, alternating, and
compares the fastest run of each. The ratio lines are ``layout_vs_rowmajor_speedup=<x>`` and
``shared_prefix_vs_whole_prompt_speedup=<x>`` (above 1: mechsafe's default is faster).

    python benchmarks/bench_generation.py [--repeats 2] [--n-prompts 64] [--max-new-tokens 24] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time

import torch

import mechsafe as ms


def compare(runs: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Time each named run ``repeats`` times, alternating; returns the times and each run's last responses."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name}_s={[round(t, 2) for t in ts]}")
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    prompts = ms.data.load("harmful_vs_harmless").texts[: args.n_prompts]
    laid_out = ms.load_model("smollm2-135m-instruct", processing="none")
    row_major = ms.load_model("smollm2-135m-instruct", processing="none")
    with torch.no_grad():
        for param in row_major.parameters():
            param.data = param.data.contiguous()
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    ms.evaluation.generate(laid_out, prompts[:2], max_new_tokens=2, progress=False)  # warm-up
    print(f"prompts={len(prompts)} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size} "
          f"threads={torch.get_num_threads()}")

    times, outputs = compare({"row_major": lambda: ms.evaluation.generate(row_major, prompts, **kw),
                              "layout": lambda: ms.evaluation.generate(laid_out, prompts, **kw)}, args.repeats)
    if outputs["layout"] != outputs["row_major"]:
        raise SystemExit("the two layouts generated different responses; the layout must not change outputs")
    print(f"identical_responses=True layout_vs_rowmajor_speedup={min(times['row_major']) / min(times['layout']):.3f}")

    times, outputs = compare({"whole_prompt": lambda: ms.evaluation.generate(laid_out, prompts, share_prefix=False, **kw),
                              "shared_prefix": lambda: ms.evaluation.generate(laid_out, prompts, **kw)}, args.repeats)
    differ = sum(a != b for a, b in zip(outputs["shared_prefix"], outputs["whole_prompt"]))
    print(f"differing_responses={differ} "
          f"shared_prefix_vs_whole_prompt_speedup={min(times['whole_prompt']) / min(times['shared_prefix']):.3f}")


if __name__ == "__main__":
    main()
