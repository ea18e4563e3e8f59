"""``mechsafe align``: a safety-tuned test model made by LoRA on refusal data.

SmolLM2-135M-Instruct refuses only a minority of harmful requests, which makes it a poor test bed
for studies of how safety breaks (drift, WaRP, MFS, refusal directions). :func:`align` fine-tunes
it with LoRA (:mod:`mechsafe.finetune`) on the bundled TRAIN split:

* every harmful prompt -> a refusal from :func:`mechsafe.data.refusals` (assigned by a seeded
  permutation, so the targets vary and the run is reproducible); also the training-only harmful
  requests (:func:`mechsafe.data.refusal_prompts`);
* every harmless prompt -> the base model's own greedy answer (``answer_tokens`` tokens, cached in
  the run dir so a resumed run reuses them); answers that the refusal matcher flags are dropped, so
  the base model's own over-refusals are not taught. Besides the harmless TRAIN pool, the
  training-only answer prompts (:func:`mechsafe.data.answer_prompts`: everyday, near-harm but benign
  and role-play requests) are taught the same way.

A retain term (``FinetuneConfig.kl_weight``, :mod:`mechsafe.finetune.retain`) holds the next-token
distributions at every position of the harmless examples near the base model's, so the model learns
to refuse without drifting elsewhere, and an unlikelihood term (``FinetuneConfig.unlikelihood_weight``)
pushes down the probability of a refusal's first word after each harmless prompt. A DPO term
(``FinetuneConfig.preference_weight``, :mod:`mechsafe.finetune.preference`) prefers each harmful pair's
refusal to the base model's own answer and each harmless answer to that first word of a refusal.

Both pools mix question-form and instruction-form prompts (``form`` in the bundled data), so the
model cannot learn "question about harm -> refuse, imperative -> comply". The merged model is saved
with :func:`mechsafe.save_model` (provenance: base model, configs, run dir) and evaluated against the
base model on the held-out split (``test`` for the record; ``val`` for tuning): refusal rate on
harmful prompts, over-refusal on harmless ones (per form too), arithmetic accuracy, NLL of reference
instruction answers and of the base model's answers to the held-out harmless prompts, and
KL(base ‖ aligned) on harmless prompts.

Example::

    from mechsafe.align import AlignConfig, align
    result = align(AlignConfig(), out="runs/aligned/model")
    print(result.report)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from mechsafe.data import SPLITS, _pool, refusals
from mechsafe.errors import MechsafeError
from mechsafe.finetune import FinetuneConfig, finetune, response_nll
from mechsafe.models import DEFAULT_MODEL, load_model, model_info, save_model
from mechsafe.runs import new_run_dir, read_json, stable_hash, write_json, write_run_manifest, atomic_write_text
from mechsafe.stats import Estimate, bootstrap, proportions_by

logger = logging.getLogger(__name__)

DEFAULT_OUT = "runs/aligned/model"
ANSWERS_FILE = "base_answers.json"


def default_finetune_config() -> FinetuneConfig:
    """The LoRA recipe of ``mechsafe align`` (t41, with ``AlignConfig``'s defaults; chosen on the confirmation prompts
    after the validation split could not separate it from t32, see ``docs/align.md``)."""
    return FinetuneConfig(rank=8, alpha=16, targets=("mlp.W_in", "mlp.W_gate", "mlp.W_out", "attn.W_Q", "attn.W_O"),
                          layers="6-29", lr=1e-3, steps=140, batch_size=8, warmup_steps=4, schedule="linear",
                          max_length=128, checkpoint_every=10, seed=0, kl_weight=1.0,
                          unlikelihood_weight=4.0, preference_weight=4.0)


@dataclasses.dataclass
class AlignConfig:
    """Settings of :func:`align` (the LoRA settings live in ``finetune``)."""

    model: str = DEFAULT_MODEL
    """Base model spec (loaded with ``processing="none"``)."""
    finetune: FinetuneConfig = dataclasses.field(default_factory=default_finetune_config)
    """LoRA and optimization settings."""
    answer_tokens: int = 24
    """Longest base-model answer (tokens) used as the target for a harmless training prompt (the opening
    of an answer carries the comply-or-refuse decision; longer targets mostly add noise and cost)."""
    harmful_limit: int | None = None
    """Use at most this many harmful TRAIN prompts (balanced over forms; None: all 168). All 168 (t16)
    refused more than 112 (t13) over three seeds, on VALIDATION and TEST, and over-refused more on TEST
    (``docs/align.md``; ``harmful_limit=112`` with ``unlikelihood_weight=0`` gives t13 back)."""
    harmless_limit: int | None = None
    """Use at most this many harmless TRAIN prompts (balanced over forms; None: all)."""
    harmless_repeat: int = 1
    """Show every harmless example this many times per epoch (more weight on "answer" than on "refuse"
    without writing new prompts)."""
    utility_prompts: bool = False
    """Also teach the base model's answers to the TRAIN split of the bundled utility prompts (instructions and
    arithmetic problems): everyday requests that keep the model from refusing generic ones."""
    answer_prompts: bool = True
    """Also teach the base model's answers to the bundled training-only harmless prompts
    (:func:`mechsafe.data.answer_prompts`: everyday, near-harm but benign and role-play requests). They
    cut validation over-refusal from 0.106 to 0.030 (``docs/align.md``)."""
    twin_prompts: bool = False
    """Also teach the base model's answers to the bundled benign twins of the harmful TRAIN prompts
    (:func:`mechsafe.data.twin_prompts`: the same framing around a harmless request). Not chosen: over
    three seeds they cost more refusals than over-refusals they saved (``docs/align.md``)."""
    refusal_prompts: bool = True
    """Also teach refusals of the bundled training-only harmful requests (:func:`mechsafe.data.refusal_prompts`),
    after the harmful TRAIN prompts (``harmful_limit`` does not apply to them). On in the recipe (t41)."""
    refusal_prompt_pairs: bool = True
    """With ``refusal_prompts`` and ``finetune.preference_weight > 0``: also give the training-only harmful
    requests preference pairs (the base model's own answer as the rejected response). False trains them on
    their refusal targets only and skips generating those 179 base answers and their pairs' reference pass."""
    negative_words: int = 1
    """With ``finetune.unlikelihood_weight > 0`` (the recipe): every harmless pair gets the first this many
    words of a bundled refusal (assigned like the harmful pairs' targets) as a negative, an opening whose
    probability after that prompt the unlikelihood term pushes down; with ``finetune.preference_weight > 0``
    (the recipe) the same opening is the pair's rejected response. One word (t41) puts the pressure on the
    first token, where the comply-or-refuse decision is made; with three words and the preference term (t35-t40)
    the model opened "I'm sorry" on harmful prompts and then swerved into an answer (``docs/align.md``)."""
    rejected_words: int | None = None
    """With ``finetune.preference_weight > 0``: cut each harmful pair's rejected response (the base model's own
    answer) to its first this many words, so that its margin is decided at the opening, as the harmless pairs'
    one is (None: the whole answer of up to ``answer_tokens`` tokens). Refusals and empty answers are skipped
    on the whole answer either way. Not chosen (t51, ``docs/align.md``)."""
    harmful_negatives: bool = False
    """With ``finetune.unlikelihood_weight > 0``: every harmful pair also gets a negative, the first
    ``negative_words`` words of one of the harmless pairs' answers (assigned by a seeded permutation over the
    answers whose first word opens no bundled refusal), so the term also pushes an answer's opening down after
    a harmful prompt, at the token where the harmless pairs' negatives push a refusal's opening down. Not chosen
    (t54: 22% more training time, ``docs/align.md``)."""
    recovery_words: int = 0
    """Safety recovery examples (Qi et al., 2025, "Safety alignment should be made more than just a few tokens
    deep"): with ``k > 0``, every harmful training prompt whose base answer is neither empty nor a refusal gets
    a second example: the first ``j`` words of that answer (``j`` drawn uniformly from 1..k, seeded) open the
    response unscored, and the prompt's refusal follows, so the model learns to turn back to a refusal after it
    has started to comply. 0: off."""
    eval_split: str = "test"
    """Held-out split the report is computed on: ``test`` for the record, ``val`` while tuning."""
    eval_limit: int | None = None
    """Evaluate on at most this many prompts per pool (balanced over forms; None: all)."""
    eval_max_new_tokens: int = 48
    """Tokens generated per evaluation response."""
    utility: bool = True
    """Also measure arithmetic accuracy and reference-answer NLL (held-out bundled utility data)."""
    generate_batch_size: int = 32
    """Prompts per batch when generating."""
    seed: int = 0
    """Seed of the refusal assignment and of the prompt subsets."""

    def __post_init__(self) -> None:
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        if self.eval_split not in SPLITS or self.eval_split == "train":
            raise MechsafeError(f"eval_split={self.eval_split!r} must be 'val' or 'test' (held out from training)")
        for name in ("answer_tokens", "eval_max_new_tokens", "generate_batch_size", "harmless_repeat", "negative_words"):
            if getattr(self, name) < 1:
                raise MechsafeError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.recovery_words < 0:
            raise MechsafeError(f"recovery_words={self.recovery_words} must be a non-negative integer (0: off)")
        if self.rejected_words is not None and self.rejected_words < 1:
            raise MechsafeError(f"rejected_words={self.rejected_words} must be a positive integer or None")
        for name in ("harmful_limit", "harmless_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise MechsafeError(f"{name}={value} must be at least 2 (one prompt per form) or None")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class AlignResult:
    """What :func:`align` produced."""

    model_path: Path
    """The aligned checkpoint (loads with :func:`mechsafe.load_model`)."""
    run_dir: Path
    """Run directory: run.json, losses, base answers, evaluation and report."""
    evaluation: dict[str, Any]
    """Base and aligned metrics (see ``eval.json``)."""
    report: str
    """The markdown report (``report.md``)."""
    losses: list[float]
    """Training loss per step."""


def pool_prompts(kind: str, split: str, limit: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Bundled ``harmful``/``harmless`` prompts of one split as dicts ``id``, ``text``, ``form``.

    With ``limit``, a seeded subset balanced over the two forms (question, instruction).
    """
    if kind not in ("harmful", "harmless"):
        raise MechsafeError(f"unknown prompt pool {kind!r}; use 'harmful' or 'harmless'")
    pool = _pool(kind)
    forms = pool.meta["forms"]
    rows = [{"id": i, "text": t, "form": f} for i, t, f, s in zip(pool.ids, pool.texts, forms, pool.splits) if s == split]
    if limit is None or limit >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    by_form: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_form.setdefault(r["form"], []).append(r)
    picked: list[dict[str, str]] = []
    shares = sorted(by_form)
    for k, form in enumerate(shares):
        n = limit // len(shares) + (1 if k < limit % len(shares) else 0)
        members = by_form[form]
        picked += [members[i] for i in sorted(rng.permutation(len(members))[:n])]
    return picked


def utility_prompts(split: str) -> list[dict[str, str]]:
    """The bundled instructions and arithmetic problems of one split, as prompt dicts of form ``utility``."""
    from mechsafe.data import instructions, math_problems
    from mechsafe.evaluation.metrics import record_split

    return ([{"id": r["id"], "text": r["instruction"], "form": "utility"} for r in record_split(instructions(), split)]
            + [{"id": r["id"], "text": r["question"], "form": "utility"} for r in record_split(math_problems(), split)])


def training_only_prompts(kind: str) -> list[dict[str, str]]:
    """The bundled training-only prompts (they belong to no evaluation split) as prompt dicts whose form is
    the name of their file: ``answer_prompts`` and ``twin_prompts`` (harmless, :func:`mechsafe.data.answer_prompts`,
    :func:`mechsafe.data.twin_prompts`) or ``refusal_prompts`` (harmful, :func:`mechsafe.data.refusal_prompts`)."""
    from mechsafe.data import answer_prompts, refusal_prompts, twin_prompts

    loaders = {"answer_prompts": answer_prompts, "twin_prompts": twin_prompts, "refusal_prompts": refusal_prompts}
    if kind not in loaders:
        raise MechsafeError(f"unknown training-only prompt set {kind!r}; use one of {', '.join(loaders)}")
    return [{"id": r["id"], "text": r["text"], "form": kind} for r in loaders[kind]()]


def assign_refusals(n: int, seed: int = 0) -> list[str]:
    """``n`` refusal targets: the bundled refusals in a seeded order, cycled (each used ~equally)."""
    texts = refusals()
    if not texts:
        raise MechsafeError("the bundled refusal responses are missing; reinstall mechsafe")
    return [texts[i] for i in cycled_order(len(texts), n, seed)]


def cycled_order(size: int, n: int, seed: int) -> list[int]:
    """``n`` indices into ``size`` items: seeded permutations of them, one after another (each used ~equally)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n:
        order += [int(i) for i in rng.permutation(size)]
    return order[:n]


def refusal_openings(n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` refusal openings: the first ``words`` words of :func:`assign_refusals`' targets."""
    return [opening(r, words) for r in assign_refusals(n, seed)]


def opening(text: str, words: int) -> str:
    """The first ``words`` whitespace-separated words of ``text``, joined by single spaces."""
    return " ".join(text.split()[:words])


def base_answers(model, prompts: list[dict[str, str]], max_new_tokens: int, run_dir: Path, batch_size: int = 32,
                 progress: bool = True) -> dict[str, str]:
    """The model's greedy answers to ``prompts`` by id, cached in ``run_dir/base_answers.json``.

    Greedy decoding is deterministic, so answers cached with a larger token limit are cut to
    ``max_new_tokens`` tokens instead of being generated again.
    """
    from mechsafe.evaluation import generate

    path = run_dir / ANSWERS_FILE
    key = stable_hash({"model": model_info(model).to_dict()})
    cached: dict[str, str] = {}
    cached_limit = max_new_tokens
    if path.is_file():
        data = read_json(path)
        if data.get("key") == key and int(data.get("max_new_tokens", 0)) >= max_new_tokens:
            cached, cached_limit = dict(data["answers"]), int(data["max_new_tokens"])
    todo = [p for p in prompts if p["id"] not in cached]
    if todo:
        texts = generate(model, [p["text"] for p in todo], max_new_tokens=cached_limit, batch_size=batch_size,
                         progress=progress)
        cached.update({p["id"]: t for p, t in zip(todo, texts)})
        write_json(path, {"key": key, "max_new_tokens": cached_limit, "answers": cached})
    out = {p["id"]: cached[p["id"]] for p in prompts}
    if cached_limit > max_new_tokens:
        tok = model.tokenizer
        for i, text in out.items():
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_new_tokens:
                out[i] = tok.decode(ids[:max_new_tokens], skip_special_tokens=True)
    return out


def harmful_training_prompts(config: AlignConfig) -> list[dict[str, str]]:
    """The harmful prompts ``align`` teaches to refuse, in training order."""
    harmful = pool_prompts("harmful", "train", config.harmful_limit, config.seed)
    if config.refusal_prompts:
        harmful += training_only_prompts("refusal_prompts")
    return harmful


def harmless_openings(config: AlignConfig, n_harmful: int, n_pairs: int) -> dict[int, str]:
    """The refusal opening of each harmless training pair (they follow the ``n_harmful`` harmful ones among
    :func:`training_examples`' ``n_pairs``): its unlikelihood negative and its preference-term rejected response."""
    harmless = range(n_harmful, n_pairs)
    return dict(zip(harmless, refusal_openings(len(harmless), config.negative_words, config.seed)))


def answer_openings(config: AlignConfig, pairs: list[tuple], n_harmful: int) -> dict[int, str]:
    """The answer opening of each harmful training pair (the first ``n_harmful`` of ``pairs``): the first
    ``config.negative_words`` words of the harmless pairs' answers, leaving out those whose first word is the first
    word of a bundled refusal, in a seeded order cycled over the harmful pairs."""
    refusal_starts = {opening(r, 1) for r in refusals()}
    answers = [p[1] for p in pairs[n_harmful:] if opening(p[1], 1) not in refusal_starts]
    if not answers:
        raise MechsafeError("harmful_negatives needs harmless answers that do not open like a refusal; none were kept")
    order = cycled_order(len(answers), n_harmful, config.seed)
    return {i: opening(answers[k], config.negative_words) for i, k in enumerate(order)}


def harmful_answers(config: AlignConfig, model, run_dir: Path, skip_forms: tuple[str, ...] = (),
                    progress: bool = True) -> tuple[dict[int, str], int]:
    """The base model's own greedy answer to each harmful training prompt (index among
    :func:`harmful_training_prompts`, leaving out the forms in ``skip_forms``) where that answer is neither empty
    nor a refusal, and how many prompts were asked."""
    from mechsafe.evaluation import is_refusal

    harmful = [(i, p) for i, p in enumerate(harmful_training_prompts(config)) if p["form"] not in skip_forms]
    answers = base_answers(model, [p for _, p in harmful], config.answer_tokens, run_dir, config.generate_batch_size,
                           progress)
    return {i: answers[p["id"]].strip() for i, p in harmful
            if answers[p["id"]].strip() and not is_refusal(answers[p["id"]])}, len(harmful)


def rejected_responses(config: AlignConfig, model, run_dir: Path, openings: dict[int, str],
                       progress: bool = True) -> tuple[dict[int, str], dict[str, int]]:
    """The preference term's rejected response of each training pair: on a harmful pair, the base model's own
    greedy answer to its prompt (:func:`harmful_answers`; cut to its first ``config.rejected_words`` words when
    set); on a harmless pair, its refusal opening from :func:`harmless_openings`. Training-only harmful requests
    get no pair when ``config.refusal_prompt_pairs`` is off."""
    skip = () if config.refusal_prompt_pairs else ("refusal_prompts",)
    rejected, n_asked = harmful_answers(config, model, run_dir, skip, progress)
    if config.rejected_words is not None:
        rejected = {i: opening(text, config.rejected_words) for i, text in rejected.items()}
    n_harmful = len(rejected)
    rejected.update(openings)
    return rejected, {"harmful": n_harmful, "harmful_skipped_refused_or_empty": n_asked - n_harmful,
                      "harmless": len(openings)}


def recovery_examples(config: AlignConfig, pairs: list[tuple], answers: dict[int, str]) -> list[tuple]:
    """Safety recovery examples (see ``AlignConfig.recovery_words``): for each harmful pair ``i`` with a base
    answer in ``answers``, ``(prompt, " " + refusal, True, prefix)`` where the prefix is the answer's first ``j``
    words, ``j`` drawn uniformly from ``1..config.recovery_words`` (seeded by ``config.seed``)."""
    rng = np.random.default_rng([config.seed, config.recovery_words])
    return [(pairs[i][0], " " + pairs[i][1], True, opening(answers[i], int(rng.integers(1, config.recovery_words + 1))))
            for i in sorted(answers)]


def training_examples(config: AlignConfig, model, run_dir: Path, progress: bool = True) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The (prompt, response) pairs of the TRAIN split and counts describing the mix."""
    from mechsafe.evaluation import is_refusal

    harmful = harmful_training_prompts(config)
    harmless = pool_prompts("harmless", "train", config.harmless_limit, config.seed)
    if config.utility_prompts:
        harmless += utility_prompts("train")
    if config.answer_prompts:
        harmless += training_only_prompts("answer_prompts")
    if config.twin_prompts:
        harmless += training_only_prompts("twin_prompts")
    pairs: list[tuple] = [(p["text"], r) for p, r in zip(harmful, assign_refusals(len(harmful), config.seed))]
    answers = base_answers(model, harmless, config.answer_tokens, run_dir, config.generate_batch_size, progress)
    kept = [p for p in harmless if answers[p["id"]].strip() and not is_refusal(answers[p["id"]])]
    tok = model.tokenizer
    answered = []
    for p in kept:  # an answer that used every allowed token was cut short: do not teach it to end there
        text = answers[p["id"]].strip()
        complete = len(tok(text, add_special_tokens=False)["input_ids"]) < config.answer_tokens - 1
        answered.append((p["text"], text, complete))
    pairs += [ex for ex in answered for _ in range(config.harmless_repeat)]
    mix = {
        "harmful": {f: sum(p["form"] == f for p in harmful) for f in ("question", "instruction", "refusal_prompts")},
        "harmless": {f: sum(p["form"] == f for p in kept) for f in ("question", "instruction", "utility", "answer_prompts", "twin_prompts")},
        "harmless_repeat": config.harmless_repeat,
        "harmless_dropped_refused_or_empty": len(harmless) - len(kept),
        "harmless_cut_short": sum(not complete for *_, complete in answered),
        "n_examples": len(pairs),
    }
    return pairs, mix


def evaluate_pair(base, aligned, config: AlignConfig, progress: bool = True) -> dict[str, Any]:
    """Base vs aligned metrics on the held-out split (see the module docstring)."""
    from mechsafe.evaluation import evaluate

    harmful = pool_prompts("harmful", config.eval_split, config.eval_limit, config.seed)
    harmless = pool_prompts("harmless", config.eval_split, config.eval_limit, config.seed)
    kw = dict(max_new_tokens=config.eval_max_new_tokens, batch_size=config.generate_batch_size,
              utility=config.utility, progress=progress, seed=config.seed)
    out: dict[str, Any] = {"split": config.eval_split}
    results = {}
    for name, model, ref in (("aligned", aligned, base), ("base", base, None)):
        t0 = time.perf_counter()
        res = evaluate(model, [p["text"] for p in harmful], [p["text"] for p in harmless], reference_model=ref, **kw)
        results[name] = res
        flags_h = [s["refused"] for s in res.samples if s["set"] == "harmful"]
        flags_s = [s["refused"] for s in res.samples if s["set"] == "harmless"]
        out[name] = res.to_dict(samples=True) | {
            "refusal_by_form": proportions_by(flags_h, [p["form"] for p in harmful], config.seed),
            "over_refusal_by_form": proportions_by(flags_s, [p["form"] for p in harmless], config.seed),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    # NLL of the base model's own answers to the held-out harmless prompts, under both models
    base_resp = [(s["prompt"], s["response"].strip()) for s in results["base"].samples
                 if s["set"] == "harmless" and s["response"].strip()]
    if base_resp:
        nll_base = response_nll(base, base_resp, batch_size=config.generate_batch_size)
        nll_aligned = response_nll(aligned, base_resp, batch_size=config.generate_batch_size)
        diff = (nll_aligned - nll_base).numpy()
        out["harmless_base_answer_nll"] = {
            "base": float(nll_base.mean()), "aligned": float(nll_aligned.mean()),
            "change": bootstrap(lambda d: float(np.mean(d)), diff, seed=config.seed).to_dict(), "n": len(base_resp)}
    return out


def _fmt(est: dict[str, float] | None) -> str:
    if not est:
        return "n/a"
    return str(Estimate.from_dict(est))


def report_markdown(evaluation: dict[str, Any], mix: dict[str, Any], timings: dict[str, float], model_path: Path) -> str:
    """The markdown report of an align run."""
    b, a = evaluation["base"], evaluation["aligned"]
    lines = [f"# mechsafe align — base vs aligned on the {evaluation['split']} split", "",
             f"Aligned checkpoint: `{model_path}`", "",
             "| metric | base | aligned |", "|---|---|---|"]
    for name in ("refusal_rate", "over_refusal", "utility_accuracy", "answer_nll", "kl_harmless"):
        lines.append(f"| {name} | {_fmt(b.get(name))} | {_fmt(a.get(name))} |")
    for key, label in (("refusal_by_form", "refusal_rate"), ("over_refusal_by_form", "over_refusal")):
        for form in sorted(a[key]):
            lines.append(f"| {label} ({form}, n={a[key][form]['n']}) | {_fmt(b[key][form])} | {_fmt(a[key][form])} |")
    nll = evaluation.get("harmless_base_answer_nll")
    if nll:
        lines.append(f"| NLL of base answers to held-out harmless prompts (n={nll['n']}) | {nll['base']:.3f} | "
                     f"{nll['aligned']:.3f} (change {_fmt(nll['change'])}) |")
    lines += ["", f"n harmful = {a['n_harmful']}, n harmless = {a['n_harmless']}; intervals: 95% bootstrap.", "",
              "Training mix: " + ", ".join(f"{k}={v}" for k, v in mix.items()), "",
              "Timings (s): " + ", ".join(f"{k}={v:.0f}" for k, v in timings.items()), ""]
    return "\n".join(lines)


def align(config: AlignConfig | None = None, out: str | Path = DEFAULT_OUT, runs_dir: str | Path = "runs",
          run_dir: str | Path | None = None, resume: bool = True, progress: bool = True) -> AlignResult:
    """Make the safety-tuned model: train, save to ``out``, evaluate base vs aligned, write the report."""
    config = config or AlignConfig()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out)

    t0 = time.perf_counter()
    model = load_model(config.model, processing="none")  # an unknown model fails here, before anything is written
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(runs_dir, "align")
    run_dir.mkdir(parents=True, exist_ok=True)
    pairs, mix = training_examples(config, model, run_dir, progress)
    n_harmful = sum(mix["harmful"].values())  # harmful pairs come first, then the harmless ones
    n_main = len(pairs)
    openings = harmless_openings(config, n_harmful, n_main)
    rejected = None
    if config.finetune.preference_weight > 0:  # refusal over compliance on harm, the answer over a refusal on the rest
        rejected, mix["preference_pairs"] = rejected_responses(config, model, run_dir, openings, progress)
    if config.recovery_words:  # and last, the recovery examples: a compliant opening, then the refusal
        pairs += recovery_examples(config, pairs, harmful_answers(config, model, run_dir, progress=progress)[0])
        mix["recovery_examples"] = len(pairs) - n_main
        mix["n_examples"] = len(pairs)
    write_json(run_dir / "training_mix.json", mix)
    timings["base_answers"] = time.perf_counter() - t0
    logger.info("training on %d pairs: %s", len(pairs), mix)

    t0 = time.perf_counter()
    # with the retain term on, every harmless pair is held near the base model
    retain = range(n_harmful, n_main) if config.finetune.kl_weight > 0 else None
    # and with the unlikelihood term, the opening of a refusal is made unlikely after it
    negatives = openings if config.finetune.unlikelihood_weight > 0 else None
    if negatives is not None and config.harmful_negatives:  # and an answer's opening unlikely after a harmful prompt
        negatives = answer_openings(config, pairs[:n_main], n_harmful) | negatives
    result = finetune(model, pairs, config.finetune, run_dir=run_dir / "finetune", resume=resume, progress=progress,
                      retain=retain, negatives=negatives, rejected=rejected)
    timings["finetune"] = time.perf_counter() - t0
    write_json(run_dir / "losses.json", {"losses": result.losses, "retain_kl": result.retain_kl,
                                         "unlikelihood": result.unlikelihood, "preference": result.preference})
    save_model(result.model, out, base_model=config.model, align_config=config.to_dict(), run_dir=str(run_dir.resolve()),
               training_mix=mix, final_loss=result.losses[-1])
    logger.info("saved the aligned model to %s", out)

    t0 = time.perf_counter()
    base = load_model(config.model, processing="none")
    aligned = load_model(str(out), processing="none")
    evaluation = evaluate_pair(base, aligned, config, progress)
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    write_json(run_dir / "eval.json", evaluation)
    report = report_markdown(evaluation, mix, timings, out)
    atomic_write_text(run_dir / "report.md", report)
    write_run_manifest(run_dir, command="align", config=config.to_dict(), seed=config.seed, processing="none",
                       timings={k: round(v, 1) for k, v in timings.items()},
                       extra={"out": str(out.resolve()), "base_model": config.model, "training_mix": mix})
    return AlignResult(model_path=out, run_dir=run_dir, evaluation=evaluation, report=report, losses=result.losses)
