"""The gateway's settings: where the broker is, where to listen, who may call, how big a body may be."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

API_KEYS_ENV: Final = "ERLLAMA_API_KEYS"  # comma-separated
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024  # the broker's own frame limit: a bigger body cannot pass


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    broker: str | None = None  # None: $ERLLAMA_BROKER, else the default ipc socket
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    cachestore: str | None = None  # the cache store endpoint, for the tier metrics (None: its default)


def load_api_keys(path: str | None) -> frozenset[str]:
    """Keys from ``path`` (one a line, ``#`` comments) and from ``$ERLLAMA_API_KEYS``."""
    keys: set[str] = set()
    if path is not None:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.add(line)
    keys.update(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
    return frozenset(keys)
