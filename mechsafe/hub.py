"""Hugging Face hub access: fail at once, in one line, when the hub cannot be reached.

Without a network, the hub client retries each request with back-off and logs every retry; a user who named a
hub model or dataset offline would wait and read pages of warnings before the one line that matters.
:func:`require_hub` checks that the hub's host accepts a connection (a few seconds at most) before any download,
unless ``HF_HUB_OFFLINE`` is set (then the client serves its local cache or fails at once by itself).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from mechsafe.errors import MechsafeError

TIMEOUT_S = 3.0
"""Seconds the reachability check waits for a connection."""


def hub_endpoint() -> str:
    """The hub's base URL (``HF_ENDPOINT`` when set)."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def require_hub(what: str, fix: str) -> None:
    """Raise a one-line :class:`MechsafeError` naming ``what`` and ``fix`` when the hub's host cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=TIMEOUT_S).close()
    except OSError as exc:
        raise MechsafeError(f"cannot reach the Hugging Face hub at {url.hostname} to load {what} ({exc.__class__.__name__}); "
                            f"{fix}") from None
