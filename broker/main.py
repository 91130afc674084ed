"""``erllama-broker``: routes client requests to one worker process per model.

Start it with no arguments to serve the embedded default model (id ``smollm2-135m``) on an
ipc socket in the runtime directory; see ``erllama.broker.config`` for the TOML file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from erllama.broker.config import build_config
from erllama.broker.server import Broker
from erllama.logsetup import setup_logging
from erllama.protocol import ErllamaError

log = logging.getLogger("erllama.broker")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="erllama-broker", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="TOML file with [broker] and [[models]] sections")
    ap.add_argument("--endpoint", help="client endpoint, ipc:// or tcp:// (default: $ERLLAMA_BROKER, else ipc)")
    ap.add_argument("--tcp", help="an extra tcp:// endpoint for clients (loopback unless --allow-remote)")
    ap.add_argument("--allow-remote", action="store_true", help="allow tcp endpoints beyond loopback")
    ap.add_argument("--runtime-dir", help="where ipc sockets and the lock live (default: $ERLLAMA_RUNTIME_DIR)")
    ap.add_argument("--no-default-model", action="store_true", help="start with no model loaded")
    ap.add_argument("--log-level", default=os.environ.get("ERLLAMA_LOG_LEVEL"))
    args = ap.parse_args(argv)
    try:
        cfg = build_config(
            args.config, args.endpoint, args.runtime_dir, args.tcp, args.allow_remote, args.log_level,
            default_model=not args.no_default_model,
        )  # fmt: skip
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
