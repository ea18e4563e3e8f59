"""Activation store: batched, padding-aware pooled activations on disk, reused across runs.

``cache_activations`` runs prompts through the model in length-sorted batches (right padding, so
every real position is exactly what it would be unbatched), reads only the requested hook points,
stops the forward pass after the last layer it needs, pools on the fly, and streams the results to
sharded safetensors with a manifest. The same model, data and settings reuse the finished store.

Poolings:

* ``last`` — the last prompt token (the post-instruction position when the chat template is used);
* ``mean`` — mean over the tokens of the user's text (padding and template excluded);
* ``tokens`` — every token for SAE training, without position 0 (an attention sink whose norm dwarfs
  the rest) and with the chat-template prefix that every prompt shares kept only once.

Example::

    store = ms.cache_activations(model, ms.data.load("harmful_vs_harmless"), hook="resid_post", layers="all")
    X = store.pooled("blocks.12.hook_resid_post", "last")   # [n_prompts, d_model]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechsafe import chat
from mechsafe.data import PromptSet
from mechsafe.errors import MechsafeError
from mechsafe.hooks import check_kind, hook_names, layer_of
from mechsafe.models import cache_dir, model_info
from mechsafe.runs import atomic_dir, read_json, stable_hash, write_json

logger = logging.getLogger(__name__)

POOLINGS = ("last", "mean", "tokens")
_FORMAT = 1


@dataclasses.dataclass
class ActivationConfig:
    """What to cache and how."""

    hook: str = "resid_post"
    """Hook kind (see ``mechsafe.hooks.HOOK_KINDS``)."""
    layers: str = "all"
    """Layer selector: ``all``, ``early``, ``middle``, ``late``, ``last``, ``3-7`` or ``0,5,9``."""
    pooling: tuple[str, ...] = ("last", "mean")
    """Poolings to store: any of ``last``, ``mean``, ``tokens``."""
    batch_size: int = 16
    """Prompts per forward pass."""
    chat: bool = True
    """Wrap prompts in the model's chat template (with the generation prompt)."""
    system: str | None = None
    """System message for the chat template; ``None`` keeps the template's default."""
    max_length: int = 512
    """Longest prompt in tokens; longer prompts lose the start of the user's text."""
    shard_size: int = 512
    """Prompts per shard file; bounds memory whatever the dataset size."""
    dtype: str = "float32"
    """Storage dtype: ``float32``, ``float16`` or ``bfloat16``."""

    def __post_init__(self) -> None:
        check_kind(self.hook)
        if isinstance(self.pooling, str):
            self.pooling = (self.pooling,)
        self.pooling = tuple(self.pooling)
        bad = [p for p in self.pooling if p not in POOLINGS]
        if bad or not self.pooling:
            raise MechsafeError(f"unknown pooling {bad or self.pooling}; choose from {', '.join(POOLINGS)}")
        for field in ("batch_size", "max_length", "shard_size"):
            if int(getattr(self, field)) < 1:
                raise MechsafeError(f"{field} must be at least 1 (got {getattr(self, field)})")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise MechsafeError(f"unknown storage dtype {self.dtype!r}; use float32, float16 or bfloat16")


def model_fingerprint(model: HookedTransformer) -> str:
    """A short hash of the model's config and weights (cheap: one sum per tensor)."""
    info = model_info(model)
    sums = [f"{k}:{float(v.detach().double().sum()):.6e}" for k, v in model.state_dict().items()
            if v.is_floating_point() and "rotary" not in k and not k.endswith(("mask", "IGNORE"))]
    return stable_hash([info.spec, info.processing, model.cfg.n_layers, model.cfg.d_model, sums], 16)


