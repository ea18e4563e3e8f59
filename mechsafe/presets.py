"""Presets and recipes: the one reader of the YAML/TOML files that ``probe bench`` and ``sae train`` start from.

A preset is a mapping of config fields; the config that receives it checks the keys (a typo names the closest
valid key) and the values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mechsafe.errors import MechsafeError


def read_preset(path: str | os.PathLike, what: str = "preset", example: str = "probes/harmful_vs_harmless.yaml"
                ) -> dict[str, Any]:
    """Read a YAML (or ``.toml``) file into a mapping; one-line errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise MechsafeError(f"{what} {path} does not exist; pass a file such as {example}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml and toml raise their own error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MechsafeError(f"{what} {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'YAML'} "
                            f"({first}); fix its syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MechsafeError(f"{what} {path} must be a mapping of config fields, not a {type(raw).__name__}")
    return raw
