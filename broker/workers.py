"""The broker's worker side: the worker ROUTER, registration, heartbeats, calls to a worker, and the
relay of each request's events (tokens, span ends, the result, errors) to the client that asked.

A message from a routing id that has not registered is either a spawned (or operator-started) worker
reporting ``ready``, or a worker telling why its load failed; nothing else from it is believed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from erllama import protocol
from erllama.broker.front import FrontEnd
from erllama.broker.lifecycle import Requests
from erllama.broker.queues import ModelQueue, QueueTotals
from erllama.broker.registry import ModelEntry, Replica, Waiter
from erllama.processes import WorkerProcess
from erllama.protocol import (
    Admitted,
    BrokerHeartbeat,
    Done,
    ErllamaError,
    Error,
    ErrorCode,
    Heartbeat,
    Message,
    ModelState,
    Op,
    OpResult,
    Ready,
    SpanEnd,
    StreamDone,
    StreamSpanEnd,
    StreamStep,
    StreamTokens,
    Tokens,
    WorkerInfo,
    WorkerMessage,
    WorkerOp,
    as_exception,
    encode,
    error_of,
)
from erllama.transport import make_socket

log = logging.getLogger(__name__)


class WorkerSide:
    """Owns the worker socket and the table of registered workers; ``on_ready(entry, replica)`` is called
    when a replica's worker has registered (the broker then dispatches the queue and answers loaders)."""

    def __init__(
        self,
        ctx: zmq.Context,
        models: dict[str, ModelEntry],
        requests: Requests,
        front: FrontEnd,
        totals: QueueTotals,
        instance: str,
    ):
        self.models = models
        self.requests = requests
        self.front = front
        self.totals = totals
        # Workers compare it across heartbeats: a new value tells an operator-started worker
        # that the broker was restarted and it must register again.
        self.instance = instance
        self.sock = make_socket(ctx, zmq.ROUTER, protocol.MAX_WORKER_FRAME_BYTES)
        # [the ipc socket, the CURVE tcp socket for workers that hosts spawn]; a routing id is known on one
        self.sockets: list[zmq.Socket] = [self.sock]
        self.via: dict[bytes, zmq.Socket] = {}  # routing id -> the socket it came through
        self.workers: dict[bytes, tuple[ModelEntry, Replica]] = {}  # routing id -> whose worker
        self.calls: dict[int, tuple[Waiter, str, int]] = {}  # rid -> who asked, which model, which replica
        self.on_ready: Callable[[ModelEntry, Replica], None] = lambda entry, replica: None
        self._decoder = protocol.worker_message_decoder()
        self._handlers: dict[type[WorkerMessage], Callable[[ModelEntry, Replica, Any], None]] = {
            Tokens: self._on_tokens,
            SpanEnd: self._on_span_end,
            Done: self._on_done,
            Error: self._on_error,
            OpResult: self._on_op_result,
            Admitted: self._on_admitted,
            Ready: lambda entry, replica, msg: log.warning(
                "worker of %s sent a second ready; ignored", entry.model_id
            ),
        }

    def send(self, replica: Replica, msg: Message) -> bool:
        """Send to a replica's registered worker without blocking; False if it is not reachable."""
        if replica.worker is None or replica.worker.identity is None:
            return False
        identity = replica.worker.identity
        try:
            self.via.get(identity, self.sock).send_multipart([identity, encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.warning(
                "cannot reach the worker of %s (replica %d): %s", replica.model_id, replica.index, exc
            )
            return False

    def call(self, replica: Replica, waiter: Waiter, op: WorkerOp, args: dict[str, Any], rid: int) -> None:
        """Ask a replica's worker an operation; its answer goes to ``waiter``."""
        if not self.send(replica, Op(rid=rid, op=op, args=args)):
            raise ErllamaError(ErrorCode.WORKER_CRASHED, f"the worker of {replica.model_id!r} is unreachable")
        self.calls[rid] = (waiter, replica.model_id, replica.index)

    def fail_calls(self, replica: Replica, err: ErllamaError) -> None:
        for rid, (waiter, owner, index) in list(self.calls.items()):
            if owner == replica.model_id and index == replica.index:
                del self.calls[rid]
                self.front.refuse(waiter, err)

    def forget(self, wp: WorkerProcess) -> None:
        if wp.identity is not None:
            self.workers.pop(wp.identity, None)
            self.via.pop(wp.identity, None)

    # --- receiving -----------------------------------------------------------------------------------------

    def on_frames(self, frames: list[bytes], sock: zmq.Socket | None = None) -> None:
        """One message from a worker, through ``sock`` (default: the ipc socket)."""
        try:
            self._on_message(frames, sock or self.sock)
        except Exception:  # a bug of ours, or a peer we did not foresee: never the broker's death
            self.totals.bad_messages += 1
            log.exception("handling a worker message failed")

    def _on_message(self, frames: list[bytes], sock: zmq.Socket) -> None:
        identity = frames[0]
        try:
            if len(frames) != 2:
                raise ErllamaError(ErrorCode.PROTOCOL_ERROR, "expected one frame")
            msg = self._decoder.decode(frames[1])
        except ErllamaError as err:
            self.totals.bad_messages += 1
            log.warning("bad worker message from %r: %s", identity, err.message)
            return
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(identity, msg, sock)
            return
        known = self.workers.get(identity)
        if known is None:
            self._on_unknown_worker(identity, msg, sock)
            return
        entry, replica = known
        assert replica.worker is not None
        replica.worker.last_seen_s = time.monotonic()
        self._handlers[type(msg)](entry, replica, msg)

    def _on_tokens(self, entry: ModelEntry, replica: Replica, msg: Tokens) -> None:
        """A tick's steps, regrouped by client: one message to each client whatever its stream count."""
        by_client: dict[bytes, tuple[list[StreamStep], list[int]]] = {}
        for step in msg.steps:
            req = self.requests.of(entry, replica, step.rid)
            if req is None:
                continue
            if req.tokens_sent == 0:
                self.requests.router.first_token(replica, req.rid)
            req.tokens_sent += len(step.token_ids)
            steps, rids = by_client.setdefault(req.client, ([], []))
            steps.append(StreamStep(req.client_id, step.text, step.token_ids, step.kind, msg.ts_ns))
            rids.append(req.rid)
        for client, (steps, rids) in by_client.items():
            if not self.front.send(client, StreamTokens(steps=steps), None):
                for rid in rids:
                    self.send(replica, protocol.CancelRun(rid=rid))

    def _on_span_end(self, entry: ModelEntry, replica: Replica, msg: SpanEnd) -> None:
        req = self.requests.of(entry, replica, msg.rid)
        if req is not None:
            event = StreamSpanEnd(id=req.client_id, kind=msg.kind, data=msg.data, signature=msg.signature)
            self.front.send(req.client, event, req.client_id)

    def _on_done(self, entry: ModelEntry, replica: Replica, msg: Done) -> None:
        req = self.requests.of(entry, replica, msg.rid)
        if req is not None:
            self.requests.finish(req.rid, StreamDone(id=req.client_id, result=msg.result))

    def _on_error(self, entry: ModelEntry, replica: Replica, msg: Error) -> None:
        if msg.rid is None:
            return
        if self.requests.of(entry, replica, msg.rid) is not None:
            self.requests.fail(msg.rid, as_exception(msg))
        elif self.calls.get(msg.rid, (None, "", -1))[1:] == (entry.model_id, replica.index):
            waiter, _, _ = self.calls.pop(msg.rid)
            self.front.refuse(waiter, as_exception(msg))

    def _on_op_result(self, entry: ModelEntry, replica: Replica, msg: OpResult) -> None:
        call = self.calls.get(msg.rid)
        if call is not None and call[1:] == (entry.model_id, replica.index):
            del self.calls[msg.rid]
            self.front.answer(call[0], msg.result)

    def _on_admitted(self, entry: ModelEntry, replica: Replica, msg: Admitted) -> None:
        hit = {"kind": msg.cache_hit_kind.value, "prefix_len": msg.prefix_len}
        entry.queue.last_cache_hit = replica.last_cache_hit = hit

    def _on_heartbeat(self, identity: bytes, msg: Heartbeat, sock: zmq.Socket) -> None:
        """Heartbeats come from each worker's heartbeat thread (and, on a phase change, from its main
        socket). Those from the heartbeat thread are answered with our instance id."""
        entry = self.models.get(msg.model)
        replica = entry.replica_of_pid(msg.pid) if entry is not None and msg.pid else None
        wp = replica.worker if replica is not None else None
        if identity != (wp.identity if wp else None):
            try:
                sock.send_multipart([identity, encode(BrokerHeartbeat(instance=self.instance))], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        if replica is None or wp is None:
            return
        now = time.monotonic()
        wp.last_seen_s = now
        if msg.progress != wp.progress or (msg.busy and not wp.busy):
            wp.progress_changed_s = now
        wp.progress = msg.progress
        wp.busy = msg.busy
        replica.reported_phase = msg.phase
        replica.tokens_generated = msg.tokens_generated
        replica.tokens_prefilled = msg.tokens_prefilled
        if msg.cache is not None:
            replica.cache_stats = msg.cache

    def _on_unknown_worker(self, identity: bytes, msg: WorkerMessage, sock: zmq.Socket) -> None:
        """A worker we have not heard from: one we spawned reporting in, or an operator's."""
        if isinstance(msg, Error) and msg.rid is None:
            model, pid = msg.detail.get("model"), msg.detail.get("pid")
            entry = self.models.get(model) if isinstance(model, str) else None
            replica = (
                entry.replica_of_pid(pid) if entry is not None and isinstance(pid, int) and pid else None
            )
            if replica is not None:
                replica.last_error = {"code": msg.code, "message": msg.message}
            return
        if isinstance(msg, Ready):
            self._register(identity, msg, sock)

    def _register(self, identity: bytes, msg: Ready, sock: zmq.Socket) -> None:
        try:  # it comes from a worker: what the broker uses of it must have the types it expects
            info = msgspec.convert(msg.info, WorkerInfo)
        except msgspec.ValidationError as exc:
            log.warning("worker of %s reported unusable info (%s); registering it without", msg.model, exc)
            info = WorkerInfo()
        model_id, pid = msg.model, msg.pid
        entry = self.models.get(model_id)
        if entry is None:
            queue = ModelQueue(model_id, max_queue=protocol.DEFAULT_MAX_QUEUE)
            entry = ModelEntry(model_id, info.path, info.options, queue, spawned=False)
            entry.replicas.append(Replica(model_id, 0, None, worker=WorkerProcess(model_id, pid)))
            self.models[model_id] = entry
            log.info("operator-started worker registered %s (pid %d)", model_id, pid)
        replica = entry.replicas[msg.replica] if 0 <= msg.replica < len(entry.replicas) else None
        wp = replica.worker if replica is not None else None
        if (
            replica is not None
            and not entry.spawned
            and replica.state in (ModelState.FAILED, ModelState.RESTARTING)
        ):
            wp = replica.worker = WorkerProcess(model_id, pid)
        elif (
            wp is not None
            and wp.host is not None
            and wp.pid == 0
            and wp.identity is None
            and sock is not self.sock
        ):
            wp.pid = pid  # placed on a host whose report of the pid has not arrived yet
        if replica is None or wp is None or wp.pid != pid or wp.identity is not None:
            err = ErllamaError(ErrorCode.ALREADY_LOADED, f"model {model_id!r} is already served")
            sock.send_multipart([identity, encode(error_of(err, None))])
            return
        wp.identity = identity
        self.workers[identity] = (entry, replica)
        self.via[identity] = sock
        entry.info = msg.info
        entry.fingerprint = info.fingerprint
        entry.memory = info.memory
        replica.slots = msg.slots
        if replica.state is not ModelState.DRAINING:  # a host that drains keeps its replicas draining
            replica.state = ModelState.READY
        replica.last_error = None
        replica.restart.reset()
        log.info("model %s ready: replica %d (pid %d, %d slots)", model_id, replica.index, pid, msg.slots)
        self.on_ready(entry, replica)
