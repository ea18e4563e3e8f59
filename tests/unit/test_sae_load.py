import pytest
import torch

from mechsafe.errors import MechsafeError
from mechsafe.sae import LoadedSAE, load_sae, save_sae
from mechsafe.sae.load import as_loaded
from sae_helpers import random_topk_sae  # noqa: F401

HOOK = "blocks.1.hook_resid_post"


def test_save_load_round_trip_keeps_encodings_and_metadata(tmp_path):
    sae = random_topk_sae(32, HOOK)
    path = save_sae(sae, tmp_path / "s", {"hook_name": HOOK, "metrics": {"l0": 4.0}}, training=False)
    loaded = load_sae(path)
    assert isinstance(loaded, LoadedSAE) and loaded.hook_name == HOOK and loaded.metrics == {"l0": 4.0}
    x = torch.randn(7, 32)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    assert (loaded.encode(x) != 0).sum(-1).max() <= 4


def test_plain_sae_lens_directory_loads(tmp_path):
    sae = random_topk_sae(32, HOOK)
    sae.save_model(str(tmp_path / "plain"))
    loaded = load_sae(tmp_path / "plain")
    assert loaded.hook_name == HOOK and loaded.metadata == {} and loaded.architecture == "topk"


def test_missing_or_broken_sources_raise(tmp_path):
    with pytest.raises(MechsafeError, match="neither an SAE directory nor a known SAE-Lens release"):
        load_sae(tmp_path / "nope")
    with pytest.raises(MechsafeError, match="neither"):
        load_sae("not-a-release/some-id")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MechsafeError, match="missing cfg.json"):
        load_sae(tmp_path / "empty")
    sae = random_topk_sae(32, HOOK)
    sae.save_model(str(tmp_path / "bad"))
    (tmp_path / "bad" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(MechsafeError, match="could not load"):
        load_sae(tmp_path / "bad")


def test_hook_name_is_required(tmp_path):
    sae = random_topk_sae(32, HOOK)
    sae.cfg.metadata.hook_name = None
    with pytest.raises(MechsafeError, match="hook name"):
        as_loaded(sae)
    assert as_loaded(sae, HOOK).hook_name == HOOK
    sae.save_model(str(tmp_path / "nohook"))
    with pytest.raises(MechsafeError, match="hook name"):
        load_sae(tmp_path / "nohook")


def test_failed_save_leaves_nothing(tmp_path):
    class Broken:
        def save_model(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_sae(Broken(), tmp_path / "s", {}, training=False)
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())
