"""``erllama``: the command line for a running broker (and a self-contained demo).

erllama demo ["prompt"]          start a broker if none runs, stream a reply from the default model
erllama serve [--port 8080]      a broker (unless one runs) and the HTTP gateway (OpenAI and Anthropic APIs)
erllama status                   each model with its state, phase, queue depth and pending length
erllama complete MODEL PROMPT    stream a completion
erllama load ID [PATH] [-o k=v] [--host NAME]  load a model (PATH omitted: the embedded default)
erllama unload ID
erllama info ID                  model_info as JSON
erllama hosts                    the hosts that joined (erllama-host): state, heartbeat age, resources
erllama cache [...]              the cache store's counters (see ``erllama cache --help``)
erllama keys DIR [--name NAME]   a CURVE key pair for tcp: NAME.key (public), NAME.key_secret
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from erllama.client import Client
from erllama.protocol import DEFAULT_MODEL_ID, ErllamaError
from erllama.transport import BROKER_ENDPOINT_ENV, CLIENT_SOCKET_NAME, RUNTIME_DIR_ENV, ipc_endpoint

log = logging.getLogger("erllama.cli")

DEMO_PROMPT = "Explain in two sentences why the sky is blue."
DEMO_START_TIMEOUT_S = 120.0


def _out(text: str, stream: TextIO = sys.stdout) -> None:
    stream.write(text)
    stream.flush()


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def chatml(prompt: str) -> str:
    """The default model's chat format, for the demo (full chat templates arrive with ``chat()``)."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def cmd_status(c: Client, args: argparse.Namespace) -> int:
    rows = [("MODEL", "STATE", "PHASE", "QUEUE", "PENDING", "RUNNING", "SLOTS", "PID")]
    for m in c.list_models():
        rows.append(
            (
                m["id"],
                m["state"],
                m["phase"],
                str(m["queue_depth"]),
                str(m["pending_len"]),
                str(m["running"]),
                str(m["slots"]),
                str(m["worker_pid"] or "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        _out("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
    _out(f"total queue depth: {c.queue_depth()}\n")
    return 0


def stream_reply(c: Client, model: str, prompt: str | list[int], **params: Any) -> int:
    stream = c.infer(model, prompt, **params)
    with stream:
        for ev in stream:
            _out(ev.text)
    r = stream.result
    assert r is not None
    _out("\n")
    _out(
        f"[{r.finish_reason}; {r.stats.prompt_tokens} prompt + {r.stats.completion_tokens} generated tokens; "
        f"ttft {r.stats.ttft_ms:.0f} ms; "
        f"{r.stats.completion_tokens / max(r.stats.generation_ms / 1000, 1e-9):.1f} tok/s]\n",
        sys.stderr,
    )
    return 0


def cmd_complete(c: Client, args: argparse.Namespace) -> int:
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    return stream_reply(c, args.model, args.prompt, **params)


def cmd_hosts(c: Client, args: argparse.Namespace) -> int:
    rows = [("HOST", "STATE", "BEAT AGE S", "CORES", "MEM AVAIL GB", "GPUS", "KV FREE GB", "MODELS")]
    for h in c.list_hosts():
        r = h["resources"]
        kv = r.get("kv_free_bytes")
        gpus = str(len(r["gpus"])) if r["gpus"] else (r.get("gpu_error") or "0")
        rows.append(
            (
                h["name"],
                h["state"],
                f"{h['heartbeat_age_s']:.1f}",
                str(r["cores"]),
                f"{r['memory_available_bytes'] / 1e9:.1f}",
                gpus,
                "-" if kv is None else f"{kv / 1e9:.1f}",
                ",".join(h["models"]) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")
    return 0


def cmd_load(c: Client, args: argparse.Namespace) -> int:
    options = dict(kv.split("=", 1) for kv in args.option)
    info = c.load_model(
        args.id,
        args.path,
        host=args.host,
        hosts=args.hosts.split(",") if args.hosts else None,
        replicas=args.replicas,
        **{k: _parse_value(v) for k, v in options.items()},
    )
    _out(json.dumps(info, indent=2, default=str) + "\n")
    return 0


def cmd_unload(c: Client, args: argparse.Namespace) -> int:
    c.unload_model(args.id)
    return 0


def cmd_info(c: Client, args: argparse.Namespace) -> int:
    _out(json.dumps(c.model_info(args.id), indent=2, default=str) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Use a running broker if there is one; otherwise run a private one for the length of the demo."""
    broker: subprocess.Popen[bytes] | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    endpoint = os.environ.get(BROKER_ENDPOINT_ENV)
    try:
        with Client(endpoint, timeout_s=2.0) as probe:
            probe.ping()
    except ErllamaError:
        tmp = tempfile.TemporaryDirectory(prefix="erllama-demo-")
        endpoint = ipc_endpoint(Path(tmp.name), CLIENT_SOCKET_NAME)
        env = os.environ | {
            RUNTIME_DIR_ENV: tmp.name,
            BROKER_ENDPOINT_ENV: endpoint,
            "ERLLAMA_LOG_LEVEL": "WARNING",
        }
        _out(f"starting erllama-broker (runtime dir {tmp.name}) ...\n", sys.stderr)
        broker = subprocess.Popen([sys.executable, "-m", "erllama.broker.main"], env=env)
    try:
        with Client(endpoint, timeout_s=5.0) as c:
            _wait_ready(c, DEFAULT_MODEL_ID)
            tokens = c.tokenize(DEFAULT_MODEL_ID, chatml(args.prompt), parse_special=True)
            _out(f"> {args.prompt}\n")
            return stream_reply(c, DEFAULT_MODEL_ID, tokens, max_tokens=args.max_tokens, temperature=0.0)
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=30)
        if tmp is not None:
            tmp.cleanup()


def cmd_serve(args: argparse.Namespace) -> int:
    """The broker (started here unless one already answers) and the HTTP gateway in front of it, until
    interrupted; a broker started here stops with the gateway."""
    from erllama.cachestore.config import SHARED_URL_ENV
    from erllama.gateway.config import GatewayConfig, load_api_keys, parse_aliases
    from erllama.gateway.main import serve
    from erllama.transport import check_tcp_bind

    check_tcp_bind(f"tcp://{args.host}:{args.port}", args.allow_remote)
    endpoint = args.endpoint or os.environ.get(BROKER_ENDPOINT_ENV)
    broker: subprocess.Popen[bytes] | None = None
    try:
        with Client(endpoint, timeout_s=2.0) as probe:
            probe.ping()
    except ErllamaError:
        _out("starting erllama-broker ...\n", sys.stderr)
        cmd = [sys.executable, "-m", "erllama.broker.main"]
        # The shared tier's URL travels in the environment: its password stays out of process lists.
        env = os.environ | {SHARED_URL_ENV: args.shared_url} if args.shared_url else None
        broker = subprocess.Popen(cmd + (["--endpoint", endpoint] if endpoint else []), env=env)
    try:
        with Client(endpoint, timeout_s=5.0) as c:
            _wait_broker(c, broker)
        _out(
            f"OpenAI API on http://{args.host}:{args.port}/v1 (broker {endpoint or 'default'})\n", sys.stderr
        )
        keys = load_api_keys(args.api_keys)
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again with the handler
        # found at start: these handlers turn it into an exception, so the broker below is stopped too.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        try:
            cfg = GatewayConfig(
                broker=endpoint,
                host=args.host,
                port=args.port,
                api_keys=keys,
                aliases=parse_aliases(args.alias),
            )
            serve(cfg)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=60)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _wait_broker(c: Client, broker: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + DEMO_START_TIMEOUT_S
    while True:
        try:
            c.ping()
            return
        except ErllamaError:
            if time.monotonic() > deadline or (broker is not None and broker.poll() is not None):
                raise


def _wait_ready(c: Client, model_id: str) -> None:
    deadline = time.monotonic() + DEMO_START_TIMEOUT_S
    while True:
        try:
            if c.model_info(model_id)["state"] == "ready":
                return
        except ErllamaError as err:
            if time.monotonic() > deadline:
                raise
            if err.code not in ("timeout", "model_not_found"):
                raise
        if time.monotonic() > deadline:
            raise ErllamaError("timeout", f"{model_id} did not become ready")
        time.sleep(0.2)


def cmd_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    Path(args.dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.dir, args.name)
    _out(f"public key: {public}\nsecret key: {secret}  (keep it private)\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cache"]:
        from erllama.cachestore.cli import run

        return run(argv[1:])
    ap = argparse.ArgumentParser(
        prog="erllama",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument(
        "--endpoint", help="broker endpoint (default: $ERLLAMA_BROKER, else the runtime dir's ipc socket)"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="stream a reply from the default model")
    p.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    p.add_argument("--max-tokens", type=int, default=96)
    p = sub.add_parser("serve", help="broker + OpenAI-compatible HTTP gateway in one command")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allow-remote", action="store_true", help="allow --host beyond loopback")
    p.add_argument("--api-keys", metavar="FILE", help="bearer keys, one a line (also $ERLLAMA_API_KEYS)")
    p.add_argument(
        "--shared-url",
        metavar="URL",
        help="the broker started here gets a Valkey/Redis shared KV tier (also $ERLLAMA_SHARED_URL)",
    )
    p.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="PATTERN=MODEL",
        help="serve model names matching the glob (claude-*) with MODEL; repeatable",
    )
    sub.add_parser("status", help="models, phases, queue depths")
    p = sub.add_parser("complete", help="stream a completion")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p = sub.add_parser("load", help="load a model")
    p.add_argument("id")
    p.add_argument("path", nargs="?")
    p.add_argument("-o", "--option", action="append", default=[], help="load option key=value (repeatable)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--host", help="run the worker on this joined erllama-host (the path is on that machine)"
    )
    where.add_argument("--hosts", help="one replica on each of these hosts (comma-separated names)")
    where.add_argument("--replicas", type=int, help="this many replicas, on the hosts that are up")
    sub.add_parser("hosts", help="the hosts that joined: state, heartbeat age, resources, models")
    p = sub.add_parser("unload", help="unload a model")
    p.add_argument("id")
    p = sub.add_parser("info", help="model_info as JSON")
    p.add_argument("id")
    sub.add_parser("cache", help="the cache store's counters (erllama cache --help)")
    p = sub.add_parser("keys", help="create a CURVE key pair for tcp clients or the broker")
    p.add_argument("dir")
    p.add_argument("--name", default="client")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    handlers = {
        "status": cmd_status,
        "complete": cmd_complete,
        "load": cmd_load,
        "unload": cmd_unload,
        "info": cmd_info,
        "hosts": cmd_hosts,
    }
    try:
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "serve":
            return cmd_serve(args)
        if args.cmd == "keys":
            return cmd_keys(args)
        with Client(args.endpoint) as c:
            return handlers[args.cmd](c, args)
    except ErllamaError as err:
        _out(f"error: {err.code}: {err.message}\n", sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
