"""The one exception type mechsafe raises for bad input.

Its message is a single line that names the problem and the fix; the CLI prints it and exits
with status 2.
"""

from __future__ import annotations


class MechsafeError(ValueError):
    """Bad input or environment: a one-line message naming the problem and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def closest(name: str, known) -> str:
    """`` (did you mean X?)`` naming the known value closest to a misspelled ``name``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_keys(given, known, what: str) -> None:
    """Raise naming each unknown key of ``given`` with the closest of ``known`` (a typo in a preset or override)."""
    import difflib

    known = list(known)
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise MechsafeError(f"unknown {what} {', '.join(hints)}; valid keys: {', '.join(known)}")
