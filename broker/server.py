"""The broker: one thread, one ``zmq.Poller`` loop over the client socket, the worker socket,
and every spawned worker's pidfd and stderr pipe.

Clients talk to a ROUTER (ipc, optionally tcp). Workers talk to a second ROUTER. A request
is queued per model (``queues.py``), sent to the model's worker when it has a free slot, and
each streamed event is relayed back to the client that asked. The broker never blocks on a
peer: sends are non-blocking, and a client that cannot be reached has its request cancelled.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from erllama import protocol
from erllama.broker.config import BrokerConfig
from erllama.broker.pressure import PressureWatcher
from erllama.broker.queues import ModelQueue, QueueTotals, Request
from erllama.broker.registry import ModelEntry, Waiter
from erllama.broker.supervisor import (
    RESTART_BACKOFF_MAX_S,
    TERMINATE_GRACE_S,
    ChildProcess,
    RestartPolicy,
    WorkerProcess,
    spawn_cachestore,
    spawn_worker,
)
from erllama.cachestore.client import CacheClient
from erllama.cachestore.config import default_disk_dir, default_shm_dir
from erllama.options import parse_load_options, parse_sampling, validate_model_id, validate_prompt
from erllama.protocol import (
    CLIENT_TYPES,
    HEARTBEAT_INTERVAL_S,
    MODEL_LOAD_TIMEOUT_S,
    WORKER_SILENCE_TIMEOUT_S,
    WORKER_STALL_TIMEOUT_S,
    WORKER_TYPES,
    CacheMsgType,
    ErllamaError,
    ErrorCode,
    MemoryKind,
    ModelState,
    MsgType,
    Phase,
)
from erllama.resources import vram_info
from erllama.transport import BROKER_LOCK_NAME, InstanceLock, ensure_private_dir, make_socket

log = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100
CACHE_QUERY_TIMEOUT_S = 2.0
MAX_TOKEN_ID = 2**31  # token ids travel to the cache store as u32; no vocabulary comes near this


class Broker:
    def __init__(self, cfg: BrokerConfig):
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.models: dict[str, ModelEntry] = {}
        self.requests: dict[int, Request] = {}
        self.by_client: dict[tuple[bytes, str], int] = {}
        self.calls: dict[int, tuple[Waiter, str]] = {}  # rid -> who asked, which model
        self.workers: dict[bytes, ModelEntry] = {}  # routing id -> entry
        self.fds: dict[int, ChildProcess] = {}  # pidfd or stderr fd -> child process
        self.cachestore: ChildProcess | None = None
        self.cachestore_restart = RestartPolicy()
        self.cachestore_restart_at_s = 0.0
        self.cache_sock: zmq.Socket | None = None  # our own questions to the store (cached_prefix_len)
        self.cache_queries: dict[int, tuple[Waiter, float]] = {}  # rid -> who asked, deadline
        self.cache_heard_s = time.monotonic()  # the store's last reply: a frozen store is killed
        self.cache_pinged_s = 0.0
        self.pressure: PressureWatcher | None = None
        self._pressure_client: CacheClient | None = None  # used only from the watcher's thread
        self.totals = QueueTotals()
        self._rids = itertools.count(1)
        self.stopping = False
        # Workers compare it across heartbeats: a new value tells an operator-started worker
        # that the broker was restarted and it must register again.
        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lock = InstanceLock(cfg.runtime_dir / BROKER_LOCK_NAME)
        # Client sockets: ipc (and plain tcp) on one, CURVE-authenticated tcp on another. A client's
        # key below is its socket's index byte followed by its routing id on that socket.
        self.fronts: list[zmq.Socket] = []
        self.auth: ThreadAuthenticator | None = None
        self.back: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self._client_handlers: dict[MsgType, Callable[[bytes, dict[str, Any]], None]] = {
            MsgType.INFER: self._on_infer,
            MsgType.CANCEL: self._on_cancel,
            MsgType.LOAD_MODEL: self._on_load_model,
            MsgType.UNLOAD_MODEL: self._on_unload_model,
            MsgType.LIST_MODELS: lambda c, m: self._reply(c, m["id"], [e.describe() for e in self.models.values()]),
            MsgType.MODEL_INFO: lambda c, m: self._reply(c, m["id"], self._entry(m["model"]).describe()),
            MsgType.QUEUE_DEPTH: self._on_queue_depth,
            MsgType.CALL: self._on_call,
            MsgType.CACHED_PREFIX_LEN: self._on_cached_prefix_len,
            MsgType.PING: lambda c, m: self._reply(c, m["id"], {"pid": os.getpid(), "models": len(self.models),
                                                                 "pressure": self.pressure.status() if self.pressure else None}),
            MsgType.VRAM_INFO: lambda c, m: self._reply(c, m["id"], vram_info()),
        }

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        ensure_private_dir(self.cfg.runtime_dir)
        self.lock.acquire()
        plain = make_socket(self.ctx, zmq.ROUTER, protocol.MAX_CLIENT_FRAME_BYTES)
        plain.bind(self.cfg.endpoint)
        log.info("clients: %s", self.cfg.endpoint)
        self.fronts.append(plain)
        if self.cfg.tcp:
            if self.cfg.curve is not None:
                self.fronts.append(self._curve_socket(self.cfg.tcp))
            else:
                plain.bind(self.cfg.tcp)
            log.info("clients: %s%s", self.cfg.tcp, " (CURVE)" if self.cfg.curve else "")
        self.back = make_socket(self.ctx, zmq.ROUTER, protocol.MAX_WORKER_FRAME_BYTES)
        self.back.bind(self.cfg.worker_endpoint)
        for sock in self.fronts:
            self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.back, zmq.POLLIN)
        if self.cfg.cache.enabled and self.cfg.cache.external_endpoint is None:
            self._spawn_cachestore()
        if self.cfg.cachestore_endpoint:
            self.cache_sock = make_socket(self.ctx, zmq.DEALER, protocol.MAX_CACHE_CONTROL_BYTES)
            self.cache_sock.connect(self.cfg.cachestore_endpoint)
            self.poller.register(self.cache_sock, zmq.POLLIN)
            if self.cfg.pressure.enabled:
                self.pressure = PressureWatcher(self.cfg.pressure, self._evict_cache_bytes)
                self.pressure.start()
        for spec in self.cfg.models:
            self._create(spec.model_id, spec.path, spec.options, waiter=None)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        while not self.stopping:
            self._poll_once(POLL_INTERVAL_MS)
        self._shutdown()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        self.stopping = True

    def _poll_once(self, timeout_ms: int) -> None:
        for item, _ in self.poller.poll(timeout_ms):
            if item in self.fronts:
                index = bytes([self.fronts.index(item)])
                self._drain(item, lambda frames, i=index: self._on_client_frames([i + frames[0], *frames[1:]]))
            elif item is self.back:
                self._drain(self.back, self._on_worker_frames)
            elif item is self.cache_sock:
                self._drain(self.cache_sock, self._on_cache_reply)
            elif isinstance(item, int) and item in self.fds:
                self._on_child_fd(item)
        self._timers(time.monotonic())

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        # Bounded, so a flood on one socket cannot starve the other.
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    def _shutdown(self) -> None:
        """Stop every worker (they finish with ``cancelled``), relay their last events, then close."""
        for entry in self.models.values():
            for rid in list(entry.queue.waiting):
                self._fail(rid, ErllamaError(ErrorCode.SHUTTING_DOWN, "the broker is shutting down"))
            self._send_worker(entry, protocol.encode(MsgType.SHUTDOWN))
        deadline = time.monotonic() + TERMINATE_GRACE_S
        while any(e.worker and e.spawned for e in self.models.values()) and time.monotonic() < deadline:
            self._poll_once(50)
        for entry in list(self.models.values()):
            if entry.worker is not None:
                entry.worker.kill()
                self._reap(entry.worker)
        for rid in list(self.requests):
            self._fail(rid, ErllamaError(ErrorCode.SHUTTING_DOWN, "the broker is shutting down"))
        if self.pressure is not None:
            self.pressure.stop()
        self._stop_cachestore()
        for sock in (*self.fronts, self.back, self.cache_sock):
            if sock is not None:
                sock.close(linger=500)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        for ep in (self.cfg.endpoint, self.cfg.worker_endpoint):
            if ep.startswith("ipc://"):
                Path(ep[len("ipc://") :]).unlink(missing_ok=True)
        self.lock.release()
        log.info("broker stopped")

    def _curve_socket(self, endpoint: str) -> zmq.Socket:
        """A ROUTER that speaks CURVE, with a ZAP allowlist: only clients whose public key is in the
        configured directory get in (the server key alone would let anyone who has it connect)."""
        assert self.cfg.curve is not None
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(self.cfg.curve.clients_dir))
        public, secret = zmq.auth.load_certificate(str(self.cfg.curve.server_key_file))
        if secret is None:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, f"{self.cfg.curve.server_key_file} holds no secret key")
        sock = make_socket(self.ctx, zmq.ROUTER, protocol.MAX_CLIENT_FRAME_BYTES)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.bind(endpoint)
        return sock

    # --- sending -------------------------------------------------------------------------------------------

    def _send_client(self, client: bytes, payload: bytes, client_id: str | None) -> bool:
        payload = protocol.within_frame_limit(payload, protocol.MAX_CLIENT_FRAME_BYTES, "id", client_id)
        try:
            self.fronts[client[0]].send_multipart([client[1:], payload], zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning("client %s is not reading; dropping its message", client.hex())
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
        return False

    def _reply(self, client: bytes, client_id: str, result: Any) -> None:
        self._send_client(client, protocol.encode(MsgType.OK, id=client_id, result=result), client_id)

    def _reply_error(self, client: bytes, client_id: str | None, err: ErllamaError) -> None:
        self._send_client(client, protocol.error_reply("id", client_id, err), client_id)

    def _send_worker(self, entry: ModelEntry, payload: bytes) -> bool:
        if entry.worker is None or entry.worker.identity is None:
            return False
        try:
            self.back.send_multipart([entry.worker.identity, payload], zmq.NOBLOCK)  # type: ignore[union-attr]
            return True
        except zmq.ZMQError as exc:
            log.warning("cannot reach the worker of %s: %s", entry.model_id, exc)
            return False

    # --- client messages -----------------------------------------------------------------------------------

    def _on_client_frames(self, frames: list[bytes]) -> None:
        client = frames[0]
        client_id = None
        try:
            if len(frames) != 2:
                raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"expected one frame, got {len(frames) - 1}")
            msg = protocol.decode(frames[1])
            client_id = msg.get("id") if isinstance(msg.get("id"), str) else None
            t = protocol.validate(msg, CLIENT_TYPES)
            self._client_handlers[t](client, msg)
        except ErllamaError as err:
            if err.code == ErrorCode.PROTOCOL_ERROR:
                self.totals.bad_messages += 1
                log.info("bad client message: %s", err.message)
            self._reply_error(client, client_id, err)
        except Exception:  # a bug of ours must cost one request, never the broker
            log.exception("handling a client message failed")
            self._reply_error(client, client_id, ErllamaError(ErrorCode.INTERNAL, "internal error in the broker"))

    def _entry(self, model_id: str) -> ModelEntry:
        entry = self.models.get(model_id)
        if entry is None:
            raise ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"no model {model_id!r} is loaded", {"model": model_id})
        return entry

    def _on_infer(self, client: bytes, msg: dict[str, Any]) -> None:
        if self.stopping:
            raise ErllamaError(ErrorCode.SHUTTING_DOWN, "the broker is shutting down")
        entry = self._entry(msg["model"])
        if entry.state is ModelState.FAILED:
            raise ErllamaError(ErrorCode.MODEL_FAILED, f"model {entry.model_id!r} has failed", entry.last_error)
        if entry.state is ModelState.UNLOADING:
            raise ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} is being unloaded")
        params = msg.get("params") or {}
        parse_sampling(params)  # reject bad values here, before they take a queue slot
        validate_prompt(msg["prompt"])
        key = (client, msg["id"])
        if key in self.by_client:
            raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"request id {msg['id']!r} is already in flight")
        rid = next(self._rids)
        try:
            entry.queue.enqueue(rid)
        except ErllamaError:
            self.totals.rejected_overloaded += 1
            raise
        self.requests[rid] = Request(rid, client, msg["id"], entry.model_id, msg["prompt"], params)
        self.by_client[key] = rid
        self.totals.accepted += 1
        self.totals.depth += 1
        self._dispatch(entry)

    def _on_cancel(self, client: bytes, msg: dict[str, Any]) -> None:
        rid = self.by_client.get((client, msg["target"]))
        if rid is not None:
            self._cancel(rid)
        self._reply(client, msg["id"], {"cancelled": rid is not None})

    def _cancel(self, rid: int) -> None:
        req = self.requests[rid]
        entry = self.models.get(req.model_id)
        if not req.dispatched:
            if entry is not None:
                entry.queue.remove(rid)
            self._finish(rid, protocol.encode(MsgType.DONE, id=req.client_id, result=_cancelled_result(req)))
        elif entry is not None:
            self._send_worker(entry, protocol.encode(MsgType.CANCEL_RUN, rid=rid))

    def _on_load_model(self, client: bytes, msg: dict[str, Any]) -> None:
        model_id = validate_model_id(msg["model"])
        if model_id in self.models:
            raise ErllamaError(ErrorCode.ALREADY_LOADED, f"model {model_id!r} is already loaded", {"model": model_id})
        path = msg.get("path")
        if path is not None:
            try:
                p = Path(path).resolve()
                is_file = p.is_file()
            except (OSError, ValueError) as exc:  # too long, NUL bytes, a loop of links
                raise ErllamaError(ErrorCode.INVALID_PARAMS, f"unusable model path: {type(exc).__name__}") from None
            if any(p.is_relative_to(d) for d in self._private_dirs()):
                raise ErllamaError(ErrorCode.INVALID_PARAMS, "model paths may not point into erllama's runtime or cache directories")
            if not is_file:
                raise ErllamaError(ErrorCode.LOAD_FAILED, f"model file {path[:200]} does not exist", {"path": path[:200]})
            path = str(p)
        options = parse_load_options(msg.get("options")).to_wire()
        self._create(model_id, path, options, Waiter(client, msg["id"]))

    def _private_dirs(self) -> list[Path]:
        """Where erllama keeps sockets, locks and cache rows: never a model to load."""
        flags = self.cfg.cache.flags
        disk = Path(flags[flags.index("--disk-dir") + 1]) if "--disk-dir" in flags else default_disk_dir()
        shm = Path(flags[flags.index("--shm-dir") + 1]) if "--shm-dir" in flags else default_shm_dir()
        return [d.resolve() for d in (self.cfg.runtime_dir, disk, shm)]

    def _create(self, model_id: str, path: str | None, options: dict[str, Any], waiter: Waiter | None) -> None:
        entry = ModelEntry(model_id, path, options, ModelQueue(model_id, max_queue=options["max_queue"]))
        if waiter is not None:
            entry.load_waiters.append(waiter)
        self.models[model_id] = entry
        self._spawn(entry)

    def _spawn(self, entry: ModelEntry) -> None:
        wp = spawn_worker(
            entry.model_id, entry.path, entry.options, self.cfg.worker_endpoint, self.cfg.runtime_dir,
            self.cfg.log_level, self.cfg.cachestore_endpoint,
        )  # fmt: skip
        entry.worker = wp
        self._watch(wp)

    def _watch(self, child: ChildProcess) -> None:
        for fd in (child.pidfd, child.stderr_fd):
            self.fds[fd] = child
            self.poller.register(fd, zmq.POLLIN)

    def _unwatch(self, child: ChildProcess) -> None:
        if child.stderr_fd >= 0:
            while child.read_stderr():
                pass
        for fd in (child.pidfd, child.stderr_fd):
            if fd in self.fds:
                self.poller.unregister(fd)
                del self.fds[fd]

    # --- the cache store -----------------------------------------------------------------------------------

    def _spawn_cachestore(self) -> None:
        args = ["--endpoint", self.cfg.cachestore_endpoint or "", "--log-level", self.cfg.log_level, *self.cfg.cache.flags]
        self.cachestore = spawn_cachestore(args)
        self._watch(self.cachestore)

    def _cachestore_exited(self, child: ChildProcess) -> None:
        """Workers keep serving (with cache misses) while the store is restarted with backoff."""
        self._unwatch(child)
        detail = child.exit_detail()
        child.close_fds()
        self.cachestore = None
        if self.stopping:
            return
        self.cachestore_restart.record_crash(time.monotonic())
        self.cachestore_restart_at_s = time.monotonic() + self.cachestore_restart.next_delay()
        log.error("the cache store died (%s); restarting it", {k: v for k, v in detail.items() if k != "stderr_tail"})

    def _evict_cache_bytes(self, nbytes: int) -> int:
        """The memory-pressure watcher's hand on the cache (called from its thread, with its own socket)."""
        if self._pressure_client is None:
            self._pressure_client = CacheClient(self.cfg.cachestore_endpoint)
        return self._pressure_client.evict_bytes(nbytes)

    def _watch_cachestore(self, now: float) -> None:
        """Ask the store for its stats every heartbeat; one that stays silent (frozen, stuck) is
        killed and restarted like a crashed one: its pidfd alone cannot tell."""
        cs = self.cachestore
        if cs is None or self.cache_sock is None:
            self.cache_heard_s = now
            return
        if now - self.cache_pinged_s >= HEARTBEAT_INTERVAL_S:
            self.cache_pinged_s = now
            try:
                self.cache_sock.send(protocol.encode(CacheMsgType.STATS, rid=0), zmq.NOBLOCK)
            except zmq.Again:
                pass
        silent_s = now - max(self.cache_heard_s, cs.started_s)
        if silent_s > WORKER_SILENCE_TIMEOUT_S and cs.kill_reason is None:
            cs.kill_reason = f"silent for {silent_s:.0f} s"
            log.error("the cache store has been silent for %.0f s; killing it", silent_s)
            cs.kill()

    def _stop_cachestore(self) -> None:
        """Last, after the workers: their shutdown saves must reach it. SIGTERM lets it spill RAM rows."""
        cs = self.cachestore
        if cs is None or cs.proc is None:
            return
        cs.terminate()
        try:
            cs.proc.wait(timeout=TERMINATE_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            cs.kill()
            cs.proc.wait()
        self._unwatch(cs)
        cs.close_fds()
        self.cachestore = None

    def _on_unload_model(self, client: bytes, msg: dict[str, Any]) -> None:
        entry = self._entry(msg["model"])
        entry.unload_waiters.append(Waiter(client, msg["id"]))
        if entry.state is ModelState.UNLOADING:
            return
        entry.state = ModelState.UNLOADING
        for rid in list(entry.queue.waiting):
            self._fail(rid, ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} was unloaded"))
        if entry.worker is None or not self._send_worker(entry, protocol.encode(MsgType.SHUTDOWN)):
            if entry.worker is not None:
                entry.worker.kill()
            else:
                self._forget(entry)

    def _on_queue_depth(self, client: bytes, msg: dict[str, Any]) -> None:
        model_id = msg.get("model")
        depth = self._entry(model_id).queue.depth if model_id else self.totals.depth
        self._reply(client, msg["id"], depth)

    def _on_call(self, client: bytes, msg: dict[str, Any]) -> None:
        entry = self._entry(msg["model"])
        if entry.state is not ModelState.READY:
            raise ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} is {entry.state.value}")
        rid = next(self._rids)
        payload = protocol.encode(MsgType.OP, rid=rid, op=msg["op"], args=msg.get("args") or {})
        if not self._send_worker(entry, payload):
            raise ErllamaError(ErrorCode.WORKER_CRASHED, f"the worker of {entry.model_id!r} is unreachable")
        self.calls[rid] = (Waiter(client, msg["id"]), entry.model_id)

    def _on_cached_prefix_len(self, client: bytes, msg: dict[str, Any]) -> None:
        """How many leading tokens of ``tokens`` the cache holds for this model: asked of the store
        directly with the fingerprint the worker reported, without a worker hop."""
        entry = self._entry(msg["model"])
        tokens = validate_prompt(msg["tokens"], MAX_TOKEN_ID)
        try:  # it came from a worker's ready message: trust nothing about it
            fp = bytes.fromhex(entry.info.get("fingerprint") or "")
        except (TypeError, ValueError):
            fp = b""
        if self.cache_sock is None or not fp or not isinstance(tokens, list):
            self._reply(client, msg["id"], 0)
            return
        rid = next(self._rids)
        # A recurrent, hybrid or sliding-window model can use only rows that are a prefix of the prompt.
        limits = {} if entry.info.get("memory", MemoryKind.TRANSFORMER) == MemoryKind.TRANSFORMER else {"max_overhang": 0}
        query = protocol.encode(CacheMsgType.PREFIX, rid=rid, fp=fp, tokens=struct.pack(f"<{len(tokens)}I", *tokens),
                                min_len=1, **limits)  # fmt: skip
        try:
            self.cache_sock.send(query, zmq.NOBLOCK)
        except zmq.Again:
            raise ErllamaError(ErrorCode.TIMEOUT, "the cache store is not accepting queries") from None
        self.cache_queries[rid] = (Waiter(client, msg["id"]), time.monotonic() + CACHE_QUERY_TIMEOUT_S)

    def _on_cache_reply(self, frames: list[bytes]) -> None:
        self.cache_heard_s = time.monotonic()
        try:
            msg = protocol.decode(frames[0])
        except ErllamaError:
            return
        query = self.cache_queries.pop(msg.get("rid"), None)  # type: ignore[arg-type]
        if query is None:
            return
        waiter = query[0]
        if msg["t"] == CacheMsgType.OK:
            hit = msg.get("hit")
            self._reply(waiter.client, waiter.client_id, int(hit["common_len"]) if isinstance(hit, dict) else 0)
        else:
            err = ErllamaError(str(msg.get("code", ErrorCode.INTERNAL)), str(msg.get("message", "")))
            self._reply_error(waiter.client, waiter.client_id, err)

    # --- dispatch and completion ---------------------------------------------------------------------------

    def _dispatch(self, entry: ModelEntry) -> None:
        while (rid := entry.queue.next_dispatchable()) is not None:
            req = self.requests[rid]
            queue_ms = (time.monotonic() - req.received_s) * 1000.0
            run = protocol.encode(MsgType.RUN, rid=rid, prompt=req.prompt, params=req.params, queue_ms=queue_ms)
            if not self._send_worker(entry, run):
                entry.queue.running.discard(rid)
                entry.queue.enqueue(rid, front=True)
                return
            req.dispatched = True

    def _finish(self, rid: int, payload: bytes, failed: bool = False) -> None:
        """Deliver a request's terminal event and forget it."""
        req = self.requests.pop(rid)
        self.by_client.pop((req.client, req.client_id), None)
        self.totals.depth -= 1
        if failed:
            self.totals.failed += 1
        else:
            self.totals.completed += 1
        self._send_client(req.client, payload, req.client_id)
        entry = self.models.get(req.model_id)
        if entry is not None:
            entry.queue.remove(rid)
            self._dispatch(entry)

    def _fail(self, rid: int, err: ErllamaError) -> None:
        req = self.requests.get(rid)
        if req is not None:
            self._finish(rid, protocol.error_reply("id", req.client_id, err), failed=True)

    # --- worker messages -----------------------------------------------------------------------------------

    def _on_worker_frames(self, frames: list[bytes]) -> None:
        try:
            self._on_worker_message(frames)
        except Exception:  # a bug of ours, or a peer we did not foresee: never the broker's death
            self.totals.bad_messages += 1
            log.exception("handling a worker message failed")

    def _on_worker_message(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            if len(frames) != 2:
                raise ErllamaError(ErrorCode.PROTOCOL_ERROR, "expected one frame")
            msg = protocol.decode(frames[1])
            t = protocol.validate(msg, WORKER_TYPES)
        except ErllamaError as err:
            self.totals.bad_messages += 1
            log.warning("bad worker message from %r: %s", identity, err.message)
            return
        if t is MsgType.HEARTBEAT:
            self._on_heartbeat(identity, msg)
            return
        entry = self.workers.get(identity)
        if entry is None:
            self._on_unknown_worker(identity, t, msg)
            return
        assert entry.worker is not None
        entry.worker.last_seen_s = time.monotonic()
        if t is MsgType.TOKEN:
            req = self._request_of(entry, msg["rid"])
            if req is not None:
                req.tokens_sent += len(msg["token_ids"])
                ok = self._send_client(
                    req.client, protocol.encode(
                        MsgType.TOKEN, id=req.client_id, text=msg["text"], token_ids=msg["token_ids"],
                        kind=msg.get("kind", "text"), ts_ns=msg.get("ts_ns"),
                    ), req.client_id,
                )  # fmt: skip
                if not ok:
                    self._send_worker(entry, protocol.encode(MsgType.CANCEL_RUN, rid=req.rid))
        elif t is MsgType.SPAN_END:
            req = self._request_of(entry, msg["rid"])
            if req is not None:
                self._send_client(req.client, protocol.encode(
                    MsgType.SPAN_END, id=req.client_id, kind=msg["kind"], data=msg["data"], signature=msg["signature"]),
                    req.client_id)  # fmt: skip
        elif t is MsgType.DONE:
            req = self._request_of(entry, msg["rid"])
            if req is not None:
                self._finish(req.rid, protocol.encode(MsgType.DONE, id=req.client_id, result=msg["result"]))
        elif t is MsgType.ERROR:
            self._on_worker_error(entry, msg)
        elif t is MsgType.OK:
            call = self.calls.get(msg["rid"])
            if call is not None and call[1] == entry.model_id:
                del self.calls[msg["rid"]]
                self._reply(call[0].client, call[0].client_id, msg["result"])
        elif t is MsgType.ADMITTED:
            entry.queue.last_cache_hit = {"kind": msg["cache_hit_kind"], "prefix_len": msg["prefix_len"]}
        elif t is MsgType.READY:
            log.warning("worker of %s sent a second ready; ignored", entry.model_id)

    def _on_heartbeat(self, identity: bytes, msg: dict[str, Any]) -> None:
        """Heartbeats come from each worker's heartbeat thread (and, on a phase change, from its main
        socket). Those from the heartbeat thread are answered with our instance id."""
        entry = self.models.get(msg["model"])
        wp = entry.worker if entry is not None else None
        if identity != (wp.identity if wp else None):
            try:
                self.back.send_multipart([identity, protocol.encode(MsgType.BROKER_HEARTBEAT, instance=self.instance)],
                                         zmq.NOBLOCK)  # type: ignore[union-attr]  # fmt: skip
            except zmq.ZMQError:
                pass
        if entry is None or wp is None or wp.pid != msg["pid"]:
            return
        now = time.monotonic()
        wp.last_seen_s = now
        if msg["progress"] != wp.progress or (msg["busy"] and not wp.busy):
            wp.progress_changed_s = now
        wp.progress = msg["progress"]
        wp.busy = msg["busy"]
        try:
            entry.queue.reported_phase = Phase(msg["phase"])
        except ValueError:
            pass
        if isinstance(msg.get("tokens_generated"), int):
            entry.queue.tokens_generated = msg["tokens_generated"]
        if isinstance(msg.get("cache"), dict):
            entry.cache_stats = msg["cache"]

    def _request_of(self, entry: ModelEntry, rid: int) -> Request | None:
        """The request ``rid`` if it belongs to this worker's model: a worker can never speak for
        another model's requests."""
        req = self.requests.get(rid)
        return req if req is not None and req.model_id == entry.model_id else None

    def _on_worker_error(self, entry: ModelEntry, msg: dict[str, Any]) -> None:
        detail = msg.get("detail")
        err = ErllamaError(msg["code"], msg["message"], detail if isinstance(detail, dict) else {})
        rid = msg["rid"]
        if self._request_of(entry, rid) is not None:
            self._fail(rid, err)
        elif rid in self.calls and self.calls[rid][1] == entry.model_id:
            waiter, _ = self.calls.pop(rid)
            self._reply_error(waiter.client, waiter.client_id, err)

    def _on_unknown_worker(self, identity: bytes, t: MsgType, msg: dict[str, Any]) -> None:
        """A worker we have not heard from: one we spawned reporting in, or an operator's."""
        if t is MsgType.ERROR and msg["rid"] is None:
            detail = msg.get("detail")
            if not isinstance(detail, dict):
                return
            entry = self.models.get(str(detail.get("model")))
            if entry is not None and entry.worker is not None and entry.worker.pid == detail.get("pid"):
                entry.last_error = {"code": msg["code"], "message": msg["message"]}
            return
        if t is not MsgType.READY:
            return
        model_id, pid = msg["model"], msg["pid"]
        entry = self.models.get(model_id)
        if entry is None:
            entry = ModelEntry(model_id, msg["info"].get("path"), msg["info"].get("options", {}),
                               ModelQueue(model_id, max_queue=protocol.DEFAULT_MAX_QUEUE), spawned=False)  # fmt: skip
            entry.worker = WorkerProcess(model_id, pid)
            self.models[model_id] = entry
            log.info("operator-started worker registered %s (pid %d)", model_id, pid)
        elif not entry.spawned and entry.state in (ModelState.FAILED, ModelState.RESTARTING):
            entry.worker = WorkerProcess(model_id, pid)
        elif entry.worker is None or entry.worker.pid != pid or entry.worker.identity is not None:
            err = ErllamaError(ErrorCode.ALREADY_LOADED, f"model {model_id!r} is already served")
            self.back.send_multipart([identity, protocol.error_reply("rid", None, err)])  # type: ignore[union-attr]
            return
        assert entry.worker is not None
        entry.worker.identity = identity
        self.workers[identity] = entry
        entry.info = msg["info"]
        entry.queue.slots = msg["slots"]
        entry.state = ModelState.READY
        entry.last_error = None
        entry.restart.reset()
        for w in entry.load_waiters:
            self._reply(w.client, w.client_id, entry.describe())
        entry.load_waiters.clear()
        log.info("model %s ready (pid %d, %d slots)", model_id, pid, msg["slots"])
        self._dispatch(entry)

    # --- worker processes ----------------------------------------------------------------------------------

    def _on_child_fd(self, fd: int) -> None:
        child = self.fds[fd]
        if fd == child.stderr_fd:
            if not child.read_stderr():
                self.poller.unregister(fd)
                del self.fds[fd]
        elif child is self.cachestore:
            self._cachestore_exited(child)
        else:
            assert isinstance(child, WorkerProcess)
            self._reap(child)

    def _reap(self, wp: WorkerProcess) -> None:
        """A worker process ended (or was declared dead): settle its requests and decide its future."""
        self._unwatch(wp)
        detail = wp.exit_detail()
        wp.close_fds()
        if wp.identity is not None:
            self.workers.pop(wp.identity, None)
        entry = self.models.get(wp.model_id)
        if entry is None or entry.worker is not wp:
            return
        entry.worker = None
        if entry.state is ModelState.UNLOADING or self.stopping:
            self._forget(entry)
            return
        detail["model"] = entry.model_id
        if entry.state is ModelState.LOADING:
            self._load_failed(entry, detail)
            return
        log.error("worker of %s died: %s", entry.model_id, {k: v for k, v in detail.items() if k != "stderr_tail"})
        self._worker_crashed(entry, detail)

    def _load_failed(self, entry: ModelEntry, detail: dict[str, Any]) -> None:
        reported = entry.last_error or {}
        code = reported.get("code", ErrorCode.LOAD_FAILED)
        message = reported.get("message") or f"the worker exited while loading: {detail.get('stderr_tail', '')[-500:]}"
        err = ErllamaError(code, message, detail)
        for w in entry.load_waiters:
            self._reply_error(w.client, w.client_id, err)
        entry.load_waiters.clear()
        for rid in list(entry.queue.waiting):
            self._fail(rid, err)
        del self.models[entry.model_id]
        log.error("loading %s failed: %s", entry.model_id, message)

    def _worker_crashed(self, entry: ModelEntry, detail: dict[str, Any]) -> None:
        err = ErllamaError(ErrorCode.WORKER_CRASHED, f"the worker of {entry.model_id!r} died", detail)
        for rid in sorted(entry.queue.running, reverse=True):
            req = self.requests[rid]
            req.crashes += 1
            entry.queue.running.discard(rid)
            if req.tokens_sent == 0 and req.crashes == 1:
                req.dispatched = False
                entry.queue.enqueue(rid, front=True)  # it may have been the victim, not the cause: once more
            else:
                poisoned = ErllamaError(err.code, err.message, detail | {"poison": req.crashes > 1})
                self._fail(rid, poisoned)
        for rid, (waiter, model_id) in list(self.calls.items()):
            if model_id == entry.model_id:
                del self.calls[rid]
                self._reply_error(waiter.client, waiter.client_id, err)
        entry.last_error = {"code": err.code, "message": err.message, "detail": detail}
        now = time.monotonic()
        if entry.spawned and entry.restart.record_crash(now):
            entry.state = ModelState.RESTARTING
            entry.restart_at_s = now + entry.restart.next_delay()
        else:
            entry.state = ModelState.FAILED
            failed = ErllamaError(ErrorCode.MODEL_FAILED, f"model {entry.model_id!r} failed", entry.last_error)
            for rid in list(entry.queue.waiting):
                self._fail(rid, failed)

    def _forget(self, entry: ModelEntry) -> None:
        for rid in list(entry.queue.running) + list(entry.queue.waiting):
            self._fail(rid, ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} was unloaded"))
        for w in entry.unload_waiters:
            self._reply(w.client, w.client_id, {"unloaded": entry.model_id})
        self.models.pop(entry.model_id, None)
        log.info("model %s unloaded", entry.model_id)

    def _timers(self, now: float) -> None:
        for rid, (waiter, deadline) in list(self.cache_queries.items()):
            if now > deadline:
                del self.cache_queries[rid]
                self._reply_error(waiter.client, waiter.client_id, ErllamaError(ErrorCode.TIMEOUT, "the cache store did not answer"))
        if (self.cachestore is None and self.cfg.cache.enabled and self.cfg.cache.external_endpoint is None
                and not self.stopping and now >= self.cachestore_restart_at_s):  # fmt: skip
            self._spawn_cachestore()
        elif self.cachestore is not None and now - self.cachestore.started_s > RESTART_BACKOFF_MAX_S:
            self.cachestore_restart.reset()  # it has stayed up: the next crash restarts it quickly again
        self._watch_cachestore(now)
        for entry in list(self.models.values()):
            wp = entry.worker
            if entry.state is ModelState.RESTARTING and wp is None and entry.spawned and now >= entry.restart_at_s:
                entry.restarts += 1
                self._spawn(entry)
            elif wp is not None and wp.identity is None and now - wp.started_s > MODEL_LOAD_TIMEOUT_S:
                entry.last_error = {"code": ErrorCode.TIMEOUT, "message": f"no ready within {MODEL_LOAD_TIMEOUT_S:.0f} s"}
                wp.kill()
            elif wp is not None and wp.identity is not None and wp.kill_reason is None:
                if now - wp.last_seen_s > WORKER_SILENCE_TIMEOUT_S:
                    wp.kill_reason = f"silent for {now - wp.last_seen_s:.0f} s"
                elif wp.busy and now - wp.progress_changed_s > entry.options.get("stall_timeout_s", WORKER_STALL_TIMEOUT_S):
                    wp.kill_reason = f"no decode progress for {now - wp.progress_changed_s:.0f} s (stuck in native code)"
                else:
                    continue
                log.error("worker of %s: %s; declaring it dead", entry.model_id, wp.kill_reason)
                if wp.spawned:
                    wp.kill()  # its pidfd fires next and _reap settles its requests
                else:
                    self._reap(wp)  # not our child: we cannot kill it, only stop using it


def _cancelled_result(req: Request) -> dict[str, Any]:
    """The result of a request cancelled before it reached a worker."""
    return {
        "reply": "",
        "generated": [],
        "context_tokens": [],
        "committed_tokens": 0,
        "finish_reason": "cancelled",
        "stop_sequence": None,
        "finish_key": None,
        "cache_hit_kind": None,
        "cache_delta": {"read": 0, "created": 0},
        "stats": {"prompt_tokens": 0, "completion_tokens": 0, "queue_ms": 0.0, "ttft_ms": 0.0,
                  "prefill_ms": 0.0, "generation_ms": 0.0},  # fmt: skip
    }
