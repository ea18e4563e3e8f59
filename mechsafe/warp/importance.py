"""WaRP phase 2: the importance of each rotated coefficient for the safety behaviour, and the masks it gives.

With ``W = W̃ Uᵀ`` (phase 1), ``∂L/∂W̃ = (∂L/∂W) U``; the importance of a coefficient is ``Σ_batches |∂L/∂W̃|``
(the absolute value per batch, no ``|W̃|`` factor) of ``L``, the teacher-forced NLL of a batch's refusal tokens
(``loss_tokens="response"``) or of its whole sequence (``"sequence"``). Matrices are in the linear layer's layout
``[d_out, d_in]`` (the transpose of TransformerLens's), so a *direction* is a column of ``W̃``.

Masks (``True`` = frozen): the top ``keep_ratio`` of coefficients by one quantile over every protected weight
(``quantile="global"``) or per weight (``"layer"``), element by element or by whole directions ranked by their
summed importance (``granularity="direction"``). Exactly ``round(keep_ratio * n)`` elements or directions are kept.

Store: ``<basis folder>/importance-<key>/`` holds ``importance.safetensors`` and a manifest; partial sums are saved
every ``checkpoint_every`` batches, so a killed run resumes at the next batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from transformer_lens import HookedTransformer

from mechsafe.chat import pad_id
from mechsafe.errors import MechsafeError
from mechsafe.forward import TeacherForced, collate, eval_mode, masked_nll
from mechsafe.runs import save_safetensors, stable_hash, write_json
from mechsafe.snip.scores import batch_loss, batches
from mechsafe.warp.basis import Basis, data_fingerprint, protected_weights
from mechsafe.warp.config import WarpConfig, check_keep_ratio
from mechsafe.weights import WeightHandle

logger = logging.getLogger(__name__)


def coefficients(handle: WeightHandle, u: torch.Tensor | None, tensor: torch.Tensor | None = None
                 ) -> Float[torch.Tensor, "d_out d_in"]:
    """``W̃ = W U`` of the weight (or of ``tensor``, a tensor of its shape such as its gradient) in the linear
    layout; ``u=None`` is the identity basis."""
    w = handle.as_matrix(handle.parameter.detach() if tensor is None else tensor).T.float()
    return w if u is None else w @ u.to(w.device)


def from_coefficients(handle: WeightHandle, u: torch.Tensor | None, coeffs: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`coefficients`: ``W = W̃ Uᵀ`` back in the weight's TransformerLens shape."""
    w = coeffs if u is None else coeffs @ u.to(coeffs.device).T
    return handle.from_matrix(w.T)


def sequence_loss(model: HookedTransformer, batch: Sequence[TeacherForced]) -> torch.Tensor:
    """Mean NLL of every token of the batch's sequences after the first (prompt and response), padding excluded."""
    tokens, _ = collate(batch, pad_id(model.tokenizer))
    lengths = torch.tensor([len(s) for s in batch])
    mask = (torch.arange(1, tokens.shape[1])[None, :] < lengths[:, None]).float()
    return masked_nll(model, tokens, mask).sum() / mask.sum()


def importance_path(basis: Basis, config: WarpConfig) -> Path:
    return basis.path / f"importance-{stable_hash({'loss': config.loss_tokens, 'batch': config.batch_size}, 8)}"


