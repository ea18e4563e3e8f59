"""The detector-mode safety bank's cost on the embedded model: time per forward and resident memory by bank size.

For each size N (features in all, over the default four sub-banks: semantic, activation, n-gram and attention
features at layer 15), the bank scores every position of the same batches of chat-formatted bundled prompts as a
plain forward pass of the embedded model, reading the activations of that same forward pass through hooks:
``mfs_overhead_<N> = (seconds with the bank − seconds of the plain forward) / seconds of the plain forward``
(median over the batches; target at 1M features: <= 0.10; the smallest bank retrieves k = sqrt of a sub-bank's size
when that is below the default 32) and the bank's resident memory (parameters, the group
code and the growth of the process's RSS while it is built). The seed's figure is ~4 GB per 1M features.

    python benchmarks/bench_mfs.py [--sizes 1024,10000,99856,1000000] [--batches 6]
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import torch

import mechsafe as ms
from mechsafe.chat import encode_prompts, pad_id, pad_right
from mechsafe.data import prompt_pool
from mechsafe.mfs import BankConfig, build_bank


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def prompt_batches(model, n_batches: int, batch_size: int) -> list[torch.Tensor]:
    """``n_batches`` right-padded batches of chat-formatted bundled TRAIN prompts (harmful, then harmless)."""
    texts = [p["text"] for p in prompt_pool("harmful", "train")] + [p["text"] for p in prompt_pool("harmless", "train")]
    enc = encode_prompts(model.tokenizer, texts[: n_batches * batch_size])
    return [pad_right([e.ids for e in enc[i:i + batch_size]], pad_id(model.tokenizer))[0]
            for i in range(0, len(enc), batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,10000,99856,1000000")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    batches = prompt_batches(model, args.batches, args.batch_size)
    with torch.inference_mode():
        for tokens in batches[:2]:  # warm-up
            model(tokens)
        for n in [int(s) for s in args.sizes.split(",")]:
            before = rss_mb()
            side = math.isqrt(n // len(BankConfig().types))
            bank = build_bank(model, BankConfig(n_features=n, k=min(BankConfig().k, side)))  # k <= sqrt of a sub-bank
            with torch.no_grad():
                for sub in bank.subs:
                    sub.votes.normal_()
            grown = rss_mb() - before
            names = bank.hooks()
            plain, guarded = [], []
            for tokens in batches:
                t0 = time.perf_counter()
                model(tokens)
                plain.append(time.perf_counter() - t0)
                acts: dict[str, torch.Tensor] = {}
                t0 = time.perf_counter()
                with model.hooks(fwd_hooks=[(h, lambda x, hook: acts.__setitem__(hook.name, x)) for h in names]):
                    model(tokens)
                bank.score(bank.inputs(acts))
                guarded.append(time.perf_counter() - t0)
            p, g = statistics.median(plain), statistics.median(guarded)
            params = sum(t.numel() * t.element_size() for t in list(bank.parameters()) + list(bank.buffers()))
            label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m"
            print(f"mfs_overhead_{label}={(g - p) / p:.4f}")
            print(f"mfs_forward_s_{label}={g:.4f} plain_forward_s={p:.4f}")
            print(f"mfs_bank_mb_{label}={params / 2**20:.1f} mfs_rss_growth_mb_{label}={grown:.1f}")
            del bank


if __name__ == "__main__":
    main()
