"""Greedy generation throughput with mechsafe's weight layout vs TransformerLens's row-major layout.

``load_model`` stores the MLP, attention-output and unembedding weights in the layout TransformerLens's
forward hands to ``F.linear`` (:func:`mechsafe.models.linear_layout`), so it no longer copies them on
every forward pass. The reference is the same model with every parameter made row-major contiguous
again (what a plain ``HookedTransformer`` holds), timed on the same prompts in the same run. Each side
runs ``--repeats`` times, alternating, and the fastest run of each is compared. The responses must be
identical. The last line is ``layout_vs_rowmajor_speedup=<x>`` (above 1: the layout is faster).

    python benchmarks/bench_generation.py [--repeats 2] [--n-prompts 64] [--max-new-tokens 24] [--batch-size 32]
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
    laid_out = ms.load_model("smollm2-135m-instruct", processing="none")
    row_major = ms.load_model("smollm2-135m-instruct", processing="none")
    with torch.no_grad():
        for param in row_major.parameters():
            param.data = param.data.contiguous()
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=False)
    ms.evaluation.generate(laid_out, prompts[:2], max_new_tokens=2, progress=False)  # warm-up

    times: dict[str, list[float]] = {"row_major": [], "layout": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, model in (("row_major", row_major), ("layout", laid_out)):
            t0 = time.perf_counter()
            outputs[name] = ms.evaluation.generate(model, prompts, **kw)
            times[name].append(time.perf_counter() - t0)
    if outputs["layout"] != outputs["row_major"]:
        raise SystemExit("the two layouts generated different responses; the layout must not change outputs")
    print(f"prompts={len(prompts)} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size} "
          f"threads={torch.get_num_threads()} identical_responses=True")
    for name, ts in times.items():
        print(f"{name}_s={[round(t, 2) for t in ts]}")
    print(f"layout_vs_rowmajor_speedup={min(times['row_major']) / min(times['layout']):.3f}")


if __name__ == "__main__":
    main()
