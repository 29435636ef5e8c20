"""Hugging Face Hub look-ups that fail fast without a network.

Without a network, huggingface_hub and datasets retry a look-up for tens of seconds before they give
up. Before loraplan's first look-up of a Hub id it checks, once per process and in at most
`TIMEOUT` seconds, that the Hub's host answers; when it does not, it turns on the libraries' own
offline mode (HF_HUB_OFFLINE: the local cache only), so a missing model or data set fails at once
with one line, and a cached one still loads.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlparse

TIMEOUT = 1.5  # seconds for DNS and a TCP connection to the Hub
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_checked: bool | None = None  # None: not checked yet; else whether the Hub was unreachable


def offline() -> bool:
    """Whether look-ups must stay in the local cache: the user said so, or the Hub is unreachable
    (then the libraries' offline mode is switched on for the rest of the process)."""
    global _checked
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS):
        return True
    if _checked is None:
        _checked = not reachable(*_hub_address())
        if _checked:
            _switch_offline()
    return _checked


def _hub_address() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def reachable(host: str, port: int, timeout: float = TIMEOUT) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds, name look-up included
    (in a thread: a resolver without a network can hang longer than any socket timeout)."""
    answer: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(answer and answer[0])


def _switch_offline() -> None:
    """HF_HUB_OFFLINE for libraries imported from now on, and for those already imported (they read
    the variable once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
