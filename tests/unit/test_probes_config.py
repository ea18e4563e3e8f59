"""Probe-bench configuration: presets, overrides, validation, and the train/val/test rows it implies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mechsafe as ms
from mechsafe.errors import MechsafeError
from mechsafe.probes import OODSplit, ProbeBenchConfig, load_config
from mechsafe.cli.common import field_docs
from mechsafe.probes.config import field_names
from mechsafe.probes.splits import make_split

PRESETS = Path(__file__).resolve().parents[2] / "probes"


def test_every_config_field_is_documented():
    from mechsafe.align import AlignConfig
    from mechsafe.directions import SelectionConfig
    from mechsafe.evaluation import EvalConfig
    from mechsafe.finetune import FinetuneConfig
    from mechsafe.sae import SAETrainConfig

    assert set(field_docs(ProbeBenchConfig)) == set(field_names())
    for cls in (SAETrainConfig, FinetuneConfig, AlignConfig, SelectionConfig, EvalConfig):
        import dataclasses

        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("name", ["harmful_vs_harmless", "toxicity_vs_other_harm", "harm_category",
                                  "harmful_vs_harmless_ood"])
def test_shipped_presets_load_and_validate(name):
    cfg = load_config(PRESETS / f"{name}.yaml")
    assert cfg.name == name
    assert set(cfg.pooling) <= {"last", "mean"} and cfg.methods
    assert (cfg.ood is not None) == name.endswith("_ood")


def test_overrides_replace_preset_values_and_are_coerced(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data: harmful_vs_harmless\nlayers: all\npooling: [last, mean]\nseed: 0\n")
    cfg = load_config(preset, layers="10-20", pooling="mean", seed=1, cs="0.5,2")
    assert (cfg.layers, cfg.pooling, cfg.seed, cfg.cs) == ("10-20", ["mean"], 1, [0.5, 2.0])
    assert load_config(preset, layers=[3, 5]).layers == "3,5"


def test_unknown_preset_key_is_one_line_error(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data: harmful_vs_harmless\nlayer: 3\n")
    with pytest.raises(MechsafeError, match="unknown preset key 'layer' \\(did you mean 'layers'\\?\\); valid keys") as err:
        load_config(preset)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": ["dense", "svm"]}, "unknown method"),
    ({"pooling": ["tokens"]}, "unknown pooling"),
    ({"hook": "resid_pots"}, "unknown hook kind"),
    ({"cv_folds": 1}, "cv_folds must be at least 2"),
    ({"cs": [0.0, 1.0]}, "cs must be"),
    ({"select_by": "loss"}, "unknown select_by"),
    ({"ood": {"train_groups": ["a"], "test_groups": ["a"]}}, "not out of distribution"),
    ({"ood": {"train_groups": ["a"]}}, "needs both"),
    ({"ood": {"train_groups": ["a"], "test_groups": ["b"], "extra": 1}}, "unknown ood key 'extra'"),
    ({"sae": "/no/such/sae"}, "does not exist"),
])
def test_bad_values_raise(kwargs, message):
    with pytest.raises(MechsafeError, match=message):
        ProbeBenchConfig(**kwargs)


def test_missing_preset_raises():
    with pytest.raises(MechsafeError, match="does not exist"):
        load_config("no/such/preset.yaml")


def test_in_distribution_rows_follow_the_dataset_splits():
    ps = ms.data.load("harmful_vs_harmless")
    split = make_split(ps)
    for which in ("train", "val", "test"):
        assert {ps.splits[i] for i in split.rows(which)} == {which}
    assert len(split.train) + len(split.val) + len(split.test) == len(ps)


def test_ood_groups_never_leak_into_test():
    cfg = load_config(PRESETS / "harmful_vs_harmless_ood.yaml")
    ps = ms.data.load(cfg.data)
    split = make_split(ps, cfg.ood)
    groups = np.asarray(ps.groups)
    train_only = set(cfg.ood.train_groups) - set(cfg.ood.test_groups)
    test_only = set(cfg.ood.test_groups) - set(cfg.ood.train_groups)
    assert train_only and test_only
    assert not set(groups[split.test]) & train_only
    assert not set(groups[np.r_[split.train, split.val]]) & test_only
    assert not set(split.test) & set(np.r_[split.train, split.val])
    shared_test = [i for i in split.test if groups[i] in set(cfg.ood.train_groups)]
    assert shared_test and all(ps.splits[i] == "test" for i in shared_test)
    # a test-only group contributes every prompt it has
    for g in test_only:
        assert np.isin(np.flatnonzero(groups == g), split.test).all()
    summary = split.summary()
    assert summary["mode"] == "ood-groups" and set(summary["test_groups"]) == set(cfg.ood.test_groups)


def test_ood_unknown_group_and_single_class_train_raise():
    ps = ms.data.load("harmful_vs_harmless")
    with pytest.raises(MechsafeError, match="not in harmful_vs_harmless"):
        make_split(ps, OODSplit(train_groups=["harmless", "nope"], test_groups=["privacy"]))
    # training on harmful groups only leaves the training rows with one class
    with pytest.raises(MechsafeError, match="only class"):
        make_split(ps, OODSplit(train_groups=["privacy", "fraud_financial"], test_groups=["toxicity_hate", "harmless"]))


def test_ood_test_data_must_share_classes():
    ps = ms.data.load("harmful_vs_harmless")
    other = ms.data.load("toxicity_vs_other_harm")
    with pytest.raises(MechsafeError, match="differ"):
        make_split(ps, OODSplit(test_data="toxicity_vs_other_harm"), other)
