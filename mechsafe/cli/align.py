"""``mechsafe align``: LoRA safety tuning of the embedded model into a refusing test model."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mechsafe.cli.common import add_config_flags, config_values
from mechsafe.errors import MechsafeError, check_keys


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.align import DEFAULT_OUT, AlignConfig

    p = sub.add_parser("align", help="make the safety-tuned test model (LoRA on refusal data)",
                       description="LoRA safety tuning on the bundled TRAIN split (harmful -> refusal, harmless -> the "
                                   "base model's own answer), then base vs aligned evaluation on a held-out split.")
    p.add_argument("--out", default=DEFAULT_OUT, help="aligned checkpoint directory (default: %(default)s)")
    p.add_argument("--runs-dir", default="runs", help="folder for run directories (default: %(default)s)")
    p.add_argument("--run-dir", help="use this run directory (resumes a run interrupted there)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --run-dir")
    recipe = p.add_argument_group("recipe (any AlignConfig field; defaults: the default recipe)")
    add_config_flags(recipe, AlignConfig, skip=("finetune",))
    p.add_argument("--lora", metavar="JSON", help='overrides of the recipe\'s FinetuneConfig, e.g. \'{"steps": 60, "lr": 3e-4, "layers": "all"}\'')
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a machine shared with other jobs)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mechsafe.align import AlignConfig, align, default_finetune_config

    if args.threads is not None:
        if args.threads < 1:
            raise MechsafeError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    recipe = dataclasses.asdict(default_finetune_config())
    if args.lora:
        try:
            overrides = json.loads(args.lora)
        except json.JSONDecodeError as exc:
            raise MechsafeError(f"--lora is not valid JSON ({exc.msg}); write e.g. '{{\"steps\": 60}}'") from None
        if not isinstance(overrides, dict):
            raise MechsafeError("--lora must be a JSON object of FinetuneConfig fields")
        check_keys(overrides, recipe, "--lora field")
        if "steps" in overrides and "epochs" not in overrides:
            recipe["epochs"] = None
        if "epochs" in overrides and "steps" not in overrides:
            recipe["steps"] = None
        recipe.update(overrides)
    config = AlignConfig(**config_values(AlignConfig, args), finetune=recipe)
    result = align(config, out=args.out, runs_dir=args.runs_dir, run_dir=args.run_dir, resume=not args.no_resume,
                   progress=not args.no_progress, device=args.device)
    print(result.report)
    print(f"aligned model: {result.model_path}\nrun directory: {result.run_dir}")
    return 0
