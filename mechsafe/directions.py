"""Difference-in-means directions and the selection of a refusal direction (Arditi et al., 2024).

**Candidates.** For every layer ``l`` (at ``resid_pre``) and every post-instruction position ``i``
(the chat-template tokens after the user's text, counted from the end: ``-1`` is the last one),
``r[i, l] = mean(harmful activations) − mean(harmless activations)`` on TRAIN prompts.

**Selection.** For each candidate, on VALIDATION prompts:

* *ablation score* — mean refusal score of harmful prompts with r̂ ablated at every layer
  (:func:`mechsafe.interventions.ablate_direction`); lower means refusal is removed;
* *steering score* — mean refusal score of harmless prompts with ``r`` added at ``resid_pre`` of its
  own layer at every position (:func:`mechsafe.interventions.steer`, coefficient 1);
* *KL* — mean ``KL(base ‖ ablated)`` of the next-token distribution at the last position of harmless
  prompts.

**Attention sink.** The first token's residual is the same for every prompt (causal attention, same
first token) and, in models with massive activations (Sun et al., 2024; SmolLM2: channel 507 ≈ 25,000 from
layer 12 on), it is far larger than any other. A raw difference in means has a small component along it,
and ablating that at every position rewrites the sink: on the aligned SmolLM2 every candidate then had KL
far above 0.1 (up to 9). With ``orthogonal_to_sink`` (default) each candidate is projected off the span of
what every layer writes at the first position (:func:`sink_basis`; that position carries no prompt
information), so ablation and weight orthogonalization leave the sink exactly as it was.

**Prompts.** As in the reference pipeline (``filter_train``, ``filter_val``), the means use only the TRAIN prompts
the model treats as their class (harmful ones it refuses: refusal score > 0; harmless ones it does not: score
< 0), and the selection only such prompts among the first ``n_val`` VALIDATION prompts of each class.

Candidates with KL > 0.1, steering score < 0 or a layer in the last 20% of layers are discarded; the
one with the lowest ablation score is chosen. To fit a CPU budget, every ablation score is computed
first and KL / steering are then computed lazily in ascending ablation order until a candidate passes
(``score_all=True`` computes them for all): the chosen candidate is the same either way. Candidate
layers and positions can be prefiltered (``layers``, ``layer_step``, ``positions``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechsafe.chat import encode_prompts, pad_id, pad_right
from mechsafe.errors import MechsafeError
from mechsafe.evaluation.generation import length_batches, prompt_last_logits
from mechsafe.evaluation.refusal import REFUSAL_START_WORDS, refusal_token_ids, score_from_logits
from mechsafe.hooks import hook_name, parse_layers
from mechsafe.interventions import ablate_direction, hooked, steer
from mechsafe.models import model_info
from mechsafe.runs import atomic_dir, read_json, write_json

logger = logging.getLogger(__name__)

DIRECTION_FILE = "direction.safetensors"
META_FILE = "direction.json"


@dataclasses.dataclass
class SelectionConfig:
    """Settings of :func:`select_refusal_direction`."""

    positions: int | None = None
    """How many post-instruction positions (from the end) give candidates; ``None``: all of them."""
    layers: str = "all"
    """Layer selector of candidate layers (see :func:`mechsafe.hooks.parse_layers`)."""
    layer_step: int = 2
    """Keep every ``layer_step``-th candidate layer: a CPU prefilter (2 halves the sweep; 1 is the paper's)."""
    n_val: int = 32
    """Validation prompts per class used to score candidates."""
    batch_size: int = 16
    """Prompts per forward pass."""
    kl_threshold: float = 0.1
    """Discard candidates whose ablation KL on harmless prompts exceeds this."""
    steering_threshold: float = 0.0
    """Discard candidates whose steering score is below this."""
    prune_layer_fraction: float = 0.2
    """Discard candidates in the last fraction of layers."""
    score_all: bool = False
    """Compute KL and steering scores for every candidate (else lazily, in ablation-score order)."""
    system: str | None = None
    """Optional system message for the chat template."""
    refusal_words: tuple[str, ...] = REFUSAL_START_WORDS
    """Words whose first tokens define the refusal score."""
    orthogonal_to_sink: bool = True
    """Project candidates off the first position's residual writes (the attention sink; see the module docstring)."""
    filter_train: bool = True
    """Compute the means only on the TRAIN prompts the model treats as their class: harmful ones whose refusal
    score is above 0 and harmless ones whose score is below 0 (the reference pipeline's ``filter_train``)."""
    filter_val: bool = True
    """Likewise keep only such prompts among the first ``n_val`` VALIDATION prompts of each class (its ``filter_val``)."""

    def __post_init__(self) -> None:
        if self.positions is not None and self.positions < 1:
            raise MechsafeError(f"positions must be at least 1 (or None for all), got {self.positions}")
        if self.layer_step < 1:
            raise MechsafeError(f"layer_step must be at least 1, got {self.layer_step}")
        if self.n_val < 1 or self.batch_size < 1:
            raise MechsafeError("n_val and batch_size must be at least 1")
        if not 0 <= self.prune_layer_fraction < 1:
            raise MechsafeError(f"prune_layer_fraction must be in [0, 1), got {self.prune_layer_fraction}")
        if self.kl_threshold <= 0:
            raise MechsafeError(f"kl_threshold must be positive, got {self.kl_threshold}")
        self.refusal_words = tuple(self.refusal_words)


@dataclasses.dataclass
class RefusalDirection:
    """A selected refusal direction with the scores of every candidate."""

    direction: Float[torch.Tensor, " d_model"]
    """The difference-in-means vector (not normalized; :attr:`unit` is r̂)."""
    layer: int
    """Layer whose ``resid_pre`` it was computed at."""
    position: int
    """Post-instruction position it was computed at (negative, counted from the end)."""
    scores: list[dict[str, Any]]
    """Per candidate: position, layer, ablation_score, steering_score, kl, kept, reason."""
    baseline: dict[str, float]
    """Mean refusal score of validation harmful and harmless prompts without intervention."""
    candidates: Float[torch.Tensor, "n_positions n_layers d_model"] | None = None
    """All difference-in-means vectors, ``[position, layer]`` (positions ``-P..-1``, layers as scored)."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Model, data fingerprints, config and how the selection ended."""

    @property
    def unit(self) -> Float[torch.Tensor, " d_model"]:
        """r̂, the direction scaled to unit norm."""
        return self.direction / self.direction.norm()

    def save(self, path: str | Path) -> Path:
        """Write ``direction.safetensors`` and ``direction.json`` into folder ``path`` (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"direction": self.direction.detach().float().contiguous()}
        if self.candidates is not None:
            tensors["candidates"] = self.candidates.detach().float().contiguous()
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / DIRECTION_FILE))
            write_json(tmp / META_FILE, {"layer": self.layer, "position": self.position, "baseline": self.baseline,
                                         "scores": self.scores, "meta": self.meta})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RefusalDirection":
        """Read a direction saved with :meth:`save` (a folder, or its ``direction.json``)."""
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_file():
            path = path.parent
        meta = read_json(path / META_FILE)
        try:
            tensors = load_file(str(path / DIRECTION_FILE))
        except Exception as exc:  # noqa: BLE001
            raise MechsafeError(f"{path / DIRECTION_FILE} is missing or corrupt ({exc}); run refusal-direction again") from None
        return cls(direction=tensors["direction"], layer=int(meta["layer"]), position=int(meta["position"]),
                   scores=list(meta["scores"]), baseline=dict(meta["baseline"]),
                   candidates=tensors.get("candidates"), meta=dict(meta.get("meta", {})))


def _texts(prompts: Any) -> list[str]:
    texts = list(getattr(prompts, "texts", prompts))
    if not texts:
        raise MechsafeError("a prompt list is empty; pass harmful and harmless prompts")
    return texts


def post_instruction_positions(tokenizer, prompts: Sequence[str], system: str | None = None) -> int:
    """How many template tokens follow the user's text in every prompt (e.g. 6 for SmolLM2)."""
    enc = encode_prompts(tokenizer, list(prompts), system=system)
    n = min(len(e.ids) - e.content[1] for e in enc)
    if n < 1:
        raise MechsafeError("the prompts have no token after the user's text; use a chat model with a template")
    return n


def mean_activations(model: HookedTransformer, prompts: Sequence[str], n_positions: int, layers: Sequence[int],
                     batch_size: int = 16, system: str | None = None,
                     kind: str = "resid_pre") -> Float[torch.Tensor, "n_positions n_layers d_model"]:
    """Mean activation (hook ``kind``) at the last ``n_positions`` positions of each prompt, per layer."""
    enc = encode_prompts(model.tokenizer, list(prompts), system=system)
    total = torch.zeros((n_positions, len(layers), model.cfg.d_model), dtype=torch.float64)
    offsets = torch.arange(-n_positions, 0)
    state: dict[str, torch.Tensor] = {}

    def make_hook(j: int):
        def fn(x: torch.Tensor, hook=None):
            pos = state["lengths"][:, None] + offsets[None, :]
            rows = torch.arange(x.shape[0])[:, None]
            total[:, j] += x.detach()[rows, pos.to(x.device)].double().sum(0).cpu()
        return fn

    hooks = [(hook_name(model, kind, layer), make_hook(j)) for j, layer in enumerate(layers)]
    stop = max(layers) + 1
    with torch.inference_mode(), hooked(model, hooks):
        for idx in length_batches([len(e) for e in enc], batch_size):
            tokens, lengths = pad_right([enc[i].ids for i in idx], pad_id(model.tokenizer))
            state["lengths"] = lengths
            model(tokens.to(model.cfg.device), stop_at_layer=stop)
    return total / len(enc)


def candidate_directions(model: HookedTransformer, harmful: Sequence[str], harmless: Sequence[str],
                         n_positions: int, layers: Sequence[int], batch_size: int = 16,
                         system: str | None = None) -> Float[torch.Tensor, "n_positions n_layers d_model"]:
    """Difference in means ``harmful − harmless`` at each position and layer (float32)."""
    diff = (mean_activations(model, harmful, n_positions, layers, batch_size, system)
            - mean_activations(model, harmless, n_positions, layers, batch_size, system))
    assert not torch.isnan(diff).any(), "NaN in the difference-in-means directions"
    return diff.float()


def sink_basis(model: HookedTransformer, prompt: str, system: str | None = None) -> Float[torch.Tensor, "d_model k"]:
    """Orthonormal basis (float32 columns) of everything written into the residual stream at the first position.

    The vectors are the first position's activations at every hook that directional ablation edits
    (``resid_pre`` of layer 0 and every ``attn_out`` and ``mlp_out``), so a direction orthogonal to the
    basis leaves that position unchanged at every layer under ablation or weight orthogonalization. The
    first position sees only the first token, so these are the same for every prompt; ``prompt`` only
    supplies the chat template.
    """
    ids = encode_prompts(model.tokenizer, [prompt], system=system)[0].ids
    names = [hook_name(model, "resid_pre", 0)] + [hook_name(model, kind, layer) for layer in range(model.cfg.n_layers)
                                                  for kind in ("attn_out", "mlp_out")]
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.tensor([ids], device=model.cfg.device), names_filter=names)
    rows = torch.stack([cache[n][0, 0].double().cpu() for n in names])
    _, sv, vh = torch.linalg.svd(rows, full_matrices=False)
    return vh[sv > sv[0] * 1e-7].T.float()


