"""The broker: one thread, one ``zmq.Poller`` loop over the client sockets, the worker socket, the cache
store socket, and every spawned child's pidfd and stderr pipe.

The work is split by job, each part an object with its own state (see the README's Development section):
``FrontEnd`` (client sockets, CURVE, replies), ``Requests`` (admission, dispatch, the terminal event,
re-queue after a crash), ``WorkerSide`` (registration, heartbeats, calls, the relay of events),
``Models`` (load, unload, what a worker's death means for its model), ``Supervisor`` (restarts and
liveness timers) and ``CacheQueries``; with ``--hosts``, ``HostSide`` (the hosts that join, their
liveness) and ``Placement`` (what a host's life means for the models placed on it). The broker's own
machine is supervised as every host's is: an in-process ``MachineSupervisor`` (``host/supervise.py``)
spawns, watches and reaps its workers and cache store. ``Broker`` owns the loop and wires the parts to
each other.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from erllama import protocol
from erllama.broker.cachequery import MAX_TOKEN_ID, CacheQueries
from erllama.broker.config import BrokerConfig
from erllama.broker.front import FrontEnd
from erllama.broker.hosts import HostSide
from erllama.broker.hosttable import OwnMachine, host_rows
from erllama.broker.kvindex import KvIndex
from erllama.broker.lifecycle import Requests
from erllama.broker.models import Models
from erllama.broker.placement import Placement
from erllama.broker.pressure import PressureWatcher
from erllama.broker.queues import QueueTotals
from erllama.broker.registry import ModelEntry
from erllama.broker.supervisor import Supervisor
from erllama.broker.workers import WorkerSide
from erllama.curve import HOSTS_ZAP_DOMAIN, CurveServer
from erllama.host.supervise import MachineSupervisor
from erllama.options import validate_prompt
from erllama.processes import TERMINATE_GRACE_S
from erllama.protocol import (
    HEARTBEAT_INTERVAL_S,
    CachedPrefixLen,
    Call,
    Cancel,
    ErllamaError,
    ErrorCode,
    Infer,
    ListHosts,
    ListModels,
    LoadModel,
    ModelInfo,
    Ping,
    QueueDepth,
    Shutdown,
    UnloadModel,
    VramInfo,
)
from erllama.resources import vram_info
from erllama.transport import BROKER_LOCK_NAME, InstanceLock, ensure_private_dir, make_socket

log = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100
DRAIN_BATCH = 1000  # messages taken from one socket per wake, so a flood on one cannot starve the others
STORE_ANSWERED_S = 3 * HEARTBEAT_INTERVAL_S  # the store answered a ping this recently: it is up


class Broker:
    def __init__(self, cfg: BrokerConfig):
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.lock = InstanceLock(cfg.runtime_dir / BROKER_LOCK_NAME)
        self.stopping = False
        self.totals = QueueTotals()
        self.table: dict[str, ModelEntry] = {}
        rids = itertools.count(1)  # the broker's ids for requests, calls and cache queries alike
        self.curve: CurveServer | None = None
        if cfg.curve is not None:
            c = cfg.curve
            self.curve = CurveServer(self.ctx, c.server_key_file, c.clients_dir, c.hosts_dir)
        self.front = FrontEnd(self.ctx, cfg, self.totals, self.curve)
        self.requests = Requests(
            self.table, self.front, self.totals, lambda r, m: self.workers.send(r, m), rids
        )
        self.router = self.requests.router
        # with a shared tier (the hosts are given the same URL), any replica can restore any host's rows
        self.router.shared_tier = bool(cfg.cache.shared_url)
        self.router.here = cfg.name
        instance = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.workers = WorkerSide(self.ctx, self.table, self.requests, self.front, self.totals, instance)
        self.machine = MachineSupervisor(cfg.machine, self.poller)  # this machine's workers and store
        self.own = OwnMachine(cfg.name)  # and this machine as a host, in list_hosts
        self.supervisor = Supervisor(self.machine, self.table)
        self.models = Models(
            cfg, self.table, self.front, self.requests, self.workers, self.supervisor, self.totals, rids
        )
        self.kv_index = KvIndex()  # which store holds which prefix blocks, from their KV events
        self.router.index = self.kv_index
        self.cache: CacheQueries | None = None
        if cfg.cachestore_endpoint:
            self.cache = CacheQueries(self.ctx, cfg.cachestore_endpoint, self.front, rids)
            self.cache.on_kv_events = self.kv_index.apply
        self.pressure: PressureWatcher | None = None
        self.hosts: HostSide | None = None
        self.placement: Placement | None = None
        if cfg.hosts and cfg.host_workers and self.curve is not None:
            self.hosts = HostSide(
                self.ctx, self.curve, cfg.hosts, cfg.host_workers, self.totals, instance, cfg.name
            )
            self.supervisor.hosts = self.hosts
            self.hosts.on_kv_events = lambda host, batch: self.kv_index.apply(host.name, batch)
            self.hosts.on_kv_lost = lambda host: self.kv_index.drop(host.name)
            self.placement = Placement(
                self.table, self.hosts, self.models, self.requests, self.workers, self.supervisor
            )
            # the workers hosts spawn reach the worker side over tcp, authenticated with their host's key
            tcp_workers = make_socket(self.ctx, zmq.ROUTER, protocol.MAX_WORKER_FRAME_BYTES)
            self.workers.sockets.append(self.curve.secure(tcp_workers, HOSTS_ZAP_DOMAIN))
        self.workers.on_ready = self.models.ready
        self.supervisor.on_worker_exit = self.models.worker_exited
        self.front.handlers = {
            Infer: self.requests.admit,
            Cancel: lambda c, m: self.front.reply(
                c, m.id, {"cancelled": self.requests.cancel_for(c, m.target)}
            ),
            LoadModel: self.models.load,
            UnloadModel: self.models.unload,
            ListModels: lambda c, m: self.front.reply(
                c, m.id, [e.describe(cfg.name) for e in self.table.values()]
            ),
            ModelInfo: lambda c, m: self.front.reply(c, m.id, self.models.entry(m.model).describe(cfg.name)),
            QueueDepth: self.models.queue_depth,
            Call: self.models.call,
            CachedPrefixLen: self._cached_prefix_len,
            Ping: lambda c, m: self.front.reply(c, m.id, self._ping()),
            ListHosts: lambda c, m: self.front.reply(c, m.id, self._list_hosts()),
            VramInfo: lambda c, m: self.front.reply(c, m.id, vram_info()),
        }

    def _cached_prefix_len(self, client: bytes, msg: CachedPrefixLen) -> None:
        entry = self.models.entry(msg.model)
        tokens = validate_prompt(msg.tokens, MAX_TOKEN_ID)
        if self.cache is None or not isinstance(tokens, list):
            self.front.reply(client, msg.id, 0)
        else:
            self.cache.cached_prefix_len(client, msg.id, tokens, entry)

    def _list_hosts(self) -> list[dict[str, Any]]:
        """This machine first (always up; its store up if it answered the last heartbeat's ping), then
        the hosts that joined."""
        store_up = self.cache is None or (
            self.machine.cachestore is not None and time.monotonic() - self.cache.heard_s < STORE_ANSWERED_S
        )
        own = self.own.entry(self.machine.host_workers(), store_up, self.cache.stats if self.cache else None)
        return host_rows([own, *(self.hosts.hosts.values() if self.hosts else ())], self.table)

    def _ping(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "models": len(self.table),
            "pressure": self.pressure.status() if self.pressure else None,
            "hosts": len(self.hosts.hosts) if self.hosts else 0,
            "routing": dict(self.router.decisions),
            "kv_index": self.kv_index.describe(),
            # joins refused at the handshake: an unknown key (ZAP), or no CURVE at all (a monitor)
            "hosts_refused": (self.hosts.refused + self.curve.hosts.refused)
            if self.hosts and self.curve
            else 0,
        }

    # --- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        ensure_private_dir(self.cfg.runtime_dir)
        self.lock.acquire()
        self.front.bind()
        self.workers.sock.bind(self.cfg.worker_endpoint)
        if self.hosts is not None and self.cfg.host_workers:
            self.hosts.bind()
            self.workers.sockets[1].bind(self.cfg.host_workers)
            self.poller.register(self.hosts.sock, zmq.POLLIN)
        for sock in self.front.sockets + self.workers.sockets:
            self.poller.register(sock, zmq.POLLIN)
        self.machine.start()
        if self.cache is not None:
            self.poller.register(self.cache.sock, zmq.POLLIN)
            if self.cfg.pressure.enabled:
                self.pressure = PressureWatcher(self.cfg.pressure, self.cache.evict_bytes)
                self.pressure.start()
        for spec in self.cfg.models:
            self.models.create(spec.model_id, spec.path, spec.options, None, list(spec.places))

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        while not self.stopping:
            self._poll_once(POLL_INTERVAL_MS)
        self._shutdown()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        self._stop()

    def _stop(self) -> None:
        self.stopping = self.requests.stopping = self.machine.stopping = True

    def _poll_once(self, timeout_ms: int) -> None:
        for item, _ in self.poller.poll(timeout_ms):
            if item in self.front.sockets:
                self._drain(item, functools.partial(self.front.on_frames, self.front.sockets.index(item)))
            elif item in self.workers.sockets:
                self._drain(item, functools.partial(self.workers.on_frames, sock=item))
            elif self.hosts is not None and item is self.hosts.sock:
                self.hosts.drain(DRAIN_BATCH)
            elif self.cache is not None and item is self.cache.sock:
                self._drain(self.cache.sock, self.cache.on_frames)
            elif isinstance(item, int) and item in self.machine.fds:
                self.machine.on_fd(item)
        now = time.monotonic()
        if self.cache is not None:
            self.cache.timers(now)
            self.cache.poll_kv_events(now)
        self.supervisor.cachestore_timers(now, self.cache)
        self.supervisor.timers(now)
        self.requests.recheck(now)
        if self.hosts is not None and self.placement is not None:
            self.hosts.timers(now)
            self.placement.drain_timers()

    @staticmethod
    def _drain(sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    def _shutdown(self) -> None:
        """Stop every worker (they finish with ``cancelled``), relay their last events, then close."""
        shutting_down = ErllamaError(ErrorCode.SHUTTING_DOWN, "the broker is shutting down")
        for entry in self.table.values():
            self.requests.fail_waiting(entry, shutting_down)
            self.models.refuse_held_calls(entry, shutting_down)
            for replica in entry.replicas:
                self.workers.send(replica, Shutdown())
        deadline = time.monotonic() + TERMINATE_GRACE_S
        while (
            any(r.worker for e in self.table.values() if e.spawned for r in e.replicas)
            and time.monotonic() < deadline
        ):
            self._poll_once(50)
        self.supervisor.kill_all()
        for rid in list(self.requests.table):
            self.requests.fail(rid, shutting_down)
        if self.pressure is not None:
            self.pressure.stop()
        self.machine.stop_cachestore()
        self.front.close()
        for sock in self.workers.sockets:
            sock.close(linger=500)
        if self.hosts is not None:
            self.hosts.close()
        if self.curve is not None:
            self.curve.stop()
        if self.cache is not None:
            self.cache.close()
        self.ctx.term()
        for ep in (self.cfg.endpoint, self.cfg.worker_endpoint):
            if ep.startswith("ipc://"):
                Path(ep[len("ipc://") :]).unlink(missing_ok=True)
        self.lock.release()
        log.info("broker stopped")