def compute_importance(model: HookedTransformer, basis: Basis, seqs: Sequence[TeacherForced],
                       config: WarpConfig | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Phase 2: ``Σ_batches |∂L/∂W̃|`` of each protected weight (linear layout, float32), saved next to the basis
    and reused when it exists; ``seqs`` are the (prompt, refusal) sequences (the basis's data)."""
    from tqdm.auto import tqdm

    config = config or WarpConfig()
    handles = protected_weights(model, config)
    basis.check(model, handles)
    if data_fingerprint(seqs) != basis.manifest["data_fingerprint"]:
        raise MechsafeError("the importance data differ from the basis's data; score on the sequences the basis "
                            "was computed on")
    folder = importance_path(basis, config)
    final = folder / "importance.safetensors"
    if final.is_file():
        return load_file(str(final))
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "partial.safetensors"
    us = {h.name: basis.u(h.name) for h in handles}
    sums = {h.name: torch.zeros(h.as_matrix(h.parameter).T.shape) for h in handles}
    start = 0
    if partial.is_file():
        try:
            saved = load_file(str(partial))
            start = int(saved.pop("__batches_done__").item())
            for name in sums:
                sums[name].copy_(saved[name])
        except Exception:  # noqa: BLE001 - a checkpoint cut short is started over
            logger.warning("ignoring an unreadable WaRP importance checkpoint %s", partial)
            start = 0
            for t in sums.values():
                t.zero_()
    all_batches = batches(seqs, config.batch_size)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    t0 = time.perf_counter()
    try:
        model.requires_grad_(False)
        for h in handles:
            h.parameter.requires_grad_(True)
        with eval_mode(model):
            for j in tqdm(range(start, len(all_batches)), desc="importance", unit="batch", disable=not progress,
                          initial=start, total=len(all_batches)):
                batch = all_batches[j]
                loss = batch_loss(model, batch) if config.loss_tokens == "response" else sequence_loss(model, batch)
                loss.backward()
                with torch.no_grad():
                    for h in handles:
                        sums[h.name].add_(coefficients(h, us[h.name], h.parameter.grad).abs_())
                        h.parameter.grad = None
                if (j + 1) % config.checkpoint_every == 0 and j + 1 < len(all_batches):
                    save_safetensors(partial, {**sums, "__batches_done__": torch.tensor(j + 1)})
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
            p.grad = None
    save_safetensors(final, sums)
    partial.unlink(missing_ok=True)
    write_json(folder / "manifest.json", {"loss_tokens": config.loss_tokens, "batch_size": config.batch_size,
                                          "n_batches": len(all_batches), "weights": list(sums),
                                          "seconds": round(time.perf_counter() - t0, 2)})
    return sums


def make_masks(importance: dict[str, torch.Tensor], keep_ratio: float, quantile: str = "global",
               granularity: str = "element") -> dict[str, torch.Tensor]:
    """Boolean masks (``True`` = frozen) of the top ``keep_ratio`` coefficients (or directions: columns) by
    importance, over all weights at once (``quantile="global"``) or per weight (``"layer"``)."""
    keep_ratio = check_keep_ratio(keep_ratio)
    if quantile not in ("global", "layer") or granularity not in ("element", "direction"):
        raise MechsafeError(f"unknown quantile {quantile!r} or granularity {granularity!r}; use global|layer and "
                            "element|direction")
    if not importance:
        raise MechsafeError("no importance scores given; run WaRP phase 2 first")
    names = list(importance)
    scores = {n: importance[n].sum(0) if granularity == "direction" else importance[n].flatten() for n in names}
    groups = [names] if quantile == "global" else [[n] for n in names]
    chosen: dict[str, torch.Tensor] = {}
    for group in groups:
        flat = torch.cat([scores[n] for n in group])
        k = max(1, round(keep_ratio * flat.numel()))
        top = torch.zeros(flat.numel(), dtype=torch.bool)
        top[torch.topk(flat, k, sorted=False).indices] = True
        offset = 0
        for n in group:
            chosen[n] = top[offset:offset + scores[n].numel()]
            offset += scores[n].numel()
    masks = {}
    for n in names:
        shape = importance[n].shape
        masks[n] = chosen[n][None, :].expand(shape).clone() if granularity == "direction" else chosen[n].reshape(shape)
    return masks


def save_masks(path: str | Path, masks: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write masks (and what made them) to one safetensors file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(path, {k: v.to(torch.uint8) for k, v in masks.items()}, {"meta": json.dumps(meta)})


def load_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Masks and their metadata from :func:`save_masks`'s file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MechsafeError(f"mask file {path} does not exist; make masks with mechsafe warp importance")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        masks = {k: v.bool() for k, v in load_file(str(path)).items()}
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise MechsafeError(f"{path} is not a WaRP mask file ({exc}); make masks with mechsafe warp importance") from None
    return masks, meta


def mask_meta(basis: Basis, config: WarpConfig) -> dict[str, Any]:
    return {"basis": str(basis.path), "model_fingerprint": basis.manifest["model_fingerprint"],
            "weights": basis.weights, "config": dataclasses.asdict(config)}


def check_masks(masks: dict[str, torch.Tensor], meta: dict[str, Any], basis: Basis) -> None:
    """Raise unless the masks were made for this basis's model and weights."""
    if meta.get("model_fingerprint") != basis.manifest["model_fingerprint"]:
        raise MechsafeError("the mask file was made for another model; make masks from this model's basis")
    if sorted(masks) != sorted(basis.weights):
        raise MechsafeError(f"the mask file covers other weights ({len(masks)}: {sorted(masks)[0]} ...) than the basis "
                            f"({len(basis.weights)}: {sorted(basis.weights)[0]} ...); use masks made from this basis")
