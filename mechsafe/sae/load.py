"""Saving and loading SAEs: mechsafe SAE directories, plain SAE-Lens directories and pretrained releases.

A mechsafe SAE directory is SAE-Lens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``,
written by SAE-Lens) plus ``mechsafe_sae.json``: the model spec, hook name, weight processing,
training config and evaluation metrics. Every loader returns a :class:`LoadedSAE`, which exposes
``hook_name``, ``encode`` and ``decode`` whatever the source::

    sae = load_sae("runs/sae/smollm2-resid-mid")
    feats = sae.encode(acts)            # [..., d_sae]
    recon = sae.decode(feats)           # [..., d_in]
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from mechsafe.errors import MechsafeError
from mechsafe.hub import require_hub
from mechsafe.runs import atomic_dir, read_json, write_json

logger = logging.getLogger(__name__)

META_FILE = "mechsafe_sae.json"
"""mechsafe's metadata file next to SAE-Lens's ``cfg.json``."""
SAE_FILES = ("cfg.json", "sae_weights.safetensors")


@dataclasses.dataclass
class LoadedSAE:
    """An SAE-Lens SAE with the hook it reads and mechsafe's metadata."""

    sae: Any
    """The SAE-Lens ``SAE`` (inference) object."""
    hook_name: str
    """TransformerLens hook name the SAE was trained on."""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    """mechsafe metadata: model spec, processing, training config, eval metrics (empty for foreign SAEs)."""
    path: Path | None = None
    """Directory it was loaded from (``None`` for an in-memory or hub SAE)."""

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())

    @property
    def W_dec(self) -> Float[torch.Tensor, "d_sae d_in"]:
        return self.sae.W_dec

    @property
    def metrics(self) -> dict[str, Any]:
        """Evaluation metrics saved with the SAE (empty when none were saved)."""
        return dict(self.metadata.get("metrics") or {})

    @torch.no_grad()
    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """Latent activations of ``x``."""
        return self.sae.encode(x.to(self.sae.dtype))

    @torch.no_grad()
    def decode(self, f: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        """Reconstruction from latent activations."""
        return self.sae.decode(f.to(self.sae.dtype))

    @torch.no_grad()
    def reconstruct(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        return self.decode(self.encode(x))


def as_loaded(sae: Any, hook_name: str | None = None) -> LoadedSAE:
    """Wrap an SAE-Lens SAE (or pass a :class:`LoadedSAE` through), resolving its hook name."""
    if isinstance(sae, LoadedSAE):
        if hook_name and hook_name != sae.hook_name:
            return dataclasses.replace(sae, hook_name=hook_name)
        return sae
    if not hasattr(sae, "encode") or not hasattr(sae, "cfg"):
        raise MechsafeError(f"{type(sae).__name__} is not an SAE; pass a LoadedSAE, an SAE-Lens SAE or a path to load_sae")
    name = hook_name or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not name:
        raise MechsafeError("the SAE does not record its hook name; pass hook_name=... (e.g. blocks.15.hook_resid_post)")
    return LoadedSAE(sae=sae, hook_name=str(name))


def save_sae(sae: Any, path: str | os.PathLike, metadata: dict[str, Any], *, training: bool = True,
             extra_files: dict[str, str] | None = None, manifest: dict[str, Any] | None = None) -> Path:
    """Write an SAE directory atomically: SAE-Lens files, ``mechsafe_sae.json`` and ``extra_files`` (name -> text).

    ``training=True`` saves a SAE-Lens ``TrainingSAE`` as its inference SAE (``save_inference_model``;
    a BatchTopK SAE becomes a JumpReLU SAE); otherwise ``save_model`` is used. ``manifest`` holds the
    keyword arguments of :func:`mechsafe.runs.write_run_manifest` (``run.json``).
    """
    from mechsafe.runs import atomic_write_text, write_run_manifest

    if isinstance(sae, LoadedSAE):
        sae, training = sae.sae, False
    path = Path(path)
    with atomic_dir(path) as tmp:
        if training and hasattr(sae, "save_inference_model"):
            sae.save_inference_model(str(tmp))
        else:
            sae.save_model(str(tmp))
        write_json(tmp / META_FILE, metadata)
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
        if manifest is not None:
            write_run_manifest(tmp, **manifest)
    return path


def _load_dir(path: Path, device: str) -> LoadedSAE:
    missing = [f for f in SAE_FILES if not (path / f).is_file()]
    if missing:
        raise MechsafeError(f"{path} is not an SAE directory (missing {', '.join(missing)}); "
                            "pass a directory written by `mechsafe sae train` or SAE-Lens's save_model")
    from sae_lens import SAE

    try:
        sae = SAE.load_from_disk(str(path), device=device)
    except Exception as exc:  # noqa: BLE001 - SAE-Lens raises several types for bad files
        raise MechsafeError(f"could not load the SAE in {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                            "re-train or re-save it") from None
    sae.eval()
    metadata = read_json(path / META_FILE) if (path / META_FILE).is_file() else {}
    hook = metadata.get("hook_name") or getattr(sae.cfg.metadata, "hook_name", None)
    if not hook:
        raise MechsafeError(f"the SAE in {path} does not record its hook name; add hook_name to its cfg.json metadata")
    return LoadedSAE(sae=sae, hook_name=str(hook), metadata=metadata, path=path)


def load_sae(path_or_name: str | os.PathLike, sae_id: str | None = None, device: str = "cpu") -> LoadedSAE:
    """Load an SAE from a directory (mechsafe or plain SAE-Lens) or a SAE-Lens pretrained release.

    Args:
        path_or_name: a directory with ``cfg.json`` + ``sae_weights.safetensors``; or a SAE-Lens release
            name (then ``sae_id`` names the SAE in it, or write ``release/sae_id`` with ``sae_id=None``).
        sae_id: the SAE within a pretrained release.
        device: torch device for the SAE.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return _load_dir(path, device)
    text = str(path_or_name)
    if sae_id is None and "/" in text:
        text, sae_id = text.split("/", 1)
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    if sae_id is None or text not in get_pretrained_saes_directory():
        raise MechsafeError(f"{path_or_name} is neither an SAE directory nor a known SAE-Lens release; "
                            "check the path (train one with `mechsafe sae train`) or the release name")

    require_hub(f"the SAE-Lens release {text!r} / {sae_id!r}", "when offline, pass a local SAE directory")
    try:
        sae = SAE.from_pretrained(text, sae_id, device=device)
    except Exception as exc:  # noqa: BLE001 - offline hubs and unknown releases raise several types
        raise MechsafeError(f"could not load SAE-Lens release {text!r} / {sae_id!r} ({type(exc).__name__}); "
                            "check the names, or when offline pass a local SAE directory") from None
    sae.eval()
    return LoadedSAE(sae=sae, hook_name=str(sae.cfg.metadata.hook_name),
                     metadata={"source": f"sae_lens:{text}/{sae_id}"})
