"""The worker's socket loop: messages from the broker in, scheduler ticks, events out.

One thread does everything: between two ticks it drains the broker socket without blocking,
so a cancel or a new request waits at most one tick (one ``llama_decode``). When nothing is
running it blocks in ``poll`` until the broker sends something or a heartbeat is due.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import zmq

from erllama import protocol
from erllama.curve import curve_client
from erllama.options import LoadOptions
from erllama.protocol import (
    HEARTBEAT_INTERVAL_S,
    Admitted,
    CacheHitKind,
    CancelRun,
    CompletionResult,
    Done,
    ErllamaError,
    Error,
    ErrorCode,
    Op,
    OpResult,
    Ready,
    Run,
    SaveReason,
    Shutdown,
    SpanEnd,
    Tokens,
    TokenStep,
    WireError,
    WorkerCommand,
    encode,
    error_of,
    frame_or_error,
)
from erllama.transport import make_socket
from erllama.worker.backend import Backend
from erllama.worker.heartbeat import Heartbeat, WorkerStatus, heartbeat_message
from erllama.worker.kvcache import KVCache
from erllama.worker.markers import MarkerSpec
from erllama.worker.ops import WorkerOps
from erllama.worker.prefill import PrefillPolicy
from erllama.worker.scheduler import Scheduler

log = logging.getLogger(__name__)

THINKING_KEY_ENV = (
    "ERLLAMA_THINKING_SIGNING_KEY"  # HMAC key for thinking-block signatures (empty: no signature)
)


class SocketEmitter:
    """Sends scheduler events to the broker. A tick's tokens are held and sent as one ``Tokens`` when the
    tick ends (``flush``), or before any other message, so that a request's events keep their order."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self._steps: list[TokenStep] = []

    def admitted(self, rid: int, cache_hit_kind: CacheHitKind, prefix_len: int) -> None:
        log.info(
            "rid=%d admitted: cache %s, %d prompt tokens not prefilled", rid, cache_hit_kind.value, prefix_len
        )
        self._send(encode(Admitted(rid=rid, cache_hit_kind=cache_hit_kind, prefix_len=prefix_len)))

    def token(self, rid: int, text: str, token_ids: list[int], kind: str = "text") -> None:
        self._steps.append(TokenStep(rid=rid, text=text, token_ids=token_ids, kind=kind))

    def flush(self) -> None:
        """Send the tokens held since the last flush."""
        if self._steps:
            steps, self._steps = self._steps, []
            # ts_ns lets a same-host client measure worker-to-client latency (CLOCK_MONOTONIC is system-wide).
            self.sock.send(encode(Tokens(steps=steps, ts_ns=time.monotonic_ns())))

    def _send(self, frame: bytes) -> None:
        self.flush()
        self.sock.send(frame)

    def span_end(self, rid: int, kind: str, data: str, signature: bytes) -> None:
        self._send(encode(SpanEnd(rid=rid, kind=kind, data=data, signature=signature)))

    def done(self, rid: int, result: CompletionResult) -> None:
        log.info(
            "rid=%d finished: %s, %d tokens generated, finish_key %s",
            rid,
            result.finish_reason.value,
            len(result.generated),
            result.finish_key,
        )
        self.reply(rid, Done(rid=rid, result=result))

    def error(self, rid: int | None, err: ErllamaError) -> None:
        log.info("rid=%s failed: %s", rid, err)
        self._send(encode(error_of(err, rid)))

    def reply(self, rid: int, msg: Done | OpResult) -> None:
        """A request's terminal message; one the broker's socket would refuse becomes a typed error."""
        self._send(
            frame_or_error(encode(msg), protocol.MAX_WORKER_FRAME_BYTES, lambda err: error_of(err, rid))
        )


