"""``erllama-worker``: one OS process serving one model for the broker.

The broker spawns it as ``erllama-worker --model PATH --id NAME --broker ENDPOINT --options JSON``;
an operator may start one by hand the same way, and it registers with the broker it connects
to. A llama.cpp abort (``GGML_ASSERT``) ends this process only: the broker fails its in-flight
requests with ``worker_crashed`` and starts a new one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import zmq

from erllama import protocol
from erllama.cachestore.config import default_endpoint as default_cachestore_endpoint
from erllama.logsetup import die_with_parent, setup_logging
from erllama.models import check_gguf_header, default_model_path
from erllama.options import EXACT_KERNELS_ENV, LoadOptions, parse_load_options, validate_model_id
from erllama.protocol import ErllamaError, ErrorCode, MemoryKind
from erllama.transport import WORKER_SOCKET_NAME, default_runtime_dir, ipc_endpoint
from erllama.worker.backend import Backend
from erllama.worker.fingerprint import file_sha256, fingerprint
from erllama.worker.heartbeat import Heartbeat
from erllama.worker.kvcache import CachePolicy, KVCache
from erllama.worker.markers import MarkerSpec, marker_spellings
from erllama.worker.service import WorkerService, connect

log = logging.getLogger("erllama.worker")

EXIT_LOAD_FAILED = 3


def load_backend(model_path: Path | None, options: LoadOptions) -> tuple[Backend[Any], Path | None]:
    """Build the backend the options ask for. Raises ``ErllamaError`` with a load error code."""
    if options.backend == "stub":
        from erllama.worker.stub_backend import StubBackend

        memory = MemoryKind(options.stub_memory)
        backend = StubBackend(
            options.n_ctx,
            options.n_seq_max,
            options.n_batch,
            options.stub_decode_ms,
            memory,
            prefill_us_per_token=options.stub_prefill_us_per_token,
        )
        return backend, model_path
    path = model_path or default_model_path()
    if not path.is_file():
        raise ErllamaError(ErrorCode.LOAD_FAILED, f"model file {path} does not exist")
    check_gguf_header(path)
    # When llama.cpp aborts, ggml attaches gdb to print a backtrace. Two decode threads aborting at
    # once race two gdb attaches, and the loser can hang the process until the broker's stall timeout
    # (seen here: 120 s instead of an immediate SIGABRT). A worker must die at once; the abort
    # message itself still reaches stderr.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    if options.exact:
        os.environ.update(EXACT_KERNELS_ENV)
    from erllama.worker.llama_backend import LlamaBackend  # imported late: it loads libllama

    return LlamaBackend(path, options), path


def model_hash(path: Path | None, options: LoadOptions) -> str:
    """What identifies the weights: the file's content hash (the stub has no file)."""
    return "stub-backend" if options.backend == "stub" or path is None else file_sha256(path)


def load_markers(backend: Backend[Any], options: LoadOptions) -> MarkerSpec:
    """Tokenize the span markers: the tokenizer's spelling and every other exact spelling in the vocab."""
    texts = [
        t.encode() for m in (options.thinking_markers, options.tool_call_markers) if m for t in m.values()
    ]
    pieces: dict[bytes, list[int]] = {}
    for tok in range(backend.n_vocab):
        piece = backend.token_bytes(tok)
        if piece and any(piece in t for t in texts):
            pieces.setdefault(piece, []).append(tok)

    def spell(text: str) -> list[tuple[int, ...]]:
        return marker_spellings(text, backend.tokenize(text, False, True), pieces)

    return MarkerSpec.from_text(spell, options.thinking_markers, options.tool_call_markers)


def fail_load(sock: zmq.Socket, ctx: zmq.Context, err: ErllamaError, model_id: str) -> int:
    """Tell the broker why the load failed, then exit."""
    err.detail |= {"model": model_id, "pid": os.getpid()}
    log.error("load failed: %s", err)
    sock.setsockopt(zmq.LINGER, 2000)  # make sure the broker hears why
    sock.send(protocol.encode(protocol.error_of(err, None)))
    sock.close()
    ctx.term()
    return EXIT_LOAD_FAILED


