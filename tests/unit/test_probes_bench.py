"""The probe benchmark end to end on the tiny random model: fitting, CV isolation, determinism,
saved probes, the SAE call site, and nothing half-written on failure."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from conftest import make_tiny_model

from mechsafe.errors import MechsafeError
from mechsafe.probes import Candidate, ProbeBenchConfig, load, probe_bench
from mechsafe.probes import bench as bench_mod
from mechsafe.probes.methods import dense_estimator, chosen_c
from mechsafe.probes.evaluate import evaluate
from mechsafe.probes.splits import BenchSplit

HARMFUL = {"weapons": ["bomb", "gun", "knife", "poison"], "fraud": ["scam", "forge", "launder", "phish"],
           "hate": ["slur", "insult", "harass", "bully"]}
HARMLESS = ["bread", "garden", "poem", "bike", "soup", "kite", "song", "chess"]


def write_dataset(path, n_per_group=12):
    """A small jsonl: harmful prompts in three groups, harmless prompts in one, int labels."""
    rows = []
    for g, words in HARMFUL.items():
        for i in range(n_per_group):
            rows.append({"prompt": f"how to {words[i % 4]} them {i}", "y": 1, "topic": g})
    for i in range(3 * n_per_group):
        rows.append({"prompt": f"how to make a {HARMLESS[i % 8]} {i}", "y": 0, "topic": "harmless"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "toy.jsonl")


@pytest.fixture(scope="module")
def act_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("acts"))


def small_config(data_file, act_root, **kw):
    base = dict(data=str(data_file), text_column="prompt", label_column="y", group_column="topic", layers="1,2",
                pooling=["last", "mean"], n_boot=100, activation_root=act_root, batch_size=32, name="toy")
    return ProbeBenchConfig(**(base | kw))


@pytest.fixture(scope="module")
def first_run(model, data_file, act_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return probe_bench(small_config(data_file, act_root), model=model, runs_dir=runs), runs


def test_bench_reports_every_method_and_layer(first_run):
    result, _ = first_run
    keys = {(r.method, r.layer) for r in result.results}
    assert keys == {("dense/last", 1), ("dense/last", 2), ("dense/mean", 1), ("dense/mean", 2),
                    ("majority", None), ("tfidf", None)}
    for r in result.results:
        for name, e in r.test.items():
            assert 0.0 <= e.low <= e.value <= e.high <= 1.0, (r.method, name, e)
        assert sum(map(sum, r.confusion)) == sum(result.data["test"].values())
    maj = result.best["majority"]
    assert maj.test["auroc"].value == 0.5 and maj.c is None
    # the word-level task is easy: TF-IDF finds it
    assert result.best["tfidf"].test["auroc"].value > 0.9
    for m in ("dense/last", "dense/mean"):
        chosen = result.best[m]
        same = [r for r in result.results if r.method == m]
        assert chosen.val["auroc"] == max(r.val["auroc"] for r in same)
        assert chosen.c in small_config("x", "y").cs


def test_run_directory_contents(first_run):
    result, runs = first_run
    run_dir = result.run_dir
    assert run_dir.parent == runs and run_dir.name.startswith("probe-bench-") and run_dir.name.endswith("-toy")
    for f in ("report.md", "results.json", "run.json", "metric_by_layer.png", "confusion_matrix.png",
              "probe-dense-last.safetensors", "probe-dense-last.json", "probe-dense-mean.safetensors"):
        assert (run_dir / f).is_file(), f
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    report = (run_dir / "report.md").read_text()
    assert "TF-IDF baseline" in report and "## All layers" in report and "| train |" in report
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best"]["tfidf"]["test"]["auroc"]["value"] == pytest.approx(result.best["tfidf"].test["auroc"].value)
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["seed"] == 0 and manifest["config"]["layers"] == "1,2" and "scikit-learn" in manifest["versions"]
    assert [c["b"] for c in results["comparisons"]] == ["tfidf", "majority"]


def test_same_seed_gives_identical_results(first_run, model, data_file, act_root, tmp_path):
    result, _ = first_run
    again = probe_bench(small_config(data_file, act_root), model=model, runs_dir=tmp_path)
    a = json.loads((result.run_dir / "results.json").read_text())
    b = json.loads((again.run_dir / "results.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731
    assert strip(a["results"]) == strip(b["results"])
    assert a["comparisons"] == b["comparisons"]


def test_saved_probe_round_trip(first_run, model):
    result, _ = first_run
    probe = load(result.run_dir)  # the best dense probe
    assert probe.path.name == result.best_probe
    assert probe.meta["label_names"] == ["0", "1"] and probe.meta["hook"] == f"blocks.{probe.meta['layer']}.hook_resid_post"
    best = result.best[probe.meta["method"]]
    prompts = ["how to bomb them 3", "how to make a soup 4", "how to scam them 99"]
    scores = probe.score(model, prompts)
    assert scores.shape == (3,)
    np.testing.assert_allclose(probe.predict_proba(model, prompts)[:, 1], scores)  # P(class 1), the columns sum to 1
    np.testing.assert_allclose(probe.predict_proba(model, prompts).sum(1), 1.0)
    # the reloaded pipeline equals the in-memory one on the same activations
    from mechsafe.activations import ActivationConfig, cache_activations

    cfg = ActivationConfig(layers=str(best.layer), pooling=(best.pooling,), max_length=result.config.max_length)
    store = cache_activations(model, prompts, cfg, root=str(result.run_dir.parent / "score-acts"), progress=False)
    X = store.pooled(probe.hook, best.pooling).numpy()
    np.testing.assert_allclose(scores, best.estimator.predict_proba(X)[:, 1], rtol=1e-6)
    assert load(result.run_dir / result.best_probe.replace(".safetensors", ".json")).meta == probe.meta


class SpyEstimator:
    """Records which rows it was fit on."""

    seen: list[np.ndarray] = []

    def fit(self, X, y):
        SpyEstimator.seen.append(np.asarray(X)[:, 0].astype(int))
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, X):
        return np.full((len(X), len(self.classes_)), 1 / len(self.classes_))


def _toy_split(n=60, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)
    from mechsafe.data import PromptSet

    y = np.arange(n) % 2
    ps = PromptSet("t", [str(i) for i in range(n)], y, ["a", "b"], ["g"] * n, ["train"] * n, [str(i) for i in range(n)])
    return BenchSplit(ps, np.sort(idx[:36]), np.sort(idx[36:48]), np.sort(idx[48:]), "in-distribution")


def test_estimators_are_fit_on_training_rows_only():
    split = _toy_split()
    SpyEstimator.seen = []
    ids = np.arange(60, dtype=float)[:, None]
    evaluate(Candidate("spy", 0, ids, lambda seed: SpyEstimator()), split.prompts.labels, split, n_classes=2, n_boot=10)
    assert len(SpyEstimator.seen) == 1
    np.testing.assert_array_equal(SpyEstimator.seen[0], split.train)


def test_chosen_c_does_not_depend_on_test_labels():
    split = _toy_split(seed=1)
    rng = np.random.default_rng(0)
    y = split.prompts.labels.copy()
    X = rng.normal(size=(60, 8)) + 0.8 * y[:, None]
    make = dense_estimator([1e-3, 1e-2, 1e-1, 1.0, 10.0], 3, 500, 2)
    a = evaluate(Candidate("dense", 0, X, make, "last"), y, split, n_classes=2, n_boot=10)
    y_flipped = y.copy()
    y_flipped[split.test] = 1 - y_flipped[split.test]
    b = evaluate(Candidate("dense", 0, X, make, "last"), y_flipped, split, n_classes=2, n_boot=10)
    assert a.c == b.c and a.val == b.val
    np.testing.assert_allclose(a.test_proba, b.test_proba)
    assert a.test["auroc"].value == pytest.approx(1 - b.test["auroc"].value)
    assert chosen_c(a.estimator) == a.c


def test_sae_call_site_appends_candidates(monkeypatch, model, data_file, act_root, tmp_path):
    calls = {}

    def probe_candidates(model_, prompts, *, sae_path, poolings, ks, seed, activation_root):
        calls.update(sae_path=sae_path, poolings=poolings, ks=ks, seed=seed, root=activation_root, n=len(prompts))
        rng = np.random.default_rng(0)
        feats = rng.random((len(prompts), 5)) + prompts.labels[:, None]  # informative fake features
        return [Candidate(f"sae-k{k}", 1, feats[:, :min(k, 5)], dense_estimator([0.1, 1.0], 3, 200, 2), p)
                for k in ks for p in poolings]

    monkeypatch.setitem(sys.modules, "mechsafe.probes.sae_probes", types.SimpleNamespace(probe_candidates=probe_candidates))
    sae = tmp_path / "sae"
    sae.mkdir()
    cfg = small_config(data_file, act_root, sae=str(sae), sae_ks=[1, 4], pooling=["last"], layers="1")
    result = probe_bench(cfg, model=model, runs_dir=None)
    assert calls == {"sae_path": str(sae), "poolings": ["last"], "ks": [1, 4], "seed": 0, "root": act_root, "n": 72}
    assert {"sae-k1/last", "sae-k4/last"} <= set(result.best)
    assert {c.a.split(" @")[0] for c in result.comparisons if c.b.startswith("dense")} == {"sae-k1/last", "sae-k4/last"}
    assert result.run_dir is None


def test_sae_without_module_is_a_clear_error(monkeypatch, model, data_file, act_root, tmp_path):
    monkeypatch.setitem(sys.modules, "mechsafe.probes.sae_probes", None)  # makes the import fail
    cfg = small_config(data_file, act_root, sae=str(tmp_path), layers="1")
    with pytest.raises(MechsafeError, match="SAE probes need mechsafe.sae"):
        probe_bench(cfg, model=model, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_single_class_data_fails_before_any_run_dir(model, tmp_path):
    f = tmp_path / "one.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": 1}) + "\n" for i in range(20)))
    with pytest.raises(MechsafeError, match="only class"):
        probe_bench(ProbeBenchConfig(data=str(f)), model=model, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_failure_while_writing_leaves_no_run_dir(monkeypatch, model, data_file, act_root, tmp_path):
    import mechsafe.probes.report as report

    def boom(result, folder):
        (folder / "report.md").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_artifacts", boom)
    with pytest.raises(RuntimeError):
        probe_bench(small_config(data_file, act_root, layers="1", methods=["dense", "majority"]), model=model,
                    runs_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ood_by_groups_on_a_local_file(model, data_file, act_root):
    cfg = small_config(data_file, act_root, layers="2", pooling=["mean"],
                       ood={"train_groups": ["weapons", "fraud", "harmless"], "test_groups": ["hate", "harmless"]})
    result = probe_bench(cfg, model=model, runs_dir=None)
    assert result.data["mode"] == "ood-groups"
    assert set(result.data["test_groups"]) == {"hate", "harmless"}
    assert set(result.data["train_groups"]) == {"weapons", "fraud", "harmless"}
    assert result.data["test"]["1"] == 12  # every "hate" prompt is tested


def test_bench_module_uses_candidates_for_everything(model, data_file, act_root):
    from mechsafe.probes.splits import make_split
    from mechsafe import data

    cfg = small_config(data_file, act_root, layers="1")
    split = make_split(data.load(cfg.data, **cfg.data_kwargs()))
    cands, hooks = bench_mod.build_candidates(cfg, model, split)
    assert hooks == ["blocks.1.hook_resid_post"]
    assert all(isinstance(c, Candidate) for c in cands)
    assert [c.key for c in cands] == ["dense/last", "dense/mean", "majority", "tfidf"]
    assert cands[0].features.shape == (72, model.cfg.d_model) and isinstance(cands[3].features, list)


def test_too_few_training_prompts_per_class_for_cv(model, tmp_path):
    f = tmp_path / "rare.jsonl"
    rows = [{"text": f"common {i}", "label": 0} for i in range(40)] + [{"text": f"rare {i}", "label": 1} for i in range(4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MechsafeError, match="cross-validation needs at least 3"):
        probe_bench(ProbeBenchConfig(data=str(f)), model=model, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_multiclass_task_reports_macro_metrics_and_scores(model, data_file, act_root, tmp_path):
    cfg = small_config(data_file, act_root, label_column="topic", group_column=None, layers="2", pooling=["mean"])
    result = probe_bench(cfg, model=model, runs_dir=tmp_path)
    assert result.label_names == ["fraud", "harmless", "hate", "weapons"]
    tfidf = result.best["tfidf"]
    assert len(tfidf.confusion) == 4 and tfidf.test["auroc"].value > 0.9
    assert result.best["majority"].test["auroc"].value == 0.5
    assert "macro F1" in (result.run_dir / "report.md").read_text()
    probe = load(result.run_dir)
    proba = probe.score(model, ["how to scam them 5", "how to make a kite 1"])
    assert proba.shape == (2, 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)


def test_saved_probes_are_arrays_that_predict_like_the_fitted_pipeline(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from mechsafe.probes.store import SIDECAR_KEYS, LinearProbe, save_probe

    rng = np.random.default_rng(0)
    meta = {k: "x" for k in SIDECAR_KEYS} | {"label_names": ["a", "b", "c"]}
    for n_classes in (2, 3):
        X = rng.normal(size=(90, 6)) * [1, 5, 0.1, 2, 1, 3] + 4
        y = np.arange(90) % n_classes
        X[:, 0] += y
        pipe = Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(max_iter=500))]).fit(X, y)
        path = save_probe(pipe, tmp_path / f"probe-{n_classes}.joblib", meta)
        assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
        probe = load(path)
        assert isinstance(probe.estimator, LinearProbe)
        np.testing.assert_allclose(probe.estimator.predict_proba(X), pipe.predict_proba(X), rtol=0, atol=1e-12)
        assert load(path.with_suffix(".json")).meta == probe.meta


def test_a_pickle_in_place_of_a_probe_is_refused_without_running_it(tmp_path):
    import pickle

    from mechsafe.probes.store import SIDECAR_KEYS

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "probe-dense-last.joblib").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "probe-dense-last.json").write_text(json.dumps({k: "x" for k in SIDECAR_KEYS}))
    for path in ("probe-dense-last.joblib", "probe-dense-last.json"):
        with pytest.raises(MechsafeError, match="pickle"):
            load(tmp_path / path)
    assert not marker.exists()  # nothing was unpickled
    load(tmp_path / "probe-dense-last.joblib", allow_pickle=True)  # the explicit opt-in does unpickle it
    assert marker.exists()


def test_a_bench_run_loads_back_from_its_directory(first_run):
    from mechsafe.probes import BenchResult

    result, _ = first_run
    back = BenchResult.load(result.run_dir)
    assert back.to_dict() == json.loads((result.run_dir / "results.json").read_text())
    assert back.best_probe == result.best_probe and back.comparisons[0].verdict == result.comparisons[0].verdict


def test_duplicates_across_splits_are_found_up_to_case_and_punctuation():
    from mechsafe.data import PromptSet
    from mechsafe.probes.bench import duplicates_across_splits
    from mechsafe.probes.splits import BenchSplit

    texts = ["How to bake bread?", "how to bake bread", "Plan a picnic", "plan a picnic!", "Name a colour"]
    ps = PromptSet("toy", texts, [0, 0, 1, 1, 0], ["a", "b"], ["g"] * 5, ["train"] * 5, [str(i) for i in range(5)], {})
    split = BenchSplit(ps, np.array([0, 2, 3]), np.array([4]), np.array([1]), "in-distribution")
    assert duplicates_across_splits(split) == [[0, 1]]  # 2 and 3 are duplicates within train only
