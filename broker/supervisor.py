"""Supervision: spawning workers and the cache store, watching their pidfds and stderr, and the liveness
timers (a worker that stays silent, one stuck in native code, a load that never ends, a frozen store).

``Supervisor`` decides nothing about requests or models: when a worker process has ended (or has been
declared dead) it calls ``on_worker_exit(wp, detail)``, and the broker settles the rest. A model placed
on a host (``Replica.host``) is spawned and killed by that host's supervisor (the same ``processes`` code),
at the broker's request through ``HostSide``; the timers here apply to it as to a local worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from erllama.broker.cachequery import CacheQueries
from erllama.broker.config import BrokerConfig
from erllama.broker.hosts import HostSide
from erllama.broker.registry import ModelEntry, Replica
from erllama.cachestore.config import SHARED_URL_ENV
from erllama.processes import (
    RESTART_BACKOFF_MAX_S,
    TERMINATE_GRACE_S,
    ChildProcess,
    FdWatch,
    RestartPolicy,
    WorkerProcess,
    spawn_cachestore,
    spawn_worker,
)
from erllama.protocol import (
    HEARTBEAT_INTERVAL_S,
    MODEL_LOAD_TIMEOUT_S,
    WORKER_SILENCE_TIMEOUT_S,
    WORKER_STALL_TIMEOUT_S,
    ErrorCode,
    ModelState,
)

log = logging.getLogger(__name__)


class Supervisor:
    """The broker's child processes and their timers. ``fds`` maps each watched fd to its process."""

    def __init__(self, cfg: BrokerConfig, poller: zmq.Poller, models: dict[str, ModelEntry]):
        self.cfg = cfg
        self.poller = poller
        self.models = models
        self.watcher = FdWatch(poller)
        self.fds = self.watcher.fds
        self.cachestore: ChildProcess | None = None
        self.cachestore_restart = RestartPolicy()
        self.cachestore_restart_at_s = 0.0
        self.stopping = False
        self.hosts: HostSide | None = None
        self.on_worker_exit: Callable[[WorkerProcess, dict[str, Any]], None] = lambda wp, detail: None
        # a replica placed on a host that is not up: the broker marks it unavailable until the host joins
        self.on_unplaceable: Callable[[ModelEntry, Replica], None] = lambda entry, replica: None

    # --- workers -------------------------------------------------------------------------------------------

    def spawn(self, entry: ModelEntry, replica: Replica) -> None:
        if replica.host is not None:
            if self.hosts is not None and self.hosts.spawn(entry, replica):
                # the pid comes from the host's report (or the worker's own ready, whichever is first)
                replica.worker = WorkerProcess(
                    name=entry.model_id, pid=0, host=replica.host, replica=replica.index
                )
            else:
                replica.worker = None
                self.on_unplaceable(entry, replica)
            return
        wp = spawn_worker(
            entry.model_id,
            entry.path,
            entry.options,
            self.cfg.worker_endpoint,
            self.cfg.runtime_dir,
            self.cfg.log_level,
            self.cfg.cachestore_endpoint,
            replica=replica.index,
        )
        replica.worker = wp
        self._watch(wp)

    def on_fd(self, fd: int) -> None:
        child = self.watcher.on_fd(fd)
        if child is None:
            return
        if child is self.cachestore:
            self._cachestore_exited(child)
        else:
            assert isinstance(child, WorkerProcess)
            self.reap(child)

    def reap(self, wp: WorkerProcess) -> None:
        """A worker process ended (or was declared dead): collect what it left and report it."""
        self._unwatch(wp)
        detail = wp.exit_detail()
        wp.close_fds()
        self.on_worker_exit(wp, detail)

    def kill(self, wp: WorkerProcess) -> None:
        """SIGKILL a worker: ours directly, a host's through its host (then it counts as gone at once:
        the host's own report of the exit, if it comes, finds nothing left to settle)."""
        if wp.host is None:
            wp.kill()
            return
        if self.hosts is not None:
            self.hosts.stop(wp.host, wp.model_id, wp.pid)
        self.reap(wp)

    def kill_all(self) -> None:
        """Last resort at shutdown: workers that did not exit within the grace period."""
        for entry in list(self.models.values()):
            for replica in entry.replicas:
                wp = replica.worker
                if wp is not None:
                    self.kill(wp)
                    if wp.host is None:
                        self.reap(wp)

    def _watch(self, child: ChildProcess) -> None:
        self.watcher.watch(child)

    def _unwatch(self, child: ChildProcess) -> None:
        self.watcher.unwatch(child)

    def timers(self, now: float) -> None:
        """Restart crashed workers when their backoff ends; kill loads that never end and workers that
        are silent or stuck in native code."""
        for entry, replica in [(e, r) for e in self.models.values() for r in e.replicas]:
            wp = replica.worker
            if (
                replica.state is ModelState.RESTARTING
                and wp is None
                and entry.spawned
                and now >= replica.restart_at_s
            ):
                replica.restarts += 1
                self.spawn(entry, replica)
            elif wp is not None and wp.identity is None and now - wp.started_s > MODEL_LOAD_TIMEOUT_S:
                message = f"no ready within {MODEL_LOAD_TIMEOUT_S:.0f} s"
                replica.last_error = {"code": ErrorCode.TIMEOUT, "message": message}
                self.kill(wp)
            elif wp is not None and wp.identity is not None and wp.kill_reason is None:
                stall_s = entry.options.get("stall_timeout_s", WORKER_STALL_TIMEOUT_S)
                if now - wp.last_seen_s > WORKER_SILENCE_TIMEOUT_S:
                    wp.kill_reason = f"silent for {now - wp.last_seen_s:.0f} s"
                elif wp.busy and now - wp.progress_changed_s > stall_s:
                    stuck_s = now - wp.progress_changed_s
                    wp.kill_reason = f"no decode progress for {stuck_s:.0f} s (stuck in native code)"
                else:
                    continue
                log.error("worker of %s: %s; declaring it dead", entry.model_id, wp.kill_reason)
                if wp.spawned or wp.host is not None:
                    self.kill(wp)  # its pidfd fires next and reap settles its requests (a host's: now)
                else:
                    self.reap(wp)  # not our child: we cannot kill it, only stop using it

    # --- the cache store -----------------------------------------------------------------------------------

    @property
    def runs_cachestore(self) -> bool:
        return self.cfg.cache.enabled and self.cfg.cache.external_endpoint is None

    def spawn_cachestore(self) -> None:
        endpoint = self.cfg.cachestore_endpoint or ""
        args = ["--endpoint", endpoint, "--log-level", self.cfg.log_level, *self.cfg.cache.flags]
        shared = self.cfg.cache.shared_url
        self.cachestore = spawn_cachestore(args, {SHARED_URL_ENV: shared} if shared else None)
        self._watch(self.cachestore)

    def _cachestore_exited(self, child: ChildProcess) -> None:
        """Workers keep serving (with cache misses) while the store is restarted with backoff."""
        self._unwatch(child)
        detail = child.exit_detail()
        child.close_fds()
        self.cachestore = None
        if self.stopping:
            return
        now = time.monotonic()
        self.cachestore_restart.record_crash(now)
        self.cachestore_restart_at_s = now + self.cachestore_restart.next_delay()
        shown = {k: v for k, v in detail.items() if k != "stderr_tail"}
        log.error("the cache store died (%s); restarting it", shown)

    def cachestore_timers(self, now: float, queries: CacheQueries | None) -> None:
        """Restart a dead store after its backoff. Ask a live one for its stats every heartbeat; one that
        stays silent (frozen, stuck) is killed and restarted like a crashed one: its pidfd cannot tell."""
        if self.cachestore is None and self.runs_cachestore and not self.stopping:
            if now >= self.cachestore_restart_at_s:
                self.spawn_cachestore()
        elif self.cachestore is not None and now - self.cachestore.started_s > RESTART_BACKOFF_MAX_S:
            self.cachestore_restart.reset()  # it has stayed up: the next crash restarts it quickly again
        cs = self.cachestore
        if queries is None:
            return
        if cs is None:
            queries.heard_s = now
            return
        if now - queries.pinged_s >= HEARTBEAT_INTERVAL_S:
            queries.ping(now)
        silent_s = now - max(queries.heard_s, cs.started_s)
        if silent_s > WORKER_SILENCE_TIMEOUT_S and cs.kill_reason is None:
            cs.kill_reason = f"silent for {silent_s:.0f} s"
            log.error("the cache store has been silent for %.0f s; killing it", silent_s)
            cs.kill()

    def stop_cachestore(self) -> None:
        """Last, after the workers: their shutdown saves must reach it. SIGTERM lets it spill RAM rows."""
        cs = self.cachestore
        if cs is None or cs.proc is None:
            return
        cs.stop(TERMINATE_GRACE_S + 5)
        self._unwatch(cs)
        cs.close_fds()
        self.cachestore = None
