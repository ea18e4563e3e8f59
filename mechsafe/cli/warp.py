"""``mechsafe warp``: safety-protected fine-tuning (WaRP) and its comparison against peers.

::

    mechsafe warp basis --model smollm2-135m-aligned --layer-types ffn_down --layers all
    mechsafe warp importance --model smollm2-135m-aligned --basis-dir DIR --keep-ratio 0.1 --masks masks.safetensors
    mechsafe warp train --model smollm2-135m-aligned --basis-dir DIR --masks masks.safetensors --out runs/warp-model
    mechsafe warp compare smollm2-135m-aligned --base smollm2-135m-instruct

Every field of :class:`mechsafe.warp.WarpConfig` (and, for ``compare``, :class:`mechsafe.warp.CompareConfig`) is a
flag.
"""

from __future__ import annotations

import argparse

from mechsafe.cli.common import (add_config_flags, add_held_out_args, add_model_args, add_runs_arg, config_values,
                                 load_held_out)

_COMPARE_SKIP = ("batch_size", "seed", "checkpoint_every")
"""WarpConfig fields ``compare`` leaves at their defaults (CompareConfig has its own batch size and seed)."""


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.warp.config import CompareConfig, WarpConfig

    p = sub.add_parser("warp", help="WaRP safety-protected fine-tuning: basis, importance masks, protected training, "
                                    "and the comparison against full fine-tuning, LoRA, SafeLoRA and masking")
    actions = p.add_subparsers(dest="warp_command", metavar="ACTION")

    b = actions.add_parser("basis", help="phase 1: eigenbasis of each protected weight's input covariance on safety data")
    add_model_args(b, processing="none")
    b.add_argument("--out", metavar="DIR", help="basis folder (default: under $MECHSAFE_CACHE/warp)")
    add_config_flags(b.add_argument_group("WaRP (any WarpConfig field)"), WarpConfig)
    add_runs_arg(b)
    b.set_defaults(func=run_basis)

    i = actions.add_parser("importance", help="phase 2: importance of the rotated coefficients and the masks of the "
                                              "top keep_ratio")
    add_model_args(i, processing="none")
    i.add_argument("--basis-dir", metavar="DIR", required=True, help="a basis folder from mechsafe warp basis")
    i.add_argument("--masks", metavar="FILE", required=True, help="where to write the masks (.safetensors)")
    add_config_flags(i.add_argument_group("WaRP (any WarpConfig field)"), WarpConfig)
    add_runs_arg(i)
    i.set_defaults(func=run_importance)

    t = actions.add_parser("train", help="phase 3: fine-tune on a utility task with the masked coefficients frozen; "
                                         "saves a checkpoint load_model reads")
    add_model_args(t, processing="none")
    t.add_argument("--basis-dir", metavar="DIR", required=True, help="a basis folder from mechsafe warp basis")
    t.add_argument("--masks", metavar="FILE", required=True, help="a mask file from mechsafe warp importance")
    t.add_argument("--out", metavar="DIR", required=True, help="checkpoint folder to write (a killed run resumes from "
                                                               "the trainer checkpoints in DIR.work)")
    for field in ("task", "n_train", "steps", "batch_size", "lr", "seed"):
        flag = "--" + field.replace("_", "-")
        t.add_argument(flag, default=getattr(CompareConfig, field), type=type(getattr(CompareConfig, field)),
                       help=f"as CompareConfig.{field} (default: %(default)s)")
    add_runs_arg(t)
    t.set_defaults(func=run_train)

    c = actions.add_parser("compare", help="WaRP against full fine-tuning, LoRA, SafeLoRA and original-space masking: "
                                           "safety, utility and the cost to break each result")
    c.add_argument("model", nargs="?", default="smollm2-135m-aligned", help="model spec (default: %(default)s)")
    c.add_argument("--base", default="smollm2-135m-instruct",
                   help="the unaligned model the model was aligned from: SafeLoRA's W_base and the attack's harmful "
                        "answers (default: %(default)s)")
    c.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    add_held_out_args(c)
    c.add_argument("--work-dir", help="folder of finished runs, for resuming (default: under $MECHSAFE_CACHE/warp)")
    add_config_flags(c.add_argument_group("comparison (any CompareConfig field)"), CompareConfig)
    add_config_flags(c.add_argument_group("WaRP (any WarpConfig field but batch_size, seed, checkpoint_every)"),
                     WarpConfig, skip=_COMPARE_SKIP)
    add_runs_arg(c)
    c.set_defaults(func=run_compare_cmd)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _model(args: argparse.Namespace):
    import mechsafe as ms
    from mechsafe.errors import MechsafeError

    if args.processing != "none":
        raise MechsafeError("WaRP refers to the model's real weights; load it with --processing none")
    return ms.load_model(args.model, processing="none", device=args.device)


