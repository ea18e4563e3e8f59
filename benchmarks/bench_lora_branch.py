"""LoRA training pass time: mechsafe's low-rank branch vs PEFT's parameter LoRA (``target_parameters``).

mechsafe's :class:`~mechsafe.finetune.lora.TransformerLensLora` runs each module with its frozen weights and
adds ``scale * (x @ A.T) @ B.T`` at the weight's hook point; the backward pass then needs the input gradient
and two small factor gradients. PEFT's ``LoraConfig(target_parameters=...)`` (``lora.ParamWrapper``, the path
mechsafe used for MLP weights before) forms ``W + scale * B @ A`` at every forward pass, and its backward pass
computes a full weight-sized gradient of that sum. The reference is PEFT's path, built here on the same model
in the same run. PEFT's parameter LoRA cannot adapt TransformerLens attention (keyword-only calls), so both
adapt the MLP weights of the align recipe (``mlp.W_in``, ``W_gate``, ``W_out`` of layers 6-29, rank 8).

The workload is one forward and backward pass of an align-shaped micro-batch: ``--batch-size`` harmful TRAIN
prompts with bundled refusals, teacher-forced, response NLL. Both adapters start as the identity, so both
losses must equal the base model's. Each path runs ``--repeats`` times, alternating, ``--iters`` passes each;
a run's time is the median pass after the first, and the fastest run of each is compared. The last line is
``branch_vs_parameter_lora_speedup=<x>`` (above 1: the branch is faster).

    python benchmarks/bench_lora_branch.py [--repeats 3] [--iters 5] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import mechsafe as ms
from mechsafe import chat
from mechsafe.align import assign_refusals, default_finetune_config
from mechsafe.data import prompt_pool
from mechsafe.finetune import attach_lora
from mechsafe.forward import collate, encode_examples, masked_nll
from mechsafe.hooks import parse_layers

TARGETS = ("mlp.W_in", "mlp.W_gate", "mlp.W_out")


def parameter_lora(model, config):
    """PEFT's own parameter LoRA on the MLP weights (the reference)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    layers = parse_layers(config.layers, model.cfg.n_layers)
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=[],
                             target_parameters=[f"blocks.{i}.{t}" for i in layers for t in TARGETS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoraModel(model, peft_config, "default")


def run(path: str, tokens, mask, iters: int) -> tuple[float, float]:
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    config = default_finetune_config()
    config.targets = TARGETS
    (attach_lora if path == "branch" else parameter_lora)(model, config)
    model.train()
    times, loss = [], None
    for _ in range(iters):
        t0 = time.perf_counter()
        loss = masked_nll(model, tokens, mask).sum() / mask.sum()
        loss.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    base = ms.load_model("smollm2-135m-instruct", processing="none")
    prompts = [p["text"] for p in prompt_pool("harmful", "train")][: args.batch_size]
    seqs = encode_examples(base.tokenizer, list(zip(prompts, assign_refusals(len(prompts)))), max_length=128)
    tokens, mask = collate(seqs, chat.pad_id(base.tokenizer))
    with torch.no_grad():
        base_loss = float(masked_nll(base, tokens, mask).sum() / mask.sum())
    del base
    times: dict[str, list[float]] = {"parameter_lora": [], "branch": []}
    losses = {}
    for _ in range(args.repeats):
        for path in times:
            pass_s, losses[path] = run(path, tokens, mask, args.iters)
            times[path].append(pass_s)
    gap = max(abs(v - base_loss) for v in losses.values())
    print(f"batch_size={args.batch_size} tokens={tokens.numel()} threads={torch.get_num_threads()} "
          f"max_loss_gap_to_base={gap:.2e}")
    for name, ts in times.items():
        print(f"{name}_pass_s={[round(t, 3) for t in ts]}")
    print(f"branch_vs_parameter_lora_speedup={min(times['parameter_lora']) / min(times['branch']):.3f}")


if __name__ == "__main__":
    main()
