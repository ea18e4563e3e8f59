"""SNIP scoring vs plain forward passes on the same batches of the embedded model, and scoring's peak memory.

The batches are ``--batches`` batches of ``--batch-size`` teacher-forced sequences of ``--tokens`` tokens (harmful
TRAIN prompts with bundled refusals filling the length): by default 128 pairs, the reference's number of scoring
samples, so the fixed costs (hashing the weights, writing the scores) weigh as they do in a real run. The reference is a
forward pass over each batch without gradients (``torch.inference_mode``); SNIP scoring
(:func:`mechsafe.snip.compute_scores`, every block weight in one pass) runs a forward and a backward per batch and
adds ``|∇|`` into its sums, with the default settings (two pairs per forward/backward pass, the batch's gradient
summed over its pairs before the absolute value). Each is timed ``--repeats`` times, alternating; the fastest of
each is compared. Resident memory is sampled every 5 ms while scoring; its peak, less what the process held before
the model was loaded (the interpreter and its libraries), is what scoring needs: the model, the score sums, one
batch's gradient and one pass's activations. It is divided by the model's parameter bytes (the absolute peak is
printed too).

Last lines: ``snip_vs_forward_ratio=<x>`` (target <= 3.5) and ``snip_peak_rss_over_param_bytes=<y>`` (target <= 4).

    python benchmarks/bench_snip.py [--batches 16] [--batch-size 8] [--tokens 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import torch

import mechsafe as ms
from mechsafe.data import prompt_pool, refusals
from mechsafe.forward import collate, encode_examples
from mechsafe.snip import ScoreConfig, compute_scores
from mechsafe.snip.scores import batches


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The largest resident set size seen while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=ScoreConfig.micro_batch,
                        help="pairs per forward/backward pass (default: ScoreConfig's, %(default)s)")
    args = parser.parse_args()

    baseline = rss_bytes()
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    n = args.batches * args.batch_size
    filler = " ".join(refusals()[:8])
    examples = [(p["text"], filler) for p in prompt_pool("harmful", "train")[:n]]
    seqs = encode_examples(model.tokenizer, examples, max_length=args.tokens)
    assert all(len(s) == args.tokens for s in seqs), "raise the filler: a sequence is shorter than --tokens"
    config = ScoreConfig(data="bench", batch_size=args.batch_size, micro_batch=args.micro_batch, max_length=args.tokens)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in batches(seqs, args.batch_size):
                model(collate(batch, 0)[0])
        return time.perf_counter() - t0

    def score() -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as root, PeakRSS() as peak:
            t0 = time.perf_counter()
            compute_scores(model, examples, config, root=root, progress=False)
            return time.perf_counter() - t0, peak.peak

    forward()  # warm-up
    fwd, snip, peaks = [], [], []
    for _ in range(args.repeats):
        fwd.append(forward())
        seconds, peak = score()
        snip.append(seconds)
        peaks.append(peak)
    print(f"batches={args.batches} batch_size={args.batch_size} micro_batch={args.micro_batch} tokens={args.tokens} "
          f"threads={torch.get_num_threads()} "
          f"param_bytes={param_bytes} rss_before_model_bytes={baseline}")
    print(f"forward_s={[round(t, 2) for t in fwd]} snip_s={[round(t, 2) for t in snip]} "
          f"peak_rss_bytes={peaks}")
    print(f"snip_vs_forward_ratio={min(snip) / min(fwd):.3f}")
    print(f"snip_peak_rss_absolute_over_param_bytes={max(peaks) / param_bytes:.3f}")
    print(f"snip_peak_rss_over_param_bytes={(max(peaks) - baseline) / param_bytes:.3f}")


if __name__ == "__main__":
    main()
