"""WaRP phase 1: a basis of each protected weight's input space, from the covariance of its inputs on safety data.

For a weight ``W`` (``d_out x d_in``, as a linear layer stores it; TransformerLens keeps ``Wᵀ``) and its inputs
``X`` (``tokens x d_in``: every prompt and refusal token of the safety pairs, padding excluded, read through a hook at
the weight's input), the basis is the eigenvectors ``U`` (columns, by decreasing eigenvalue) of ``C = XᵀX / n``,
accumulated in float64 batch by batch, so no activation is kept. WaRP rotates only the input side: the weight's
coefficients in the basis are ``W̃ = W U``, and ``W = W̃ Uᵀ``.

Store layout (``$MECHSAFE_CACHE/warp/<model fingerprint>-<key>/``, or a folder given)::

    manifest.json                      format, model fingerprint, weights, data fingerprint, tokens, spectra
    basis/<weight name>.safetensors    U [d_in, d_in] (float32) and the eigenvalues (float64)

Each weight's file is written when its basis is done; a killed run computes only the weights left.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.forward import TeacherForced, encode_examples
from mechsafe.models import cache_dir, model_info
from mechsafe.runs import read_json, save_safetensors, stable_hash, write_json
from mechsafe.snip.actsvd import input_grams, weight_gram
from mechsafe.warp.config import WarpConfig
from mechsafe.weights import WeightHandle, fingerprint, has_kind, select

logger = logging.getLogger(__name__)

FORMAT = "mechsafe-warp/1"


def protected_weights(model: HookedTransformer, config: WarpConfig) -> list[WeightHandle]:
    """The handles of the weights ``config`` protects (``ffn_up`` takes ``W_gate`` only where the MLP is gated;
    ``ffn_gate`` asks for it and raises without one)."""
    kinds = [k for k in config.kinds()
             if not (k == "mlp.W_gate" and "ffn_gate" not in config.layer_types and not has_kind(model, k))]
    return select(model, kinds, config.layers)


def safety_pairs(model: HookedTransformer, config: WarpConfig, progress: bool = True
                 ) -> tuple[list[tuple[str, str]], str]:
    """The (prompt, refusal) pairs of phases 1 and 2 (the SNIP scoring data of the same name), and where they are from."""
    from mechsafe.snip.config import ScoreConfig
    from mechsafe.snip.data import scoring_pairs

    score_config = ScoreConfig(data=config.data, responses=config.responses, n_samples=config.n_samples,
                               max_length=config.max_length, seed=config.seed)
    return scoring_pairs(model, score_config, cache_dir() / "snip", progress)


def safety_sequences(model: HookedTransformer, config: WarpConfig, progress: bool = True
                     ) -> tuple[list[TeacherForced], str]:
    pairs, where = safety_pairs(model, config, progress)
    return encode_examples(model.tokenizer, pairs, max_length=config.max_length), where


def data_fingerprint(seqs: Sequence[TeacherForced]) -> str:
    return stable_hash([[list(s.ids), s.prompt_len] for s in seqs], 16)


def store_path(model: HookedTransformer, config: WarpConfig, seqs: Sequence[TeacherForced]) -> Path:
    """The default store of ``model``'s basis for ``config`` and its data."""
    basis_fields = {k: getattr(config, k) for k in ("layer_types", "layers", "basis", "batch_size", "seed")}
    key = stable_hash({"config": basis_fields, "data": data_fingerprint(seqs)}, 12)
    return cache_dir() / "warp" / f"{fingerprint(model)}-{key}"


