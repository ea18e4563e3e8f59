"""Run directories, manifests and atomic writes.

Every command writes into its own run directory (default ``runs/``). Files are written to a
temporary path and renamed, so an interrupted run never leaves an artifact that looks complete.
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
