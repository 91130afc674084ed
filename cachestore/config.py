"""The cache store's configuration: defaults, environment variables and directory resolution."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from erllama.transport import CACHESTORE_SOCKET_NAME, default_runtime_dir, ipc_endpoint

CACHESTORE_ENDPOINT_ENV: Final = "ERLLAMA_CACHESTORE"
CACHE_DIR_ENV: Final = "ERLLAMA_CACHE_DIR"
SHM_DIR_ENV: Final = "ERLLAMA_SHM_DIR"
# The shared tier's server, redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS). An environment variable
# as well as a flag, so that a password need not appear in a process list.
SHARED_URL_ENV: Final = "ERLLAMA_SHARED_URL"

GIB: Final = 1024**3
MIB: Final = 1024**2
DEFAULT_RAM_BYTES: Final = 1 * GIB
DEFAULT_SHM_MAX_BYTES: Final = 4 * GIB  # the automatic shm budget: min(this, half of /dev/shm's free space)
DEFAULT_DISK_BYTES: Final = 20 * GIB
SHM_TIER_MIN_BYTES: Final = 128 * MIB  # below this (a container's 64 MiB /dev/shm) the shm tier is off
DEFAULT_MIN_PREFIX_TOKENS: Final = 1  # no floor: the worker weighs common_len against row_tokens
RESERVATION_TTL_S: Final = 30.0  # a writer that has not committed by then has died or stalled
LEASE_TTL_S: Final = 600.0  # a reader holding a row longer than this is presumed stuck
SWEEP_INTERVAL_S: Final = 1.0  # reservation expiry, dead-holder checks
USAGE_FLUSH_INTERVAL_S: Final = 5.0  # write hit counts and last-use times back into row files
SHUTDOWN_SPILL_BUDGET_S: Final = 10.0  # SIGTERM: time allowed to copy RAM rows into free shm/disk room


def default_endpoint() -> str:
    """``$ERLLAMA_CACHESTORE``, else ``ipc://<runtime dir>/cachestore.sock``."""
    return os.environ.get(CACHESTORE_ENDPOINT_ENV) or ipc_endpoint(
        default_runtime_dir(), CACHESTORE_SOCKET_NAME
    )


def default_disk_dir() -> Path:
    """``$ERLLAMA_CACHE_DIR``, else ``$XDG_CACHE_HOME/erllama/kv``, else ``~/.cache/erllama/kv``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "erllama" / "kv"


def default_shm_dir() -> Path:
    """``$ERLLAMA_SHM_DIR``, else ``/dev/shm/erllama-<uid>``."""
    return Path(os.environ.get(SHM_DIR_ENV) or f"/dev/shm/erllama-{os.getuid()}")


@dataclass(slots=True)
class StoreConfig:
    """Everything the daemon needs; ``shm_bytes=None`` sizes the shm tier from /dev/shm at start."""

    endpoint: str
    shm_dir: Path
    disk_dir: Path
    ram_bytes: int = DEFAULT_RAM_BYTES
    shm_bytes: int | None = None
    disk_bytes: int = DEFAULT_DISK_BYTES
    min_prefix_tokens: int = DEFAULT_MIN_PREFIX_TOKENS
    reservation_ttl_s: float = RESERVATION_TTL_S
    lease_ttl_s: float = LEASE_TTL_S
    shared_url: str | None = None  # a Valkey/Redis server below disk (``shared``); None: no shared tier

    def __post_init__(self) -> None:
        for name in ("ram_bytes", "disk_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.shm_bytes is not None and self.shm_bytes < 0:
            raise ValueError("shm_bytes must be >= 0")
        if self.min_prefix_tokens < 1:
            raise ValueError("min_prefix_tokens must be >= 1")


def auto_shm_budget(fs_free_bytes: int, own_bytes: int) -> int:
    """The default shm budget: half of what the filesystem could give us (our own rows included)."""
    return min(DEFAULT_SHM_MAX_BYTES, (fs_free_bytes + own_bytes) // 2)


def parse_size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024): ``512M``, ``4G``, ``1.5GiB``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)
