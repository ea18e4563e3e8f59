"""SNIP scores (Wei et al., ICML 2024): ``S = |W| ⊙ Σ_batches |∇_W L|`` for every selected block weight.

``L`` is the mean NLL of a batch's response tokens given their prompts (prompt tokens masked). The absolute value
is taken per batch, before the sum over batches (never ``|Σ ∇|``). A batch runs in micro-batches of
``micro_batch`` pairs (two by default, which bounds activation memory); their gradients accumulate, and on the
batch's last backward pass a hook on each selected parameter adds ``|∇|`` into a float32 accumulator and zeroes the
gradient in place. One pass over the data collects the blocks of ``layers_per_pass`` (all by default); the scores
then stream to disk, one safetensors file per block, next to a manifest.

Data parallel: under ``torchrun`` each rank takes ``|∇|`` of its own batches (batch ``j`` on rank
``j mod world_size``) and the accumulators are summed across ranks afterwards; averaging gradients before the
absolute value (what DDP does) would compute a different quantity.

Resuming: the accumulators are checkpointed every ``checkpoint_s`` seconds (per rank), and finished blocks are
files, so a killed run continues at the next batch of the unfinished blocks. A rerun with the same model, data
and settings finds the finished store and computes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from transformer_lens import HookedTransformer

from mechsafe import distributed
from mechsafe.chat import pad_id
from mechsafe.errors import MechsafeError
from mechsafe.forward import TeacherForced, collate, encode_examples, eval_mode, masked_nll
from mechsafe.models import cache_dir, model_info
from mechsafe.runs import read_json, save_safetensors, stable_hash, write_json
from mechsafe.snip.config import ScoreConfig
from mechsafe.weights import WeightHandle, fingerprint, select

logger = logging.getLogger(__name__)

FORMAT = "mechsafe-snip-scores/1"


def default_root() -> Path:
    """Where score stores live unless told otherwise: ``$MECHSAFE_CACHE/snip``."""
    return cache_dir() / "snip"


def shorten(seqs: Sequence[TeacherForced], n_tokens: int) -> list[TeacherForced]:
    """The sequences with only their first ``n_tokens`` response tokens (the "short" scoring variant)."""
    return [TeacherForced(ids=s.ids[: s.prompt_len + n_tokens], prompt_len=s.prompt_len) for s in seqs]


def batches(seqs: Sequence[TeacherForced], batch_size: int) -> list[list[TeacherForced]]:
    """Fixed batches, longest sequences first (the batch composition is part of the score, so it never depends
    on the number of ranks)."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    return [[seqs[i] for i in order[b:b + batch_size]] for b in range(0, len(order), batch_size)]


def batch_loss(model: HookedTransformer, batch: Sequence[TeacherForced], n_tokens: int | None = None) -> torch.Tensor:
    """Summed NLL of the batch's response tokens (prompt tokens masked) over ``n_tokens`` (default: their number,
    giving the mean; a micro-batch passes its whole batch's count, so the micro-batches' losses sum to the batch's)."""
    tokens, mask = collate(batch, pad_id(model.tokenizer))
    n_tokens = n_tokens or int(mask.sum())
    return masked_nll(model, tokens, mask).sum() / n_tokens


@dataclasses.dataclass
class ScoreStore:
    """A finished set of SNIP scores on disk: ``manifest.json`` and ``layer_NNN.safetensors`` per block, each
    holding the scores of that block's weights under their kinds (in TransformerLens shapes)."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ScoreStore":
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise MechsafeError(f"{path} holds no SNIP scores (no manifest.json); compute them with mechsafe snip score")
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT:
            raise MechsafeError(f"{manifest_path} is not a SNIP score manifest; point to a score directory")
        if not manifest.get("complete"):
            raise MechsafeError(f"the SNIP scores in {path} are unfinished; rerun mechsafe snip score to resume them")
        return cls(path, manifest)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def kinds(self) -> list[str]:
        return list(self.manifest["kinds"])

    @property
    def data(self) -> str:
        return str(self.manifest["config"]["data"])

    @property
    def n_tokens(self) -> int:
        """Tokens the scoring passes ran over (prompts and responses)."""
        if "n_tokens" not in self.manifest:
            raise MechsafeError(f"the SNIP scores in {self.path} do not record their token count; delete them and score "
                                "again")
        return int(self.manifest["n_tokens"])

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """The scores of block ``layer`` by weight kind (float32)."""
        if layer not in self.layers:
            raise MechsafeError(f"the scores in {self.path} cover blocks {self.layers}, not {layer}; rescore with "
                                "those layers")
        try:
            return {k: v.float() for k, v in load_file(self.path / f"layer_{layer:03d}.safetensors").items()}
        except Exception as exc:  # noqa: BLE001 - a corrupt file raises several types
            raise MechsafeError(f"the score file of block {layer} in {self.path} is unreadable ({type(exc).__name__}); "
                                "delete the directory and score again") from None

    def items(self) -> Iterator[tuple[int, str, torch.Tensor]]:
        """``(layer, kind, scores)`` for every scored weight, block by block (one block in memory at a time)."""
        for layer in self.layers:
            for kind, tensor in self.layer(layer).items():
                yield layer, kind, tensor

    def check_model(self, model: HookedTransformer) -> None:
        """Raise unless these scores were computed on ``model``'s current weights."""
        if self.manifest["model_fingerprint"] != fingerprint(model):
            raise MechsafeError(f"the SNIP scores in {self.path} were made on another model "
                                f"({self.manifest['model']['spec']}); score this model first")

    def totals(self) -> dict[int, dict[str, float]]:
        """Summed score per block and weight kind."""
        out: dict[int, dict[str, float]] = {}
        for layer, kind, tensor in self.items():
            out.setdefault(layer, {})[kind] = float(tensor.double().sum())
        return out


