"""The one exception type mechsafe raises for bad input.

Its message is a single line that names the problem and the fix; the CLI prints it and exits
with status 2.
"""

from __future__ import annotations


class MechsafeError(ValueError):
    """Bad input or environment: a one-line message naming the problem and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
