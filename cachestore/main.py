"""``erllama-cachestore``: the per-host KV-row store shared by every worker (see cachestore/README.md)."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from pathlib import Path

from erllama.cachestore.config import (
    DEFAULT_DISK_BYTES,
    DEFAULT_MIN_PREFIX_TOKENS,
    DEFAULT_RAM_BYTES,
    SHARED_URL_ENV,
    StoreConfig,
    default_disk_dir,
    default_endpoint,
    default_shm_dir,
    parse_size,
)
from erllama.cachestore.server import CacheServer
from erllama.logsetup import die_with_parent, setup_logging
from erllama.protocol import ErllamaError
from erllama.transport import CACHESTORE_SOCKET_NAME, ipc_endpoint

log = logging.getLogger("erllama.cachestore")

FD_HEADROOM = 512  # descriptors kept for sockets, temps and copies; the rest may hold RAM-tier rows


def _ram_row_limit() -> int:
    """Raise the soft fd limit to the hard one: each RAM-tier row is one memfd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(0, soft - FD_HEADROOM)


def build_config(args: argparse.Namespace) -> StoreConfig:
    endpoint = args.endpoint
    if endpoint is None:
        endpoint = (
            ipc_endpoint(Path(args.runtime_dir), CACHESTORE_SOCKET_NAME)
            if args.runtime_dir
            else default_endpoint()
        )
    return StoreConfig(
        endpoint=endpoint,
        shm_dir=Path(args.shm_dir) if args.shm_dir else default_shm_dir(),
        disk_dir=Path(args.disk_dir) if args.disk_dir else default_disk_dir(),
        ram_bytes=args.ram_bytes,
        shm_bytes=args.shm_bytes,
        disk_bytes=args.disk_bytes,
        min_prefix_tokens=args.min_prefix_tokens,
        shared_url=args.shared_url or None,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="erllama-cachestore", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--endpoint",
        help="ipc:// or tcp:// to bind (default: $ERLLAMA_CACHESTORE, else ipc in the runtime dir)",
    )
    ap.add_argument(
        "--runtime-dir", help="directory of the default ipc socket (default: $ERLLAMA_RUNTIME_DIR, ...)"
    )
    ap.add_argument(
        "--shm-dir", help="shm tier directory (default: $ERLLAMA_SHM_DIR, else /dev/shm/erllama-<uid>)"
    )
    ap.add_argument(
        "--disk-dir", help="disk tier directory (default: $ERLLAMA_CACHE_DIR, else ~/.cache/erllama/kv)"
    )
    ap.add_argument(
        "--ram-bytes",
        type=parse_size,
        default=DEFAULT_RAM_BYTES,
        help="RAM tier budget (0 = off; default 1G)",
    )
    ap.add_argument(
        "--shm-bytes",
        type=parse_size,
        default=None,
        help="shm tier budget (0 = off; default min(4G, half of the free space of the shm dir)",
    )
    ap.add_argument(
        "--disk-bytes", type=parse_size, default=DEFAULT_DISK_BYTES, help="disk tier budget (default 20G)"
    )
    ap.add_argument(
        "--min-prefix-tokens",
        type=int,
        default=DEFAULT_MIN_PREFIX_TOKENS,
        help="shortest common prefix longest_prefix reports (default 1)",
    )
    ap.add_argument(
        "--shared-url",
        default=os.environ.get(SHARED_URL_ENV),
        help="a Valkey/Redis server as a shared tier below disk: redis://:PASSWORD@HOST:PORT/DB "
        f"(default: ${SHARED_URL_ENV}; none: no shared tier)",
    )
    ap.add_argument("--log-level", default=os.environ.get("ERLLAMA_LOG_LEVEL", "INFO"))
    ap.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    setup_logging(args.log_level, "cachestore")
    if args.parent_pid:
        die_with_parent(args.parent_pid)  # SIGTERM: the normal shutdown spills RAM rows, releases the locks
    try:
        config = build_config(args)
        server = CacheServer(config, ram_row_limit=_ram_row_limit())
        return server.run()
    except (ErllamaError, OSError, ValueError) as exc:
        log.error("cache store cannot start: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
