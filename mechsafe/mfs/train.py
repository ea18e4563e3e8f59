"""Building, training and measuring a detector-mode safety bank.

The model stays frozen in detector mode, so each prompt's inputs to every sub-bank at its last position are
computed once (:func:`prompt_inputs`) and training runs on them. The loss of a step is

    L = L_safety + w_sparsity · L_sparsity + w_diversity · L_diversity

* ``L_safety``: BCE of the prompt's score (a logit; label 1 = harmful) plus the hinge ``relu(margin − ±score)``;
* ``L_sparsity``: the mean firing strength of the retrieved features;
* ``L_diversity``: the mean squared correlation, over the batch, between different sub-banks' summed votes
  (feature types should err independently);
* robustness: each step removes a random ``feature_dropout`` share of the features and drops a random
  ``group_dropout`` share of the groups.

Adaptive weighting: with ``adaptive``, ``w_i = base_i · EMA(L_safety) / max(EMA(L_i), 0.01 · EMA(L_safety))``
(exponential moving averages, decay 0.9, no gradient), so every auxiliary term weighs like the safety term times
its base weight whatever its scale, and a term near zero is never scaled by more than 100. The LM-preservation term (KL to the original model on harmless prompts) is zero in detector mode: the bank
reads the model without changing it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformer_lens import HookedTransformer

from mechsafe.chat import encode_prompts, pad_id, pad_right
from mechsafe.errors import MechsafeError
from mechsafe.hooks import parse_layers
from mechsafe.mfs.aggregate import aggregate, group_scores
from mechsafe.mfs.bank import SafetyBank, SubBankSpec, feature_type, run_with_bank
from mechsafe.mfs.config import BankConfig, TrainConfig
from mechsafe.stats import Estimate, bootstrap

logger = logging.getLogger(__name__)


def build_bank(model: HookedTransformer, config: BankConfig | None = None) -> SafetyBank:
    """A fresh (untrained) bank for ``model``: one sub-bank per feature type and layer."""
    config = config or BankConfig()
    slots = []
    for t in config.types:
        layered = feature_type(t).uses_layer
        slots += [(t, layer) for layer in parse_layers(config.layers, model.cfg.n_layers)] if layered else [(t, None)]
    per = config.per_bank(len(slots))
    specs = [SubBankSpec(t, layer, per) for t, layer in slots]
    return SafetyBank(model, specs, config.d_key, config.k, config.n_groups, config.r, config.rule, config.window,
                      config.seed)


@dataclasses.dataclass
class PromptInputs:
    """Each sub-bank's input vectors at every position of each prompt from the start of the user's text to the last
    template token (the positions a prompt's score pools), as rows ``xs[j][offsets[i]:offsets[i + 1]]`` of prompt
    ``i``."""

    xs: list[torch.Tensor]
    offsets: torch.Tensor

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The rows of prompts ``idx`` and the position in ``idx`` of each row's prompt."""
        starts, stops = self.offsets[idx], self.offsets[idx + 1]
        rows = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(starts, stops)])
        segment = torch.repeat_interleave(torch.arange(len(idx)), stops - starts)
        return [x[rows] for x in self.xs], segment


@torch.no_grad()
def prompt_inputs(model: HookedTransformer, bank: SafetyBank, prompts: Sequence[str], batch_size: int = 16
                  ) -> PromptInputs:
    """:class:`PromptInputs` of chat-formatted ``prompts``."""
    enc = encode_prompts(model.tokenizer, list(prompts))
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    parts: dict[int, list[torch.Tensor]] = {}
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        tokens, lengths = pad_right([enc[i].ids for i in idx], pad_id(model.tokenizer))
        xs = run_with_bank(model, bank, tokens.to(model.cfg.device), bank.inputs)
        for row, i in enumerate(idx):
            start = enc[i].content[0]
            parts[i] = [x[row, start:int(lengths[row])].cpu() for x in xs]
    counts = torch.tensor([len(parts[i][0]) for i in range(len(enc))])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    return PromptInputs([torch.cat([parts[i][j] for i in range(len(enc))]) for j in range(len(bank.subs))], offsets)


