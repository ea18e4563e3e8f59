"""Running the recipe: train, save, evaluate, report; and the cached ``smollm2-135m-aligned`` model."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from mechsafe.align.config import AlignConfig
from mechsafe.align.data import training_objectives
from mechsafe.align.report import evaluate_pair, report_markdown
from mechsafe.finetune import FinetuneResult, finetune
from mechsafe.models import CHECKPOINT_MANIFEST, cache_dir, load_model, save_model
from mechsafe.runs import atomic_write_text, new_run_dir, stable_hash, versions, write_json, write_run_manifest

logger = logging.getLogger(__name__)

DEFAULT_OUT = "runs/aligned/model"
ALIGNED_SPEC = "smollm2-135m-aligned"
"""The model spec :func:`mechsafe.load_model` builds with the default recipe on first use."""

_PACKAGE = Path(__file__).resolve().parent.parent
_TRAINING_CODE = ("align/config.py", "align/data.py", "align/run.py", "finetune", "forward.py", "chat.py", "weights.py",
                  "evaluation/generation.py", "evaluation/refusal.py", "data/__init__.py", "data/suites")
"""The package files that decide the aligned weights: their code (docstrings and comments left out) and data key
the cached model."""


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


def train(config: AlignConfig, run_dir: Path, resume: bool = True, progress: bool = True, model=None
          ) -> tuple[FinetuneResult, dict[str, Any], float]:
    """Train the aligned model in ``run_dir`` (resuming there) from ``model`` (default: ``config.model`` loaded with
    ``processing="none"``); returns the fine-tune result (the merged model), the training mix and the seconds spent
    on the base model's answers."""
    t0 = time.perf_counter()
    if model is None:
        model = load_model(config.model, processing="none")  # an unknown model fails here, before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    objectives, mix = training_objectives(config, model, run_dir, progress)
    write_json(run_dir / "training_mix.json", mix)
    answers_seconds = time.perf_counter() - t0
    logger.info("training on %d examples: %s", mix["n_examples"], mix)
    result = finetune(model, objectives, config.finetune, run_dir=run_dir / "finetune", resume=resume,
                      progress=progress)
    write_json(run_dir / "losses.json", {"losses": result.losses, "terms": result.terms})
    return result, mix, answers_seconds


def align(config: AlignConfig | None = None, out: str | Path = DEFAULT_OUT, runs_dir: str | Path = "runs",
          run_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
          device: str = "cpu") -> AlignResult:
    """Make the safety-tuned model on ``device``: train, save to ``out``, evaluate base vs aligned, write the report."""
    config = config or AlignConfig()
    t_start = time.perf_counter()
    out = Path(out)
    t0 = time.perf_counter()
    model = load_model(config.model, processing="none", device=device)  # an unknown model fails before the run dir exists
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(runs_dir, "align")
    result, mix, answers_seconds = train(config, run_dir, resume, progress, model=model)
    timings = {"base_answers": answers_seconds, "finetune": time.perf_counter() - t0 - answers_seconds}
    save_model(result.model, out, base_model=config.model, align_config=config.to_dict(), run_dir=str(run_dir.resolve()),
               training_mix=mix, final_loss=result.losses[-1])
    logger.info("saved the aligned model to %s", out)

    t0 = time.perf_counter()
    base = load_model(config.model, processing="none", device=device)
    aligned = load_model(str(out), processing="none", device=device)
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


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _code(path: Path) -> bytes:
    """A Python file's syntax tree without docstrings (so documentation edits keep the cache), or a data file's bytes."""
    if path.suffix != ".py":
        return path.read_bytes()
    return ast.dump(_strip_docstrings(ast.parse(path.read_text(encoding="utf-8")))).encode()


def _definitions(path: Path) -> dict[str, list[ast.stmt]]:
    """A module's top-level definitions (functions, classes, assignments) by the names they bind."""
    out: dict[str, list[ast.stmt]] = {}
    for node in _strip_docstrings(ast.parse(path.read_text(encoding="utf-8"))).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.setdefault(node.name, []).append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out.setdefault(name.id, []).append(node)
    return out


def _used_names(node: ast.AST) -> set[str]:
    """Names a definition may call or read from elsewhere: the names it loads that none of its functions binds
    locally (arguments, assignments), and every attribute name."""
    local: set[str] = set()
    for fn in ast.walk(node):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local |= {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
            local |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    loaded = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return (loaded - local) | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def code_fingerprint() -> str:
    """Hash of the code and data that decide the aligned weights: :func:`aligned_checkpoint` and every top-level
    definition of :data:`_TRAINING_CODE` it uses by name, transitively (a name defined in several files counts all of
    them); docstrings, comments and code the build never reaches do not count. Bundled data files count whole."""
    definitions: dict[str, list[tuple[str, ast.stmt]]] = {}
    h = hashlib.sha256()
    roots: list[tuple[str, ast.stmt]] = []
    for rel in _TRAINING_CODE:
        path = _PACKAGE / rel
        for f in sorted(p for p in path.rglob("*") if p.suffix in (".py", ".jsonl")) if path.is_dir() else [path]:
            name = str(f.relative_to(_PACKAGE))
            if f.suffix != ".py":
                h.update(name.encode() + f.read_bytes())
                continue
            for key, nodes in _definitions(f).items():
                definitions.setdefault(key, []).extend((name, n) for n in nodes)
                if name == "align/run.py" and key == "aligned_checkpoint":
                    roots.extend((name, n) for n in nodes)
    seen: dict[tuple[str, int], tuple[str, ast.stmt]] = {}
    todo = roots
    while todo:
        name, node = todo.pop()
        if (name, node.lineno) in seen:
            continue
        seen[(name, node.lineno)] = (name, node)
        for used in _used_names(node):
            todo.extend(definitions.get(used, []))
    for (name, line), (_, node) in sorted(seen.items()):
        h.update(name.encode() + ast.dump(node).encode())
    return h.hexdigest()[:16]


def aligned_checkpoint(config: AlignConfig | None = None, progress: bool = True) -> Path:
    """The checkpoint of ``smollm2-135m-aligned``: built with ``config`` (default: the default recipe) on first use,
    cached under ``$MECHSAFE_CACHE/models`` keyed by the recipe, the training code and the torch and TransformerLens
    versions. An interrupted build resumes at its last LoRA checkpoint on the next call."""
    config = config or AlignConfig()
    env = versions()
    key = stable_hash({"recipe": config.to_dict(), "code": code_fingerprint(),
                       "versions": {k: env.get(k) for k in ("torch", "transformer-lens")}}, 16)
    out = cache_dir() / "models" / f"{ALIGNED_SPEC}-{key}"
    if (out / CHECKPOINT_MANIFEST).is_file():
        return out
    build_dir = cache_dir() / "builds" / f"{ALIGNED_SPEC}-{key}"
    logger.warning("building %s with the default align recipe, once per machine (about 15-20 min on 2 CPU cores; "
                   "an interrupted build resumes); cache: %s", ALIGNED_SPEC, out)
    t0 = time.perf_counter()
    result, mix, _ = train(config, build_dir, resume=True, progress=progress)
    save_model(result.model, out, base_model=config.model, align_config=config.to_dict(), recipe_key=key,
               build_dir=str(build_dir), training_mix=mix, final_loss=result.losses[-1],
               build_seconds=round(time.perf_counter() - t0, 1))
    logger.warning("built %s in %.0f s", ALIGNED_SPEC, time.perf_counter() - t0)
    return out
