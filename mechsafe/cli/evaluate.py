"""``mechsafe eval``: refusal rate, over-refusal, attack success and utility of a model, with a run directory."""

from __future__ import annotations

import argparse
import json
import time

from mechsafe.cli.common import add_config_flags, add_model_args, add_runs_arg, config_values


def register(sub: argparse._SubParsersAction) -> None:
    from mechsafe.evaluation.metrics import EvalConfig

    p = sub.add_parser("eval", help="safety and utility evaluation on held-out harmful/harmless prompts")
    add_model_args(p)
    p.add_argument("--models", nargs="+", metavar="SPEC",
                   help="evaluate several models on the same prompts, with paired differences against the first "
                        "(instead of --model)")
    p.add_argument("--reference", help="reference model spec: adds KL(reference || model) on harmless prompts")
    for kind in ("harmful", "harmless"):
        p.add_argument(f"--{kind}", default=kind,
                       help=f"{kind} prompts: a bundled suite, a hub dataset, or a local .jsonl/.csv/.parquet file with a "
                            "text column and no labels needed (default: %(default)s)")
        p.add_argument(f"--{kind}-text-column", metavar="COLUMN", help=f"text column of the {kind} file (default: text)")
    p.add_argument("--judge-model", metavar="SPEC",
                   help="judge refusals with this chat model (mechsafe.evaluation.ModelJudge) instead of phrase matching")
    add_config_flags(p.add_argument_group("evaluation (any EvalConfig field)"), EvalConfig)
    add_runs_arg(p)
    p.set_defaults(func=run)


def _paired_table(results: list, seed: int) -> tuple[str, list[dict]]:
    """Each model against the first on the same prompts: paired differences of refusal and over-refusal."""
    from mechsafe.stats import paired_rate_difference

    def flags(result, which):
        return [s["refused"] for s in result.samples if s["set"] == which]

    first = results[0]
    rows = ["| model | vs | refusal rate difference [95% CI] | over-refusal difference [95% CI] |", "|---|---|---|---|"]
    out = []
    for r in results[1:]:
        d_ref = paired_rate_difference(flags(r, "harmful"), flags(first, "harmful"), seed=seed)
        d_over = paired_rate_difference(flags(r, "harmless"), flags(first, "harmless"), seed=seed)
        rows.append(f"| {r.model} | {first.model} | {d_ref} | {d_over} |")
        out.append({"model": r.model, "vs": first.model, "refusal_rate_difference": d_ref.to_dict(),
                    "over_refusal_difference": d_over.to_dict()})
    return "\n".join(rows) + "\n", out


def run(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe import evaluation as ev
    from mechsafe.runs import start_run

    cfg = ev.EvalConfig(**config_values(ev.EvalConfig, args))
    sets = {}
    for kind in ("harmful", "harmless"):
        texts, where = ms.data.load_texts(getattr(args, kind), cfg.split, getattr(args, f"{kind}_text_column"))
        sets[kind] = texts[:cfg.limit]
        print(f"{kind}: {where}" + (f", first {len(sets[kind])} used" if len(sets[kind]) < len(texts) else ""))
    specs = args.models or [args.model]
    t0 = time.perf_counter()
    models = [ms.load_model(spec, processing=args.processing, device=args.device) for spec in specs]
    reference = ms.load_model(args.reference, processing=args.processing, device=args.device) if args.reference else None
    judge = None
    if args.judge_model:
        judge = ev.ModelJudge(ms.load_model(args.judge_model, processing=args.processing, device=args.device),
                              batch_size=cfg.batch_size)
    t_load = time.perf_counter() - t0
    results = [ev.evaluate(model, sets["harmful"], sets["harmless"], max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, reference_model=reference, utility=cfg.utility,
                           progress=not args.no_progress, system=cfg.system, judge=judge, utility_limit=cfg.limit,
                           seed=cfg.seed) for model in models]
    tables = [f"### `{r.model}`\n\n{r.markdown()}" if len(results) > 1 else r.markdown() for r in results]
    paired, comparisons = _paired_table(results, cfg.seed) if len(results) > 1 else ("", [])
    with start_run(args.runs_dir, "eval", config={**vars(args), "func": None}, seed=cfg.seed,
                   processing=args.processing) as run:
        run.write_json("results.json", {"models": [r.to_dict() for r in results], "comparisons": comparisons}
                       if len(results) > 1 else results[0].to_dict())
        samples = [dict(s, model=r.model) for r in results for s in r.samples]
        run.write_text("samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        title = ", ".join(f"`{r.model}`" for r in results)
        lines = [f"# Evaluation of {title}", "",
                 f"Harmful prompts: {results[0].n_harmful} ({args.harmful}); harmless prompts: {results[0].n_harmless} "
                 f"({args.harmless}); split {cfg.split} where the data has splits; {cfg.max_new_tokens} new tokens, "
                 f"greedy; refusals by {judge.__name__ if judge else 'phrase matching'}. Rates carry Wilson "
                 "intervals, differences between models on the same prompts paired bootstrap intervals.", "", *tables]
        if paired:
            lines += ["## Paired differences (same prompts)", "", paired]
        lines += ["## Example responses", ""]
        lines += [f"- [{s['set']}, {'refused' if s['refused'] else 'answered'}] {s['prompt']!r} -> {s['response'][:160]!r}"
                  for s in [s for s in results[0].samples if s["set"] in ("harmful", "harmless")][:6]]
        run.write_text("report.md", "\n".join(lines) + "\n")
        run.timings.update({"load": t_load, **{f"{r.model}:{k}": v for r in results for k, v in r.timings_s.items()}})
        run.extra["models"] = [ms.models.model_info(m).to_dict() for m in models]
    print("\n".join(tables))
    if paired:
        print(paired)
    print(f"run directory: {run.path}")
    return 0
