"""Settings of SNIP scoring (:class:`ScoreConfig`), of neuron/weight groups (:class:`GroupConfig`) and of the
pruning study (:class:`StudyConfig`)."""

from __future__ import annotations

import dataclasses

from mechsafe.errors import MechsafeError
from mechsafe.weights import WEIGHT_KINDS, check_kinds

SCORE_DATA = ("safety", "safety-short", "utility")
"""Bundled scoring data by name; anything else is a local file or a Hugging Face dataset with prompt/response columns."""
RESPONSE_SOURCES = ("own", "bundled")
GRANULARITIES = ("weight", "unit")
DTYPES = ("float32", "float16")


def _fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise MechsafeError(f"{name}={value} is not a fraction in (0, 1); pass e.g. 0.03 for 3%")
    return value


@dataclasses.dataclass
class ScoreConfig:
    """What SNIP scores are computed on, and how (``mechsafe snip score``)."""

    data: str = "safety-short"
    """Scoring data: ``safety`` (harmful prompts + refusals), ``safety-short`` (the same, scoring only the first
    ``short_tokens`` response tokens; Wei et al.'s recommended variant), ``utility`` (harmless prompts + helpful
    answers), or a local .jsonl/.csv/.parquet file or Hugging Face dataset with ``prompt_column``/``response_column``."""
    responses: str = "own"
    """For the bundled data: ``own`` (the scored model's own greedy responses, kept when the refusal matcher agrees:
    refusals for safety, answers for utility; cached) or ``bundled`` (the bundled refusals / reference answers)."""
    prompt_column: str = "prompt"
    """Prompt column of a file or hub dataset."""
    response_column: str = "response"
    """Response column of a file or hub dataset."""
    n_samples: int = 128
    """Number of (prompt, response) pairs scored (fewer when the data has fewer)."""
    short_tokens: int = 8
    """Response tokens scored by ``safety-short``."""
    max_new_tokens: int = 64
    """Tokens generated per own response."""
    max_length: int = 256
    """Longest scored sequence in tokens (prompt + response)."""
    batch_size: int = 1
    """Pairs per backward pass. The absolute gradient is taken per batch, so the batch size is part of the score's
    definition: 1 (the reference code's choice) sums per-example absolute gradients."""
    micro_batch: int = 2
    """Pairs per forward/backward pass. A batch's gradient is summed over its micro-batches before the absolute value,
    so this changes memory and speed, not the scores: each pass adds one pass's activations to memory and saves one
    accumulation of the gradients; larger values are faster where activation memory is plentiful (GPUs)."""
    kinds: tuple[str, ...] = WEIGHT_KINDS
    """Weight kinds scored (``attn.W_Q``, ``attn.W_K``, ``attn.W_V``, ``attn.W_O``, ``mlp.W_in``, ``mlp.W_gate``,
    ``mlp.W_out``); kinds a model lacks (``W_gate`` without a gated MLP) are skipped."""
    layers: str = "all"
    """Blocks scored: a layer selector (``all``, ``early``, ``middle``, ``late``, ``3-7``, ``0,5,9``)."""
    layers_per_pass: int | None = None
    """Blocks whose gradients one pass over the data collects (``None``: all of them in one pass). Memory holds the
    absolute-gradient sums of these blocks only; 1 bounds it by one block's scores, at one pass per block."""
    dtype: str = "float32"
    """Dtype of the scores on disk: ``float32`` or ``float16``."""
    system: str | None = None
    """Optional system message of the chat-formatted prompts."""
    seed: int = 0
    """Seed of the choice of pairs."""

    def __post_init__(self) -> None:
        self.kinds = check_kinds(self.kinds)
        if self.responses not in RESPONSE_SOURCES:
            raise MechsafeError(f"unknown response source {self.responses!r}; use {' or '.join(RESPONSE_SOURCES)}")
        if self.dtype not in DTYPES:
            raise MechsafeError(f"unknown score dtype {self.dtype!r}; use {' or '.join(DTYPES)}")
        for name in ("n_samples", "short_tokens", "max_new_tokens", "max_length", "batch_size", "micro_batch"):
            if int(getattr(self, name)) < 1:
                raise MechsafeError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.layers_per_pass is not None and self.layers_per_pass < 1:
            raise MechsafeError(f"layers_per_pass={self.layers_per_pass} must be a positive integer or None")
        if not str(self.data).strip():
            raise MechsafeError("no scoring data named; use safety, safety-short, utility or a file path")