class _AbsGradSums:
    """Float32 sums of ``|∇|`` of some parameters, filled (inside ``with``) by post-accumulate-grad hooks; only these
    parameters require gradients inside the block. While ``last`` is False (a batch's earlier micro-batches) the
    gradients accumulate as usual; on the batch's last backward pass each hook adds the absolute value of the batch's
    gradient into its sum and zeroes the gradient buffer (kept, so later batches reuse its memory)."""

    def __init__(self, model: HookedTransformer, handles: Sequence[WeightHandle]):
        self.model, self.handles = model, list(handles)
        self.last = True
        self.sums = {h.name: torch.zeros(h.shape, dtype=torch.float32, device=h.parameter.device) for h in handles}
        self._removers: list[Any] = []
        self._requires: dict[int, bool] = {}

    def __enter__(self) -> "_AbsGradSums":
        self._requires = {id(p): p.requires_grad for p in self.model.parameters()}
        self.model.requires_grad_(False)
        for h in self.handles:
            h.parameter.grad = None
            h.parameter.requires_grad_(True)

            def add(param: torch.nn.Parameter, name: str = h.name) -> None:
                if self.last:  # the batch's gradient is complete: add |grad| and reset the buffer in place
                    grad = param.grad.detach()
                    self.sums[name].add_(grad.abs_())
                    grad.zero_()

            self._removers.append(h.parameter.register_post_accumulate_grad_hook(add))
        return self

    def __exit__(self, *exc) -> None:
        for remover in self._removers:
            remover.remove()
        self._removers = []
        for p in self.model.parameters():
            p.requires_grad_(self._requires.get(id(p), p.requires_grad))
        for h in self.handles:
            h.parameter.grad = None


def _chunks(layers: list[int], size: int | None) -> list[list[int]]:
    size = size or len(layers)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def store_key(model_fingerprint: str, config: ScoreConfig, seqs: Sequence[TeacherForced], kinds: Sequence[str],
              layers: Sequence[int]) -> str:
    """What identifies a score store: the model's weights, the scored tokens and the settings that change scores."""
    return stable_hash({"model": model_fingerprint, "tokens": stable_hash([[s.prompt_len, s.ids] for s in seqs]),
                        "batch_size": config.batch_size, "kinds": list(kinds), "layers": list(layers),
                        "dtype": config.dtype, "format": FORMAT}, length=16)


