"""``mechsafe align``: LoRA safety tuning of the embedded model into a refusing test model."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mechsafe.errors import MechsafeError, check_keys


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.align import DEFAULT_OUT

    p = sub.add_parser("align", help="make the safety-tuned test model (LoRA on refusal data)",
                       description="LoRA safety tuning on the bundled TRAIN split (harmful -> refusal, harmless -> the "
                                   "base model's own answer), then base vs aligned evaluation on a held-out split.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model spec (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, help="aligned checkpoint directory (default: %(default)s)")
    p.add_argument("--runs-dir", default="runs", help="folder for run directories (default: %(default)s)")
    p.add_argument("--run-dir", help="use this run directory (resumes a run interrupted there)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --run-dir")
    p.add_argument("--eval-split", default="test", choices=("val", "test"),
                   help="held-out split of the report (tune on val; default: %(default)s)")
    p.add_argument("--eval-limit", type=int, help="evaluate on at most N prompts per pool")
    p.add_argument("--eval-max-new-tokens", type=int, default=48, help="tokens per evaluation response (default: %(default)s)")
    p.add_argument("--no-utility", action="store_true", help="skip the arithmetic and reference-answer NLL metrics")
    p.add_argument("--harmful-limit", type=int, help="use at most N harmful TRAIN prompts (default: all)")
    p.add_argument("--harmless-limit", type=int, help="use at most N harmless TRAIN prompts (default: all)")
    p.add_argument("--answer-prompts", action=argparse.BooleanOptionalAction, default=True,
                   help="also train on the base model's answers to the bundled training-only harmless prompts "
                        "(default: on)")
    p.add_argument("--refusal-prompts", action=argparse.BooleanOptionalAction, default=True,
                   help="also train refusals of the bundled training-only harmful requests (default: on)")
    p.add_argument("--negative-words", type=int, default=1,
                   help="words of the refusal opening that each harmless prompt is trained away from (the unlikelihood "
                        "negative and the preference term's rejected response; default: %(default)s)")
    p.add_argument("--retain-weight", type=float, default=1.0, help="weight of the retain (KL) term; 0: off (default: %(default)s)")
    p.add_argument("--unlikelihood-weight", type=float, default=4.0,
                   help="weight of the unlikelihood term; 0: off (default: %(default)s)")
    p.add_argument("--preference-weight", type=float, default=4.0,
                   help="weight of the preference (DPO) term; 0: off (default: %(default)s)")
    p.add_argument("--answer-tokens", type=int, default=24, help="longest base answer used as a target (default: %(default)s)")
    p.add_argument("--batch-size-generate", type=int, default=32, help="prompts per generation batch (default: %(default)s)")
    p.add_argument("--lora", metavar="JSON", help='overrides of the recipe\'s FinetuneConfig, e.g. \'{"steps": 60, "lr": 3e-4, "layers": "all"}\'')
    p.add_argument("--seed", type=int, default=0)
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
    config = AlignConfig(model=args.model, finetune=recipe, answer_tokens=args.answer_tokens,
                         harmful_limit=args.harmful_limit, harmless_limit=args.harmless_limit,
                         answer_prompts=args.answer_prompts, refusal_prompts=args.refusal_prompts,
                         negative_words=args.negative_words, retain_weight=args.retain_weight,
                         unlikelihood_weight=args.unlikelihood_weight, preference_weight=args.preference_weight,
                         eval_split=args.eval_split, eval_limit=args.eval_limit,
                         eval_max_new_tokens=args.eval_max_new_tokens, utility=not args.no_utility,
                         generate_batch_size=args.batch_size_generate, seed=args.seed)
    result = align(config, out=args.out, runs_dir=args.runs_dir, run_dir=args.run_dir, resume=not args.no_resume,
                   progress=not args.no_progress)
    print(result.report)
    print(f"aligned model: {result.model_path}\nrun directory: {result.run_dir}")
    return 0