@dataclasses.dataclass
class GroupConfig:
    """Which weights or units form the safety-critical groups (``mechsafe snip groups``)."""

    granularity: str = "unit"
    """``unit``: MLP neurons and attention heads, ranked by the summed scores of their weight slices; ``weight``:
    single weights (unstructured, as Wei et al. prune)."""
    top_fraction: float = 0.03
    """Share of each module's weights (or each layer's neurons and heads) in the top-safety and top-utility groups."""
    safety_q: float = 0.03
    """Set difference: the top ``safety_q`` share by safety score (the reference code's ``q``) ..."""
    utility_p: float = 0.03
    """... minus the top ``utility_p`` share by utility score (the reference code's ``p``), per module or layer."""
    seed: int = 0
    """Seed of the random group (matched to the set difference in size and per-layer, per-kind counts)."""

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise MechsafeError(f"unknown granularity {self.granularity!r}; use {' or '.join(GRANULARITIES)}")
        for name in ("top_fraction", "safety_q", "utility_p"):
            setattr(self, name, _fraction(name, getattr(self, name)))


@dataclasses.dataclass
class StudyConfig:
    """The pruning study (``mechsafe prune-study``): which edits, at which sizes, evaluated how."""

    sparsities: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.05)
    """Shares of the selected weights pruned by the top-safety, top-utility and random groups."""
    set_difference: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
    """Values of ``p = q`` of the set-difference sweep (its sparsity is an outcome: reported, not set)."""
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Safety ranks removed by ActSVD from every selected weight."""
    utility_rank: int = 64
    """Utility rank kept by ActSVD's orthogonal variant ``W <- W - (I - P_u) P_s W``."""
    responses: str = "own"
    """Responses of the scoring data (``ScoreConfig.responses``): ``own`` or ``bundled``."""
    score_samples: int = 128
    """Examples of each scoring data set (``ScoreConfig.n_samples``)."""
    max_new_tokens: int = 48
    """Tokens generated per response to judge refusal."""
    utility_max_new_tokens: int = 64
    """Tokens generated per arithmetic answer."""
    limit: int | None = None
    """Use only the first N prompts of each evaluation set (``None``: all)."""
    batch_size: int = 16
    """Prompts per forward pass of the evaluation."""
    holds_nll: float = 0.10
    """Utility holds when the reference-answer NLL rises by at most this share of the unpruned model's ..."""
    holds_accuracy: float = 0.10
    """... and the arithmetic accuracy falls by at most this much (absolute)."""
    seed: int = 0
    """Seed of the random groups and of the bootstrap intervals."""

    def __post_init__(self) -> None:
        self.sparsities = tuple(_fraction("sparsity", s) for s in self.sparsities)
        self.set_difference = tuple(_fraction("set-difference p=q", s) for s in self.set_difference)
        self.ranks = tuple(int(r) for r in self.ranks)
        if not (self.sparsities or self.set_difference or self.ranks):
            raise MechsafeError("the study has nothing to run; give sparsities, set-difference values or ranks")
        if any(r < 1 for r in self.ranks) or self.utility_rank < 1:
            raise MechsafeError("ranks and utility_rank must be positive integers")
        if self.limit is not None and self.limit < 1:
            raise MechsafeError(f"limit={self.limit} must be a positive integer or None")
        if self.score_samples < 1:
            raise MechsafeError(f"score_samples={self.score_samples} must be a positive integer")
        if self.responses not in RESPONSE_SOURCES:
            raise MechsafeError(f"unknown response source {self.responses!r}; use {' or '.join(RESPONSE_SOURCES)}")
