"""``mechsafe report``: one safety report per model, several models side by side.

::

    mechsafe report smollm2-135m-instruct smollm2-135m-aligned --quick
    mechsafe report runs/mfs-model --sections harm,refusal --harmful my_harmful.jsonl

Every field of :class:`mechsafe.reporting.ReportConfig` is a flag (``--quick`` sets the profile).
"""

from __future__ import annotations

import argparse

from mechsafe.cli.common import add_config_flags, add_runs_arg, config_values


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.reporting import ReportConfig

    p = sub.add_parser("report", help="where a model represents harm, what carries its refusal, which weights are "
                                      "safety-critical, how cheaply safety is removed, and utility; several models "
                                      "side by side")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model specs or checkpoint folders (the first is the "
                                                              "reference of KL and paired differences)")
    p.add_argument("--quick", action="store_true", help="the quick profile: smaller prompt sets and sweeps")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    add_config_flags(p.add_argument_group("report (any ReportConfig field)"), ReportConfig, skip=("profile",))
    add_runs_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mechsafe.reporting import ReportConfig, report

    values = config_values(ReportConfig, args)
    if isinstance(values.get("sections"), str):
        values["sections"] = tuple(s.strip() for s in values["sections"].split(",") if s.strip())
    config = ReportConfig(profile="quick" if args.quick else "full", **values)
    out = report(args.models, config, runs_dir=args.runs_dir, device=args.device, progress=not args.no_progress)
    for m in out["models"]:
        took = sum(m["seconds"].values())
        cached = [name for name, sec in m["sections"].items() if sec.get("cached")]
        print(f"{m['name']}: {len(m['sections'])} sections in {took:.0f} s" + (f" ({', '.join(cached)} cached)"
                                                                                if cached else ""))
    print(f"report: {out['run_dir']}/report.html")
    print(f"run directory: {out['run_dir']}")
    return 0
