"""The gateway's settings: where the broker is, where to listen, who may call, how big a body may be."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

API_KEYS_ENV: Final = "ERLLAMA_API_KEYS"  # comma-separated
# the worker's thinking-signature key (worker/service.py THINKING_KEY_ENV); the gateway signs and checks
# replayed blocks with the same key, so one secret covers both
SIGNING_KEY_ENV: Final = "ERLLAMA_THINKING_SIGNING_KEY"
DEFAULT_SESSION_HEADER: Final = "x-claude-code-session-id"
# Claude Code starts its system prompt with a line that changes every request; without this it breaks
# every cached prefix at token 0
DEFAULT_SYSTEM_NORMALIZE: Final = r"\Ax-anthropic-billing-header:[^\n]*\n?"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024  # the broker's own frame limit: a bigger body cannot pass
DEFAULT_PING_INTERVAL_S: Final = 5.0  # an Anthropic stream's pings while a long prompt is prefilled


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    broker: str | None = None  # None: $ERLLAMA_BROKER, else the default ipc socket
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    cachestore: str | None = None  # the cache store endpoint, for the tier metrics (None: its default)
    # the Anthropic Messages API and exact replay (gateway/anthropic_*.py, gateway/replay.py)
    aliases: tuple[tuple[str, str], ...] = ()  # (glob over requested names, loaded model), first match wins
    session_header: str = DEFAULT_SESSION_HEADER  # its value becomes the sticky session_id
    system_normalize: str | None = DEFAULT_SYSTEM_NORMALIZE  # regex removed from the system prompt
    replay_dir: str | None = None  # None: $XDG_CACHE_HOME/erllama/replay
    signing_key: bytes = b""  # empty: $ERLLAMA_THINKING_SIGNING_KEY, else a key kept in replay_dir
    ping_interval_s: float = DEFAULT_PING_INTERVAL_S


def parse_aliases(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """``PATTERN=MODEL`` items (``claude-*=qwen3``) as (pattern, model) pairs."""
    out = []
    for spec in specs:
        pattern, sep, model = spec.partition("=")
        if not sep or not pattern or not model:
            raise ValueError(f"an alias is PATTERN=MODEL, got {spec!r}")
        out.append((pattern.strip(), model.strip()))
    return tuple(out)


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
