"""``mechsafe prune-study``: Wei et al.'s pruning study (SNIP top, set difference, random, utility control, ActSVD)
on one model, with figures, a table and a verdict computed from the numbers."""

from __future__ import annotations

import argparse

from mechsafe.cli.common import add_config_flags, add_held_out_args, add_model_args, add_runs_arg, config_values, load_held_out


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.snip.config import StudyConfig

    p = sub.add_parser("prune-study", help="does pruning a few %% of safety-critical weights remove refusal while "
                                           "utility holds? (Wei et al., 2024)")
    add_model_args(p)
    p.set_defaults(model="smollm2-135m-aligned")
    add_held_out_args(p)
    p.add_argument("--scores-dir", help="folder of SNIP score stores and study points (default: $MECHSAFE_CACHE/snip)")
    add_config_flags(p.add_argument_group("study (any StudyConfig field)"), StudyConfig)
    add_runs_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe.errors import MechsafeError
    from mechsafe.runs import start_run
    from mechsafe.snip.config import StudyConfig
    from mechsafe.snip.report import plot_study, study_markdown
    from mechsafe.snip.study import run_study

    cfg = StudyConfig(**config_values(StudyConfig, args))
    if args.processing != "none":
        raise MechsafeError("the pruning study edits the model's real weights; load it with --processing none")
    sets = load_held_out(args)
    model = ms.load_model(args.model, processing="none", device=args.device)

    def show(p: dict) -> None:
        if not args.no_progress:
            print(f"  {p['method']:<18} {p['setting']:<7g} refusal share {p['refusal_share']['value']:.3f}  "
                  f"answer NLL {p['answer_nll']['value']:.3f}  ({p['seconds']:.0f} s)", flush=True)

    result = run_study(model, sets["harmful"][0], sets["harmless"][0], cfg, root=args.scores_dir,
                       progress=not args.no_progress, on_point=show)
    result["data"] = {kind: where for kind, (_, where) in sets.items()}
    with start_run(args.runs_dir, "prune-study", config=result["config"], seed=cfg.seed, processing="none") as run:
        run.figure("pruning.png", plot_study(result))
        run.write_json("results.json", result)
        run.write_text("report.md", study_markdown(result))
        run.timings.update(result["timings_s"])
        run.extra.update({"model": result["model"], "data": result["data"]})
    for claim in result["verdict"]["claims"]:
        print(f"{claim['claim']}: {({True: 'holds', False: 'does not hold', None: 'not tested'})[claim['holds']]}")
    print(f"run directory: {run.path}")
    return 0
