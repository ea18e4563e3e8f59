import pytest

from mechsafe.errors import MechsafeError
from mechsafe.hooks import HOOK_KINDS, hook_name, hook_names, kind_of, layer_of, parse_layers


@pytest.mark.parametrize("selector,expected", [
    ("all", list(range(30))),
    ("early", list(range(0, 10))),
    ("middle", list(range(10, 20))),
    ("late", list(range(20, 30))),
    ("last", [29]),
    ("3-7", [3, 4, 5, 6, 7]),
    ("0,5,9", [0, 5, 9]),
    ("1-2,5", [1, 2, 5]),
    (-1, [29]),
    ([4, 2, 4], [2, 4]),
])
def test_parse_layers(selector, expected):
    assert parse_layers(selector, 30) == expected


def test_named_sets_cover_small_models():
    # every named set must select at least one layer even with few layers
    for sel in ("early", "middle", "late", "last"):
        assert parse_layers(sel, 2)
    assert parse_layers("early", 3) == [0] and parse_layers("middle", 3) == [1] and parse_layers("late", 3) == [2]


@pytest.mark.parametrize("bad,needle", [("30", "out of range"), ("7-3", "empty"), ("x", "not valid"), ("", "not valid")])
def test_parse_layers_errors(bad, needle):
    with pytest.raises(MechsafeError, match=needle):
        parse_layers(bad, 30)


def test_hook_names_are_validated(tiny_model):
    names = hook_names(tiny_model, "resid_post", "all")
    assert names == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert all(n in tiny_model.hook_dict for kind in HOOK_KINDS for n in hook_names(tiny_model, kind, "all"))
    assert hook_name(tiny_model, "mlp_post", -1) == "blocks.2.mlp.hook_post"
    assert layer_of("blocks.2.mlp.hook_post") == 2 and kind_of("blocks.2.mlp.hook_post") == "mlp_post"


def test_unknown_kind_and_layer_name_the_valid_choices(tiny_model):
    with pytest.raises(MechsafeError, match="resid_post"):
        hook_names(tiny_model, "resid", "all")
    with pytest.raises(MechsafeError, match="layers 0-2"):
        hook_name(tiny_model, "resid_post", 3)
