"""``mechsafe refusal-direction``: select a refusal direction (Arditi et al., 2024) and save it with its plots."""

from __future__ import annotations

import argparse
import time

from mechsafe.cli.common import add_config_flags, add_model_args, add_runs_arg, config_values


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.directions import SelectionConfig

    p = sub.add_parser("refusal-direction", help="difference-in-means refusal direction with Arditi et al.'s selection")
    add_model_args(p)
    p.add_argument("--harmful", default="harmful", help="harmful prompts with train/val splits (default: %(default)s)")
    p.add_argument("--harmless", default="harmless", help="harmless prompts with train/val splits (default: %(default)s)")
    selection = p.add_argument_group("selection (any SelectionConfig field; --no-orthogonal-to-sink keeps the paper's "
                                     "raw difference in means)")
    add_config_flags(selection, SelectionConfig)
    add_runs_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe.directions import SelectionConfig, plot_scores, select_refusal_direction
    from mechsafe.runs import start_run

    cfg = SelectionConfig(**config_values(SelectionConfig, args))
    harmful, harmless = ms.data.load(args.harmful), ms.data.load(args.harmless)
    t0 = time.perf_counter()
    model = ms.load_model(args.model, processing=args.processing, device=args.device)
    t_load = time.perf_counter() - t0
    result = select_refusal_direction(model, harmful, harmless, config=cfg, progress=not args.no_progress)
    result.meta["data"] = {"harmful": harmful.fingerprint(), "harmless": harmless.fingerprint()}
    chosen = next(s for s in result.scores if s["layer"] == result.layer and s["position"] == result.position)
    summary = (f"layer {result.layer}, position {result.position}: ablation score {chosen['ablation_score']:.3f} "
               f"(baseline harmful {result.baseline['harmful']:.3f}), steering score {chosen['steering_score']:.3f} "
               f"(baseline harmless {result.baseline['harmless']:.3f}), KL {chosen['kl']:.4f}; {result.meta['outcome']}")
    with start_run(args.runs_dir, "refusal-direction", config=result.meta["config"],
                   processing=args.processing) as run:
        result.save(run.tmp / "direction")
        plot_scores(result, run.tmp / "scores.png")
        rows = ["| position | layer | ablation score | steering score | KL | outcome |", "|---|---|---|---|---|---|"]
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        for s in sorted(result.scores, key=lambda s: (s["position"], s["layer"])):
            rows.append(f"| {s['position']} | {s['layer']} | {fmt(s['ablation_score'], '.3f')} | "
                        f"{fmt(s['steering_score'], '.3f')} | {fmt(s['kl'], '.4f')} | "
                        f"{'kept' if s['kept'] else (s['reason'] or 'not needed (lazy)')} |")
        report = [f"# Refusal direction of `{result.meta['model']}`", "", f"Selected: {summary}.", "",
                  "![scores](scores.png)", "", "\n".join(rows)]
        run.write_text("report.md", "\n".join(report) + "\n")
        run.timings.update({"load": t_load, **result.meta["timings_s"]})
        run.extra.update({"model": ms.models.model_info(model).to_dict(), "data": result.meta["data"]})
    print(f"refusal direction: {summary}")
    print(f"run directory: {run.path}")
    return 0
