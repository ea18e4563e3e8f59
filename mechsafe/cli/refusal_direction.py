"""``mechsafe refusal-direction``: select a refusal direction (Arditi et al., 2024) and save it with its plots."""

from __future__ import annotations

import argparse
import time

from mechsafe.cli.common import add_model_args, add_runs_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refusal-direction", help="difference-in-means refusal direction with Arditi et al.'s selection")
    add_model_args(p)
    p.add_argument("--harmful", default="harmful", help="harmful prompts with train/val splits (default: %(default)s)")
    p.add_argument("--harmless", default="harmless", help="harmless prompts with train/val splits (default: %(default)s)")
    p.add_argument("--positions", type=int, help="post-instruction positions scored, counted from the end (default: all)")
    p.add_argument("--layers", default="all", help="candidate layer selector (default: %(default)s)")
    p.add_argument("--layer-step", type=int, default=2,
                   help="score every k-th candidate layer; 1 is the paper's full sweep (default: %(default)s)")
    p.add_argument("--n-val", type=int, default=32, help="validation prompts per class (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: %(default)s)")
    p.add_argument("--kl-threshold", type=float, default=0.1, help="discard candidates above this KL (default: %(default)s)")
    p.add_argument("--score-all", action="store_true", help="compute KL and steering scores for every candidate")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--no-filter-train", action="store_true",
                   help="use every TRAIN prompt for the means (default: only harmful ones the model refuses and harmless "
                        "ones it answers, by refusal score, as the reference pipeline)")
    p.add_argument("--no-filter-val", action="store_true",
                   help="use every one of the first --n-val VALIDATION prompts (default: filtered like TRAIN)")
    p.add_argument("--keep-sink", action="store_true",
                   help="do not project candidates off the first-position residual (the paper's raw difference in means)")
    add_runs_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe.directions import SelectionConfig, plot_scores, select_refusal_direction
    from mechsafe.runs import start_run

    cfg = SelectionConfig(positions=args.positions, layers=args.layers, layer_step=args.layer_step, n_val=args.n_val,
                          batch_size=args.batch_size, kl_threshold=args.kl_threshold, score_all=args.score_all,
                          system=args.system, orthogonal_to_sink=not args.keep_sink,
                          filter_train=not args.no_filter_train, filter_val=not args.no_filter_val)
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
