"""WaRP's costs on the embedded model: a protected fine-tuning step against a plain one, and the basis against a
forward pass.

* ``warp_vs_full_step_ratio``: median seconds of a WaRP phase-3 step (the comparison's defaults: ``W_out`` of every
  block in the covariance basis, keep ratio 0.1, gradients and updates projected) over that of a plain
  full-parameter step (every weight), on the same batches of arithmetic problems (target <= 1.5). Both runs are
  repeated and the smaller median kept, so a stray slow step of one run does not decide the ratio.
* ``basis_vs_forward_ratio``: phase 1 (the streaming float64 covariance of every protected weight's input and its
  eigendecomposition) over one forward pass over the same safety sequences.

    python benchmarks/bench_warp.py [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import mechsafe as ms
from mechsafe.chat import pad_id
from mechsafe.data.arithmetic import arithmetic_problems
from mechsafe.finetune import FinetuneConfig, finetune
from mechsafe.forward import collate, eval_mode
from mechsafe.snip.scores import batches
from mechsafe.warp import CompareConfig, WarpConfig, compute_basis, compute_importance, make_masks, protected_finetune
from mechsafe.warp.basis import safety_sequences
from mechsafe.warp.task import training_pairs


def step_seconds(run, steps: int) -> float:
    """Median seconds between consecutive callbacks (one per step), leaving out the first step."""
    stamps: list[float] = []
    run(lambda step, m: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps[1:-1], stamps[2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    compare = CompareConfig()
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    warp = WarpConfig(responses="bundled")
    seqs, _ = safety_sequences(model, warp, progress=False)

    with eval_mode(model), torch.no_grad():
        t0 = time.perf_counter()
        for batch in batches(seqs, warp.batch_size):
            model(collate(batch, pad_id(model.tokenizer))[0], return_type=None)
        forward = time.perf_counter() - t0
    folder = tempfile.mkdtemp(prefix="bench-warp-")
    t0 = time.perf_counter()
    basis = compute_basis(model, warp, folder, seqs=seqs, progress=False)
    basis_s = time.perf_counter() - t0
    masks = make_masks(compute_importance(model, basis, seqs, warp, progress=False), warp.keep_ratio)

    pairs = training_pairs(arithmetic_problems(compare.batch_size * (args.steps + 1), "train"))
    ft = FinetuneConfig(lr=compare.lr, steps=args.steps, batch_size=compare.batch_size, checkpoint_every=0)

    def restore() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(clean[n])

    def full(cb):
        finetune(model, pairs, FinetuneConfig(**{**ft.to_dict(), "method": "full"}), progress=False, callback=cb)
        restore()

    def protected(cb):
        protected_finetune(model, pairs, basis, masks, ft, progress=False, callback=cb)
        restore()

    full_s = min(step_seconds(full, args.steps) for _ in range(2))
    warp_s = min(step_seconds(protected, args.steps) for _ in range(2))
    print(f"full_step_s={full_s:.3f}")
    print(f"warp_step_s={warp_s:.3f}")
    print(f"warp_vs_full_step_ratio={warp_s / full_s:.3f}")
    print(f"basis_s={basis_s:.2f}")
    print(f"forward_s={forward:.2f}")
    print(f"basis_vs_forward_ratio={basis_s / forward:.3f}")


if __name__ == "__main__":
    main()
