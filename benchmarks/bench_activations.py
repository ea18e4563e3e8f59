"""Activation-caching throughput vs a plain Hugging Face forward, measured in the same run.

Caches the bundled harmful-vs-harmless prompts (resid_post, all 30 layers, last + mean pooling) on the
embedded model with ``mechsafe.cache_activations`` and times ``AutoModelForCausalLM`` (transformers)
over exactly the same token batches. Each side runs ``--repeats`` times, alternating, and the fastest
run of each is compared (the machine is noisy). The last line is ``cache_vs_hf_throughput_ratio=<x>``
(target >= 0.9; above 1 means caching is faster than a bare HF forward).

    python benchmarks/bench_activations.py [--repeats 2] [--batch-size 16] [--limit N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import mechsafe as ms
from mechsafe import chat, models


def hf_forward_seconds(hf, encoded, batch_size: int, pad: int) -> float:
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = [encoded[i].ids for i in order[b:b + batch_size]]
            tokens, lengths = chat.pad_right(batch, pad)
            mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).long()
            hf(input_ids=tokens, attention_mask=mask)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    args = parser.parse_args()

    prompts = ms.data.load("harmful_vs_harmless").texts[: args.limit]
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    hf, tok = models._load_hf_gguf(models.embedded_gguf_path())
    hf.eval()
    encoded = chat.encode_prompts(tok, prompts)
    n_tokens = sum(len(e) for e in encoded)
    pad = chat.pad_id(tok)
    cfg = ms.ActivationConfig(hook="resid_post", layers="all", pooling=("last", "mean"), batch_size=args.batch_size)

    hf_times, cache_times = [], []
    for _ in range(args.repeats):
        hf_times.append(hf_forward_seconds(hf, encoded, args.batch_size, pad))
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            ms.cache_activations(model, prompts, cfg, root=root, progress=False)
            cache_times.append(time.perf_counter() - t0)
    hf_tps, cache_tps = n_tokens / min(hf_times), n_tokens / min(cache_times)
    print(f"prompts={len(prompts)} tokens={n_tokens} batch_size={args.batch_size} threads={torch.get_num_threads()}")
    print(f"hf_forward_s={[round(t, 2) for t in hf_times]} hf_tokens_per_s={hf_tps:.0f}")
    print(f"cache_s={[round(t, 2) for t in cache_times]} cache_tokens_per_s={cache_tps:.0f} (30 hooks, last+mean, written to disk)")
    print(f"cache_vs_hf_throughput_ratio={cache_tps / hf_tps:.3f}")


if __name__ == "__main__":
    main()
