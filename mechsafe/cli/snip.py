"""``mechsafe snip``: SNIP scores of a model's weights (Wei et al., 2024) and its safety-critical groups.

::

    mechsafe snip score --model smollm2-135m-aligned --data safety-short
    mechsafe snip score --model smollm2-135m-aligned --data utility
    torchrun --nproc-per-node 2 -m mechsafe snip score --model smollm2-135m-aligned   # data parallel
    mechsafe snip groups --model smollm2-135m-aligned --safety-q 0.03 --utility-p 0.03 --granularity unit

Every field of :class:`mechsafe.snip.ScoreConfig` / :class:`mechsafe.snip.GroupConfig` is a flag.
"""

from __future__ import annotations

import argparse

from mechsafe.cli.common import add_config_flags, add_model_args, add_runs_arg, config_values

SCORES_HELP = "folder of SNIP score stores (default: $MECHSAFE_CACHE/snip)"


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.snip.config import GroupConfig, ScoreConfig

    p = sub.add_parser("snip", help="SNIP scores of weights and safety-critical neuron/weight groups (Wei et al., 2024)")
    actions = p.add_subparsers(dest="snip_command", metavar="ACTION")

    s = actions.add_parser("score", help="|W| * sum over batches of |dL/dW| on safety, utility or your own data")
    add_model_args(s)
    s.add_argument("--scores-dir", help=SCORES_HELP)
    add_config_flags(s.add_argument_group("scoring (any ScoreConfig field)"), ScoreConfig)
    add_runs_arg(s)
    s.set_defaults(func=run_score)

    g = actions.add_parser("groups", help="top-safety, top-utility, set-difference and random groups, saved as ids and "
                                          "weight masks")
    add_model_args(g)
    g.add_argument("--safety-scores", metavar="DIR", help="a safety score store (default: score safety-short data)")
    g.add_argument("--utility-scores", metavar="DIR", help="a utility score store (default: score utility data)")
    g.add_argument("--scores-dir", help=SCORES_HELP)
    add_config_flags(g.add_argument_group("groups (any GroupConfig field)"), GroupConfig)
    add_runs_arg(g)
    g.set_defaults(func=run_groups)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _load(args: argparse.Namespace):
    import mechsafe as ms

    if args.processing != "none":
        from mechsafe.errors import MechsafeError

        raise MechsafeError("SNIP scores refer to the model's real weights; load it with --processing none")
    return ms.load_model(args.model, processing=args.processing, device=args.device)


def _plot_totals(store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = store.totals()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for kind in store.kinds:
        ax.plot(store.layers, [totals[layer][kind] for layer in store.layers], marker=".", label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("summed SNIP score")
    ax.set_yscale("log")
    ax.set_title(f"SNIP scores by block and weight kind ({store.data})", fontsize=10)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig, totals


def run_score(args: argparse.Namespace) -> int:
    from mechsafe import distributed
    from mechsafe.models import model_info
    from mechsafe.runs import start_run
    from mechsafe.snip import ScoreConfig, score

    cfg = ScoreConfig(**config_values(ScoreConfig, args))
    distributed.init_from_env(args.device)
    model = _load(args)
    rank = distributed.rank()
    try:
        store = score(model, cfg, root=args.scores_dir, progress=not args.no_progress and rank == 0)
    finally:
        distributed.shutdown()
    if rank != 0:
        return 0
    with start_run(args.runs_dir, "snip score", config=store.manifest["config"], seed=cfg.seed,
                   processing=args.processing) as run:
        fig, totals = _plot_totals(store)
        run.figure("scores.png", fig)
        run.write_json("scores.json", {**store.manifest, "path": str(store.path), "totals": totals})
        rows = ["| block | " + " | ".join(store.kinds) + " |", "|---" * (len(store.kinds) + 1) + "|"]
        rows += [f"| {layer} | " + " | ".join(f"{totals[layer][k]:.4g}" for k in store.kinds) + " |"
                 for layer in store.layers]
        m = store.manifest
        run.write_text("report.md", "\n".join([
            f"# SNIP scores of `{m['model']['spec']}` on {cfg.data}", "",
            f"{m['definition']}; {m['description']}, {m['n_response_tokens']} scored response tokens in "
            f"{m['n_batches']} batches of up to {cfg.batch_size}.", "", f"Scores: `{store.path}`", "",
            "![scores](scores.png)", "", "Summed score per block and kind:", "", *rows, ""]))
        run.extra.update({"model": model_info(model).to_dict(), "scores": str(store.path)})
    print(f"SNIP scores ({cfg.data}): {store.path}")
    print(f"run directory: {run.path}")
    return 0


def run_groups(args: argparse.Namespace) -> int:
    from mechsafe.models import model_info
    from mechsafe.runs import start_run
    from mechsafe.snip import GroupConfig, ScoreStore, groups

    cfg = GroupConfig(**config_values(GroupConfig, args))
    safety = ScoreStore.open(args.safety_scores) if args.safety_scores else None
    utility = ScoreStore.open(args.utility_scores) if args.utility_scores else None
    model = _load(args)
    made = groups(model, cfg, safety, utility, root=args.scores_dir, progress=not args.no_progress)
    with start_run(args.runs_dir, "snip groups", config=made["set-difference"].meta, seed=cfg.seed,
                   processing=args.processing) as run:
        rows = ["| group | what | weights | sparsity | units |", "|---|---|---|---|---|"]
        for name, group in made.items():
            group.save(run.tmp / "groups")
            units = "" if group.units is None else str(len(group.units))
            rows.append(f"| {name} | {group.meta['description']} | {group.n_selected:,} | {group.sparsity:.3%} | {units} |")
        run.write_text("report.md", "\n".join([f"# SNIP groups of `{model_info(model).spec}` ({cfg.granularity})", "",
                                               *rows, "", "Masks: `groups/<group>.safetensors`; ids and counts: "
                                               "`groups/<group>.json`.", ""]))
        run.extra.update({"model": model_info(model).to_dict()})
    for line in rows[2:]:
        print(line)
    print(f"run directory: {run.path}")
    return 0
