"""SAE evaluation on held-out prompts: reconstruction, sparsity and the cost of splicing the SAE in.

All metrics are computed on the *content tokens* (the user's own text) of prompts the SAE was never
trained on, formatted with the chat template as everywhere else in mechsafe.

Let ``x`` be a token's activation at the hook, ``x̂ = decode(encode(x))`` and ``f = encode(x)``:

* ``l0`` — mean number of non-zero latents per token, mean ‖f‖₀;
* ``explained_variance`` — 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄: mean over the evaluation tokens);
* ``mse`` — mean over tokens and dimensions of (x − x̂)²; ``cosine`` — mean cos(x, x̂);
* ``dead_fraction`` — latents that never fire on any evaluation token;
* ``dense_fraction`` — latents that fire on more than ``dense_threshold`` (default 10%) of tokens;
* ``ce_clean`` / ``ce_sae`` / ``ce_zero`` — mean next-token cross-entropy (nats) over content-token
  targets, without intervention, with x replaced by x̂, and with x replaced by 0 (zero ablation);
* ``ce_increase`` = ce_sae − ce_clean;
  ``ce_recovered`` = (ce_zero − ce_sae) / (ce_zero − ce_clean) (1 = no loss, 0 = as bad as ablation).

The SAE (or zero) replaces the hook activation at every position except position 0 — the attention
sink, whose norm is ~100x the rest and which SAE training leaves out, as SAE-Lens leaves out BOS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from mechsafe import chat
from mechsafe.data import PromptSet
from mechsafe.errors import MechsafeError
from mechsafe.hooks import check_hook, layer_of
from mechsafe.hooks import hook_name as build_hook_name
from mechsafe.sae.load import LoadedSAE, as_loaded

logger = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.1
"""Default firing frequency above which a latent counts as dense."""


@dataclasses.dataclass
class SAEMetrics:
    """Evaluation of one SAE on held-out content tokens (definitions in the module docstring)."""

    hook_name: str
    """Hook the SAE reads and, when spliced, writes."""
    n_prompts: int
    """Held-out prompts evaluated."""
    n_tokens: int
    """Content tokens evaluated (reconstruction metrics)."""
    n_ce_targets: int
    """Next-token targets scored for the CE metrics."""
    l0: float
    """Mean active latents per token."""
    explained_variance: float
    """1 − residual variance / total variance."""
    mse: float
    """Mean squared reconstruction error per dimension."""
    cosine: float
    """Mean cosine similarity of x and x̂."""
    dead_fraction: float
    """Fraction of latents that never fire on the evaluation tokens."""
    dense_fraction: float
    """Fraction of latents firing on more than ``dense_threshold`` of the tokens."""
    dense_threshold: float
    """Threshold used for ``dense_fraction``."""
    ce_clean: float
    """CE (nats) of the unmodified model."""
    ce_sae: float
    """CE (nats) with the SAE reconstruction spliced in."""
    ce_zero: float
    """CE (nats) with the hook zero-ablated."""
    ce_increase: float
    """ce_sae − ce_clean (nats)."""
    ce_recovered: float
    """(ce_zero − ce_sae) / (ce_zero − ce_clean)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path) -> "SAEMetrics":
        """Metrics back from a ``metrics.json`` file (or the ``mechsafe sae eval`` run directory holding it)."""
        from pathlib import Path

        from mechsafe.runs import read_json

        path = Path(path)
        d = read_json(path / "metrics.json" if path.is_dir() else path)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def markdown(self) -> str:
        """A markdown table of the metrics."""
        rows = [
            ("held-out prompts / content tokens", f"{self.n_prompts} / {self.n_tokens}"),
            ("L0 (active latents per token)", f"{self.l0:.1f}"),
            ("explained variance", f"{self.explained_variance:.3f}"),
            ("MSE per dimension", f"{self.mse:.4g}"),
            ("cosine(x, x̂)", f"{self.cosine:.3f}"),
            ("dead latents (never fire)", f"{100 * self.dead_fraction:.1f}%"),
            (f"dense latents (fire on > {100 * self.dense_threshold:.0f}% of tokens)", f"{100 * self.dense_fraction:.1f}%"),
            ("CE clean / SAE / zero-ablated (nats)", f"{self.ce_clean:.3f} / {self.ce_sae:.3f} / {self.ce_zero:.3f}"),
            ("CE increase with the SAE (nats)", f"{self.ce_increase:+.3f}"),
            ("CE loss recovered", f"{self.ce_recovered:.3f}"),
        ]
        return "| metric | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


def _flat(act: torch.Tensor) -> torch.Tensor:
    return act.reshape(act.shape[0], act.shape[1], -1)


@contextlib.contextmanager
def splice(model: HookedTransformer, hook_name: str, replace, skip_first: bool = True) -> Iterator[None]:
    """Replace the activation at ``hook_name`` by ``replace(act)`` (flattened ``[batch, pos, d]``) while inside.

    Position 0 is left untouched when ``skip_first``. The hook is removed in ``finally``, also after an
    exception.
    """
    check_hook(model, hook_name)
    point = model.hook_dict[hook_name]

    def hook_fn(act, hook):
        flat = _flat(act)
        new = replace(flat).to(flat.dtype)
        if skip_first:
            new = torch.cat([flat[:, :1], new[:, 1:]], dim=1)
        return new.reshape(act.shape)

    before = list(point.fwd_hooks)
    point.add_hook(hook_fn)
    added = [h for h in point.fwd_hooks if all(h is not b for b in before)]
    try:
        yield
    finally:
        for handle in added:
            handle.hook.remove()
        point.fwd_hooks = [h for h in point.fwd_hooks if all(h is not a for a in added)]


