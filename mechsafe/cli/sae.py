"""``mechsafe sae``: train (with SAE-Lens), evaluate and inspect sparse autoencoders.

::

    mechsafe sae train sae/smollm2-resid-mid.yaml                      # -> runs/sae/smollm2-resid-mid/
    mechsafe sae train sae/smollm2-resid-mid.yaml --layer 10 --architecture batchtopk --out runs/sae/l10
    mechsafe sae eval runs/sae/smollm2-resid-mid --max-prompts 50
    mechsafe sae inspect runs/sae/smollm2-resid-mid --features 12,40

Every field of the recipe (:class:`mechsafe.sae.SAETrainConfig`) is also an option of ``sae train``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mechsafe.errors import MechsafeError


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.cli.common import add_config_flags
    from mechsafe.sae.config import SAETrainConfig

    p = sub.add_parser("sae", help="train, evaluate and inspect SAEs (SAE-Lens)")
    group = p.add_subparsers(dest="sae_command", metavar="ACTION")

    t = group.add_parser("train", help="train an SAE from a YAML recipe, evaluate it on held-out prompts, save it")
    t.add_argument("recipe", help="YAML recipe, e.g. sae/smollm2-resid-mid.yaml")
    t.add_argument("--out", help="SAE directory to write (default: <runs-dir>/sae/<recipe name>)")
    t.add_argument("--runs-dir", default="runs", help="root of the default output (default: %(default)s)")
    t.add_argument("--activation-root", help="activation-store folder (default: $MECHSAFE_CACHE/activations)")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    overrides = t.add_argument_group("recipe overrides (any SAETrainConfig field)")
    add_config_flags(overrides, SAETrainConfig, dest=lambda name: f"cfg_{name}")
    t.set_defaults(func=run_train)

    e = group.add_parser("eval", help="evaluate a saved SAE on held-out prompts (L0, EV, MSE, dead/dense, CE)")
    e.add_argument("sae", help="SAE directory (or SAE-Lens release/sae_id)")
    _add_model_args(e)
    e.add_argument("--data", default=None, help="prompt set (default: the SAE's eval_data, else harmful_vs_harmless)")
    e.add_argument("--split", default="test", choices=("train", "val", "test"), help="split (default: %(default)s)")
    e.add_argument("--max-prompts", type=int, help="evaluate on at most this many prompts")
    e.add_argument("--runs-dir", default="runs", help="folder for the run directory (default: %(default)s)")
    e.set_defaults(func=run_eval)

    i = group.add_parser("inspect", help="top-activating tokens and logit effects of SAE features, or the latents "
                                         "that fire on a text")
    i.add_argument("sae", help="SAE directory (or SAE-Lens release/sae_id)")
    what = i.add_mutually_exclusive_group(required=True)
    what.add_argument("--features", help="comma list of latent indices, e.g. 12,40")
    what.add_argument("--prompt", metavar="TEXT",
                      help="list the latents that fire on this text (template and system-prompt tokens excluded)")
    _add_model_args(i)
    i.add_argument("--data", default="harmful_vs_harmless", help="prompts to search for top activations (default: %(default)s)")
    i.add_argument("--top", type=int, default=8, help="top activations per feature (default: %(default)s)")
    i.add_argument("--logits", type=int, default=10, help="promoted/suppressed tokens per feature (default: %(default)s)")
    i.add_argument("--activation-root", help="activation store for the top-activation search (default: a temporary "
                                             "folder, removed afterwards)")
    i.add_argument("--runs-dir", default="runs", help="folder for the run directory (default: %(default)s)")
    i.set_defaults(func=run_inspect)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model spec (default: the model the SAE was trained on)")
    parser.add_argument("--processing", choices=("none", "fold"), help="weight processing (default: the SAE's)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def _model_for(args: argparse.Namespace, sae):
    import mechsafe as ms

    meta = sae.metadata
    spec = args.model or (meta.get("model") or {}).get("spec")
    if not spec:
        raise MechsafeError("this SAE does not record its model; pass --model")
    processing = args.processing or meta.get("weight_processing") or "none"
    if processing not in ("none", "fold"):
        processing = "none"
    return ms.load_model(spec, processing=processing, device=args.device)


def run_train(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe.sae import load_recipe, train_sae

    overrides = {k[len("cfg_"):]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    cfg = load_recipe(args.recipe, **overrides)
    out = Path(args.out) if args.out else Path(args.runs_dir) / "sae" / Path(args.recipe).stem
    model = ms.load_model(cfg.model, processing=cfg.processing, device=cfg.device)
    command = "sae train " + args.recipe + "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    result = train_sae(model, cfg, out_dir=out, activation_root=args.activation_root, progress=not args.no_progress,
                       command=command)
    print((result.path / "report.md").read_text(encoding="utf-8"))
    print(f"run directory: {result.path} (the saved SAE)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe.runs import start_run
    from mechsafe.sae import evaluate_sae, load_sae

    sae = load_sae(args.sae, device=args.device)
    model = _model_for(args, sae)
    data = args.data or (sae.metadata.get("training") or {}).get("eval_data") or "harmful_vs_harmless"
    prompts = ms.data.load(data).split(args.split)
    if args.max_prompts:
        prompts = prompts.subset(list(range(min(args.max_prompts, len(prompts)))))
    metrics = evaluate_sae(model, sae, prompts)
    report = (f"# SAE evaluation: `{args.sae}` at `{sae.hook_name}`\n\nData: {data}, split {args.split}, content tokens.\n\n"
              + metrics.markdown())
    with start_run(args.runs_dir, "sae eval", config={"sae": str(args.sae), "data": data, "split": args.split,
                                                      "max_prompts": args.max_prompts},
                   processing=ms.models.model_info(model).processing) as run:
        run.write_json("metrics.json", metrics)
        run.write_text("report.md", report)
    print(report)
    print(f"run directory: {run.path}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    import tempfile

    import mechsafe as ms
    from mechsafe.runs import start_run
    from mechsafe.sae import inspect_features, load_sae
    from mechsafe.sae.inspect import latents_on_text

    features = []
    if args.features is not None:
        try:
            features = [int(f) for f in args.features.split(",") if f.strip()]
        except ValueError:
            raise MechsafeError(f"--features must be a comma list of integers (got {args.features!r})") from None
    if args.top < 1:
        raise MechsafeError(f"--top {args.top} must be at least 1")
    sae = load_sae(args.sae, device=args.device)
    model = _model_for(args, sae)
    if args.prompt is not None:
        found = latents_on_text(model, sae, args.prompt, top=args.top)
        lines = [f"# Latents of `{args.sae}` on a prompt", "", f"Prompt: {args.prompt!r} (its own tokens only).", "",
                 "| latent | max | at token | tokens fired | mean |", "|---:|---:|---|---:|---:|"]
        lines += [f"| {r['latent']} | {r['max']:.3f} | {r['token']!r} | {r['n_tokens']} | {r['mean']:.3f} |" for r in found]
        if not found:
            lines.append("| – | no latent fires on these tokens | | | |")
        results = {"prompt": args.prompt, "latents": found}
    else:
        prompts = ms.data.load(args.data) if args.data else None
        with tempfile.TemporaryDirectory(prefix="mechsafe-inspect-") as scratch:
            reports = inspect_features(model, sae, features, prompts, top_n=args.top, n_logits=args.logits,
                                       activation_root=args.activation_root or scratch)
        lines = [r.markdown() for r in reports]
        results = {"features": [dataclasses.asdict(r) for r in reports]}
    with start_run(args.runs_dir, "sae inspect", config={k: v for k, v in vars(args).items() if k != "func"},
                   processing=ms.models.model_info(model).processing) as run:
        run.write_text("report.md", "\n".join(lines) + "\n")
        run.write_json("results.json", results)
    print("\n".join(lines))
    print(f"run directory: {run.path}")
    return 0
