"""Run directories, manifests and atomic writes.

Every command writes into its own run directory (default ``runs/``) through :func:`start_run`: files go to a
temporary folder that is renamed into place only when the run completes, with its ``run.json`` (config,
versions, seed, weight processing, timings), so an interrupted or failed run never leaves an artifact that
looks complete::

    with start_run("runs", "eval", config=cfg, seed=0, processing="none") as run:
        run.write_json("results.json", results)
        run.write_text("report.md", report)
        run.timings["generate"] = 12.3
    print(f"run directory: {run.path}")
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mechsafe.errors import MechsafeError


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:  # NaN is not valid JSON
        return None
    return obj


def to_json(obj: Any) -> str:
    """Serialize dataclasses, numpy/torch scalars and arrays, and paths to indented JSON."""
    return json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as JSON."""
    return atomic_write_text(path, to_json(obj) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a one-line MechsafeError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MechsafeError(f"{path} does not exist; check the path or re-run the step that writes it") from None
    except json.JSONDecodeError as exc:
        raise MechsafeError(f"{path} is corrupt ({exc.msg}); delete it and re-run the step that writes it") from None


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` to a safetensors file (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``final`` (replacing it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short SHA-256 of the JSON form of ``obj`` (dict keys sorted)."""
    blob = json.dumps(_jsonable(obj), sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages a result depends on."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("mechsafe", "torch", "transformer-lens", "sae-lens", "transformers", "peft", "scikit-learn", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def new_run_dir(runs_dir: str | os.PathLike, command: str, tag: str = "") -> Path:
    """Create ``runs_dir/<command>-<UTC time>[-tag]`` (unique) and return it."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"{command}-{stamp}" + (f"-{tag}" if tag else "")
    root = Path(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        path = root / (base if i == 0 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise MechsafeError(f"could not create a run directory under {root}; clean it up or pass another --runs-dir")


def write_run_manifest(run_dir: str | os.PathLike, *, command: str, config: Any, seed: int | None,
                       processing: str | None, timings: dict[str, float] | None = None,
                       extra: dict[str, Any] | None = None) -> Path:
    """Write ``run.json``: command, config, versions, seed, weight processing, timings."""
    manifest = {
        "command": command,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "seed": seed,
        "weight_processing": processing,
        "versions": versions(),
        "timings_s": timings or {},
    }
    if extra:
        manifest.update(extra)
    return write_json(Path(run_dir) / "run.json", manifest)


@dataclasses.dataclass
class Run:
    """An open run directory (see :func:`start_run`): write its files with the methods below."""

    path: Path
    """Where the run will be once it completes."""
    tmp: Path
    """Where its files are written until then."""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds per stage, written to ``run.json``."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """More entries for ``run.json`` (e.g. the model's provenance)."""

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.tmp / name, obj)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.tmp / name, text)

    def figure(self, name: str, fig, dpi: int = 110) -> Path:
        """Save a matplotlib figure as ``name`` (PNG)."""
        fig.savefig(self.tmp / name, dpi=dpi)
        return self.tmp / name


@contextlib.contextmanager
def start_run(runs_dir: str | os.PathLike, command: str, *, config: Any, seed: int | None = None,
              processing: str | None = None, tag: str = "", name: str | None = None) -> Iterator[Run]:
    """Open a new run directory ``runs_dir/<name>-<UTC time>[-tag]`` (``name`` defaults to ``command`` with dashes)
    for the block; on success it is completed with ``run.json`` and moved into place, on an error (or an interrupt)
    nothing is left behind."""
    final = new_run_dir(runs_dir, name or command.replace(" ", "-"), tag)
    try:
        with atomic_dir(final) as tmp:
            run = Run(final, tmp)
            yield run
            write_run_manifest(tmp, command=command, config=config, seed=seed, processing=processing,
                               timings={k: round(v, 3) for k, v in run.timings.items()}, extra=run.extra)
    except BaseException:
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        raise