def _class_rows(logits: torch.Tensor, token_ids: list[int], kind: str, split: str,
                fix: str | None = None) -> list[int]:
    """Rows (of last-position ``logits``) of the prompts the model treats as their class: refusal score above 0
    (harmful) or below 0 (harmless); ``fix`` is what the error tells the user to switch off."""
    scores = score_from_logits(logits, token_ids)
    keep = scores > 0 if kind == "harmful" else scores < 0
    rows = np.flatnonzero(keep).tolist()
    if not rows:
        what = "refuses none" if kind == "harmful" else "refuses every one"
        raise MechsafeError(f"the model {what} of the {len(scores)} {kind} {split.upper()} prompts (refusal score "
                            f"{'> 0' if kind == 'harmful' else '< 0'} for none), so filtering leaves none; "
                            f"pass {fix or f'filter_{split}=False (CLI: --no-filter-{split})'}")
    return rows


def difference_in_means(model: HookedTransformer, harmful: Any, harmless: Any, layer: int, position: int = -1, *,
                        filter_prompts: bool = True, orthogonal_to_sink: bool = True, batch_size: int = 16,
                        system: str | None = None,
                        refusal_words: Sequence[str] = REFUSAL_START_WORDS) -> Float[torch.Tensor, " d_model"]:
    """One difference-in-means direction, ``mean harmful − mean harmless`` at ``resid_pre`` of ``layer`` and
    post-instruction ``position`` (−1: the last prompt token), without the selection sweep.

    As in :func:`select_refusal_direction`: with ``filter_prompts`` the means use only the prompts the model treats as
    their class (refusal score above 0 for harmful, below 0 for harmless), and with ``orthogonal_to_sink`` the
    direction is projected off what the first position writes into the stream (:func:`sink_basis`).
    """
    harmful, harmless = _texts(harmful), _texts(harmless)
    (layer,) = parse_layers(int(layer), model.cfg.n_layers)
    n_post = post_instruction_positions(model.tokenizer, harmful + harmless, system)
    if not -n_post <= position <= -1:
        raise MechsafeError(f"position {position} is not a post-instruction position; use -1 … -{n_post}")
    if filter_prompts:
        token_ids = refusal_token_ids(model.tokenizer, refusal_words)
        harmful, harmless = ([p[i] for i in _class_rows(prompt_last_logits(model, p, batch_size=batch_size, system=system),
                                                        token_ids, kind, "given", fix="filter_prompts=False")]
                             for p, kind in ((harmful, "harmful"), (harmless, "harmless")))
    direction = candidate_directions(model, harmful, harmless, -position, [layer], batch_size, system)[0, 0]
    if orthogonal_to_sink:
        basis = sink_basis(model, harmful[0], system)
        direction = direction - basis @ (basis.T @ direction)
    return direction


