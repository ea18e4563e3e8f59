"""SAE-feature probes against dense probes and TF-IDF, on one model and one task, end to end.

The question (Kantamneni et al., ICML 2025; GDM's 2025 negative results; Gallifant et al., EMNLP 2025):
do probes on SAE latents classify harmful prompts as well as a plain logistic regression on the
activations they are computed from — and does either beat the words alone?

1. Train the SAE with the default recipe if it is not on disk yet (``runs/sae/smollm2-resid-mid``).
2. Run ``probe-bench`` on ``toxicity_vs_other_harm`` at the SAE's hook and layer only: dense probes
   (last-token and mean pooling), SAE probes (``sae_all``, k-sparse ``sae_k1/k16/k64``, binarized-sum
   ``sae_binsum``), TF-IDF and the majority class — same train/val/test split, same estimator family,
   bootstrap intervals on test.
3. Inspect the latents the k-sparse probes picked on the training rows: their top-activating tokens on
   the training prompts and their direct logit effects.
4. Write ``report.md`` (with a plain-language verdict), ``results.json`` and ``run.json``.

    python analyses/sae_vs_dense_probe.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mechsafe as ms
import mechsafe.sae  # noqa: F401  (makes ms.sae available)
from mechsafe import probes
from mechsafe.errors import MechsafeError
from mechsafe.hooks import kind_of, layer_of
from mechsafe.runs import start_run

SAE_DIR = Path("runs/sae/smollm2-resid-mid")
RECIPE = Path("sae/smollm2-resid-mid.yaml")
PRESET = Path("probes/toxicity_vs_other_harm.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", default=str(SAE_DIR), help="SAE directory (trained with --recipe if missing; default: %(default)s)")
    p.add_argument("--recipe", default=str(RECIPE), help="recipe used when the SAE is missing (default: %(default)s)")
    p.add_argument("--preset", default=str(PRESET), help="probe-bench preset (default: %(default)s)")
    p.add_argument("--ks", default="1,16,64", help="k of the k-sparse SAE probes (default: %(default)s)")
    p.add_argument("--inspect", type=int, default=6, help="latents of the k-sparse probe to inspect (default: %(default)s)")
    p.add_argument("--n-boot", type=int, help="bootstrap resamples (default: the preset's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--runs-dir", default="runs")
    return p.parse_args(argv)


def row(result) -> dict:
    t = result.test
    return {"method": result.method, "layer": result.layer, "val_auroc": result.val["auroc"],
            "auroc": t["auroc"].to_dict(), "accuracy": t["accuracy"].to_dict(),
            "f1": t["f1"].to_dict() if "f1" in t else None, "C": result.c}


def picked_features(result, top: int) -> list[tuple[int, float]]:
    """Latents a fitted k-sparse pipeline kept, ordered by |logistic coefficient| (on standardized inputs)."""
    est = result.estimator
    chosen = est.named_steps["select"].get_support(indices=True)
    coef = np.ravel(est.steps[-1][1].coef_[0]) if est.steps[-1][1].coef_.shape[0] == 1 else \
        np.abs(est.steps[-1][1].coef_).max(0)
    order = np.argsort(-np.abs(coef))[:top]
    return [(int(chosen[i]), float(coef[i])) for i in order]


def verdict(best: dict, comparisons: list) -> str:
    """Plain-language summary; "reliably" means the paired bootstrap interval of the AUROC difference excludes 0."""
    dense = {m: r for m, r in best.items() if m.startswith("dense")}
    sae = {m: r for m, r in best.items() if m.startswith("sae_")}
    if not dense or not sae:
        return "The bench did not produce both dense and SAE probes; no verdict."
    d_key = max(dense, key=lambda m: dense[m].val["auroc"])
    s_key = max(sae, key=lambda m: sae[m].val["auroc"])
    d, s = dense[d_key].test["auroc"], sae[s_key].test["auroc"]
    vs = [c for c in comparisons if c.a.startswith("sae_") and c.b.startswith("dense")]
    better = [c.a.split(" @")[0] for c in vs if c.difference.low > 0]
    worse = [c.a.split(" @")[0] for c in vs if c.difference.high < 0]
    text = (f"The best dense probe ({d_key}, chosen on validation) reaches test AUROC {d}; the best SAE probe by "
            f"validation ({s_key}) reaches {s}. ")
    if better:
        text += f"SAE probes reliably above the dense probe (paired 95% interval of the AUROC difference above 0): {', '.join(better)}. "
    else:
        text += ("No SAE probe is reliably better than the dense probe: every paired 95% interval of the AUROC "
                 "difference includes 0 or lies below it. ")
    if worse:
        text += f"Reliably worse than the dense probe: {', '.join(worse)}. "
    tf = best.get("tfidf")
    if tf is not None:
        text += f"TF-IDF on the words alone reaches {tf.test['auroc']}. "
    one = {m: r for m, r in sae.items() if m.startswith("sae_k1/")}
    if one:
        k1 = max(one.values(), key=lambda r: r.val["auroc"])
        text += f"A single SAE latent ({k1.method}) gives {k1.test['auroc']}. "
    n_test = len(next(iter(best.values())).test_proba) if next(iter(best.values())).test_proba is not None else None
    if n_test:
        text += (f"With {n_test} test prompts the intervals are wide: this task is close to saturated for both "
                 "dense and SAE probes, so it cannot separate them finely.")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    timings = {}
    sae_dir = Path(args.sae)
    if not (sae_dir / "cfg.json").is_file():
        print(f"no SAE at {sae_dir}; training it with {args.recipe} ...", file=sys.stderr)
        cfg = ms.sae.load_recipe(args.recipe)
        model = ms.load_model(cfg.model, processing=cfg.processing)
        ms.sae.train_sae(model, cfg, out_dir=sae_dir, runs_dir=args.runs_dir, command=f"sae train {args.recipe}")
    timings["sae"] = time.perf_counter() - t0
    sae = ms.sae.load_sae(sae_dir)
    spec = (sae.metadata.get("model") or {}).get("spec") or ms.DEFAULT_MODEL
    model = ms.load_model(spec, processing=sae.metadata.get("weight_processing") or "none")
    layer, kind = layer_of(sae.hook_name), kind_of(sae.hook_name)

    t1 = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",")]
    overrides = dict(hook=kind, layers=str(layer), sae=str(sae_dir), sae_ks=ks, name="sae-vs-dense")
    if args.n_boot:
        overrides["n_boot"] = args.n_boot
    bench_cfg = probes.load_config(args.preset, **overrides)
    bench = probes.probe_bench(bench_cfg, model=model, runs_dir=args.runs_dir)
    timings["probe_bench"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    prompts = ms.data.load(bench_cfg.data)
    train = prompts.split("train")  # inspect on training prompts only: the test split stays unseen
    inspected = {}
    for method in sorted(bench.best):
        if not method.startswith("sae_k"):
            continue
        k = int(method.split("/")[0][len("sae_k"):])
        if k > 16:
            continue
        feats = picked_features(bench.best[method], min(args.inspect, k))
        reports = ms.sae.inspect_features(model, sae, [f for f, _ in feats], train, top_n=5, n_logits=8)
        inspected[method] = [(f, c, r) for (f, c), r in zip(feats, reports)]
    timings["inspect"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0

    order = sorted(bench.best.values(), key=lambda r: (not r.method.startswith("dense"), not r.method.startswith("sae"),
                                                      r.method))
    sae_metrics = sae.metrics
    lines = [
        "# SAE-feature probes vs dense probes vs TF-IDF", "",
        f"Task: `{bench_cfg.data}` ({', '.join(bench.label_names)}); model `{bench.model['spec']}` "
        f"(weights: {bench.model['processing']}); features at `{sae.hook_name}` (layer {layer}).",
        f"SAE: `{sae_dir}` ({sae.architecture}, d_sae {sae.d_sae}); held-out EV "
        f"{sae_metrics.get('explained_variance', float('nan')):.3f}, CE increase "
        f"{sae_metrics.get('ce_increase', float('nan')):+.3f} nats, L0 {sae_metrics.get('l0', float('nan')):.1f}.",
        f"Probe-bench run: `{bench.run_dir}`. Splits (train/val/test): "
        + ", ".join(f"{s} {sum(bench.data[s].values()) if isinstance(bench.data.get(s), dict) else '?'}"
                    for s in ("train", "val", "test")) + ".",
        "", "## Verdict", "", verdict(bench.best, bench.comparisons), "",
        "## Test metrics (95% bootstrap intervals; each method's pooling/layer chosen on validation)", "",
        "AUROC is the primary metric. Accuracy and F1 use a 0.5 threshold: a probe whose cross-validation chose a "
        "very small C (0.001) ranks prompts well but predicts the majority class everywhere (accuracy = the "
        "majority rate, F1 = 0).", "",
        "| method | val AUROC | test AUROC | test accuracy | test F1 | C |", "|---|---|---|---|---|---|",
    ]
    for r in order:
        f1 = r.test.get("f1")
        lines.append(f"| {r.method} | {r.val['auroc']:.3f} | {r.test['auroc']} | {r.test['accuracy']} | "
                     f"{f1 if f1 is not None else 'n/a'} | {r.c if r.c is not None else '-'} |")
    lines += ["", "## Paired comparisons (test AUROC, a − b)", "",
              "The verdict is the paired bootstrap interval's: `better` above 0, `worse` below 0, `tie` holding 0.", "",
              "| a | b | difference (paired 95% CI) | verdict |", "|---|---|---|---|"]
    for c in bench.comparisons:
        lines.append(f"| {c.a} | {c.b} | {c.difference} | {c.verdict} |")
    lines += ["", "## Latents the k-sparse probes picked (on training rows)", "",
              "Top activations are searched in the training prompts only; the logit effect is the latent's decoder "
              "direction through the final norm scale and the unembedding (its direct effect).", ""]
    for method, items in inspected.items():
        lines += [f"### {method}", ""]
        for f, coef, rep in items:
            head, _, rest = rep.markdown().partition("\n")
            lines += [head, "", f"Probe coefficient (on standardized inputs): {coef:+.3f}.", rest]
    report = "\n".join(lines) + "\n"
    results = {"bench_run": str(bench.run_dir), "sae": str(sae_dir), "hook": sae.hook_name, "sae_metrics": sae_metrics,
               "best": {m: row(r) for m, r in bench.best.items()},
               "comparisons": [c.to_dict() for c in bench.comparisons],
               "inspected": {m: [{"feature": f, "coef": c, "frequency": r.frequency,
                                  "top_tokens": [ex["token"] for ex in r.top_examples],
                                  "promotes": [t for t, _ in r.logit_top], "suppresses": [t for t, _ in r.logit_bottom]}
                                 for f, c, r in items] for m, items in inspected.items()},
               "timings_s": timings}
    with start_run(args.runs_dir, "analyses/sae_vs_dense_probe.py", name="sae-vs-dense",
                   config=vars(args) | {"bench": bench_cfg.to_dict()}, seed=bench_cfg.seed,
                   processing=bench.model.get("processing")) as run:
        run.write_text("report.md", report)
        run.write_json("results.json", results)
        run.timings.update(timings)
    print(report)
    print(f"run directory: {run.path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MechsafeError as exc:
        sys.exit(f"error: {exc}")
