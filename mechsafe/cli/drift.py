"""``mechsafe drift``: do safety-critical neurons drift more than others during fine-tuning, and does freezing them
stop a harmful fine-tune?"""

from __future__ import annotations

import argparse

from mechsafe.cli.common import add_config_flags, add_held_out_args, add_runs_arg, config_values, load_held_out


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.drift.config import DriftConfig

    p = sub.add_parser("drift", help="safety-neuron drift during benign and harmful fine-tuning, and the freezing "
                                     "experiment")
    p.add_argument("model", nargs="?", default="smollm2-135m-aligned", help="model spec (default: %(default)s)")
    p.add_argument("--base", default="smollm2-135m-instruct",
                   help="unaligned model whose own answers the harmful fine-tune trains on (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    add_held_out_args(p)
    p.add_argument("--groups", metavar="DIR", help="SNIP unit groups: the groups/ folder of a mechsafe snip groups run "
                                                  "(top-safety, top-utility, set-difference, random); default: made "
                                                  "from the model's SNIP scores")
    p.add_argument("--scores-dir", help="folder of SNIP score stores (default: $MECHSAFE_CACHE/snip)")
    p.add_argument("--work-dir", help="folder of finished runs, for resuming (default: under $MECHSAFE_CACHE/drift)")
    add_config_flags(p.add_argument_group("study (any DriftConfig field)"), DriftConfig)
    add_runs_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import mechsafe as ms
    from mechsafe.drift.config import DriftConfig
    from mechsafe.drift.report import markdown, plot_final, plot_freezing, plot_series
    from mechsafe.drift.study import run_study
    from mechsafe.errors import MechsafeError
    from mechsafe.runs import start_run
    from mechsafe.snip.groups import GROUPS, Group

    config = DriftConfig(**config_values(DriftConfig, args))
    sets = load_held_out(args)
    groups = None
    if args.groups:
        groups = {g: Group.load(Path(args.groups) / f"{g}.safetensors") for g in GROUPS}
    model = ms.load_model(args.model, processing="none", device=args.device)
    base = ms.load_model(args.base, processing="none", device=args.device)
    if base.cfg.d_vocab != model.cfg.d_vocab:
        raise MechsafeError("--base has another vocabulary than the model; pass its unaligned base model")
    progress = not args.no_progress
    result = run_study(model, base, sets["harmful"][0], sets["harmless"][0], config, groups=groups,
                       work_dir=args.work_dir, scores_dir=args.scores_dir, progress=progress,
                       on_run=(lambda name: print(f"  finished {name}", flush=True)) if progress else None)
    result["data"] = {kind: where for kind, (_, where) in sets.items()}
    with start_run(args.runs_dir, "drift", config=result["config"], seed=config.seed, processing="none") as run:
        run.figure("drift.png", plot_series(result))
        run.figure("drift-heads.png", plot_series(result, "head"))
        run.figure("final.png", plot_final(result))
        if result["freezing"]:
            run.figure("freezing.png", plot_freezing(result))
        run.write_json("results.json", result)
        run.write_text("report.md", markdown(result))
        run.timings.update(result["timings_s"])
        run.extra.update({"model": result["model"], "data": result["data"]})
    print(f"verdict: {result['verdict']['answer']} ({result['verdict']['reason']})")
    print(f"run directory: {run.path}")
    return 0
