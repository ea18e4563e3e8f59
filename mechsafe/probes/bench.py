"""The probe benchmark: per-layer dense probes against text and majority baselines (and SAE probes).

:func:`probe_bench` loads and validates the data, caches activations (reused across runs), turns
every method into :class:`~mechsafe.probes.methods.Candidate` objects, evaluates them all with one
function, picks each method's best layer on validation, compares the best probe with the TF-IDF
baseline on test, saves the best dense probes, and writes the run directory. Nothing is created on
disk until all the numbers exist, and the run directory's contents appear at once (atomic rename).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from mechsafe import data as data_mod
from mechsafe import models as models_mod
from mechsafe.activations import ActivationConfig, cache_activations, model_fingerprint
from mechsafe.errors import MechsafeError
from mechsafe.hooks import hook_name, hook_names
from mechsafe.models import model_info
from mechsafe.probes.config import ProbeBenchConfig, load_config
from mechsafe.probes.evaluate import (CandidateResult, Comparison, best_overall, best_per_method, compare,
                                      evaluate)
from mechsafe.probes.methods import (Candidate, baseline_candidates, dense_candidates, dense_estimator,
                                     tfidf_estimator)
from mechsafe.probes.splits import BenchSplit, make_split
from mechsafe.probes.store import save_probe
from mechsafe.runs import start_run

logger = logging.getLogger(__name__)

COMMAND = "probe-bench"


@dataclasses.dataclass
class BenchResult:
    """Everything a probe-bench run measured (also written to ``results.json`` in its run directory)."""

    config: ProbeBenchConfig
    """The configuration that ran."""
    run_dir: Path | None
    """The run directory (``None`` before it is written)."""
    results: list[CandidateResult]
    """Every candidate (method x layer x pooling) with validation and test metrics."""
    best: dict[str, CandidateResult]
    """Each method's best layer, selected on validation."""
    comparisons: list[Comparison]
    """The best model-based method against the baselines (and SAE methods against the best dense)."""
    data: dict[str, Any]
    """Counts per split and class (and group)."""
    model: dict[str, Any]
    """What model was probed: spec, source, weight processing."""
    hooks: list[str]
    """Hook names probed."""
    probes: dict[str, str] = dataclasses.field(default_factory=dict)
    """Saved probe files (method -> file name in the run directory)."""
    best_probe: str | None = None
    """File name of the best saved probe (the one ``mechsafe.probes.load(run_dir)`` returns)."""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall time of each phase in seconds."""

    @property
    def label_names(self) -> list[str]:
        return list(self.data["label_names"])

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable form written to ``results.json``."""
        return {"config": self.config.to_dict(), "model": self.model, "hooks": self.hooks, "data": self.data,
                "label_names": self.label_names, "select_by": self.config.select_by,
                "best": {m: r.to_dict() for m, r in self.best.items()},
                "comparisons": [c.to_dict() for c in self.comparisons],
                "results": [r.to_dict() for r in self.results], "probes": self.probes, "best_probe": self.best_probe,
                "timings_s": self.timings}

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "BenchResult":
        """A finished run back from its directory's ``results.json`` (metrics, comparisons and probe files; the
        estimators themselves load with :func:`mechsafe.probes.load`)."""
        from mechsafe.runs import read_json

        d = read_json(Path(run_dir) / "results.json")
        return cls(config=ProbeBenchConfig(**{k: v for k, v in d["config"].items() if k != "ood"},
                                           ood=d["config"].get("ood")),
                   run_dir=Path(run_dir), results=[CandidateResult.from_dict(r) for r in d["results"]],
                   best={m: CandidateResult.from_dict(r) for m, r in d["best"].items()},
                   comparisons=[Comparison.from_dict(c) for c in d["comparisons"]], data=d["data"], model=d["model"],
                   hooks=d["hooks"], probes=d["probes"], best_probe=d["best_probe"], timings=d["timings_s"])


