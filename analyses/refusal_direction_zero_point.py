"""Is zero a neutral point of the refusal direction? Zero vs affine ablation of saved candidates.

Directional ablation (Arditi et al., 2024) sets every activation's component along r̂ to zero. That
leaves ordinary prompts alone only if they sit near zero along r̂. When harmless prompts sit far on
the "comply" side, ablation moves them towards refusal, and the paper's KL filter (KL on harmless
prompts ≤ 0.1) rejects a direction that does carry refusal. This script measures, for candidates of
a saved selection (by default the selected one and the strongest, i.e. lowest ablation score before
the layer cutoff):

* the mean projection on r̂ of TRAIN harmful and harmless prompts at the last prompt position, at
  every point where the stream is read (below);
* on VALIDATION prompts (the first ``--n-val`` of each class): the mean refusal score of harmful and
  harmless prompts and the last-position KL(model ‖ intervened) on harmless prompts (mean, median,
  share above the threshold) with no intervention, with **zero ablation** (the paper's,
  ``mechsafe.interventions.ablate_direction``) and with **affine ablation** (Marshall et al., 2024,
  "Refusal in LLMs is an affine function"): ``x ← x − (x·r̂ − c) r̂`` wherever the stream is read
  (each block's attention and MLP input, and the final residual), at all positions, where ``c`` is
  the harmless TRAIN mean projection at the last position at that point. Harmless prompts then keep
  their typical component and harmful ones are moved to it. The first position (the attention sink,
  with no component along a sink-projected r̂) is shifted as well; skipping it changed the KL of the
  aligned model's layer-23 candidate by 0.001 (measured with the block inputs only).

Writes ``report.md``, ``results.json`` and ``run.json`` into ``runs/refusal-zero-point-<time>/``.

    python analyses/refusal_direction_zero_point.py --model smollm2-135m-aligned \\
        --direction runs/refusal-direction-study-<time>/direction
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np
import torch

import mechsafe as ms
from mechsafe import interventions as iv
from mechsafe.directions import RefusalDirection, mean_activations
from mechsafe.errors import MechsafeError
from mechsafe.evaluation import prompt_last_logits, refusal_token_ids, score_from_logits
from mechsafe.runs import start_run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model the direction was selected on")
    p.add_argument("--direction", required=True, help="a saved selection (a run's direction/ folder, with candidates)")
    p.add_argument("--candidates", help="LAYER:POSITION pairs, e.g. 23:-1,16:-2 (default: selected and strongest)")
    p.add_argument("--n-val", type=int, default=32, help="validation prompts per class (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--runs-dir", default="runs")
    return p.parse_args(argv)


def _candidates(rd: RefusalDirection, spec: str | None) -> list[dict]:
    by_key = {(s["layer"], s["position"]): s for s in rd.scores}
    if spec:
        try:
            keys = [tuple(int(v) for v in item.split(":")) for item in spec.split(",")]
        except ValueError:
            raise MechsafeError(f"--candidates {spec!r}: write LAYER:POSITION pairs such as 23:-1,16:-2") from None
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise MechsafeError(f"--candidates: {missing} are not candidates of this selection; "
                                f"layers {rd.meta['layers_scored']}, positions -1…-{rd.candidates.shape[0]}")
        return [by_key[k] for k in keys]
    chosen = by_key[(rd.layer, rd.position)]
    scored = [s for s in rd.scores if s["ablation_score"] is not None and s["layer"] < rd.meta["layer_cutoff"]]
    strongest = min(scored, key=lambda s: s["ablation_score"])
    return [chosen] if strongest is chosen else [chosen, strongest]


def last_position_means(model, prompts: list[str], batch_size: int, system: str | None) -> torch.Tensor:
    """Mean activation at the last prompt position at each of :func:`mechsafe.interventions.residual_read_points` (float64)."""
    n = model.cfg.n_layers
    pre, mid = (mean_activations(model, prompts, 1, list(range(n)), batch_size, system, kind=kind)[0]
                for kind in ("resid_pre", "resid_mid"))
    post = mean_activations(model, prompts, 1, [n - 1], batch_size, system, kind="resid_post")[0]
    return torch.cat([torch.stack([pre, mid], 1).flatten(0, 1), post])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    rd = RefusalDirection.load(args.direction)
    if rd.candidates is None:
        raise MechsafeError(f"{args.direction} holds no candidates; use a direction saved by a selection run")
    cands = _candidates(rd, args.candidates)  # checked before the model is loaded
    model = ms.load_model(args.model)
    if rd.meta.get("model") != ms.models.model_info(model).spec:
        raise MechsafeError(f"{args.direction} was selected on {rd.meta.get('model')!r}, not on {args.model!r}; "
                            "pass the model it was selected on")
    harmful, harmless = ms.data.load("harmful"), ms.data.load("harmless")
    hv, lv = harmful.split("val").texts[: args.n_val], harmless.split("val").texts[: args.n_val]
    system = rd.meta["config"].get("system")
    token_ids = refusal_token_ids(model.tokenizer, rd.meta["config"]["refusal_words"])
    kl_threshold = rd.meta["config"]["kl_threshold"]

    def logits(prompts):
        return prompt_last_logits(model, prompts, batch_size=args.batch_size, system=system)

    base_logp = torch.log_softmax(logits(lv).double(), dim=-1)

    def scores(context) -> dict:
        with context:
            h, l = logits(hv), logits(lv)
        kl = (base_logp.exp() * (base_logp - torch.log_softmax(l.double(), dim=-1))).sum(-1).numpy()
        return {"harmful_score": float(score_from_logits(h, token_ids).mean()),
                "harmless_score": float(score_from_logits(l, token_ids).mean()),
                "kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)),
                "kl_share_above_threshold": float(np.mean(kl > kl_threshold))}

    means = {name: last_position_means(model, pool.split("train").texts, args.batch_size, system)
             for name, pool in (("harmful", harmful), ("harmless", harmless))}
    results = {"model": args.model, "direction": args.direction, "n_val": {"harmful": len(hv), "harmless": len(lv)},
               "points": iv.residual_read_points(model), "no_intervention": scores(contextlib.nullcontext()), "candidates": []}
    for cand in cands:
        r = rd.candidates[tuple(cand["index"])]
        proj = {name: (m @ (r / r.norm()).double()).float() for name, m in means.items()}
        entry = {"layer": cand["layer"], "position": cand["position"], "selection_scores": cand,
                 "train_projection_last_position": {k: v.tolist() for k, v in proj.items()},
                 "zero": scores(iv.ablate_direction(model, r)),
                 "affine": scores(iv.affine_ablation(model, r, proj["harmless"]))}
        results["candidates"].append(entry)
        print(f"layer {cand['layer']}, position {cand['position']}: zero {entry['zero']}, affine {entry['affine']}",
              flush=True)
    results["timings_s"] = {"total": time.perf_counter() - t_start}
    report = _report(args, results, kl_threshold, model.cfg.n_layers)
    with start_run(args.runs_dir, "analyses/refusal_direction_zero_point.py", name="refusal-zero-point",
                   config=vars(args), processing=ms.models.model_info(model).processing) as run:
        run.write_json("results.json", results)
        run.write_text("report.md", report)
        run.timings.update(results["timings_s"])
    print(report)
    print(f"run directory: {run.path}")
    return 0


def _report(args, results: dict, kl_threshold: float, n_layers: int) -> str:
    n = results["n_val"]
    lines = ["# Zero vs affine ablation of refusal-direction candidates", "",
             f"Model `{args.model}`, selection `{args.direction}`; {n['harmful']} harmful and {n['harmless']} "
             f"harmless VALIDATION prompts; KL is last-position KL(model ‖ intervened) on the harmless ones "
             f"(threshold {kl_threshold}). Total {results['timings_s']['total']:.0f} s.", "",
             "| candidate | intervention | harmful refusal score | harmless refusal score | KL mean | KL median | "
             f"share KL > {kl_threshold} |", "|---|---|---|---|---|---|---|"]

    def row(label, how, s):
        lines.append(f"| {label} | {how} | {s['harmful_score']:.3f} | {s['harmless_score']:.3f} | {s['kl_mean']:.3f} | "
                     f"{s['kl_median']:.3f} | {s['kl_share_above_threshold']:.2f} |")

    row("—", "none", results["no_intervention"])
    for c in results["candidates"]:
        label = f"L{c['layer']} / {c['position']}"
        row(label, "zero (paper)", c["zero"])
        row(label, "affine (harmless mean)", c["affine"])
    lines += ["", "Mean projection on r̂ at the last prompt position (TRAIN prompts), at the input of block L:", ""]
    shown = sorted(set(range(0, n_layers, 4)) | {n_layers - 1})
    lines += ["| candidate | class | " + " | ".join(f"L{l}" for l in shown) + " | final |",
              "|---|---|" + "---|" * (len(shown) + 1)]
    for c in results["candidates"]:
        for cls in ("harmful", "harmless"):
            p = c["train_projection_last_position"][cls]
            lines.append(f"| L{c['layer']} / {c['position']} | {cls} | "
                         + " | ".join(f"{p[2 * l]:.1f}" for l in shown) + f" | {p[-1]:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MechsafeError as exc:
        sys.exit(f"error: {exc}")