class ActivationStore:
    """A finished activation store on disk (see :func:`cache_activations`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_json(self.path / "manifest.json")
        if self.manifest.get("format") != _FORMAT or not self.manifest.get("complete"):
            raise MechsafeError(f"activation store {self.path} is incomplete or corrupt; delete it and cache again")
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def hooks(self) -> list[str]:
        """Hook names stored."""
        return list(self.manifest["hooks"])

    @property
    def poolings(self) -> list[str]:
        return list(self.manifest["config"]["pooling"])

    @property
    def n_prompts(self) -> int:
        return int(self.manifest["n_prompts"])

    def _check(self, hook: str, pooling: str) -> None:
        if hook not in self.manifest["hooks"]:
            raise MechsafeError(f"hook {hook!r} is not in this store; stored hooks: {', '.join(self.hooks)}")
        if pooling not in self.poolings:
            raise MechsafeError(f"pooling {pooling!r} is not in this store; stored: {', '.join(self.poolings)}")

    def _load_shard(self, shard: dict) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path / shard["file"]))
        except Exception as exc:  # noqa: BLE001
            raise MechsafeError(f"shard {shard['file']} of {self.path} is corrupt ({exc}); delete the store and cache again") from None

    def pooled(self, hook: str, pooling: str = "last") -> Float[torch.Tensor, "n_prompts d"]:
        """Pooled activations of every prompt at ``hook`` (float32, in prompt order)."""
        if pooling == "tokens":
            raise MechsafeError("use iter_tokens() for the per-token pooling")
        self._check(hook, pooling)
        key = (hook, pooling)
        if key not in self._cache:
            parts = [self._load_shard(s)[f"{hook}/{pooling}"] for s in self.manifest["shards"]]
            self._cache[key] = torch.cat(parts).float()
        return self._cache[key]

    def iter_tokens(self, hook: str) -> Iterator[tuple[Float[torch.Tensor, "tokens d"], Int[torch.Tensor, " tokens"], Int[torch.Tensor, " tokens"]]]:
        """Per shard: token activations, their prompt index and their position in the prompt."""
        self._check(hook, "tokens")
        for shard in self.manifest["shards"]:
            data = self._load_shard(shard)
            yield data[f"{hook}/tokens"].float(), data["tokens/prompt"], data["tokens/position"]

    def n_tokens(self) -> int:
        return int(sum(s.get("n_tokens", 0) for s in self.manifest["shards"]))


def _pool_batch(act: torch.Tensor, lengths: torch.Tensor, spans: torch.Tensor, poolings: Sequence[str],
                token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    act = act.reshape(act.shape[0], act.shape[1], -1)
    out = {}
    if "last" in poolings:
        out["last"] = act[torch.arange(act.shape[0]), lengths - 1]
    if "mean" in poolings:
        pos = torch.arange(act.shape[1])
        mask = ((pos[None, :] >= spans[:, :1]) & (pos[None, :] < spans[:, 1:])).to(act.dtype)
        out["mean"] = (act * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if "tokens" in poolings and token_mask is not None:
        out["tokens"] = act[token_mask]
    return out


def _shared_prefix(encoded: Sequence[chat.Encoded]) -> int:
    first = encoded[0].ids
    n = min(min(len(e.ids) for e in encoded), min(e.content[0] for e in encoded))
    for e in encoded[1:]:
        k = 0
        while k < n and e.ids[k] == first[k]:
            k += 1
        n = k
    return n


def cache_activations(model: HookedTransformer, prompts: PromptSet | Sequence[str],
                      config: ActivationConfig | None = None, *, root: str | os.PathLike | None = None,
                      progress: bool = True, **overrides) -> ActivationStore:
    """Cache pooled activations of ``prompts`` and return the (possibly reused) store.

    Args:
        model: any ``HookedTransformer`` with a tokenizer.
        prompts: a :class:`~mechsafe.data.PromptSet` or a list of strings.
        config: what to cache; keyword ``overrides`` (e.g. ``hook="mlp_out", layers="3-7"``) replace
            its fields.
        root: folder holding stores (default ``$MECHSAFE_CACHE/activations``).
        progress: show a progress bar.
    """
    cfg = dataclasses.replace(config or ActivationConfig(), **overrides)
    texts = list(prompts.texts if isinstance(prompts, PromptSet) else prompts)
    if not texts:
        raise MechsafeError("no prompts to cache; the dataset is empty")
    names = hook_names(model, cfg.hook, cfg.layers)
    data_hash = prompts.fingerprint() if isinstance(prompts, PromptSet) else stable_hash(texts, 16)
    key_fields = {"model": model_fingerprint(model), "data": data_hash, "hooks": names,
                  "config": dataclasses.asdict(cfg) | {"batch_size": None, "shard_size": None}}
    path = Path(root or cache_dir() / "activations") / f"acts-{stable_hash(key_fields, 20)}"
    if (path / "manifest.json").is_file():
        try:
            store = ActivationStore(path)
            logger.info("reusing activation store %s", path)
            return store
        except MechsafeError:
            logger.warning("activation store %s is incomplete; caching again", path)

    encoded = chat.encode_prompts(model.tokenizer, texts, system=cfg.system, chat=cfg.chat, max_length=cfg.max_length)
    if max(len(e) for e in encoded) > model.cfg.n_ctx:
        raise MechsafeError(f"a prompt has more tokens than the model's context ({model.cfg.n_ctx}); lower max_length")
    prefix = _shared_prefix(encoded) if "tokens" in cfg.pooling else 0
    stop_layer = max(layer_of(n) for n in names) + 1
    store_dtype = getattr(torch, cfg.dtype)
    pad = chat.pad_id(model.tokenizer)
    t0 = time.perf_counter()
    n_tokens_total = 0
    with atomic_dir(path) as tmp:
        shards = []
        bar = tqdm(total=len(texts), desc=f"caching {cfg.hook} x{len(names)}", unit="prompt", disable=not progress)
        for shard_start in range(0, len(texts), cfg.shard_size):
            shard_idx = list(range(shard_start, min(shard_start + cfg.shard_size, len(texts))))
            shard = _run_shard(model, encoded, shard_idx, names, cfg, stop_layer, pad, prefix, bar)
            tensors = {k: v.to(store_dtype).contiguous() if v.is_floating_point() else v.contiguous()
                       for k, v in shard.items()}
            fname = f"shard-{len(shards):05d}.safetensors"
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / fname))
            n_tok = int(tensors["tokens/prompt"].numel()) if "tokens/prompt" in tensors else 0
            n_tokens_total += n_tok
            dims = {n: int(tensors[f"{n}/{cfg.pooling[0]}"].shape[-1]) for n in names}
            shards.append({"file": fname, "start": shard_idx[0], "stop": shard_idx[-1] + 1, "n_tokens": n_tok})
        bar.close()
        info = model_info(model)
        write_json(tmp / "manifest.json", {
            "format": _FORMAT, "complete": True, "model": info.to_dict(), "model_fingerprint": key_fields["model"],
            "weight_processing": info.processing, "data_hash": data_hash, "hooks": names,
            "d": dims, "config": dataclasses.asdict(cfg),
            "n_prompts": len(texts), "shared_prefix_tokens": prefix, "shards": shards,
            "seconds": round(time.perf_counter() - t0, 3),
            "n_prompt_tokens": int(sum(len(e) for e in encoded)), "n_stored_tokens": n_tokens_total,
        })
    return ActivationStore(path)


def _run_shard(model, encoded, shard_idx, names, cfg, stop_layer, pad, prefix, bar) -> dict[str, torch.Tensor]:
    """Forward one shard in length-sorted batches; returns pooled tensors in shard order."""
    order = sorted(shard_idx, key=lambda i: -len(encoded[i]))
    results: dict[str, list[torch.Tensor]] = {}
    rows: list[int] = []
    tok_prompt: list[torch.Tensor] = []
    tok_pos: list[torch.Tensor] = []
    for b in range(0, len(order), cfg.batch_size):
        batch = order[b:b + cfg.batch_size]
        tokens, lengths = chat.pad_right([encoded[i].ids for i in batch], pad)
        spans = torch.tensor([encoded[i].content for i in batch], dtype=torch.long)
        token_mask = None
        if "tokens" in cfg.pooling:
            pos = torch.arange(tokens.shape[1])
            token_mask = (pos[None, :] < lengths[:, None]) & (pos[None, :] >= 1)
            firsts = torch.tensor([i != 0 for i in batch])  # prompt 0 keeps the shared prefix
            token_mask &= ~(firsts[:, None] & (pos[None, :] < prefix))
            rows_idx, pos_idx = token_mask.nonzero(as_tuple=True)
            tok_prompt.append(torch.tensor(batch, dtype=torch.long)[rows_idx])
            tok_pos.append(pos_idx)
        captured: dict[str, dict[str, torch.Tensor]] = {}

        def hook_fn(act, hook):
            captured[hook.name] = _pool_batch(act.detach(), lengths, spans, cfg.pooling, token_mask)

        with torch.inference_mode():
            model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=[(n, hook_fn) for n in names],
                                 stop_at_layer=stop_layer)
        for n in names:
            for p, t in captured[n].items():
                results.setdefault(f"{n}/{p}", []).append(t.cpu())
        rows.extend(batch)
        bar.update(len(batch))
    # undo the length sort for pooled rows; token rows stay grouped by batch with their prompt index
    inverse = torch.empty(len(rows), dtype=torch.long)
    inverse[torch.tensor([shard_idx.index(r) for r in rows])] = torch.arange(len(rows))
    out = {}
    for k, parts in results.items():
        cat = torch.cat(parts)
        out[k] = cat if k.endswith("/tokens") else cat[inverse]
    if tok_prompt:
        out["tokens/prompt"] = torch.cat(tok_prompt)
        out["tokens/position"] = torch.cat(tok_pos)
    return out