def policy_of(options: LoadOptions) -> CachePolicy:
    return CachePolicy(
        options.cache_min_tokens,
        options.cold_trim_tokens,
        options.cold_align_tokens,
        options.continued_interval_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="erllama-worker", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--id", default=protocol.DEFAULT_MODEL_ID, help="model id clients use")
    ap.add_argument("--broker", help="broker worker endpoint (default: ipc in the runtime dir)")
    ap.add_argument("--runtime-dir", help="runtime directory (default: $ERLLAMA_RUNTIME_DIR)")
    ap.add_argument("--options", default="{}", help="load options as a JSON object")
    ap.add_argument(
        "--cachestore", help="cache store endpoint (default: $ERLLAMA_CACHESTORE, else the runtime dir's)"
    )
    ap.add_argument("--no-cache", action="store_true", help="serve without the KV cache")
    ap.add_argument("--curve-key", help="our CURVE key file (with its secret), for a tcp broker endpoint")
    ap.add_argument("--curve-server-key", help="the broker's public CURVE key file")
    ap.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--replica", type=int, default=0, help="which of the model's replicas this is")
    ap.add_argument("--log-level", default=os.environ.get("ERLLAMA_LOG_LEVEL", "INFO"))
    args = ap.parse_args(argv)
    setup_logging(args.log_level, f"worker[{args.id}]")
    if args.parent_pid:
        die_with_parent(args.parent_pid)

    runtime_dir = Path(args.runtime_dir) if args.runtime_dir else default_runtime_dir()
    endpoint = args.broker or ipc_endpoint(runtime_dir, WORKER_SOCKET_NAME)
    curve = (args.curve_key, args.curve_server_key) if args.curve_key and args.curve_server_key else None
    ctx = zmq.Context()
    sock = connect(ctx, endpoint, args.id, curve)
    try:
        validate_model_id(args.id)
        options = parse_load_options(json.loads(args.options))
        backend, path = load_backend(Path(args.model) if args.model else None, options)
    except (ErllamaError, json.JSONDecodeError) as exc:
        err = (
            exc
            if isinstance(exc, ErllamaError)
            else ErllamaError(ErrorCode.INVALID_PARAMS, f"--options: {exc}")
        )
        return fail_load(sock, ctx, err, args.id)
    try:
        markers = None
        if options.thinking_markers or options.tool_call_markers:
            markers = load_markers(backend, options)
    except ErllamaError as err:
        return fail_load(sock, ctx, err, args.id)
    model_identity = model_hash(path, options)

    layout = backend.state_layout()

    def refingerprint(adapters: list[tuple[str, float]]) -> bytes:
        return fingerprint(model_identity, layout, adapters)

    cache = None
    if options.cache and not args.no_cache:
        cache = KVCache(
            args.cachestore or default_cachestore_endpoint(), refingerprint([]), policy_of(options)
        )
    info = backend.info() | {
        "path": str(path) if path else None,
        "options": options.to_wire(),
        "n_ctx": backend.n_ctx_seq,
        "fingerprint": cache.fingerprint.hex() if cache else None,
        # Whether warm greedy output is bit-identical to cold (options.py ``exact``, README).
        "exact": options.exact,
    }
    heartbeat = Heartbeat(ctx, endpoint, args.id, curve)
    heartbeat.start()
    service = WorkerService(args.id, backend, options, sock, heartbeat, info, cache, markers, refingerprint)
    service.supervised = bool(args.parent_pid)
    service.replica = args.replica
    try:
        service.run()
    finally:
        heartbeat.stop()
        if cache is not None:
            cache.close()  # hands over the shutdown saves before the process ends
        backend.close()
        sock.setsockopt(zmq.LINGER, 1000)
        sock.close()
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
