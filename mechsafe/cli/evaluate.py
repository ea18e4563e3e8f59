"""``mechsafe eval``: refusal rate, over-refusal, attack success and utility of a model, with a run directory."""

from __future__ import annotations

import argparse
import json
import time

from mechsafe.cli.common import add_model_args, add_runs_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="safety and utility evaluation on held-out harmful/harmless prompts")
    add_model_args(p)
    p.add_argument("--reference", help="reference model spec: adds KL(reference || model) on harmless prompts")
    p.add_argument("--harmful", default="harmful", help="harmful prompts: bundled suite or local file (default: %(default)s)")
    p.add_argument("--harmless", default="harmless", help="harmless prompts: bundled suite or local file (default: %(default)s)")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="which split of the prompt sets to use (default: %(default)s)")
    p.add_argument("--limit", type=int, help="use only the first N prompts of each set (and N utility items)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per response (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: %(default)s)")
    p.add_argument("--no-utility", action="store_true", help="skip the arithmetic accuracy and answer NLL")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--judge-model", metavar="SPEC",
                   help="judge refusals with this chat model (mechsafe.evaluation.ModelJudge) instead of phrase matching")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals (default: %(default)s)")
    add_runs_arg(p)
    p.set_defaults(func=run)


def _prompts(source: str, split: str, limit: int | None) -> list[str]:
    import mechsafe as ms

    ps = ms.data.load(source)
    if split != "all":
        ps = ps.split(split)
    texts = list(ps.texts)[:limit]
    if not texts:
        raise ms.MechsafeError(f"{source} has no prompts in split {split!r}; pick another --split")
    return texts


def run(args: argparse.Namespace) -> int:
    import mechsafe as ms
    from mechsafe import evaluation as ev
    from mechsafe.runs import atomic_dir, atomic_write_text, new_run_dir, write_json, write_run_manifest

    if args.limit is not None and args.limit < 1:
        raise ms.MechsafeError(f"--limit must be at least 1, got {args.limit}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ms.MechsafeError("--max-new-tokens and --batch-size must be at least 1")
    harmful = _prompts(args.harmful, args.split, args.limit)
    harmless = _prompts(args.harmless, args.split, args.limit)
    t0 = time.perf_counter()
    model = ms.load_model(args.model, processing=args.processing, device=args.device)
    reference = ms.load_model(args.reference, processing=args.processing, device=args.device) if args.reference else None
    judge = None
    if args.judge_model:
        judge = ev.ModelJudge(ms.load_model(args.judge_model, processing=args.processing, device=args.device),
                              batch_size=args.batch_size)
    t_load = time.perf_counter() - t0
    result = ev.evaluate(model, harmful, harmless, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         reference_model=reference, utility=not args.no_utility, progress=not args.no_progress,
                         system=args.system, judge=judge, utility_limit=args.limit, seed=args.seed)
    table = result.markdown()
    run_dir = new_run_dir(args.runs_dir, "eval")
    with atomic_dir(run_dir) as tmp:
        write_json(tmp / "results.json", result.to_dict())
        atomic_write_text(tmp / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result.samples))
        examples = [s for s in result.samples if s["set"] in ("harmful", "harmless")][:6]
        lines = [f"# Evaluation of `{result.model}`", "",
                 f"Harmful prompts: {result.n_harmful} ({args.harmful}, split {args.split}); "
                 f"harmless prompts: {result.n_harmless} ({args.harmless}, split {args.split}); "
                 f"{args.max_new_tokens} new tokens, greedy; refusals by "
                 f"{judge.__name__ if judge else 'phrase matching'}.", "", table,
                 "## Example responses", ""]
        lines += [f"- [{s['set']}, {'refused' if s['refused'] else 'answered'}] {s['prompt']!r} -> {s['response'][:160]!r}"
                  for s in examples]
        atomic_write_text(tmp / "report.md", "\n".join(lines) + "\n")
        write_run_manifest(tmp, command="eval", config={**vars(args), "func": None}, seed=args.seed,
                           processing=args.processing,
                           timings={"load": t_load, **result.timings_s},
                           extra={"model": ms.models.model_info(model).to_dict()})
    print(table)
    print(f"run directory: {run_dir}")
    return 0