def _load_data(cfg: ProbeBenchConfig) -> BenchSplit:
    prompts = data_mod.load(cfg.data, **cfg.data_kwargs())
    prompts.require_classes(2)
    test_prompts = None
    if cfg.ood is not None and cfg.ood.test_data is not None:
        test_prompts = data_mod.load(cfg.ood.test_data, **cfg.data_kwargs())
    split = make_split(prompts, cfg.ood, test_prompts)
    counts = np.bincount(split.prompts.labels[split.train], minlength=len(split.prompts.label_names))
    if counts.min() < cfg.cv_folds:
        k = int(counts.argmin())
        raise MechsafeError(f"the training rows have only {counts[k]} prompts of class "
                            f"{split.prompts.label_names[k]!r}; {cfg.cv_folds}-fold cross-validation needs at least "
                            f"{cfg.cv_folds}: add data or lower cv_folds")
    leaks = duplicates_across_splits(split)
    if leaks:
        logger.warning("%d prompt texts (equal up to case and punctuation) sit in more than one of train/val/test, so "
                       "test scores may be inflated; `mechsafe data describe %s` lists them", len(leaks), cfg.data)
    return split


def duplicates_across_splits(split: BenchSplit) -> list[list[int]]:
    """Groups of rows with the same normalized text that lie in more than one of the split's train/val/test rows."""
    from mechsafe.data.describe import duplicate_groups, normalize

    part = {int(i): name for name, rows in (("train", split.train), ("val", split.val), ("test", split.test))
            for i in rows}
    rows = sorted(part)
    groups = [[rows[j] for j in g] for g in duplicate_groups([normalize(split.prompts.texts[i]) for i in rows])]
    return [g for g in groups if len({part[i] for i in g}) > 1]


def _sae_probe_candidates():
    """``mechsafe.probes.sae_probes.probe_candidates`` (imported on use: it loads SAE-Lens), or a clear error when
    the SAE side is not available."""
    try:
        from mechsafe.probes.sae_probes import probe_candidates
    except ImportError as exc:
        raise MechsafeError(f"SAE probes need mechsafe.sae ({exc}); install a mechsafe with SAE support "
                            "or drop the sae field") from None
    return probe_candidates


def _sae_candidates(cfg: ProbeBenchConfig, model, prompts) -> list[Candidate]:
    probe_candidates = _sae_probe_candidates()
    root = cfg.activation_root
    cands = list(probe_candidates(model, prompts, sae_path=cfg.sae, poolings=list(cfg.pooling), ks=list(cfg.sae_ks),
                                  seed=cfg.seed, activation_root=root))
    for c in cands:
        if not isinstance(c, Candidate):
            raise MechsafeError(f"probe_candidates returned a {type(c).__name__}, not a Candidate")
    return cands


def build_candidates(cfg: ProbeBenchConfig, model, split: BenchSplit, *, progress: bool = False) -> tuple[list[Candidate], list[str]]:
    """Every candidate the config asks for, and the hook names the dense ones read."""
    n_classes = len(split.prompts.label_names)
    hooks = hook_names(model, cfg.hook, cfg.layers)
    cands: list[Candidate] = []
    if "dense" in cfg.methods:
        act_cfg = ActivationConfig(hook=cfg.hook, layers=cfg.layers, pooling=tuple(cfg.pooling),
                                   batch_size=cfg.batch_size, chat=cfg.chat, system=cfg.system,
                                   max_length=cfg.max_length)
        store = cache_activations(model, split.prompts, act_cfg, root=cfg.activation_root, progress=progress)
        make = dense_estimator(cfg.cs, cfg.cv_folds, cfg.max_iter, n_classes)
        cands += dense_candidates(store, hooks, cfg.pooling, make)
    cands += baseline_candidates(split.prompts.texts, cfg.methods,
                                 tfidf_estimator(cfg.tfidf_cs, cfg.cv_folds, cfg.max_iter, n_classes))
    if cfg.sae:
        cands += _sae_candidates(cfg, model, split.prompts)
    return cands, hooks


def _comparisons(cfg: ProbeBenchConfig, best: dict[str, CandidateResult], y_test: np.ndarray) -> list[Comparison]:
    kw = dict(n_boot=cfg.n_boot, level=cfg.ci_level, seed=cfg.seed)
    out = []
    top_dense = best_overall({m: r for m, r in best.items() if m.startswith("dense")}, cfg.select_by)
    top = top_dense or best_overall(best, cfg.select_by)
    if top is not None:
        for base in ("tfidf", "majority"):
            if base in best:
                out.append(compare(top, best[base], y_test, "auroc", **kw))
    if top_dense is not None:
        for method, r in best.items():
            if not method.startswith(("dense", "tfidf", "majority")):
                out.append(compare(r, top_dense, y_test, "auroc", **kw))
    return out