class WorkerService:
    """Serves one model for one broker until told to shut down or the broker goes away."""

    def __init__(
        self,
        model_id: str,
        backend: Backend[Any],
        options: LoadOptions,
        sock: zmq.Socket,
        heartbeat: Heartbeat,
        info: dict[str, Any],
        cache: KVCache | None = None,
        markers: MarkerSpec | None = None,
        refingerprint: Callable[[list[tuple[str, float]]], bytes] = lambda adapters: b"",
    ):
        self.model_id = model_id
        self.heartbeat = heartbeat
        self.backend = backend
        self.options = options
        self.sock = sock
        self.info = info
        self.emitter = SocketEmitter(sock)
        signing_key = os.environ.get(THINKING_KEY_ENV, "").encode()
        self.scheduler = Scheduler(
            backend,
            self.emitter,
            PrefillPolicy.of(options),
            cache,
            markers,
            signing_key,
            share_prefix=options.share_prefix,
        )
        self.ops = WorkerOps(backend, self.scheduler, cache, refingerprint)
        self.decoder = protocol.worker_command_decoder()
        self.handlers: dict[type[WorkerCommand], Callable[[Any], None]] = {
            Run: self._run,
            CancelRun: lambda m: self.scheduler.cancel(m.rid),
            Op: self._call,
            Shutdown: lambda m: self._stop(),
            Error: self._refused,
        }
        self.stopping = False
        self.supervised = False  # spawned by a supervisor (an erllama-host): stop when the broker restarts
        self.replica = 0  # which of the model's replicas this worker is, echoed in ``ready``
        self.refused = False
        self.bad_messages = 0
        self._reported_phase = self.scheduler.phase

    def announce(self) -> None:
        self.sock.send(
            encode(
                Ready(
                    model=self.model_id,
                    pid=os.getpid(),
                    slots=self.backend.n_seq_max,
                    info=self.info,
                    replica=self.replica,
                )
            )
        )

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.announce()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stopping:
            busy = self.scheduler.has_work()
            timeout_ms = 0 if busy else int(HEARTBEAT_INTERVAL_S * 1000)
            if poller.poll(timeout_ms):
                self._drain()
            # Published before the tick too: the broker must know we are busy while a decode runs.
            self._publish_status()
            if self.scheduler.has_work() and not self.stopping:
                try:
                    self.scheduler.tick()
                except Exception:  # a bug of ours: fail what is running, keep the process
                    log.exception("tick failed; failing the running requests")
                    self.scheduler.fail_all(
                        ErllamaError(ErrorCode.INTERNAL, "internal error in the worker's scheduler")
                    )
                self.emitter.flush()
            self._publish_status()
            if self.heartbeat.broker_restarted.is_set():
                self._register_again()
        log.info("worker %s stopping", self.model_id)
        # A clean unload or broker shutdown keeps what this worker knows: every running context and
        # idle session goes to the cache before the requests end.
        self.scheduler.save_all(SaveReason.SHUTDOWN)
        self.scheduler.cancel_all()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _publish_status(self) -> None:
        """Hand the heartbeat thread a fresh snapshot; tell the broker at once when the phase changes."""
        s = self.scheduler
        phase = s.phase
        cache = (s.cache.stats() if s.cache is not None else {}) | {"restores_refused": s.placement.refused}
        status = WorkerStatus(
            s.progress, phase, len(s.running), len(s.waiting), s.tokens_generated, s.tokens_prefilled, cache
        )
        self.heartbeat.status = status
        if phase is not self._reported_phase:
            self._reported_phase = phase
            self.sock.send(heartbeat_message(self.model_id, status))

    def _register_again(self) -> None:
        """A new broker does not know our requests (their clients were the old broker's) and reuses
        request ids: end them all, then introduce ourselves. A worker with a supervisor (an erllama-host
        spawned it) stops instead: its host joins the new broker afresh, and the broker places it again."""
        self.heartbeat.broker_restarted.clear()
        self.scheduler.cancel_all()
        if self.supervised:
            log.warning("the broker restarted; stopping (our host joins it again)")
            self.stopping = True
            return
        self.announce()

    def _drain(self) -> None:
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frame)

    def _handle(self, frame: bytes) -> None:
        try:
            msg = self.decoder.decode(frame)
        except WireError as err:
            # The broker never sends garbage; count it, and answer it if it names a request.
            self.bad_messages += 1
            log.warning("bad message from the broker: %s", err)
            rid = err.field("rid", int)
            if rid is not None and err.field("t", str) in (
                Run.__struct_config__.tag,
                Op.__struct_config__.tag,
            ):
                self.emitter.error(rid, err)
            return
        try:
            self.handlers[type(msg)](msg)
        except Exception:  # a bug of ours must cost one request, not the process
            log.exception("handling %s failed", type(msg).__name__)
            if isinstance(msg, Run | Op):
                self.emitter.error(
                    msg.rid, ErllamaError(ErrorCode.INTERNAL, f"internal error handling {type(msg).__name__}")
                )

    def _stop(self) -> None:
        self.stopping = True

    def _refused(self, msg: Error) -> None:
        if msg.rid is None:
            # The broker refused our registration (another worker serves this model id).
            log.error("the broker refused this worker: %s", msg.message)
            self.refused = True
            self.stopping = True

    def _run(self, msg: Run) -> None:
        # The parameters were validated by the broker and again, in C, by our decoder: they arrive typed.
        log.info("rid=%d received (queued %.1f ms in the broker)", msg.rid, msg.queue_ms)
        try:
            self.scheduler.submit(msg.rid, msg.prompt, msg.params, msg.queue_ms)
        except ErllamaError as err:
            self.emitter.error(msg.rid, err)

    def _call(self, msg: Op) -> None:
        try:
            result = self.ops.dispatch(msg.op, msg.args)
        except ErllamaError as err:
            self.emitter.error(msg.rid, err)
            return
        self.emitter.reply(msg.rid, OpResult(rid=msg.rid, result=result))


def connect(
    ctx: zmq.Context, endpoint: str, model_id: str, curve: tuple[str, str] | None = None
) -> zmq.Socket:
    """A DEALER to the broker's worker socket. The routing id carries the pid so a restarted
    worker of the same model is a new peer, never confused with the dead one. ``curve``: (our key
    file, the broker's public key file), for a worker a host spawned, which reaches the broker over tcp."""
    identity = f"w:{model_id}:{os.getpid()}".encode()
    sock = make_socket(ctx, zmq.DEALER, protocol.MAX_WORKER_FRAME_BYTES, identity=identity)
    if curve is not None:
        curve_client(sock, *curve)
    sock.connect(endpoint)
    return sock