def splice_sae(model: HookedTransformer, sae, hook_name: str | None = None, skip_first: bool = True):
    """Context manager: the model runs with the SAE's reconstruction in place of its hook activation."""
    loaded = as_loaded(sae, hook_name)
    return splice(model, loaded.hook_name, loaded.reconstruct, skip_first=skip_first)


def zero_ablate(model: HookedTransformer, hook_name: str, skip_first: bool = True):
    """Context manager: the hook activation is replaced by zeros (except position 0 when ``skip_first``)."""
    return splice(model, hook_name, torch.zeros_like, skip_first=skip_first)


def reconstruction_stats(x: Float[torch.Tensor, "tokens d"], x_hat: Float[torch.Tensor, "tokens d"],
                         feats: Float[torch.Tensor, "tokens d_sae"], dense_threshold: float = DENSE_THRESHOLD) -> dict[str, float]:
    """Reconstruction and sparsity metrics of a batch of token activations (see the module docstring)."""
    if x.shape[0] == 0:
        raise MechsafeError("no evaluation tokens; the held-out prompts have no content tokens")
    x, x_hat, feats = x.double(), x_hat.double(), feats.double()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    active = feats != 0
    freq = active.double().mean(0)
    return {
        "l0": float(active.sum(-1).double().mean()),
        "explained_variance": float(1 - resid / total) if total > 0 else float("nan"),
        "mse": float((x - x_hat).pow(2).mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()),
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction": float((freq > dense_threshold).double().mean()),
    }


def _batches(encoded: Sequence[chat.Encoded], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for b in range(0, len(order), batch_size):
        yield order[b:b + batch_size]


def _content_ce(logits: torch.Tensor, tokens: torch.Tensor, spans: torch.Tensor) -> tuple[float, int]:
    """Summed next-token CE over content-token targets, and the number of targets."""
    total, count = 0.0, 0
    for row in range(tokens.shape[0]):
        start, stop = int(spans[row, 0]), int(spans[row, 1])
        start = max(start, 1)  # a target needs a preceding position
        if stop <= start:
            continue
        logp = torch.log_softmax(logits[row, start - 1:stop - 1].double(), dim=-1)
        total -= float(logp.gather(-1, tokens[row, start:stop, None]).sum())
        count += stop - start
    return total, count


@torch.no_grad()
def evaluate_sae(model: HookedTransformer, sae, prompts: PromptSet | Sequence[str], *, hook_name: str | None = None,
                 batch_size: int = 16, dense_threshold: float = DENSE_THRESHOLD, chat_template: bool = True,
                 max_length: int = 512) -> SAEMetrics:
    """Evaluate ``sae`` on the content tokens of ``prompts`` (which should be held out from training)."""
    loaded: LoadedSAE = as_loaded(sae, hook_name)
    name = check_hook(model, loaded.hook_name)
    texts = list(prompts.texts if isinstance(prompts, PromptSet) else prompts)
    if not texts:
        raise MechsafeError("no evaluation prompts; pass a non-empty held-out prompt set")
    layer = layer_of(name)
    block_input = build_hook_name(model, "resid_pre", layer)
    encoded = chat.encode_prompts(model.tokenizer, texts, chat=chat_template, max_length=max_length)
    pad = chat.pad_id(model.tokenizer)
    xs, feats_all, recons = [], [], []
    ce = {"clean": [0.0, 0], "sae": [0.0, 0], "zero": [0.0, 0]}
    for batch in _batches(encoded, batch_size):
        tokens, lengths = chat.pad_right([encoded[i].ids for i in batch], pad)
        tokens = tokens.to(model.cfg.device)
        spans = torch.tensor([encoded[i].content for i in batch], dtype=torch.long)
        captured = {}

        def grab(act, hook):
            captured[hook.name] = act.detach()

        # the clean pass also keeps the block's input, so the spliced passes start at the hook's block
        s, n = _content_ce(model.run_with_hooks(tokens, fwd_hooks=[(name, grab), (block_input, grab)]), tokens, spans)
        ce["clean"][0] += s
        ce["clean"][1] += n
        captured["act"] = _flat(captured[name])
        act = captured["act"].float()
        for row in range(len(batch)):
            start, stop = int(spans[row, 0]), int(spans[row, 1])
            start = max(start, 1)
            x = act[row, start:stop].cpu()
            f = loaded.encode(x.to(loaded.sae.device)).float()
            xs.append(x)
            feats_all.append(f.cpu())
            recons.append(loaded.decode(f).float().cpu())
        resid = captured[block_input]
        with splice_sae(model, loaded):
            s, n = _content_ce(model(resid, start_at_layer=layer), tokens, spans)
            ce["sae"][0] += s
            ce["sae"][1] += n
        with zero_ablate(model, name):
            s, n = _content_ce(model(resid, start_at_layer=layer), tokens, spans)
            ce["zero"][0] += s
            ce["zero"][1] += n
    stats = reconstruction_stats(torch.cat(xs), torch.cat(recons), torch.cat(feats_all), dense_threshold)
    clean, with_sae, zero = (ce[k][0] / max(ce[k][1], 1) for k in ("clean", "sae", "zero"))
    recovered = (zero - with_sae) / (zero - clean) if zero != clean else float("nan")
    return SAEMetrics(hook_name=name, n_prompts=len(texts), n_tokens=int(sum(x.shape[0] for x in xs)),
                      n_ce_targets=int(ce["clean"][1]), **stats, dense_threshold=dense_threshold,
                      ce_clean=clean, ce_sae=with_sae, ce_zero=zero, ce_increase=with_sae - clean,
                      ce_recovered=recovered)