@dataclasses.dataclass
class Basis:
    """A finished phase-1 store: ``U`` of each protected weight (``None`` for the identity basis)."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "Basis":
        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise MechsafeError(f"{path} holds no WaRP basis (no manifest.json); compute one with mechsafe warp basis")
        manifest = read_json(path / "manifest.json")
        if manifest.get("format") != FORMAT:
            raise MechsafeError(f"{path / 'manifest.json'} is not a WaRP store manifest; point to a basis folder")
        if not manifest.get("complete"):
            raise MechsafeError(f"the WaRP basis in {path} is unfinished; rerun mechsafe warp basis to resume it")
        return cls(path, manifest)

    @property
    def weights(self) -> list[str]:
        return list(self.manifest["weights"])

    def check(self, model: HookedTransformer, handles: Sequence[WeightHandle]) -> None:
        """Raise unless the basis was computed on this model for exactly these weights."""
        if self.manifest["model_fingerprint"] != fingerprint(model):
            raise MechsafeError(f"the WaRP basis in {self.path} was computed on another model "
                                f"({self.manifest.get('model', '?')}); compute the basis of this model")
        names = [h.name for h in handles]
        if names != self.weights:
            raise MechsafeError(f"the WaRP basis in {self.path} covers other weights ({_span(self.weights)}) than "
                                f"the ones selected ({_span(names)}); select its layer types and layers, or compute "
                                "a basis for these")

    def u(self, name: str) -> torch.Tensor | None:
        """``U`` of weight ``name`` (float32, columns by decreasing eigenvalue), ``None`` for the identity basis."""
        if self.manifest["basis"] == "identity":
            return None
        try:
            return load_file(str(self.path / "basis" / f"{name}.safetensors"))["U"]
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise MechsafeError(f"the basis file of {name} in {self.path} is unreadable ({exc}); delete it and rerun "
                                "mechsafe warp basis") from None

    def eigenvalues(self, name: str) -> torch.Tensor:
        return load_file(str(self.path / "basis" / f"{name}.safetensors"))["eigenvalues"]


def _span(names: Sequence[str]) -> str:
    return f"{len(names)} weights, {names[0]} ... {names[-1]}" if names else "no weights"


def eigenbasis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns, in that order) of a symmetric matrix, in float64."""
    vals, vecs = torch.linalg.eigh(cov.double())
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def random_basis(d: int, seed: int, name: str) -> torch.Tensor:
    """A seeded random orthonormal ``d x d`` basis (QR of a Gaussian matrix, signs fixed), float64."""
    gen = torch.Generator().manual_seed(int(stable_hash([seed, name], 8), 16))
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def compute_basis(model: HookedTransformer, config: WarpConfig | None = None, path: str | Path | None = None,
                  seqs: Sequence[TeacherForced] | None = None, progress: bool = True) -> Basis:
    """Phase 1 on ``model`` (loaded with ``processing="none"``): the basis of each weight ``config`` protects,
    saved weight by weight under ``path`` (default: :func:`store_path`). A finished store is returned as it is."""
    from tqdm.auto import tqdm

    config = config or WarpConfig()
    if model_info(model).processing not in ("none", "unknown"):
        raise MechsafeError("WaRP refers to the model's real weights; load the model with processing='none'")
    handles = protected_weights(model, config)
    where = "given sequences"
    if seqs is None:
        seqs, where = safety_sequences(model, config, progress)
    if not seqs:
        raise MechsafeError("no safety sequences for the WaRP basis; pass (prompt, refusal) pairs")
    path = Path(path) if path else store_path(model, config, seqs)
    manifest_path = path / "manifest.json"
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT or manifest.get("model_fingerprint") != fingerprint(model):
            raise MechsafeError(f"{path} holds a WaRP store of another model; use another folder")
        if manifest.get("data_fingerprint") != data_fingerprint(seqs) or manifest.get("weights") != [h.name for h in handles]:
            raise MechsafeError(f"{path} holds a WaRP basis of other data or weights; use another folder")
        if manifest.get("complete"):
            return Basis(path, manifest)
    n_tokens = sum(len(s) for s in seqs)
    manifest = {"format": FORMAT, "model": model_info(model).to_dict(), "model_fingerprint": fingerprint(model),
                "config": dataclasses.asdict(config), "weights": [h.name for h in handles],
                "kinds": {h.name: h.kind for h in handles}, "basis": config.basis, "data": where,
                "data_fingerprint": data_fingerprint(seqs), "n_sequences": len(seqs), "n_tokens": n_tokens,
                "complete": False, "spectra": {}}
    write_json(manifest_path, manifest)
    folder = path / "basis"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [h for h in handles if not (folder / f"{h.name}.safetensors").is_file()] if config.basis != "identity" else []
    t0 = time.perf_counter()
    grams = input_grams(model, seqs, todo, config.batch_size, positions="all") if config.basis == "covariance" and todo else {}
    seconds_forward = time.perf_counter() - t0
    for h in tqdm(todo, desc="basis", unit="weight", disable=not progress):
        if config.basis == "covariance":
            vals, u = eigenbasis(weight_gram(model, h, grams) / n_tokens)
        else:
            u = random_basis(h.in_features, config.seed, h.name)
            vals = torch.full((h.in_features,), float("nan"), dtype=torch.float64)
        save_safetensors(folder / f"{h.name}.safetensors", {"U": u.float(), "eigenvalues": vals})
    basis = Basis(path, manifest)
    if config.basis == "covariance":
        for h in handles:
            vals = basis.eigenvalues(h.name).clamp_min(0)
            share = torch.cumsum(vals, 0) / vals.sum().clamp_min(1e-30)
            manifest["spectra"][h.name] = {"top": [float(v) for v in vals[:8]], "trace": float(vals.sum()),
                                           "rank_90": int((share < 0.9).sum()) + 1,
                                           "rank_99": int((share < 0.99).sum()) + 1}
    manifest.update(complete=True, seconds={"forward": round(seconds_forward, 2),
                                            "total": round(time.perf_counter() - t0, 2)})
    write_json(manifest_path, manifest)
    return Basis(path, manifest)
