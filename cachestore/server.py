"""The daemon: one ZeroMQ ROUTER loop that answers every request from memory, plus a small pool of
I/O threads for everything that touches row bytes (their results come back through a wake pipe).

Every request is one msgpack map (a typed message of ``erllama.protocol.cache``), optionally followed by one raw
frame (an inline payload on ``c.commit``); every request gets exactly one reply. A malformed,
oversized or unknown message gets a typed ``err`` (when it has a return address) and is counted.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import select
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import zmq

from erllama.cachestore.codec import encode_usage
from erllama.cachestore.config import (
    SHUTDOWN_SPILL_BUDGET_S,
    SWEEP_INTERVAL_S,
    USAGE_FLUSH_INTERVAL_S,
    StoreConfig,
)
from erllama.cachestore.publish import Publisher
from erllama.cachestore.shared import SharedTier
from erllama.cachestore.storage import Storage
from erllama.cachestore.store import Store
from erllama.cachestore.tiers import TIER_ORDER, eviction_order
from erllama.logsetup import about_request
from erllama.protocol import (
    MAX_CACHE_CONTROL_BYTES,
    MAX_CACHE_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    Ack,
    CacheAbort,
    CacheBye,
    CacheCommit,
    CacheEvict,
    CacheExact,
    CacheKvEvents,
    CacheLoad,
    CachePrefix,
    CacheRelease,
    CacheReply,
    CacheRequest,
    CacheReserve,
    CacheStats,
    CacheTier,
    ErllamaError,
    ErrorCode,
    EvictReply,
    KvEventsReply,
    StatsReply,
    WireError,
    cache_request_decoder,
    encode,
    error_of,
)
from erllama.transport import InstanceLock, ensure_private_dir, make_socket

log = logging.getLogger(__name__)

IO_THREADS: Final = 2
MAX_MESSAGES_PER_WAKE: Final = 256  # keep I/O completions flowing under a flood of requests
LOCK_NAME: Final = ".lock"


@dataclass(slots=True)
class _Reply:
    server: CacheServer
    ident: bytes
    rid: int | None
    req: int | None = None  # the broker's request this serves, if the caller said

    def ok(self, reply: CacheReply, frame: Any = None) -> None:
        if self.req is not None:
            with about_request(self.req):
                log.debug("answered: %s", type(reply).__name__)
        self.server.send(self.ident, encode(msgspec.structs.replace(reply, rid=self.rid)), frame)

    def error(self, err: ErllamaError) -> None:
        if self.req is not None:
            with about_request(self.req):
                log.info("request failed: %s", err)
        self.server.send(self.ident, encode(error_of(err, self.rid)))


class CacheServer:
    """``erllama-cachestore``: construct, then ``run()`` until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, config: StoreConfig, ram_row_limit: int | None = None):
        self.config = config
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="cachestore-io")
        self._done: queue.SimpleQueue[tuple[Future[Any], Callable[[Future[Any]], None]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending = 0
        self._stopping = False
        self.storage = Storage(config.shm_dir, config.disk_dir)
        self.store = Store(config, self.storage, self.submit, ram_row_limit)
        self.publisher = Publisher(self.store)
        self.shared: SharedTier | None = None
        self._shared_pools: list[ThreadPoolExecutor] = []
        if config.shared_url:
            # One thread for lookups, one for writes: an upload never holds a lookup back.
            get = ThreadPoolExecutor(1, thread_name_prefix="cachestore-shared-get")
            put = ThreadPoolExecutor(1, thread_name_prefix="cachestore-shared-put")
            self._shared_pools = [get, put]
            self.shared = SharedTier(
                config.shared_url,
                self.store,
                self.storage,
                self.submit,
                functools.partial(self.submit_on, get),
                functools.partial(self.submit_on, put),
            )
            self.store.shared = self.shared
            self.publisher.on_stored = self.shared.row_stored
            self.shared.busy_key = self.publisher.by_key.__contains__
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._locks: list[InstanceLock] = []
        self._started = time.monotonic()
        self._decoder = cache_request_decoder()
        self._handlers: dict[type[CacheRequest], Callable[[_Reply, Any, memoryview | None], None]] = {
            CacheExact: lambda r, m, _: self.store.exact(r, m.key),
            CachePrefix: lambda r, m, _: self.store.prefix(
                r, m.fp, m.tokens, m.min_len, m.max_len, m.max_overhang, m.load_pid
            ),
            CacheLoad: lambda r, m, _: self.store.load(r, m.key, m.pid, m.inline),
            CacheRelease: lambda r, m, _: self.store.release(r, m.lease, m.bad),
            CacheReserve: lambda r, m, _: self.publisher.reserve(
                r, m.fp, m.tokens, m.payload_len, m.reason, m.pid, m.tier
            ),
            CacheCommit: lambda r, m, p: self.publisher.commit(r, m.res, m.crc, p),
            CacheAbort: lambda r, m, _: self.publisher.abort(r, m.res),
            CacheStats: lambda r, m, _: r.ok(StatsReply(stats=self.stats())),
            CacheEvict: self._evict,
            CacheBye: self._bye,
            CacheKvEvents: lambda r, m, _: r.ok(
                KvEventsReply(batch=self.store.events.batch(m, self.store.index.rows.values()))
            ),
        }

    # --- background work ---------------------------------------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], on_done: Callable[[Future[Any]], None], *args: Any, **kw: Any
    ) -> None:
        """Run ``fn`` on an I/O thread; ``on_done(future)`` then runs on the loop thread."""
        self.submit_on(self._pool, fn, on_done, *args, **kw)

    def submit_on(
        self,
        pool: ThreadPoolExecutor,
        fn: Callable[..., Any],
        on_done: Callable[[Future[Any]], None],
        *args: Any,
        **kw: Any,
    ) -> None:
        """``submit`` on another pool (the shared tier's threads)."""
        self._pending += 1
        fut = pool.submit(fn, *args, **kw)
        fut.add_done_callback(lambda f: self._complete(f, on_done))

    def _complete(self, fut: Future[Any], on_done: Callable[[Future[Any]], None]) -> None:
        self._done.put((fut, on_done))
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is waking anyway

    def _run_completions(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fut, on_done = self._done.get_nowait()
            except queue.Empty:
                return
            self._pending -= 1
            try:
                on_done(fut)
            except Exception:  # a bug in one completion must not stop the store
                log.exception("completion handler failed")

    # --- messages ----------------------------------------------------------------------------------------

    def send(self, ident: bytes, ctrl: bytes, frame: Any = None) -> None:
        if self._sock is None:  # shutting down: work finishing now has nobody to answer
            return
        parts = [ident, ctrl] if frame is None else [ident, ctrl, frame]
        try:
            # Never block the loop on one client that stopped reading (its queue is full).
            self._sock.send_multipart(parts, zmq.NOBLOCK, copy=frame is None)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: it went away (its leases die with it); EAGAIN: stuck
            log.debug("reply dropped: %s", exc)

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        reply = _Reply(self, ident, None)
        try:
            if len(frames) not in (2, 3):
                raise ErllamaError(
                    ErrorCode.PROTOCOL_ERROR, "a request is one map and at most one payload frame"
                )
            if len(frames[1]) > MAX_CACHE_CONTROL_BYTES:
                raise ErllamaError(
                    ErrorCode.PROTOCOL_ERROR, f"control frame over {MAX_CACHE_CONTROL_BYTES} bytes"
                )
            try:
                msg = self._decoder.decode(frames[1].buffer)
            except WireError as err:
                reply.rid = err.field("rid", int)
                raise
            reply.rid, reply.req = msg.rid, msg.req
            payload = frames[2].buffer if len(frames) == 3 else None
            if (payload is not None) != (isinstance(msg, CacheCommit) and msg.inline):
                raise ErllamaError(
                    ErrorCode.PROTOCOL_ERROR, "a payload frame goes with an inline commit only"
                )
            with about_request(msg.req):
                if msg.req is not None:
                    log.debug("received %s", type(msg).__name__)
                self._handlers[type(msg)](reply, msg, payload)
        except ErllamaError as err:
            if err.code == ErrorCode.PROTOCOL_ERROR:
                self.store.counters.bad_messages += 1
                log.info("bad message: %s", err.message)
            reply.error(err)
        except Exception:  # one request's bug must not take the store down
            log.exception("request failed")
            reply.error(ErllamaError(ErrorCode.INTERNAL, "internal error in the cache store"))

    def _evict(self, reply: _Reply, msg: CacheEvict, _: memoryview | None) -> None:
        try:
            tiers = [CacheTier(t) for t in msg.tiers]
            if CacheTier.SHARED in tiers:
                raise ValueError("the shared tier evicts by itself")
        except ValueError:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, "tiers must be a list of ram, shm, disk") from None
        if msg.nbytes < 0:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, "bytes must be >= 0")
        rows, freed = self.store.evict_bytes(msg.nbytes, tiers)
        reply.ok(EvictReply(rows=rows, nbytes=freed))

    def _bye(self, reply: _Reply, msg: CacheBye, _: memoryview | None) -> None:
        self.store.drop_client(reply.ident)
        self.publisher.drop_client(reply.ident)
        reply.ok(Ack())

    def stats(self) -> dict[str, Any]:
        snap = self.store.snapshot()
        snap.update(
            pid=os.getpid(),
            endpoint=self.config.endpoint,
            uptime_s=round(time.monotonic() - self._started, 3),
            reservations=len(self.publisher.by_id),
            min_prefix_tokens=self.config.min_prefix_tokens,
            pending_io=self._pending,
            protocol=PROTOCOL_VERSION,
            shared=self.shared.snapshot() if self.shared is not None else {"enabled": False},
            kv_events={"publisher": self.store.events.publisher, "seq": self.store.events.seq},
        )
        return snap

    # --- life cycle --------------------------------------------------------------------------------------

    def _lock(self, directory: Path, name: str = LOCK_NAME) -> None:
        lock = InstanceLock(directory / name)
        lock.acquire()
        self._locks.append(lock)

    def start(self) -> None:
        """Lock the directories and the endpoint, rebuild the index, bind."""
        ensure_private_dir(self.config.disk_dir)
        self._lock(self.config.disk_dir)
        try:
            ensure_private_dir(self.config.shm_dir)
            self._lock(self.config.shm_dir)
        except OSError as exc:
            log.warning("shm tier off: %s is unusable (%s)", self.config.shm_dir, exc)
            self.storage.dirs.pop(CacheTier.SHM, None)
        if self.config.endpoint.startswith("ipc://"):
            sock_path = Path(self.config.endpoint[len("ipc://") :])
            ensure_private_dir(sock_path.parent)
            self._lock(sock_path.parent, sock_path.name + ".lock")
        self.store.restore()
        self._run_completions()
        if self.shared is not None:
            self.shared.start()
        self._sock = make_socket(self._ctx, zmq.ROUTER, MAX_CACHE_PAYLOAD_BYTES)
        self._sock.bind(self.config.endpoint)
        log.info(
            "cache store serving on %s (pid %d): %s",
            self.config.endpoint,
            os.getpid(),
            {t.value: self.store.tiers[t].snapshot() for t in TIER_ORDER},
        )

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stopping = True
        self._poke()

    def run(self) -> int:
        self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        assert self._sock is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        next_flush = time.monotonic() + USAGE_FLUSH_INTERVAL_S
        while not self._stopping:
            wake_at = next_sweep
            if self.shared is not None:
                wake_at = min(wake_at, self.shared.next_deadline() or wake_at)
            timeout_ms = max(0, math.ceil((wake_at - time.monotonic()) * 1000))
            ready = dict(poller.poll(timeout_ms))
            if self._sock in ready:
                for _ in range(MAX_MESSAGES_PER_WAKE):
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_message(frames)
            if self._wake_r in ready or not self._done.empty():
                self._run_completions()
            now = time.monotonic()
            if self.shared is not None:
                self.shared.expire(now)
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL_S
                self.publisher.expire(now)
                self.store.reap_leases(now)
                self.store.procs.forget(self.store.holders() | self.publisher.holders())
            if now >= next_flush:
                next_flush = now + USAGE_FLUSH_INTERVAL_S
                self.store.flush_usage()
        self.shutdown()
        return 0

    def _drain(self, deadline: float) -> None:
        while self._pending and time.monotonic() < deadline:
            select.select([self._wake_r], [], [], 0.1)
            self._run_completions()

    def shutdown(self) -> None:
        """Clean exit: finish background work, spill RAM rows into free shm/disk room (never evicting
        anything for them), write hit counts back, release the locks."""
        log.info("cache store shutting down")
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self.publisher.abort_all()
        deadline = time.monotonic() + SHUTDOWN_SPILL_BUDGET_S
        self._drain(deadline)
        self._spill_ram(deadline)
        self.store.flush_usage(wait=True)
        self._pool.shutdown(wait=True)
        for pool in self._shared_pools:  # writes still queued are dropped: the rows stay local
            pool.shutdown(wait=True, cancel_futures=True)
        if self.shared is not None:
            self.shared.close()
        self._ctx.term()
        if self.config.endpoint.startswith("ipc://"):  # we hold its lock: the socket file is ours
            Path(self.config.endpoint[len("ipc://") :]).unlink(missing_ok=True)
        for lock in self._locks:
            lock.release()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _spill_ram(self, deadline: float) -> None:
        store, spilled = self.store, 0
        for entry in reversed(eviction_order(store.index, CacheTier.RAM, time.time_ns())):  # hottest first
            if time.monotonic() >= deadline:
                break
            # Disk first: it also survives a reboot, and the page cache keeps it fast after a restart.
            dest = next(
                (t for t in (CacheTier.DISK, CacheTier.SHM) if store.tiers[t].free() >= entry.size), None
            )
            if dest is None:
                continue
            try:
                usage = encode_usage(entry.hits, entry.last_used_ns)
                store.storage.copy_row(
                    store.location(entry), dest, entry.key, entry.size, usage, "spill", verify=False
                )
            except (OSError, ErllamaError) as exc:
                log.warning("could not keep RAM row %s: %s", entry.key.hex()[:16], exc)
                continue
            store.tiers[dest].add_row(entry.size)
            spilled += 1
        if spilled:
            log.info("kept %d RAM rows by writing them to shm/disk", spilled)
