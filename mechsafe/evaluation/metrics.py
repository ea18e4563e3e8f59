"""Safety and utility metrics of a model: refusal rate, over-refusal, attack success, utility, drift.

:func:`evaluate` generates responses to harmful and harmless prompts and reports, each with a
95% bootstrap interval (:mod:`mechsafe.stats`):

* ``refusal_rate`` — share of harmful prompts refused (phrase matcher or judge);
* ``over_refusal`` — share of harmless prompts refused;
* ``attack_success_rate`` — ``1 − refusal_rate`` (the substring-matching ASR of Arditi et al.);
* ``utility_accuracy`` — exact numeric match on the held-out test split of the bundled arithmetic
  problems (the last number of the response is compared with the answer);
* ``answer_nll`` — mean negative log-likelihood per token of the bundled reference answers to the
  held-out instructions, teacher-forced after the chat-formatted prompt (prompt tokens masked);
* ``kl_harmless`` — with a reference model, mean ``KL(reference ‖ model)`` of the next-token
  distributions over every position of the harmless prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformer_lens import HookedTransformer

from mechsafe.chat import encode_prompts, pad_id, pad_right
from mechsafe.data import assign_splits, instructions, math_problems
from mechsafe.errors import MechsafeError
from mechsafe.evaluation.generation import generate, length_batches
from mechsafe.forward import encode_examples, sequence_nll
from mechsafe.evaluation.refusal import refusal_flags
from mechsafe.models import model_info
from mechsafe.stats import Estimate, bootstrap, proportion

logger = logging.getLogger(__name__)

UTILITY_SUFFIX = " Answer with the final number."
"""Appended to each arithmetic question so the answer ends with a number."""

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def record_split(records: Sequence[dict[str, Any]], which: str = "test") -> list[dict[str, Any]]:
    """Records (dicts with an ``id``) of one fixed 60/20/20 split, assigned from a hash of each id."""
    splits = assign_splits([str(r["id"]) for r in records], ["all"] * len(records))
    return [r for r, s in zip(records, splits) if s == which]


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (commas as thousands separators), or ``None``."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    return float(num.sum() / den.sum())


def answer_nll(model: HookedTransformer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 8,
               system: str | None = None) -> Estimate:
    """Mean NLL per answer token of ``answers`` teacher-forced after the chat-formatted ``prompts``.

    Each answer is followed by the end-of-turn token, which is scored too; prompt tokens are masked.
    The interval resamples prompts (ratio of summed NLL to summed token count).
    """
    if len(prompts) != len(answers) or not prompts:
        raise MechsafeError("answer_nll needs one answer per prompt and at least one prompt")
    seqs = encode_examples(model.tokenizer, list(zip(prompts, answers)), max_length=model.cfg.n_ctx, system=system)
    nll_sum, n_tok = sequence_nll(model, seqs, batch_size)
    return bootstrap(_ratio, nll_sum.double().numpy(), n_tok.double().numpy())


def kl_divergence(reference: HookedTransformer, model: HookedTransformer, prompts: Sequence[str],
                  batch_size: int = 8, system: str | None = None) -> Estimate:
    """Mean ``KL(reference ‖ model)`` of next-token distributions over all positions of ``prompts``."""
    if not prompts:
        raise MechsafeError("no prompts for the KL divergence; pass at least one prompt")
    if reference.cfg.d_vocab != model.cfg.d_vocab:
        raise MechsafeError("the reference model has another vocabulary; compare models that share a tokenizer")
    enc = encode_prompts(model.tokenizer, list(prompts), system=system)
    kl_sum = np.zeros(len(enc))
    n_pos = np.zeros(len(enc))
    with torch.inference_mode():
        for idx in length_batches([len(e) for e in enc], batch_size):
            tokens, lengths = pad_right([enc[i].ids for i in idx], pad_id(model.tokenizer))
            p = torch.log_softmax(reference(tokens.to(reference.cfg.device)).float(), dim=-1).cpu()
            q = torch.log_softmax(model(tokens.to(model.cfg.device)).float(), dim=-1).cpu()
            kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).double()
            for row, i in enumerate(idx):
                kl_sum[i], n_pos[i] = float(kl[row, :int(lengths[row])].sum()), int(lengths[row])
    return bootstrap(_ratio, kl_sum, n_pos)


@dataclasses.dataclass
class EvalConfig:
    """Settings of ``mechsafe eval`` (each is a flag of the command)."""

    split: str = "test"
    """Split of a bundled suite, or of a file with a ``split`` column (``all``: every prompt); a file without one is
    used whole."""
    limit: int | None = None
    """Use only the first N prompts of each set (and N utility items); ``None``: all."""
    max_new_tokens: int = 48
    """Tokens generated per response (greedy)."""
    batch_size: int = 16
    """Prompts per forward pass."""
    utility: bool = True
    """Also measure arithmetic accuracy and reference-answer NLL."""
    system: str | None = None
    """System message for the chat template."""
    seed: int = 0
    """Seed of the bootstrap intervals."""

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test", "all"):
            raise MechsafeError(f"unknown split {self.split!r}; use train, val, test or all")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise MechsafeError(f"{name}={getattr(self, name)} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise MechsafeError(f"limit={self.limit} must be at least 1 (or none for all)")


@dataclasses.dataclass
class EvalResult:
    """Safety and utility metrics of one model (see the module docstring for each metric)."""

    model: str
    """The evaluated model's spec."""
    refusal_rate: Estimate
    """Share of harmful prompts refused."""
    over_refusal: Estimate
    """Share of harmless prompts refused."""
    attack_success_rate: Estimate
    """Share of harmful prompts not refused (1 − refusal rate)."""
    utility_accuracy: Estimate | None
    """Exact numeric accuracy on the held-out arithmetic problems (``None`` when skipped)."""
    answer_nll: Estimate | None
    """NLL per token of reference answers to held-out instructions (``None`` when skipped)."""
    kl_harmless: Estimate | None
    """Mean KL(reference ‖ model) over harmless prompt positions (``None`` without a reference)."""
    n_harmful: int
    """Number of harmful prompts."""
    n_harmless: int
    """Number of harmless prompts."""
    samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """One record per generation: ``set``, ``prompt``, ``response``, ``refused`` (and ``correct`` for math)."""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Settings the metrics were computed with."""
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds spent per stage."""

    METRICS = ("refusal_rate", "over_refusal", "attack_success_rate", "utility_accuracy", "answer_nll", "kl_harmless")

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        """Metrics (each ``{value, low, high, level}`` or ``None``), counts, config and timings."""
        out: dict[str, Any] = {"model": self.model, "n_harmful": self.n_harmful, "n_harmless": self.n_harmless}
        for name in self.METRICS:
            est = getattr(self, name)
            out[name] = est.to_dict() if est is not None else None
        out["config"] = self.config
        out["timings_s"] = self.timings_s
        if samples:
            out["samples"] = self.samples
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        """The result back from :meth:`to_dict` (``samples`` when the dict has them)."""
        est = {name: Estimate.from_dict(d[name]) if d.get(name) else None for name in cls.METRICS}
        return cls(model=d["model"], n_harmful=d["n_harmful"], n_harmless=d["n_harmless"], samples=d.get("samples", []),
                   config=d.get("config", {}), timings_s=d.get("timings_s", {}), **est)

    def save(self, path) -> None:
        """Write the result with its samples as JSON (:meth:`load` reads it back)."""
        from mechsafe.runs import write_json

        write_json(path, self.to_dict(samples=True))

    @classmethod
    def load(cls, path, model: str | None = None) -> "EvalResult":
        """A result back from :meth:`save`'s file or a ``mechsafe eval`` run directory (its ``results.json`` and
        ``samples.jsonl``); for a run of several models, ``model`` names the one to load."""
        import json
        from pathlib import Path

        from mechsafe.runs import read_json

        path = Path(path)
        d = read_json(path / "results.json" if path.is_dir() else path)
        if "models" in d:
            names = [m["model"] for m in d["models"]]
            if model not in names:
                raise MechsafeError(f"{path} holds several models {names}; pass model= one of them")
            d = d["models"][names.index(model)]
        samples = path / "samples.jsonl"
        if path.is_dir() and "samples" not in d and samples.is_file():
            rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
            d = d | {"samples": [{k: v for k, v in r.items() if k != "model"} for r in rows
                                 if r.get("model", d["model"]) == d["model"]]}
        return cls.from_dict(d)

    def markdown(self) -> str:
        """The metrics as a markdown table (value and 95% interval)."""
        rows = ["| metric | value | 95% CI | n |", "|---|---|---|---|"]
        counts = {"refusal_rate": self.n_harmful, "attack_success_rate": self.n_harmful,
                  "over_refusal": self.n_harmless, "kl_harmless": self.n_harmless}
        for name in self.METRICS:
            est = getattr(self, name)
            n = counts.get(name, sum(1 for s in self.samples if s.get("set") == ("math" if name == "utility_accuracy" else "instructions")))
            if est is None:
                rows.append(f"| {name} | n/a | | |")
            else:
                rows.append(f"| {name} | {est.value:.3f} | [{est.low:.3f}, {est.high:.3f}] | {n} |")
        return "\n".join(rows) + "\n"


