"""Models placed on hosts: what a host joining, draining, leaving or dying means for its models, and the
host's reports of its workers (spawned, exited), settled as the death of a local worker is.

- A model whose host is not up (it has not joined yet, is dead, has left) is ``unavailable``: requests
  and calls are refused with ``host_down``; when the host joins again its models are placed again.
- A host that drains makes its models ``draining``: new requests are refused with ``host_down``, accepted
  ones are still dispatched and finish, and once a model has none left its worker is told to shut down.
- A host declared dead: its workers count as crashed (running requests get ``worker_crashed``; those
  that had produced nothing are re-queued once, as for any dead worker), then, with nowhere to run, the
  models are unavailable and what waits gets ``host_down``.
"""

from __future__ import annotations

import logging
from typing import Any

from erllama.broker.hosts import HostSide
from erllama.broker.hosttable import HostEntry
from erllama.broker.lifecycle import Requests, host_down
from erllama.broker.models import Models
from erllama.broker.registry import ModelEntry
from erllama.broker.supervisor import Supervisor
from erllama.broker.workers import WorkerSide
from erllama.protocol import ErrorCode, ModelState, Shutdown, WorkerExited, WorkerSpawned

log = logging.getLogger(__name__)


class Placement:
    def __init__(
        self,
        table: dict[str, ModelEntry],
        hosts: HostSide,
        models: Models,
        requests: Requests,
        workers: WorkerSide,
        supervisor: Supervisor,
    ):
        self.table = table
        self.hosts = hosts
        self.models = models
        self.requests = requests
        self.workers = workers
        self.supervisor = supervisor
        self.draining_sent: set[str] = set()  # models whose worker was told to shut down for a drain
        hosts.on_up = self.host_up
        hosts.on_draining = self.host_draining
        hosts.on_lost = self.host_lost
        hosts.on_worker_spawned = self.worker_spawned
        hosts.on_worker_exited = self.worker_exited
        supervisor.on_unplaceable = self.unavailable

    def on(self, host: HostEntry) -> list[ModelEntry]:
        return [e for e in self.table.values() if e.host == host.name]

    # --- a host's life -------------------------------------------------------------------------------------

    def host_up(self, host: HostEntry) -> None:
        for entry in self.on(host):
            if entry.state is ModelState.UNAVAILABLE and entry.worker is None:
                log.info("placing %s on host %s again", entry.model_id, host.name)
                entry.state = ModelState.RESTARTING
                self.supervisor.spawn(entry)

    def host_draining(self, host: HostEntry) -> None:
        for entry in self.on(host):
            if entry.state in (ModelState.READY, ModelState.LOADING, ModelState.RESTARTING):
                entry.state = ModelState.DRAINING
                self.models.refuse_held_calls(entry, host_down(entry))
        self.drain_timers()

    def drain_timers(self) -> None:
        """Shut down the worker of each draining model that has nothing left to finish."""
        for entry in list(self.table.values()):
            if (
                entry.state is not ModelState.DRAINING
                or entry.queue.depth
                or entry.model_id in self.draining_sent
            ):
                continue
            self.draining_sent.add(entry.model_id)
            if entry.worker is None:
                self.unavailable(entry)
            elif not self.workers.send(entry, Shutdown()):
                self.supervisor.kill(entry.worker)  # still loading: nothing to save

    def host_lost(self, host: HostEntry, detail: dict[str, Any]) -> None:
        """The host is dead or gone: its workers with it."""
        for entry in self.on(host):
            wp = entry.worker
            if wp is not None:
                if entry.state is ModelState.LOADING:
                    entry.last_error = {
                        "code": ErrorCode.HOST_DOWN.value,
                        "message": f"host {host.name!r} was lost",
                    }
                self.models.worker_exited(
                    wp, {"pid": wp.pid, "host": host.name, "host_lost": detail["reason"]}
                )
            if (
                entry.model_id in self.table
                and entry.worker is None
                and entry.state is not ModelState.UNAVAILABLE
            ):
                self.unavailable(entry)

    def unavailable(self, entry: ModelEntry) -> None:
        """No host to run on: refuse what waits, until the host joins again."""
        self.draining_sent.discard(entry.model_id)
        entry.state = ModelState.UNAVAILABLE
        entry.last_error = {"code": ErrorCode.HOST_DOWN.value, "message": f"host {entry.host!r} is not up"}
        err = host_down(entry)
        for w in entry.load_waiters:
            self.models.front.refuse(w, err)
        entry.load_waiters.clear()
        self.models.refuse_held_calls(entry, err)
        self.requests.fail_waiting(entry, err)
        log.warning("model %s is unavailable: host %s is not up", entry.model_id, entry.host)

    # --- a host's reports about its workers ----------------------------------------------------------------

    def _placed(self, host: HostEntry, model_id: str, pid: int) -> ModelEntry | None:
        entry = self.table.get(model_id)
        if entry is None or entry.host != host.name or entry.worker is None:
            return None
        return entry if entry.worker.pid in (pid, 0) else None

    def worker_spawned(self, host: HostEntry, msg: WorkerSpawned) -> None:
        entry = self._placed(host, msg.model, msg.pid)
        if entry is not None and entry.worker is not None:
            entry.worker.pid = msg.pid
            log.info("host %s spawned the worker of %s: pid %d", host.name, msg.model, msg.pid)

    def worker_exited(self, host: HostEntry, msg: WorkerExited) -> None:
        entry = self._placed(host, msg.model, msg.pid)
        if entry is None or entry.worker is None:
            return
        wp = entry.worker
        drained = entry.state is ModelState.DRAINING
        self.models.worker_exited(wp, msg.detail | {"pid": msg.pid, "host": host.name})
        if drained and entry.model_id in self.table and entry.worker is None:
            self.unavailable(entry)