def compute_scores(model: HookedTransformer, examples: Sequence[tuple], config: ScoreConfig | None = None,
                   root: str | os.PathLike | None = None, progress: bool = True, checkpoint_s: float = 60.0,
                   description: str = "") -> ScoreStore:
    """SNIP scores of ``model`` on ``examples`` ((prompt, response) pairs), stored under ``root`` (default
    :func:`default_root`) in a directory named by what identifies them; an existing finished store is reused, an
    unfinished one resumed. ``config.data == "safety-short"`` scores the first ``config.short_tokens`` response
    tokens only. Runs data-parallel when a ``torch.distributed`` process group is up (see module docs)."""
    config = config or ScoreConfig()
    if model_info(model).processing not in ("none", "unknown"):
        raise MechsafeError(f"SNIP scores refer to the model's real weights, but it was loaded with processing "
                            f"{model_info(model).processing!r}; load it with processing='none'")
    handles = select(model, config.kinds, config.layers, skip_missing=True)
    if not handles:
        raise MechsafeError(f"no weight of kinds {list(config.kinds)} exists in this model; choose other kinds")
    kinds = list(dict.fromkeys(h.kind for h in handles))
    layers = list(dict.fromkeys(h.layer for h in handles))
    seqs = encode_examples(model.tokenizer, examples, max_length=config.max_length, system=config.system)
    if config.data == "safety-short":
        seqs = shorten(seqs, config.short_tokens)
    model_fingerprint = fingerprint(model)
    path = Path(root or default_root()) / store_key(model_fingerprint, config, seqs, kinds, layers)
    if (path / "manifest.json").is_file() and read_json(path / "manifest.json").get("complete"):
        logger.info("reusing SNIP scores in %s", path)
        return ScoreStore.open(path)
    all_batches = batches(seqs, config.batch_size)
    manifest = {"format": FORMAT, "complete": False, "config": dataclasses.asdict(config), "kinds": kinds,
                "layers": layers, "model": model_info(model).to_dict(), "model_fingerprint": model_fingerprint,
                "n_examples": len(seqs), "n_batches": len(all_batches),
                "n_response_tokens": int(sum(len(s) - s.prompt_len for s in seqs)),
                "n_tokens": int(sum(len(s) for s in seqs)), "description": description,
                "definition": "|W| * sum over batches of |dL/dW|, L = mean response-token NLL of a batch"}
    if distributed.rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "manifest.json", manifest)
    distributed.barrier()
    mine = distributed.shard(all_batches)
    tag = f"rank{distributed.rank()}-of{distributed.world_size()}"
    t0 = time.perf_counter()
    with eval_mode(model):
        for chunk in _chunks(layers, config.layers_per_pass):
            if all((path / f"layer_{layer:03d}.safetensors").is_file() for layer in chunk):
                continue
            _score_chunk(model, [h for h in handles if h.layer in chunk], mine, path, tag, progress, checkpoint_s,
                         config.micro_batch)
    distributed.barrier()
    if distributed.rank() == 0:
        manifest.update(complete=True, seconds=round(time.perf_counter() - t0, 3),
                        world_size=distributed.world_size())
        write_json(path / "manifest.json", manifest)
    distributed.barrier()
    return ScoreStore.open(path)


def _score_chunk(model: HookedTransformer, handles: list[WeightHandle], mine: list[list[TeacherForced]], path: Path,
                 tag: str, progress: bool, checkpoint_s: float, micro_batch: int) -> None:
    chunk = sorted({h.layer for h in handles})
    partial = path / f"partial-{'-'.join(map(str, chunk))}-{tag}.safetensors"
    acc = _AbsGradSums(model, handles)
    start = 0
    if partial.is_file():
        try:
            saved = load_file(str(partial))
            start = int(saved.pop("__batches_done__").item())
            for name in acc.sums:
                acc.sums[name].copy_(saved[name])
            logger.info("resuming SNIP scores of blocks %s at batch %d", chunk, start)
        except Exception:  # noqa: BLE001 - a checkpoint cut short is started over
            logger.warning("ignoring an unreadable SNIP checkpoint %s", partial)
            start = 0
            for t in acc.sums.values():
                t.zero_()
    from tqdm.auto import tqdm

    last = time.monotonic()
    with acc:
        bar = tqdm(total=len(mine), initial=start, disable=not progress, desc=f"SNIP blocks {chunk[0]}-{chunk[-1]}")
        for j in range(start, len(mine)):
            batch = mine[j]
            n_tokens = sum(len(s) - s.prompt_len for s in batch)
            for i in range(0, len(batch), micro_batch):
                acc.last = i + micro_batch >= len(batch)
                batch_loss(model, batch[i:i + micro_batch], n_tokens).backward()
            bar.update(1)
            if time.monotonic() - last > checkpoint_s and j + 1 < len(mine):
                save_safetensors(partial, {**acc.sums, "__batches_done__": torch.tensor(j + 1)})
                last = time.monotonic()
        bar.close()
    for t in acc.sums.values():
        distributed.all_reduce_sum(t)
    if distributed.rank() == 0:
        dtype = getattr(torch, read_json(path / "manifest.json")["config"]["dtype"])
        for layer in chunk:
            scores = {h.kind: (h.parameter.detach().abs().float() * acc.sums[h.name]).to(dtype).cpu()
                      for h in handles if h.layer == layer}
            save_safetensors(path / f"layer_{layer:03d}.safetensors", scores, {"layer": str(layer)})
    distributed.barrier()
    partial.unlink(missing_ok=True)


def scores_of(store: ScoreStore, model: HookedTransformer) -> dict[str, Float[torch.Tensor, "..."]]:
    """All scores of ``store`` keyed by the parameter names of ``model`` (checked to be the scored model)."""
    store.check_model(model)
    return {select(model, kind, layer)[0].name: t for layer, kind, t in store.items()}
