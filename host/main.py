"""``erllama-host``: joins a broker over tcp with CURVE, runs this machine's cache store, and spawns and
supervises the workers the broker places here (``load_model(..., host=NAME)``). SIGTERM drains it.

    erllama-host --broker tcp://10.0.0.1:7421 --name gpu1 \\
                 --curve-key keys/gpu1.key_secret --curve-server-key keys/server.key
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from erllama.cachestore.config import SHARED_URL_ENV
from erllama.host.host import Host, HostSettings
from erllama.logsetup import setup_logging
from erllama.options import validate_model_id
from erllama.protocol import ErllamaError
from erllama.transport import InstanceLock, default_runtime_dir, ensure_private_dir

log = logging.getLogger("erllama.host")

HOST_LOCK_NAME = "host.lock"
CACHE_FLAGS = {  # our flag's dest -> erllama-cachestore flag
    "cache_dir": "--disk-dir",
    "shm_dir": "--shm-dir",
    "cache_ram": "--ram-bytes",
    "cache_shm": "--shm-bytes",
    "cache_disk": "--disk-bytes",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="erllama-host", description=__doc__.splitlines()[0])
    ap.add_argument("--broker", required=True, help="the broker's host endpoint, tcp://ADDRESS:PORT")
    ap.add_argument("--name", default=socket.gethostname(), help="this host's name (default: the hostname)")
    ap.add_argument("--curve-key", help="this host's CURVE key file with its secret (erllama keys)")
    ap.add_argument("--curve-server-key", help="the broker's public CURVE key file")
    ap.add_argument("--runtime-dir", help="ipc sockets and the lock (default: $ERLLAMA_RUNTIME_DIR)")
    ap.add_argument("--log-level", default=os.environ.get("ERLLAMA_LOG_LEVEL", "INFO"))
    cache = ap.add_argument_group("KV cache (this machine's erllama-cachestore)")
    cache.add_argument("--no-cache", action="store_true", help="run workers without a KV cache")
    cache.add_argument("--cache-dir", help="disk tier directory (default ~/.cache/erllama/kv)")
    cache.add_argument("--shm-dir", help="shm tier directory (default /dev/shm/erllama-<uid>)")
    cache.add_argument("--cache-ram", help="RAM tier budget, e.g. 1G (0 = off)")
    cache.add_argument("--cache-shm", help="shm tier budget")
    cache.add_argument("--cache-disk", help="disk tier budget (default 20G)")
    cache.add_argument(
        "--shared-url",
        help="a Valkey/Redis shared KV tier, redis://:PASSWORD@HOST:PORT/DB (or $ERLLAMA_SHARED_URL)",
    )
    return ap.parse_args(argv)


def settings_of(args: argparse.Namespace) -> HostSettings:
    if bool(args.curve_key) != bool(args.curve_server_key):
        raise ErllamaError("invalid_params", "CURVE needs both --curve-key and --curve-server-key")
    flags: list[str] = []
    for dest, flag in CACHE_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            flags += [flag, str(value)]
    return HostSettings(
        name=validate_model_id(args.name),
        broker=args.broker,
        runtime_dir=Path(args.runtime_dir) if args.runtime_dir else default_runtime_dir(),
        log_level=args.log_level,
        curve=(args.curve_key, args.curve_server_key) if args.curve_key else None,
        cache=not args.no_cache,
        cache_flags=flags,
        shared_url=args.shared_url or os.environ.get(SHARED_URL_ENV) or None,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, f"host[{args.name}]")
    try:
        settings = settings_of(args)
        ensure_private_dir(settings.runtime_dir)
        lock = InstanceLock(settings.runtime_dir / HOST_LOCK_NAME)
        lock.acquire()
        host = Host(settings)
    except (ErllamaError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        return host.run()
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
