"""``mechsafe data describe``: class and group balance, prompt lengths, duplicates and likely noise of a data set."""

from __future__ import annotations

import argparse

from mechsafe.cli.common import add_runs_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="look at a data set before using it")
    group = p.add_subparsers(dest="data_command", metavar="ACTION")
    d = group.add_parser("describe", help="class/group balance, prompt lengths, duplicates, very short prompts",
                         description="Writes report.md, results.json and figures (lengths.png, groups.png) into a run "
                                     "directory: prompts per class, split and group, prompt lengths per class and group, "
                                     "exact, normalized and near-duplicate prompts (and how many straddle splits), and "
                                     "prompts too short to mean anything.")
    d.add_argument("source", help="a bundled suite, a hub dataset name, or a local .jsonl/.csv/.parquet file")
    d.add_argument("--text-column", help="text column of a local file or hub dataset (default: text)")
    d.add_argument("--label-column", help="label column of a local file (default: none, the file is one class)")
    d.add_argument("--group-column", help="column used as the group (e.g. a category)")
    d.add_argument("--near-threshold", type=float, default=0.8,
                   help="Jaccard similarity of content words that makes two prompts near-duplicates (default: %(default)s)")
    d.add_argument("--short-words", type=int, default=2,
                   help="prompts of at most this many words are listed as likely noise (default: %(default)s)")
    add_runs_arg(d)
    d.set_defaults(func=run)
    p.set_defaults(func=lambda args: p.error("name an action, e.g. `mechsafe data describe harmful_vs_harmless`"))


def run(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe.data.describe import describe, plot
    from mechsafe.runs import start_run

    if not 0 < args.near_threshold <= 1:
        raise ms.MechsafeError(f"--near-threshold {args.near_threshold} must be in (0, 1]")
    kwargs = {k: getattr(args, k) for k in ("text_column", "group_column") if getattr(args, k)}
    if args.source not in ms.data.BUNDLED_SUITES:
        kwargs["label_column"] = args.label_column
    elif args.label_column:
        raise ms.MechsafeError(f"bundled suite {args.source!r} has its own labels; drop --label-column")
    prompts = ms.data.load(args.source, **kwargs)
    desc = describe(prompts, near_threshold=args.near_threshold, short_words=args.short_words)
    report = desc.markdown()
    with start_run(args.runs_dir, "data describe", config={k: v for k, v in vars(args).items() if k != "func"}) as run:
        run.write_json("results.json", desc.to_dict())
        plot(desc, prompts, run.tmp)
        run.write_text("report.md", report + "\n![prompt lengths](lengths.png)\n\n![groups](groups.png)\n")
        run.extra["data_fingerprint"] = prompts.fingerprint()
    print(report)
    print(f"run directory: {run.path}")
    return 0
