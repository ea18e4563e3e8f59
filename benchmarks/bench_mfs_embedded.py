"""Embedded-mode MFS by size: what N added MLP neurons cost the embedded model per forward, and where memory stops.

For each N, ``smollm2-135m-instruct`` is widened by N neurons spread over all 30 blocks (:func:`mechsafe.mfs.embed.
widen`, random read and write weights: the cost does not depend on their values), and the wide model runs the same
batches of chat-formatted bundled prompts as the original in the same process:
``mfs_embedded_forward_ratio_<N> = median seconds of the wide forward / median seconds of the original``, the
added parameters' size and the process's RSS growth. A size whose widening would need more memory than the machine
has free (about twice the wide model's parameter bytes while it is built) is reported as skipped, with the figure.

    python benchmarks/bench_mfs_embedded.py [--sizes 1000,10000,100000,1000000] [--batches 4]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import mechsafe as ms
from mechsafe.mfs.embed import split_counts, widen


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def label(n: int) -> str:
    return f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m"


def median_forward(model, batches) -> float:
    times = []
    for tokens in batches:
        t0 = time.perf_counter()
        model(tokens, return_type=None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from bench_mfs import prompt_batches, rss_mb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    batches = prompt_batches(model, args.batches, args.batch_size)
    d_model, gated = model.cfg.d_model, model.cfg.gated_mlp
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode():
        median_forward(model, batches[:2])  # warm-up
        for n in [int(s) for s in args.sizes.split(",")]:
            counts = split_counts(n, model.cfg.n_layers, "all")
            added = model.cfg.n_layers * max(counts) * (3 if gated else 2) * d_model * 4 + model.cfg.n_layers * max(counts) * 4
            need = 2 * (base_bytes + added) / 2**30 + 1.0
            if need > available_gb():
                print(f"mfs_embedded_{label(n)}=skipped needs_gb={need:.1f} available_gb={available_gb():.1f}")
                continue
            gc.collect()
            before = rss_mb()
            wide = widen(model, counts, torch.Generator().manual_seed(0))
            for block in wide.blocks:
                block.mlp.W_out[model.cfg.d_mlp:].normal_(0, 0.02)
            grown = rss_mb() - before
            median_forward(wide, batches[:1])  # warm-up
            plain, wide_s = median_forward(model, batches), median_forward(wide, batches)
            print(f"mfs_embedded_forward_ratio_{label(n)}={wide_s / plain:.3f}")
            print(f"mfs_embedded_forward_s_{label(n)}={wide_s:.4f} plain_forward_s={plain:.4f}")
            print(f"mfs_embedded_added_mb_{label(n)}={added / 2**20:.1f} mfs_embedded_rss_growth_mb_{label(n)}="
                  f"{grown:.1f} d_mlp={wide.cfg.d_mlp}")
            del wide
            gc.collect()


if __name__ == "__main__":
    main()
