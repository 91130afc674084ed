"""The broker's decisions about processes: when a replica's worker is spawned again (restart backoff), and
the liveness timers (a worker that stays silent, one stuck in native code, a load that never ends, a
frozen cache store).

The processes themselves are supervised by the machine they run on, with one code for every machine
(``host/supervise.py`` ``MachineSupervisor``): the broker's own machine through an in-process
``MachineSupervisor`` (``machine``), a host's through that host's, at the broker's request through
``HostSide`` (``Replica.host``). The timers here apply to every worker alike. ``Supervisor`` decides
nothing about requests or models: when a worker process has ended (or has been declared dead) it calls
``on_worker_exit(wp, detail)``, and the broker settles the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from erllama.broker.cachequery import CacheQueries
from erllama.broker.hosts import HostSide
from erllama.broker.registry import ModelEntry, Replica
from erllama.host.supervise import MachineSupervisor
from erllama.processes import TERMINATE_GRACE_S, WorkerProcess
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
    """The broker's workers (on its machine, on hosts, or operator-started) and their timers."""

    def __init__(self, machine: MachineSupervisor, models: dict[str, ModelEntry]):
        self.machine = machine
        self.models = models
        self.hosts: HostSide | None = None
        self.on_worker_exit: Callable[[WorkerProcess, dict[str, Any]], None] = lambda wp, detail: None
        # a replica placed on a host that is not up: the broker marks it unavailable until the host joins
        self.on_unplaceable: Callable[[ModelEntry, Replica], None] = lambda entry, replica: None
        machine.on_worker_exit = lambda wp, detail: self.on_worker_exit(wp, detail)

    @property
    def stopping(self) -> bool:
        return self.machine.stopping

    # --- workers -------------------------------------------------------------------------------------------

    def spawn(self, entry: ModelEntry, replica: Replica) -> None:
        if replica.host is None:
            replica.worker = self.machine.spawn(entry.model_id, entry.path, entry.options, replica.index)
        elif self.hosts is not None and self.hosts.spawn(entry, replica):
            # the pid comes from the host's report (or the worker's own ready, whichever is first)
            replica.worker = WorkerProcess(
                name=entry.model_id, pid=0, host=replica.host, replica=replica.index
            )
        else:
            replica.worker = None
            self.on_unplaceable(entry, replica)

    def reap(self, wp: WorkerProcess) -> None:
        """A worker that is not this machine's child has ended or is given up on: report it."""
        self.on_worker_exit(wp, wp.exit_detail())

    def kill(self, wp: WorkerProcess) -> None:
        """SIGKILL a worker: ours through this machine's supervisor (its pidfd fires next and the exit is
        reported), a host's through its host (then it counts as gone at once: the host's own report of
        the exit, if it comes, finds nothing left to settle). An operator's worker is not ours to kill."""
        if wp.host is None:
            self.machine.kill(wp.model_id, wp.pid, wp.replica)
            return
        if self.hosts is not None:
            self.hosts.stop(wp.host, wp.model_id, wp.pid)
        self.reap(wp)

    def kill_all(self) -> None:
        """Last resort at shutdown: workers that did not exit within the grace period."""
        self.machine.kill_all()
        self.machine.wait_workers(TERMINATE_GRACE_S)
        for entry in list(self.models.values()):
            for replica in entry.replicas:
                wp = replica.worker
                if wp is None:
                    continue
                if wp.host is not None:
                    self.kill(wp)
                else:
                    self.reap(wp)  # operator-started

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
                    self.kill(wp)  # its pidfd fires next and its exit settles its requests (a host's: now)
                else:
                    self.reap(wp)  # not our child: we cannot kill it, only stop using it

    # --- the cache store -----------------------------------------------------------------------------------

    def cachestore_timers(self, now: float, queries: CacheQueries | None) -> None:
        """Restart a dead store after its backoff. Ask a live one for its stats every heartbeat; one that
        stays silent (frozen, stuck) is killed and restarted like a crashed one: its pidfd cannot tell."""
        self.machine.cachestore_timers(now)
        cs = self.machine.cachestore
        if queries is None:
            return
        if cs is None:
            queries.heard_s = now
            return
        if now - queries.pinged_s >= HEARTBEAT_INTERVAL_S:
            queries.ping(now)
        silent_s = now - max(queries.heard_s, cs.started_s)
        if silent_s > WORKER_SILENCE_TIMEOUT_S:
            self.machine.kill_cachestore(f"silent for {silent_s:.0f} s")