def _probe_meta(cfg: ProbeBenchConfig, model, r: CandidateResult, split: BenchSplit) -> dict[str, Any]:
    info = model_info(model)
    return {"method": r.method, "model": info.spec, "model_source": info.source, "model_path": info.path,
            "processing": info.processing, "model_fingerprint": model_fingerprint(model),
            "hook": hook_name(model, cfg.hook, r.layer), "layer": r.layer, "pooling": r.pooling,
            "label_names": list(split.prompts.label_names), "positive_class": split.prompts.label_names[-1]
            if len(split.prompts.label_names) == 2 else None,
            "chat": cfg.chat, "system": cfg.system, "max_length": cfg.max_length, "C": r.c,
            "data": split.prompts.name, "data_fingerprint": split.prompts.fingerprint(), "seed": cfg.seed,
            "val": r.val, "test": {k: v.to_dict() for k, v in r.test.items()}}


def _write_run(result: BenchResult, model, split: BenchSplit, runs_dir: str | os.PathLike) -> Path:
    from mechsafe.probes.report import write_artifacts

    cfg = result.config
    try:
        with start_run(runs_dir, COMMAND, config=cfg.to_dict(), seed=cfg.seed, processing=result.model.get("processing"),
                       tag=cfg.name or "") as run:
            for method, r in result.best.items():
                if method.startswith("dense") and r.estimator is not None:
                    fname = f"probe-{method.replace('/', '-')}.safetensors"
                    save_probe(r.estimator, run.tmp / fname, _probe_meta(cfg, model, r, split))
                    result.probes[method] = fname
            top = best_overall({m: r for m, r in result.best.items() if m in result.probes}, cfg.select_by)
            result.best_probe = result.probes[top.method] if top is not None else None
            result.run_dir = run.path
            write_artifacts(result, run.tmp)
            run.timings.update(result.timings)
            run.extra.update({"model": result.model, "data": {k: result.data[k] for k in ("name", "fingerprint", "n")},
                              "run_dir": str(run.path)})
    except BaseException:
        result.run_dir = None
        raise
    return run.path


def probe_bench(config: ProbeBenchConfig | str | os.PathLike, *, model=None, runs_dir: str | os.PathLike | None = "runs",
                progress: bool = False) -> BenchResult:
    """Run the probe benchmark and write its run directory (unless ``runs_dir`` is ``None``).

    Args:
        config: a :class:`ProbeBenchConfig` or the path of a preset.
        model: an already loaded ``HookedTransformer`` (default: load ``config.model``).
        runs_dir: folder that receives ``probe-bench-<time>[-name]/``; ``None`` writes nothing.
        progress: show progress bars while caching activations.
    """
    cfg = config if isinstance(config, ProbeBenchConfig) else load_config(config)
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    split = _load_data(cfg)
    if cfg.sae:
        _sae_probe_candidates()  # fail before the expensive steps
    timings["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if model is None:
        model = models_mod.load_model(cfg.model, processing=cfg.processing, device=cfg.device)
    timings["model_load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    candidates, hooks = build_candidates(cfg, model, split, progress=progress)
    timings["features"] = time.perf_counter() - t0
    labels = split.prompts.labels
    n_classes = len(split.prompts.label_names)
    t0 = time.perf_counter()
    results = []
    for i, cand in enumerate(candidates):
        # Small dense problems: threaded BLAS only adds synchronization (5x slower on a busy 2-core machine).
        with threadpool_limits(1, user_api="blas"):
            r = evaluate(cand, labels, split, n_classes=n_classes, seed=cfg.seed, n_boot=cfg.n_boot,
                         level=cfg.ci_level)
        logger.info("[%d/%d] %s layer=%s val %s=%.3f test auroc=%s C=%s", i + 1, len(candidates), r.method, r.layer,
                    cfg.select_by, r.val[cfg.select_by], r.test["auroc"], r.c)
        results.append(r)
    timings["fit_and_score"] = time.perf_counter() - t0
    best = best_per_method(results, cfg.select_by)
    comparisons = _comparisons(cfg, best, labels[split.test])
    info = model_info(model)
    result = BenchResult(config=cfg, run_dir=None, results=results, best=best, comparisons=comparisons,
                         data=split.summary(), model=info.to_dict(), hooks=hooks, timings=timings)
    timings["total_before_write"] = time.perf_counter() - t_all
    if runs_dir is not None:
        _write_run(result, model, split, runs_dir)
    timings["total"] = time.perf_counter() - t_all
    return result
