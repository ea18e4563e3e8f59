"""``mechsafe attack``: what it costs to remove a model's safety, under a stated threat model (the attack bench)."""

from __future__ import annotations

import argparse

from mechsafe.cli.common import add_config_flags, add_held_out_args, add_runs_arg, config_values, load_held_out


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.attacks.config import BenchConfig, ThreatModel

    p = sub.add_parser("attack", help="sweep attacks (fine-tuning, direction ablation, pruning, prefill) and report "
                                      "the cost to break a model's safety")
    p.add_argument("model", nargs="?", default="smollm2-135m-aligned", help="model spec (default: %(default)s)")
    p.add_argument("--base", default="smollm2-135m-instruct",
                   help="unaligned model whose own answers the harmful fine-tuning attacks train on (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    add_held_out_args(p)
    p.add_argument("--attack-requests", metavar="FILE", help="harmful requests to train on (default: the bundled "
                                                            "training prompts)")
    p.add_argument("--attack-requests-column", metavar="COLUMN", help="text column of --attack-requests")
    p.add_argument("--budget", dest="budget_flops", type=float, default=argparse.SUPPRESS,
                   help="stop each fine-tuning trial after this many FLOPs")
    add_config_flags(p.add_argument_group("sweep (any BenchConfig field)"), BenchConfig, skip=("budget_flops",))
    add_config_flags(p.add_argument_group("threat model (any ThreatModel field)"), ThreatModel)
    p.add_argument("--work-dir", help="folder of finished trials, for resuming (default: under $MECHSAFE_CACHE/attacks)")
    add_runs_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe.attacks.bench import align_build_flops, run_bench
    from mechsafe.attacks.config import BenchConfig, ThreatModel
    from mechsafe.attacks.data import harmful_requests
    from mechsafe.attacks.report import bench_markdown, plot_curves
    from mechsafe.errors import MechsafeError
    from mechsafe.runs import start_run

    config = BenchConfig(**config_values(BenchConfig, args))
    threat = ThreatModel(**config_values(ThreatModel, args))
    sets = load_held_out(args)
    requests = harmful_requests(args.attack_requests, args.attack_requests_column) if args.attack_requests else None
    model = ms.load_model(args.model, processing="none", device=args.device)
    needs_base = any(a.startswith("harmful-") for a in config.attacks)
    base = ms.load_model(args.base, processing="none", device=args.device) if needs_base else None
    if base is not None and base.cfg.d_vocab != model.cfg.d_vocab:
        raise MechsafeError("--base has another vocabulary than the attacked model; pass its unaligned base model")
    result = run_bench(model, base, sets["harmful"][0], sets["harmless"][0], config, threat, work_dir=args.work_dir,
                       progress=not args.no_progress, attack_requests=requests)
    if base is not None:
        result["build_flops"] = align_build_flops(model, base)
    result["data"] = {kind: where for kind, (_, where) in sets.items()}
    with start_run(args.runs_dir, "attack", config=result["config"], seed=config.seed, processing="none") as run:
        run.figure("curves.png", plot_curves(result))
        run.write_json("results.json", result)
        run.write_text("report.md", bench_markdown(result))
        run.extra.update({"model": result["model"], "threat": result["threat"], "data": result["data"]})
    for attack, s in result["summary"].items():
        c = s["cost_to_break"]
        print(f"{attack:<14} " + ("not broken" if c is None else f"broken at {c['flops']:.3g} FLOPs (step {c['step']})"))
    print(f"run directory: {run.path}")
    return 0
