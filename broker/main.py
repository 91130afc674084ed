"""``erllama-broker``: routes client requests to one worker process per model.

Start it with no arguments to serve the embedded default model (id ``smollm2-135m``) on an
ipc socket in the runtime directory; see ``erllama.broker.config`` for the TOML file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from erllama.broker.broker import Broker
from erllama.broker.config import build_config
from erllama.logsetup import setup_logging
from erllama.protocol import ErllamaError

log = logging.getLogger("erllama.broker")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="erllama-broker", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="TOML file with [broker] and [[models]] sections")
    ap.add_argument(
        "--endpoint", help="client endpoint, ipc:// or tcp:// (default: $ERLLAMA_BROKER, else ipc)"
    )
    ap.add_argument("--tcp", help="an extra tcp:// endpoint for clients (loopback unless --allow-remote)")
    ap.add_argument("--allow-remote", action="store_true", help="allow tcp endpoints beyond loopback")
    ap.add_argument(
        "--curve-secret-key", help="the broker's CURVE key file (erllama keys): tcp clients must authenticate"
    )
    ap.add_argument("--curve-clients", help="directory of the client public keys allowed in over tcp")
    ap.add_argument(
        "--hosts", help="tcp:// endpoint where erllama-host processes join (CURVE; their workers: port + 1)"
    )
    ap.add_argument(
        "--curve-hosts", help="directory of the host public keys allowed to join (default: --curve-clients)"
    )
    ap.add_argument("--name", help="this machine's name among the hosts (default: the hostname)")
    ap.add_argument(
        "--runtime-dir", help="where ipc sockets and the lock live (default: $ERLLAMA_RUNTIME_DIR)"
    )
    ap.add_argument("--no-default-model", action="store_true", help="start with no model loaded")
    ap.add_argument("--log-level", default=os.environ.get("ERLLAMA_LOG_LEVEL"))
    cache = ap.add_argument_group("KV cache (passed to the erllama-cachestore the broker runs)")
    cache.add_argument(
        "--no-cache", dest="cache_enabled", action="store_const", const=False, help="serve without a KV cache"
    )
    cache.add_argument("--cachestore", help="use the cache store at this endpoint instead of spawning one")
    cache.add_argument("--cache-dir", help="disk tier directory (default ~/.cache/erllama/kv)")
    cache.add_argument("--shm-dir", help="shm tier directory (default /dev/shm/erllama-<uid>)")
    cache.add_argument("--cache-ram", help="RAM tier budget, e.g. 1G (0 = off)")
    cache.add_argument("--cache-shm", help="shm tier budget (default: min(4G, half of /dev/shm free))")
    cache.add_argument("--cache-disk", help="disk tier budget (default 20G)")
    cache.add_argument(
        "--shared-url",
        help="a Valkey/Redis server as a shared KV tier below disk, redis://:PASSWORD@HOST:PORT/DB "
        "(also $ERLLAMA_SHARED_URL, which keeps the password out of process lists)",
    )
    args = ap.parse_args(argv)
    cache_overrides = {
        "enabled": args.cache_enabled,
        "endpoint": args.cachestore,
        "disk_dir": args.cache_dir,
        "shm_dir": args.shm_dir,
        "ram_bytes": args.cache_ram,
        "shm_bytes": args.cache_shm,
        "disk_bytes": args.cache_disk,
        "shared_url": args.shared_url,
    }
    try:
        cfg = build_config(
            args.config,
            args.endpoint,
            args.runtime_dir,
            args.tcp,
            args.allow_remote,
            args.log_level,
            default_model=not args.no_default_model,
            cache_overrides=cache_overrides,
            curve_key=args.curve_secret_key,
            curve_clients=args.curve_clients,
            hosts=args.hosts,
            curve_hosts=args.curve_hosts,
            name=args.name,
        )
    except (ErllamaError, OSError, ValueError) as exc:
        setup_logging("INFO", "broker")
        log.error("bad configuration: %s", exc)
        return 2
    setup_logging(cfg.log_level, "broker")
    broker = Broker(cfg)
    try:
        broker.start()
    except ErllamaError as exc:
        log.error("cannot start: %s", exc)
        return 1
    broker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
