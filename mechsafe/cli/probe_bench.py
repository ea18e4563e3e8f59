"""``mechsafe probe bench`` (run a probe benchmark preset) and ``mechsafe probe score`` (apply a saved probe); the
older names ``probe-bench`` and ``probe-score`` still work.

Every field of :class:`mechsafe.probes.ProbeBenchConfig` is also a flag that overrides the preset::

    mechsafe probe-bench probes/harmful_vs_harmless.yaml --layers 10-20 --pooling mean --seed 1
    mechsafe probe-bench --data my.jsonl --text-column prompt --label-column y --layers middle
    mechsafe probe-score runs/probe-bench-.../probe-dense-last.safetensors "prompt one" "prompt two"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mechsafe.cli.common import add_config_flags, add_data_args, add_runs_arg, config_values, data_kwargs
from mechsafe.errors import MechsafeError

_DATA_FIELDS = ("data", "text_column", "label_column", "label_map", "group_column")
_OOD_FLAGS = {"ood_train_groups": "train_groups", "ood_test_groups": "test_groups", "ood_test_data": "test_data"}


def register(sub: argparse._SubParsersAction) -> None:
    """``mechsafe probe bench|score`` (like ``sae train|eval|inspect``), also reachable as ``probe-bench`` and
    ``probe-score``."""
    group = sub.add_parser("probe", help="probe benchmark (bench) and saved probes (score)")
    actions = group.add_subparsers(dest="probe_command", metavar="ACTION")
    _bench_parser(actions, "bench")
    _score_parser(actions, "score")
    group.set_defaults(func=lambda args: group.error("name an action: bench or score"))
    _bench_parser(sub, "probe-bench")
    _score_parser(sub, "probe-score")


def _bench_parser(sub: argparse._SubParsersAction, name: str) -> None:
    from mechsafe.probes.config import ProbeBenchConfig

    p = sub.add_parser(name, help="per-layer probes vs TF-IDF and majority baselines, with CIs",
                       description="Run a probe benchmark preset; any config field can be overridden by its flag.")
    p.add_argument("preset", nargs="?", help="YAML/TOML preset (e.g. probes/harmful_vs_harmless.yaml)")
    add_data_args(p)
    add_runs_arg(p)
    add_config_flags(p, ProbeBenchConfig, skip=(*_DATA_FIELDS, "ood"))
    p.add_argument("--ood-train-groups", default=argparse.SUPPRESS, metavar="G1,G2",
                   help="out-of-distribution split: groups to train/validate on (comma list)")
    p.add_argument("--ood-test-groups", default=argparse.SUPPRESS, metavar="G3,G4",
                   help="out-of-distribution split: groups to test on (comma list)")
    p.add_argument("--ood-test-data", default=argparse.SUPPRESS, metavar="DATA",
                   help="out-of-distribution split: test on the test split of this dataset instead")
    p.add_argument("--no-ood", action="store_true", help="ignore the preset's ood split")
    p.set_defaults(func=run)


def _score_parser(sub: argparse._SubParsersAction, name: str) -> None:
    s = sub.add_parser(name, help="score prompts with a saved probe (e.g. P(harmful))",
                       description="Apply a probe saved by probe-bench, using the model recorded in its sidecar.")
    s.add_argument("probe", help="probe .safetensors file (or its .json sidecar, or a probe-bench run directory)")
    s.add_argument("prompts", nargs="*", help="prompts to score")
    s.add_argument("--file", help="text file with one prompt per line")
    s.add_argument("--model", help="score with this model spec instead of the one in the sidecar")
    s.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: %(default)s)")
    s.add_argument("--runs-dir", default="runs", help="folder for the run directory (default: %(default)s)")
    s.set_defaults(func=run_score)


def config_from_args(args: argparse.Namespace):
    """The :class:`ProbeBenchConfig` a parsed command line describes (preset + overrides)."""
    from mechsafe.probes.config import OODSplit, ProbeBenchConfig, load_config, read_preset

    overrides = {k: v for k, v in config_values(ProbeBenchConfig, args).items() if k not in _DATA_FIELDS and k != "ood"}
    if getattr(args, "data", None):
        overrides["data"] = args.data
    overrides.update(data_kwargs(args))
    ood_flags = {key: getattr(args, flag) for flag, key in _OOD_FLAGS.items() if flag in vars(args)}
    if args.no_ood:
        if ood_flags:
            raise MechsafeError("--no-ood conflicts with the --ood-* flags; drop one")
        overrides["ood"] = None
    elif ood_flags:
        base = {}
        if args.preset and "test_data" not in ood_flags:
            preset_ood = read_preset(args.preset).get("ood") or {}
            base = {k: v for k, v in dict(preset_ood).items() if k != "test_data"}
        if "test_data" in ood_flags:
            base = {}
        overrides["ood"] = OODSplit(**(base | ood_flags))
    return load_config(args.preset, **overrides)


def run(args: argparse.Namespace) -> int:
    from mechsafe.probes import probe_bench
    from mechsafe.probes.report import summary_lines

    if args.preset and not Path(args.preset).is_file():
        raise MechsafeError(f"preset {args.preset} does not exist; see probes/ for the shipped presets")
    cfg = config_from_args(args)
    result = probe_bench(cfg, runs_dir=args.runs_dir, progress=not args.no_progress)
    d = result.data
    counts = ", ".join(f"{s} {sum(d[s].values())}" for s in ("train", "val", "test"))
    print(f"probe-bench {cfg.name or cfg.data}: {result.model['spec']}, {cfg.hook} x {len(result.hooks)} layers, "
          f"{d['mode']} ({counts})")
    for line in summary_lines(result):
        print(line)
    for c in result.comparisons:
        print(f"{c.a} vs {c.b}: {c.verdict} (test {c.metric} difference {c.difference})")
    print(f"report: {result.run_dir / 'report.md'}")
    if result.best_probe:
        print(f"probe:  {result.run_dir / result.best_probe}")
    print(f"run directory: {result.run_dir}")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise MechsafeError(f"prompt file {path} does not exist; check the path")
        prompts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise MechsafeError("no prompts to score; pass prompts as arguments or --file prompts.txt")
    return prompts


def run_score(args: argparse.Namespace) -> int:
    from mechsafe import probes

    prompts = _read_prompts(args)
    probe = probes.load(args.probe)
    model = probe.load_model(device=args.device, spec=args.model)
    proba = probe.predict_proba(model, prompts, batch_size=args.batch_size)
    names = probe.label_names
    if len(names) == 2:
        lines = [f"P({names[1]})\tprompt"] + [f"{p:.4f}\t{text}" for p, text in zip(proba[:, 1], prompts)]
    else:
        lines = ["class\tP(class)\tprompt"] + [f"{names[int(row.argmax())]}\t{row.max():.4f}\t{text}"
                                              for row, text in zip(proba, prompts)]
    from mechsafe.models import model_info
    from mechsafe.runs import start_run

    with start_run(args.runs_dir, "probe-score", config={"probe": str(probe.path), "model": args.model,
                                                          "n_prompts": len(prompts)},
                   processing=model_info(model).processing) as run:
        run.write_text("scores.tsv", "\n".join(lines) + "\n")
        run.write_json("results.json", {"probe": str(probe.path), "label_names": names,
                                        "scores": [{"prompt": t, "proba": row.tolist()} for t, row in zip(prompts, proba)]})
    print("\n".join(lines))
    print(f"run directory: {run.path}")
    return 0
