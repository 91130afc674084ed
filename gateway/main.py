"""``erllama-gateway``: the OpenAI-compatible HTTP server in front of a running broker.

erllama-gateway [--broker URL] [--host 127.0.0.1] [--port 8080] [--api-keys FILE] [--max-body-bytes N]
                [--alias PATTERN=MODEL ...] [--session-header NAME] [--system-normalize REGEX]
                [--replay-dir DIR] [--ping-interval-s S]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from erllama.gateway.app import create_app
from erllama.gateway.config import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PING_INTERVAL_S,
    DEFAULT_PORT,
    DEFAULT_SESSION_HEADER,
    DEFAULT_SYSTEM_NORMALIZE,
    GatewayConfig,
    load_api_keys,
    parse_aliases,
)
from erllama.logsetup import setup_logging
from erllama.protocol import ErllamaError
from erllama.transport import check_tcp_bind

log = logging.getLogger("erllama.gateway")


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    ap = argparse.ArgumentParser(prog="erllama-gateway", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--broker", help="broker endpoint (default: $ERLLAMA_BROKER, else the runtime dir's ipc socket)"
    )
    ap.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--allow-remote", action="store_true", help="allow --host beyond loopback")
    ap.add_argument(
        "--api-keys", metavar="FILE", help="bearer keys, one a line (also $ERLLAMA_API_KEYS, comma-separated)"
    )
    ap.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    ap.add_argument(
        "--cachestore", help="cache store endpoint for the tier metrics (default: its ipc default)"
    )
    ap.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="PATTERN=MODEL",
        help="serve requests for models matching the glob PATTERN (claude-*) with MODEL; repeatable",
    )
    ap.add_argument(
        "--session-header",
        default=DEFAULT_SESSION_HEADER,
        help="request header whose value becomes the sticky session_id (default %(default)s)",
    )
    ap.add_argument(
        "--system-normalize",
        default=DEFAULT_SYSTEM_NORMALIZE,
        help="regex removed from system prompts before rendering ('' for none; default: Claude Code's "
        "billing line)",
    )
    ap.add_argument(
        "--replay-dir", help="where exact-replay records live (default $XDG_CACHE_HOME/erllama/replay)"
    )
    ap.add_argument(
        "--ping-interval-s",
        type=float,
        default=DEFAULT_PING_INTERVAL_S,
        help="how often an Anthropic stream sends a ping while its prompt is being prefilled "
        "(default %(default)s)",
    )
    args = ap.parse_args(argv)
    if args.ping_interval_s <= 0:
        ap.error("--ping-interval-s must be positive")
    try:
        aliases = parse_aliases(args.alias)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        check_tcp_bind(f"tcp://{args.host}:{args.port}", args.allow_remote)
    except ErllamaError:
        ap.error(
            f"--host {args.host} is not loopback; pass --allow-remote to listen there (and set API keys)"
        )
    return GatewayConfig(
        broker=args.broker,
        host=args.host,
        port=args.port,
        api_keys=load_api_keys(args.api_keys),
        max_body_bytes=args.max_body_bytes,
        cachestore=args.cachestore,
        aliases=aliases,
        session_header=args.session_header.lower(),
        system_normalize=args.system_normalize or None,
        replay_dir=args.replay_dir,
        ping_interval_s=args.ping_interval_s,
    )


def serve(cfg: GatewayConfig) -> None:
    """Run the gateway until interrupted (SIGINT or SIGTERM)."""
    if not cfg.api_keys and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without API keys: anyone who can reach it may use it", cfg.host)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> int:
    setup_logging(os.environ.get("ERLLAMA_LOG_LEVEL", "INFO"), "gateway")
    serve(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