def prompt_groups(bank: SafetyBank, inputs: PromptInputs, idx: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group scores of prompts ``idx`` (each group's vote averaged over the prompt's positions), and the firing
    strengths and cast votes of their rows."""
    xs, segment = inputs.rows(idx)
    ids, fire, votes = bank.features(xs)
    per_row = group_scores(ids, votes, bank.code.long(), bank.n_groups)
    sums = torch.zeros(len(idx), bank.n_groups, dtype=per_row.dtype).index_add_(0, segment, per_row)
    counts = torch.bincount(segment, minlength=len(idx)).clamp_min(1)[:, None]
    return sums / counts, fire, votes


def _diversity(votes: torch.Tensor, k: int) -> torch.Tensor:
    """Mean squared off-diagonal correlation between sub-banks' summed votes over the batch."""
    per_bank = votes.unflatten(-1, (-1, k)).sum(-1)  # [batch, n_sub]
    if per_bank.shape[-1] < 2:
        return votes.new_zeros(())
    z = per_bank - per_bank.mean(0)
    z = z * torch.rsqrt(z.pow(2).mean(0) + 1e-8)
    corr = z.T @ z / z.shape[0]
    off = corr - torch.diag(torch.diagonal(corr))
    n = corr.shape[0]
    return off.pow(2).sum() / (n * (n - 1))


def train_bank(bank: SafetyBank, inputs: PromptInputs, labels: torch.Tensor, config: TrainConfig | None = None,
               work_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``bank`` (in place) on precomputed prompt inputs (:func:`prompt_inputs`) with ``labels`` (1 harmful,
    0 harmless). With ``work_dir`` the bank and optimizer are saved every ``checkpoint_every`` steps and a rerun
    resumes from the last save. Returns each term's history."""
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    labels = torch.as_tensor(labels, dtype=torch.float32)
    pos, neg = torch.nonzero(labels == 1).flatten(), torch.nonzero(labels == 0).flatten()
    if len(pos) == 0 or len(neg) == 0:
        raise MechsafeError("training a safety bank needs harmful and harmless prompts (both labels); check the data")
    opt = torch.optim.Adam(bank.parameters(), lr=config.lr)
    history: dict[str, list[float]] = {k: [] for k in ("loss", "safety", "sparsity", "diversity", "accuracy")}
    ema: dict[str, float] = {}
    step = 0
    ckpt = Path(work_dir) / "checkpoint.pt" if work_dir else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        bank.load_state_dict(state["bank"])
        opt.load_state_dict(state["optimizer"])
        step, history, ema = state["step"], state["history"], state["ema"]
        logger.info("resumed bank training at step %d", step)
    k = bank.subs[0].keys.k
    bar = tqdm(total=config.steps, initial=step, desc="mfs train", unit="step", disable=not progress)
    try:
        while step < config.steps:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            half = config.batch_size // 2
            idx = torch.cat([pos[torch.randint(len(pos), (half,), generator=gen)],
                             neg[torch.randint(len(neg), (config.batch_size - half,), generator=gen)]])
            bank.alive.copy_(torch.rand(bank.n_features, generator=gen) >= config.feature_dropout)
            keep = torch.rand(bank.n_groups, generator=gen) >= config.group_dropout
            keep[torch.randint(bank.n_groups, (1,), generator=gen)] = True
            groups, fire, votes = prompt_groups(bank, inputs, idx)
            score = aggregate(groups[..., keep], "trimmed", bank.r, config.train_trim) + bank.bias
            y = labels[idx]
            safety = (torch.nn.functional.binary_cross_entropy_with_logits(score, y)
                      + torch.relu(config.margin - (2 * y - 1) * score).mean())
            terms = {"sparsity": fire.mean(), "diversity": _diversity(votes, k)}
            for name, value in [("safety", safety), *terms.items()]:
                v = float(value.detach())
                ema[name] = 0.9 * ema.get(name, v) + 0.1 * v
            loss = safety
            for name, value in terms.items():
                base = getattr(config, name)
                weight = base * ema["safety"] / max(ema[name], 0.01 * ema["safety"]) if config.adaptive else base
                loss = loss + weight * value
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            for name, value in (("loss", loss), ("safety", safety), *terms.items()):
                history[name].append(float(value.detach()))
            history["accuracy"].append(float(((score > 0).float() == y).float().mean()))
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{history['accuracy'][-1]:.2f}")
            if ckpt is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"bank": bank.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "history": history, "ema": ema}, tmp)
                tmp.replace(ckpt)
    finally:
        bar.close()
        bank.alive.fill_(True)
    return history


@torch.no_grad()
def scores_of(bank: SafetyBank, inputs: PromptInputs, rule: str | None = None, batch_size: int = 64) -> np.ndarray:
    """The bank's score of each prompt by ``rule`` (default: the bank's)."""
    out = []
    for i in range(0, len(inputs), batch_size):
        groups, _, _ = prompt_groups(bank, inputs, torch.arange(i, min(i + batch_size, len(inputs))))
        out.append(aggregate(groups, rule or bank.rule, bank.r) + bank.bias)
    return torch.cat(out).numpy()


def auroc(scores: np.ndarray, labels: np.ndarray, seed: int = 0) -> Estimate:
    """AUROC of ``scores`` for ``labels`` with a stratified bootstrap interval."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    if len(set(labels.tolist())) < 2:
        raise MechsafeError("AUROC needs prompts of both classes; check the held-out data")
    return bootstrap(lambda s, y: roc_auc_score(y, s), np.asarray(scores), labels, stratify=labels, seed=seed)


@torch.no_grad()
def feature_importance(bank: SafetyBank, inputs: PromptInputs, batch_size: int = 64) -> torch.Tensor:
    """Each feature's summed absolute cast vote over the prompts' positions: what removing it takes away."""
    total = torch.zeros(bank.n_features)
    for i in range(0, len(inputs), batch_size):
        xs, _ = inputs.rows(torch.arange(i, min(i + batch_size, len(inputs))))
        ids, _, votes = bank.features(xs)
        total.scatter_add_(0, ids.flatten().long(), votes.abs().flatten())
    return total


@torch.no_grad()
def removal_curve(bank: SafetyBank, inputs: PromptInputs, labels: np.ndarray, fractions: Sequence[float],
                  mode: str = "random", rules: Sequence[str] = ("median", "sum"),
                  importance: torch.Tensor | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Detection AUROC of each rule after removing each fraction of the features, at random (``mode="random"``,
    seeded) or the most important first (``"targeted"``, by ``importance``: :func:`feature_importance` on
    training prompts)."""
    if mode not in ("random", "targeted"):
        raise MechsafeError(f"unknown removal mode {mode!r}; use random or targeted")
    if mode == "targeted" and importance is None:
        raise MechsafeError("targeted removal needs each feature's importance (feature_importance on training data)")
    order = (torch.argsort(importance, descending=True) if mode == "targeted"
             else torch.randperm(bank.n_features, generator=torch.Generator().manual_seed(seed)))
    points = []
    try:
        for f in fractions:
            bank.alive.fill_(True)
            bank.alive[order[: round(f * bank.n_features)]] = False
            points.append({"fraction": float(f), "mode": mode,
                           **{rule: auroc(scores_of(bank, inputs, rule), labels, seed).to_dict() for rule in rules}})
    finally:
        bank.alive.fill_(True)
    return points
