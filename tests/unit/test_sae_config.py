from pathlib import Path

import pytest

from mechsafe.errors import MechsafeError
from mechsafe.sae import ARCHITECTURES, SAETrainConfig, load_recipe, make_config

RECIPES = Path(__file__).resolve().parents[2] / "sae"


def test_default_recipe_is_topk_k64_4x_mid_layer():
    cfg = load_recipe(RECIPES / "smollm2-resid-mid.yaml")
    assert (cfg.architecture, cfg.k, cfg.expansion_factor, cfg.hook, cfg.layer) == ("topk", 64, 4, "resid_post", 15)
    assert cfg.eval_split == "test" and cfg.source == "bundled"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    assert isinstance(load_recipe(path), SAETrainConfig)


def test_overrides_are_coerced_from_cli_strings():
    cfg = make_config({"architecture": "topk"}, k="32", extra_texts="false", lr="1e-3", max_texts="null")
    assert cfg.k == 32 and cfg.extra_texts is False and cfg.lr == pytest.approx(1e-3) and cfg.max_texts is None
    assert cfg.n_steps == cfg.training_tokens // cfg.batch_size


@pytest.mark.parametrize("bad", [
    {"architecture": "gatedish"}, {"hook": "resid_sideways"}, {"k": 0}, {"route": "teleport"},
    {"training_tokens": 10, "batch_size": 512}, {"dense_threshold": 1.5}, {"lr": -1},
])
def test_bad_fields_raise_one_line_errors(bad):
    with pytest.raises(MechsafeError) as err:
        make_config(bad)
    assert "\n" not in str(err.value)


def test_unknown_field_and_bad_value_name_the_problem(tmp_path):
    with pytest.raises(MechsafeError, match="unknown SAE config field"):
        make_config({"widht": 4})
    with pytest.raises(MechsafeError, match="k"):
        make_config({"k": "many"})
    with pytest.raises(MechsafeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("k: [1,\n")
    with pytest.raises(MechsafeError, match="not valid YAML"):
        load_recipe(broken)


def test_architectures_cover_the_required_families():
    assert {"standard", "topk", "batchtopk", "jumprelu"} <= set(ARCHITECTURES)