def _texts(prompts: Sequence[str] | Any) -> list[str]:
    texts = list(getattr(prompts, "texts", prompts))
    if not texts:
        raise MechsafeError("a prompt list is empty; pass at least one harmful and one harmless prompt")
    return texts


def evaluate(model: HookedTransformer, harmful: Sequence[str], harmless: Sequence[str], max_new_tokens: int = 48,
             batch_size: int = 8, reference_model: HookedTransformer | None = None, utility: bool = True,
             progress: bool = True, *, system: str | None = None, judge: Callable[[str, str], bool] | None = None,
             utility_max_new_tokens: int = 64, utility_limit: int | None = None, seed: int = 0) -> EvalResult:
    """Generate on harmful and harmless prompts and compute the metrics of :class:`EvalResult`.

    Args:
        model: the model to evaluate (active intervention hooks apply).
        harmful, harmless: prompt texts (or ``PromptSet``s), e.g. the test splits of the bundled suites.
        max_new_tokens: tokens generated per response to judge refusal.
        batch_size: prompts per forward pass.
        reference_model: if given, ``kl_harmless`` compares ``model`` with it.
        utility: compute ``utility_accuracy`` and ``answer_nll`` on the held-out bundled utility data.
        progress: show progress bars.
        system: optional system message.
        judge: ``judge(prompt, response) -> bool`` replacing the phrase matcher, e.g. a
            :class:`~mechsafe.evaluation.ModelJudge` (called once per prompt set).
        utility_max_new_tokens: tokens generated per arithmetic answer.
        utility_limit: use only the first N held-out utility items.
        seed: seed of the bootstrap intervals.
    """
    harmful, harmless = _texts(harmful), _texts(harmless)
    timings: dict[str, float] = {}
    samples: list[dict[str, Any]] = []

    def run_set(name: str, prompts: list[str]) -> np.ndarray:
        t0 = time.perf_counter()
        responses = generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             system=system, progress=progress)
        flags = refusal_flags(responses, judge=judge, prompts=prompts)
        samples.extend({"set": name, "prompt": p, "response": r, "refused": bool(f)}
                       for p, r, f in zip(prompts, responses, flags))
        timings[f"generate_{name}"] = time.perf_counter() - t0
        return flags

    harmful_flags = run_set("harmful", harmful)
    harmless_flags = run_set("harmless", harmless)
    refusal = proportion(harmful_flags)
    asr = proportion(~harmful_flags)
    over = proportion(harmless_flags)

    accuracy = nll = None
    if utility:
        t0 = time.perf_counter()
        problems = record_split(math_problems(), "test")[:utility_limit]
        questions = [p["question"] + UTILITY_SUFFIX for p in problems]
        answers = generate(model, questions, max_new_tokens=utility_max_new_tokens, batch_size=batch_size,
                           system=system, progress=progress)
        correct = []
        for p, q, a in zip(problems, questions, answers):
            got = last_number(a)
            ok = got is not None and abs(got - float(p["answer"])) < 1e-6
            correct.append(ok)
            samples.append({"set": "math", "prompt": q, "response": a, "refused": bool(refusal_flags([a])[0]),
                            "answer": p["answer"], "correct": ok})
        accuracy = proportion(np.array(correct, dtype=bool))
        timings["utility_math"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        items = record_split(instructions(), "test")[:utility_limit]
        nll = answer_nll(model, [i["instruction"] for i in items], [i["answer"] for i in items],
                         batch_size=batch_size, system=system)
        samples.extend({"set": "instructions", "prompt": i["instruction"], "reference": i["answer"]} for i in items)
        timings["utility_nll"] = time.perf_counter() - t0

    kl = None
    if reference_model is not None:
        t0 = time.perf_counter()
        kl = kl_divergence(reference_model, model, harmless, batch_size=batch_size, system=system)
        timings["kl_harmless"] = time.perf_counter() - t0

    config = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "utility": utility,
              "utility_max_new_tokens": utility_max_new_tokens, "utility_limit": utility_limit,
              "system": system, "judge": getattr(judge, "__name__", None) if judge else "phrases",
              "reference_model": model_info(reference_model).spec if reference_model is not None else None,
              "seed": seed}
    return EvalResult(model=model_info(model).spec, refusal_rate=refusal, over_refusal=over,
                      attack_success_rate=asr, utility_accuracy=accuracy, answer_nll=nll, kl_harmless=kl,
                      n_harmful=len(harmful), n_harmless=len(harmless), samples=samples, config=config,
                      timings_s=timings)
