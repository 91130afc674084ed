"""The broker's host side: the CURVE tcp socket ``erllama-host`` processes join through, the host table,
placing a model's worker on a host, and the liveness of hosts.

``HostSide`` decides nothing about models or requests: it reports what happens to a host through
callbacks (``on_up``, ``on_draining``, ``on_lost``) and what happens to a worker a host runs
(``on_worker_exited``), and ``Models`` settles the rest, as it does for a worker on this machine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from typing import Any

import psutil
import zmq
from zmq.utils.monitor import parse_monitor_message

from erllama import protocol
from erllama.broker.hosttable import HostEntry
from erllama.broker.queues import QueueTotals
from erllama.broker.registry import ModelEntry, Replica
from erllama.curve import HOSTS_ZAP_DOMAIN, CurveServer
from erllama.protocol import (
    HOST_SILENCE_TIMEOUT_S,
    ErllamaError,
    ErrorCode,
    HostBeat,
    HostDrain,
    HostJoin,
    HostKvResync,
    HostLeave,
    HostMessage,
    HostState,
    HostWelcome,
    KvEventBatch,
    Message,
    SpawnWorker,
    StopWorker,
    WorkerExited,
    WorkerSpawned,
    encode,
    error_of,
)
from erllama.transport import make_socket

log = logging.getLogger(__name__)

# A peer that fails the handshake never reaches ZAP when it speaks no CURVE at all: only a monitor sees it.
HANDSHAKE_FAILED_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


class HostSide:
    """Owns the host socket and ``hosts`` (name -> entry)."""

    def __init__(
        self,
        ctx: zmq.Context,
        curve: CurveServer,
        endpoint: str,
        worker_endpoint: str,
        totals: QueueTotals,
        instance: str,
        here: str,
    ):
        self.endpoint = endpoint
        self.here = here  # the broker's own machine's name: no host may join under it
        self.worker_port = port_of(worker_endpoint)
        self.totals = totals
        self.instance = instance
        self.sock = curve.secure(
            make_socket(ctx, zmq.ROUTER, protocol.MAX_CACHE_CONTROL_BYTES), HOSTS_ZAP_DOMAIN
        )
        self.monitor = self.sock.get_monitor_socket(HANDSHAKE_FAILED_EVENTS)
        self.refused = 0  # handshakes that failed (no CURVE, a wrong server key); unknown keys: curve.py
        self.hosts: dict[str, HostEntry] = {}
        self.on_up: Callable[[HostEntry], None] = lambda host: None
        self.on_draining: Callable[[HostEntry], None] = lambda host: None
        self.on_lost: Callable[[HostEntry, dict[str, Any]], None] = lambda host, detail: None
        self.on_worker_spawned: Callable[[HostEntry, WorkerSpawned], None] = lambda host, msg: None
        self.on_worker_exited: Callable[[HostEntry, WorkerExited], None] = lambda host, msg: None
        # A beat's KV events for the routing index (``KvIndex.apply``): False means a gap, and the host
        # is asked to send a snapshot (``resync``). ``on_kv_lost``: forget a dead or departed host's.
        self.on_kv_events: Callable[[HostEntry, KvEventBatch], bool] = lambda host, batch: True
        self.on_kv_lost: Callable[[HostEntry], None] = lambda host: None
        self._decoder = protocol.host_message_decoder()

    def bind(self) -> None:
        self.sock.bind(self.endpoint)
        log.info("hosts: %s (CURVE), their workers: port %d", self.endpoint, self.worker_port)

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=500)

    # --- placing workers -----------------------------------------------------------------------------------

    def up(self, name: str) -> HostEntry | None:
        host = self.hosts.get(name)
        return host if host is not None and host.state is HostState.UP else None

    def machines(self, taken: Collection[str | None] = ()) -> list[str | None]:
        """Where a replica placed by count may go, the most free memory first: the hosts that are up and
        the broker's own machine (None), less ``taken``."""
        free: list[tuple[int, str | None]] = [
            (h.resources.memory_available_bytes, h.name) for h in self.hosts.values() if self.up(h.name)
        ]
        free.append((psutil.virtual_memory().available, None))
        free.sort(key=lambda m: -m[0])
        return [name for _, name in free if name not in taken]

    def spawn(self, entry: ModelEntry, replica: Replica) -> bool:
        """Ask the replica's host to start its worker; False if the host is not up to take it."""
        host = self.up(replica.host or "")
        if host is None:
            return False
        spawn = SpawnWorker(
            model=entry.model_id, path=entry.path, options=entry.options, replica=replica.index
        )
        return self._send(host, spawn)

    def stop(self, name: str, model_id: str, pid: int) -> None:
        """SIGKILL a worker on its host (one the broker gave up on); its exit is reported as usual."""
        host = self.hosts.get(name)
        if host is not None and host.live:
            self._send(host, StopWorker(model=model_id, pid=pid))

    def resync(self, host: HostEntry) -> None:
        """Ask ``host`` to read its cache store's KV events from a snapshot again."""
        if host.live:
            self._send(host, HostKvResync(name=host.name))

    def _send(self, host: HostEntry, msg: Message) -> bool:
        return self._send_to(host.identity, msg)

    def _send_to(self, identity: bytes, msg: Message) -> bool:
        try:
            self.sock.send_multipart([identity, encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.warning("cannot reach host %r: %s", identity, exc)
            return False

    # --- receiving -----------------------------------------------------------------------------------------

    def drain(self, batch: int) -> None:
        """Up to ``batch`` messages; each frame carries its sender's address, shown in ``list_hosts``."""
        for _ in range(batch):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                address: str | None = str(frames[-1].get("Peer-Address"))
            except zmq.ZMQError:
                address = None
            self.on_frames([f.bytes for f in frames], address)

    def on_frames(self, frames: list[bytes], address: str | None = None) -> None:
        try:
            self._on_message(frames, address)
        except Exception:  # a bug of ours, or a peer we did not foresee: never the broker's death
            self.totals.bad_messages += 1
            log.exception("handling a host message failed")

    def _on_message(self, frames: list[bytes], address: str | None) -> None:
        identity = frames[0]
        try:
            if len(frames) != 2:
                raise ErllamaError(ErrorCode.PROTOCOL_ERROR, "expected one frame")
            msg: HostMessage = self._decoder.decode(frames[1])
        except ErllamaError as err:
            self.totals.bad_messages += 1
            log.warning("bad host message from %r: %s", identity, err.message)
            return
        if isinstance(msg, HostJoin):
            self._join(identity, msg, address)
            return
        host = next((h for h in self.hosts.values() if h.identity == identity), None)
        if host is None or not host.live:
            # Declared dead (a partition that healed) or from before a broker restart: join again.
            unknown = ErllamaError(ErrorCode.HOST_DOWN, "unknown host: join again")
            self._send_to(identity, error_of(unknown, None))
            return
        host.last_seen_s = time.monotonic()
        if isinstance(msg, HostBeat):
            self._beat(host, msg)
        elif isinstance(msg, WorkerSpawned):
            self.on_worker_spawned(host, msg)
        elif isinstance(msg, WorkerExited):
            self.on_worker_exited(host, msg)
        elif isinstance(msg, HostDrain):
            if host.state is not HostState.DRAINING:
                log.info("host %s drains", host.name)
                host.state = HostState.DRAINING
                self.on_draining(host)
        elif isinstance(msg, HostLeave):
            log.info("host %s left", host.name)
            self._lose(host, HostState.LEFT, {"host": host.name, "reason": "left"})

    def _join(self, identity: bytes, msg: HostJoin, address: str | None) -> None:
        old = self.hosts.get(msg.name)
        if msg.name == self.here or (old is not None and old.live and old.identity != identity):
            pid = os.getpid() if old is None else old.pid
            err = ErllamaError(
                ErrorCode.HOST_REFUSED, f"a host named {msg.name!r} is already joined", {"pid": pid}
            )
            log.warning("refused host %s (pid %d): %s", msg.name, msg.pid, err.message)
            self._send_to(identity, error_of(err, None))
            return
        if old is not None and old.live:  # the same process joining again: it lost us; start afresh
            self._lose(old, HostState.DEAD, {"host": old.name, "reason": "joined again"})
        host = HostEntry(msg.name, identity, msg.pid, msg.resources, address)
        if old is not None:
            host.joins = old.joins + 1
        self.hosts[msg.name] = host
        log.info("host %s joined from %s (pid %d, %d cores)", msg.name, address, msg.pid, msg.resources.cores)
        self._send(host, HostWelcome(instance=self.instance, worker_port=self.worker_port))

    def _beat(self, host: HostEntry, msg: HostBeat) -> None:
        host.resources = msg.resources
        host.workers = msg.workers
        host.cachestore_up = msg.cachestore_up
        if msg.kv is not None and not self.on_kv_events(host, msg.kv):
            self.resync(host)
        if host.state is HostState.JOINING and msg.cachestore_up:
            host.state = HostState.UP
            log.info("host %s is up", host.name)
            self.on_up(host)

    # --- liveness ------------------------------------------------------------------------------------------

    def timers(self, now: float) -> None:
        """A live host silent for ``HOST_SILENCE_TIMEOUT_S`` is dead (gone, or cut off by the network)."""
        self._refusals()
        for host in list(self.hosts.values()):
            silent_s = now - host.last_seen_s
            if host.live and silent_s > HOST_SILENCE_TIMEOUT_S:
                log.error("host %s silent for %.1f s: declaring it dead", host.name, silent_s)
                self._lose(
                    host, HostState.DEAD, {"host": host.name, "reason": f"silent for {silent_s:.1f} s"}
                )

    def _refusals(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.refused += 1
            log.warning(
                "refused a host connection on %s: the handshake failed (%s: a host without CURVE, or with "
                "another server key)",
                self.endpoint,
                zmq.Event(event["event"]).name,
            )

    def _lose(self, host: HostEntry, state: HostState, detail: dict[str, Any]) -> None:
        host.state = state
        host.workers = []
        host.last_error = {"code": ErrorCode.HOST_DOWN.value, "detail": detail}
        self.on_kv_lost(host)
        self.on_lost(host, detail)