def _last_position_kl(base_logp: torch.Tensor, logits: torch.Tensor) -> float:
    q = torch.log_softmax(logits.double(), dim=-1)
    return float((base_logp.exp() * (base_logp - q)).sum(-1).mean())


def select_refusal_direction(model: HookedTransformer, harmful: Any, harmless: Any, harmful_val: Any = None,
                             harmless_val: Any = None, config: SelectionConfig | None = None,
                             progress: bool = True, **overrides) -> RefusalDirection:
    """Compute difference-in-means candidates and select the refusal direction (see module docstring).

    Args:
        model: the model (active hooks apply; usually none).
        harmful, harmless: TRAIN prompts for the means; ``PromptSet``s with splits may be passed
            alone, in which case their ``train`` split gives the means and ``val`` the selection data.
        harmful_val, harmless_val: VALIDATION prompts (the first ``n_val`` of each are used).
        config: a :class:`SelectionConfig`; keyword ``overrides`` replace its fields.
        progress: show a progress bar.
    """
    cfg = dataclasses.replace(config or SelectionConfig(), **overrides)
    t_start = time.perf_counter()
    if harmful_val is None or harmless_val is None:
        if not (hasattr(harmful, "split") and hasattr(harmless, "split")):
            raise MechsafeError("pass harmful_val and harmless_val, or PromptSets with train/val splits")
        harmful, harmful_val = harmful.split("train"), harmful.split("val")
        harmless, harmless_val = harmless.split("train"), harmless.split("val")
    harmful, harmless = _texts(harmful), _texts(harmless)
    hv, lv = _texts(harmful_val)[: cfg.n_val], _texts(harmless_val)[: cfg.n_val]
    n_layers = model.cfg.n_layers
    layers = parse_layers(cfg.layers, n_layers)[:: cfg.layer_step]
    n_post = post_instruction_positions(model.tokenizer, harmful + harmless + hv + lv, cfg.system)
    n_pos = min(cfg.positions or n_post, n_post)
    cutoff = int(n_layers * (1.0 - cfg.prune_layer_fraction))
    token_ids = refusal_token_ids(model.tokenizer, cfg.refusal_words)

    def logits(prompts: list[str]) -> torch.Tensor:
        return prompt_last_logits(model, prompts, batch_size=cfg.batch_size, system=cfg.system)

    given = {"harmful": len(harmful), "harmless": len(harmless), "harmful_val": len(hv), "harmless_val": len(lv)}
    if cfg.filter_train:
        harmful, harmless = ([p[i] for i in _class_rows(logits(p), token_ids, kind, "train")]
                             for p, kind in ((harmful, "harmful"), (harmless, "harmless")))
    base_h, base_l = logits(hv), logits(lv)  # also the baseline of the selection below
    if cfg.filter_val:  # keep the rows of the prompts kept, so each prompt runs once
        rows_h = _class_rows(base_h, token_ids, "harmful", "val")
        rows_l = _class_rows(base_l, token_ids, "harmless", "val")
        hv, lv = [hv[i] for i in rows_h], [lv[i] for i in rows_l]
        base_h, base_l = base_h[rows_h], base_l[rows_l]

    t0 = time.perf_counter()
    cands = candidate_directions(model, harmful, harmless, n_pos, layers, cfg.batch_size, cfg.system)
    sink: dict[str, Any] = {}
    if cfg.orthogonal_to_sink:
        basis = sink_basis(model, hv[0], cfg.system)
        removed = cands @ basis @ basis.T
        share = removed.norm(dim=-1) / cands.norm(dim=-1).clamp_min(1e-12)
        cands = cands - removed
        sink = {"rank": int(basis.shape[1]), "removed_norm_share_max": float(share.max()),
                "removed_norm_share_median": float(share.median())}
    t_means = time.perf_counter() - t0

    base_l_logp = torch.log_softmax(base_l.double(), dim=-1)
    baseline = {"harmful": float(score_from_logits(base_h, token_ids).mean()),
                "harmless": float(score_from_logits(base_l, token_ids).mean())}

    scores: list[dict[str, Any]] = []
    for pi in range(n_pos):
        for li, layer in enumerate(layers):
            scores.append({"position": pi - n_pos, "layer": layer, "index": [pi, li], "ablation_score": None,
                           "steering_score": None, "kl": None, "kept": None,
                           "reason": "late layer" if layer >= cutoff else None})
            if float(cands[pi, li].norm()) < 1e-6 * (1.0 + float(cands.norm(dim=-1).max())):
                scores[-1]["reason"] = "zero vector"  # e.g. layer 0: same template token in both classes
    to_score = [s for s in scores if s["reason"] is None or (cfg.score_all and s["reason"] == "late layer")]
    if not any(s["reason"] is None for s in scores):
        raise MechsafeError(f"every candidate layer is in the last {cfg.prune_layer_fraction:.0%} of layers; "
                            "pick earlier --layers")
    bar = tqdm(total=len(to_score), desc="ablation scores", unit="cand", disable=not progress)
    t0 = time.perf_counter()
    for s in to_score:
        r = cands[tuple(s["index"])]
        with ablate_direction(model, r):
            s["ablation_score"] = float(score_from_logits(logits(hv), token_ids).mean())
        bar.update(1)
    bar.close()
    t_ablation = time.perf_counter() - t0

    def fill_filters(s: dict[str, Any]) -> None:
        r = cands[tuple(s["index"])]
        with ablate_direction(model, r):
            s["kl"] = _last_position_kl(base_l_logp, logits(lv))
        with steer(model, r, layers=[s["layer"]], coeff=1.0, hook="resid_pre"):
            s["steering_score"] = float(score_from_logits(logits(lv), token_ids).mean())
        if s["reason"] is None:
            if not np.isfinite(s["ablation_score"]) or not np.isfinite(s["kl"]) or not np.isfinite(s["steering_score"]):
                s["reason"] = "not finite"
            elif s["kl"] > cfg.kl_threshold:
                s["reason"] = "kl too high"
            elif s["steering_score"] < cfg.steering_threshold:
                s["reason"] = "steering score too low"
        s["kept"] = s["reason"] is None

    t0 = time.perf_counter()
    order = sorted((s for s in to_score if s["reason"] is None), key=lambda s: s["ablation_score"])
    chosen = None
    if cfg.score_all:
        for s in to_score:
            fill_filters(s)
    for s in order:
        if s["kept"] is None:
            fill_filters(s)
        if s["kept"]:
            chosen = s
            break
    t_filters = time.perf_counter() - t0
    outcome = "all filters passed"
    if chosen is None:
        # Nothing passes every filter: fall back to the lowest ablation score among candidates
        # within the KL threshold (then among all scored ones), and say so in the metadata.
        within_kl = [s for s in order if s["kl"] is not None and s["kl"] <= cfg.kl_threshold]
        chosen = (within_kl or order)[0]
        outcome = ("no candidate passed every filter; chose the lowest ablation score "
                   + ("within the KL threshold" if within_kl else "ignoring the filters"))
        logger.warning("refusal-direction selection: %s", outcome)
    pi, li = chosen["index"]
    info = model_info(model)
    meta = {"model": info.spec, "processing": info.processing, "config": dataclasses.asdict(cfg),
            "layers_scored": layers, "layer_cutoff": cutoff, "n_post_instruction": n_post, "refusal_token_ids": token_ids,
            "sink_projection": sink,
            "n_given": given, "n_train": {"harmful": len(harmful), "harmless": len(harmless)},
            "n_val": {"harmful": len(hv), "harmless": len(lv)}, "outcome": outcome,
            "timings_s": {"means": t_means, "ablation_scores": t_ablation, "filters": t_filters,
                          "total": time.perf_counter() - t_start}}
    return RefusalDirection(direction=cands[pi, li].clone(), layer=chosen["layer"], position=chosen["position"],
                            scores=scores, baseline=baseline, candidates=cands, meta=meta)


def plot_scores(result: RefusalDirection, path: str | Path) -> Path:
    """Plot ablation (and, where computed, steering) scores by layer, one line per position (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for key, ax, base in (("ablation_score", axes[0], result.baseline["harmful"]),
                          ("steering_score", axes[1], result.baseline["harmless"])):
        for pos in sorted({s["position"] for s in result.scores}):
            pts = sorted((s["layer"], s[key]) for s in result.scores if s["position"] == pos and s[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"pos {pos}")
        ax.axhline(base, color="grey", ls="--", lw=1, label="no intervention")
        ax.axvline(result.layer, color="red", ls=":", lw=1)
        ax.set_xlabel("layer")
        ax.set_ylabel(key.replace("_", " "))
        ax.legend(fontsize=7)
    axes[0].set_title("refusal score of harmful prompts, direction ablated")
    axes[1].set_title("refusal score of harmless prompts, direction added")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path