def run_basis(args: argparse.Namespace) -> int:
    from mechsafe.runs import start_run
    from mechsafe.warp import WarpConfig, compute_basis

    config = WarpConfig(**config_values(WarpConfig, args))
    model = _model(args)
    basis = compute_basis(model, config, args.out, progress=not args.no_progress)
    m = basis.manifest
    with start_run(args.runs_dir, "warp-basis", config=m["config"], seed=config.seed, processing="none") as run:
        run.write_json("basis.json", {k: m[k] for k in ("weights", "data", "n_sequences", "n_tokens", "spectra")}
                       | {"path": str(basis.path)})
    print(f"basis of {len(m['weights'])} weights from {m['n_tokens']} tokens ({m['data']}): {basis.path}")
    print(f"run directory: {run.path}")
    return 0


def run_importance(args: argparse.Namespace) -> int:
    from mechsafe.runs import start_run
    from mechsafe.warp import Basis, WarpConfig, compute_importance, make_masks, protected_weights, save_masks
    from mechsafe.warp.basis import safety_sequences
    from mechsafe.warp.importance import mask_meta

    config = WarpConfig(**config_values(WarpConfig, args))
    model = _model(args)
    basis = Basis.open(args.basis_dir)
    basis.check(model, protected_weights(model, config))
    seqs, _ = safety_sequences(model, config, progress=not args.no_progress)
    importance = compute_importance(model, basis, seqs, config, progress=not args.no_progress)
    masks = make_masks(importance, config.keep_ratio, config.quantile, config.granularity)
    path = save_masks(args.masks, masks, mask_meta(basis, config))
    frozen = {n: float(m.float().mean()) for n, m in masks.items()}
    with start_run(args.runs_dir, "warp-importance", config=config, seed=config.seed, processing="none") as run:
        run.write_json("masks.json", {"masks": str(path), "basis": str(basis.path), "frozen_share": frozen})
    print(f"froze {sum(int(m.sum()) for m in masks.values())} of {sum(m.numel() for m in masks.values())} rotated "
          f"coefficients ({config.keep_ratio:g}): {path}")
    print(f"run directory: {run.path}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from mechsafe.finetune import FinetuneConfig
    from mechsafe.models import save_model
    from mechsafe.runs import start_run
    from mechsafe.warp import Basis, load_masks, protected_finetune
    from mechsafe.warp.importance import check_masks
    from mechsafe.warp.task import task_utility, training_pairs, utility_problems

    model = _model(args)
    basis = Basis.open(args.basis_dir)
    masks, meta = load_masks(args.masks)
    check_masks(masks, meta, basis)
    train, test, where = utility_problems(args.task, args.n_train, 100, args.seed)
    config = FinetuneConfig(lr=args.lr, steps=args.steps, batch_size=args.batch_size, seed=args.seed, checkpoint_every=5)
    work = Path(args.out).with_name(Path(args.out).name + ".work")  # trainer checkpoints: a killed run resumes
    with start_run(args.runs_dir, "warp-train", config={"finetune": config.to_dict(), "task": where,
                                                        "basis": str(basis.path), "masks": args.masks},
                   seed=args.seed, processing="none") as run:
        before = task_utility(model, test)
        result = protected_finetune(model, training_pairs(train), basis, masks, config, run_dir=work,
                                    progress=not args.no_progress)
        after = task_utility(model, test)
        out = save_model(model, args.out, warp_basis=str(basis.path), warp_masks=str(args.masks), task=where)
        run.write_json("results.json", {"before": before, "after": after, "losses": result.losses, "checkpoint": str(out),
                                        "resumed_from": result.resumed_from})
    shutil.rmtree(work, ignore_errors=True)
    print(f"accuracy on 100 held-out problems: {before['accuracy']['value']:.3f} -> {after['accuracy']['value']:.3f}")
    print(f"checkpoint: {out}")
    print(f"run directory: {run.path}")
    return 0


def run_compare_cmd(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe.runs import start_run
    from mechsafe.warp.compare import run_compare
    from mechsafe.warp.config import CompareConfig, WarpConfig
    from mechsafe.warp.report import markdown, plot_keep_ratio, plot_pareto

    config = CompareConfig(**config_values(CompareConfig, args))
    warp = WarpConfig(**config_values(WarpConfig, args))
    sets = load_held_out(args)
    model = ms.load_model(args.model, processing="none", device=args.device)
    base = ms.load_model(args.base, processing="none", device=args.device)
    progress = not args.no_progress
    result = run_compare(model, base, sets["harmful"][0], sets["harmless"][0], warp, config, work_dir=args.work_dir,
                         progress=progress, on_run=(lambda name: print(f"  finished {name}", flush=True)) if progress else None)
    result["data"] = {kind: where for kind, (_, where) in sets.items()}
    with start_run(args.runs_dir, "warp-compare", config={"compare": result["config"], "warp": result["warp"]},
                   seed=config.seed, processing="none") as run:
        run.figure("pareto.png", plot_pareto(result))
        run.figure("keep-ratio.png", plot_keep_ratio(result))
        run.write_json("results.json", result)
        run.write_text("report.md", markdown(result))
        run.timings.update(result["timings_s"])
    print(f"published ordering: {result['verdict']['answer']} ({result['verdict']['reason']})")
    print(f"run directory: {run.path}")
    return 0
