"""Replicas placed on hosts: what a host joining, draining, leaving or dying means for the replicas on it,
and the host's reports of its workers (spawned, exited), settled as the death of a local worker is. A
model is as good as its best replica (``ModelEntry.state``), so these rules reach requests only when no
other replica serves the model:

- A replica whose host is not up (it has not joined yet, is dead, has left) is ``unavailable``; when the
  host joins again it is placed again. A model with no other replica refuses requests and calls with
  ``host_down``.
- A host that drains makes its replicas ``draining``: they take no new requests while another replica
  serves (a model with none refuses new ones with ``host_down`` and still dispatches what it accepted);
  once a draining replica has nothing left its worker is told to shut down.
- A host declared dead: its workers count as crashed (running requests get ``worker_crashed``; those
  that had produced nothing are re-queued once, as for any dead worker, and may run on another replica),
  then the replicas are unavailable.
"""

from __future__ import annotations

import logging
from typing import Any

from erllama.broker.hosts import HostSide
from erllama.broker.hosttable import HostEntry
from erllama.broker.lifecycle import Requests, host_down
from erllama.broker.models import Models
from erllama.broker.registry import ModelEntry, Replica
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
        # replicas whose worker was told to shut down for a drain: (model, replica index)
        self.draining_sent: set[tuple[str, int]] = set()
        hosts.on_up = self.host_up
        hosts.on_draining = self.host_draining
        hosts.on_lost = self.host_lost
        hosts.on_worker_spawned = self.worker_spawned
        hosts.on_worker_exited = self.worker_exited
        supervisor.on_unplaceable = self.unavailable

    def on(self, host: HostEntry) -> list[tuple[ModelEntry, Replica]]:
        return [(e, r) for e in self.table.values() for r in e.replicas if r.host == host.name]

    # --- a host's life -------------------------------------------------------------------------------------

    def host_up(self, host: HostEntry) -> None:
        for entry, replica in self.on(host):
            if replica.state is ModelState.UNAVAILABLE and replica.worker is None:
                log.info("placing %s (replica %d) on host %s again", entry.model_id, replica.index, host.name)
                replica.state = ModelState.RESTARTING
                self.supervisor.spawn(entry, replica)
        for entry in list(self.table.values()):  # replicas placed by count that wait for any host
            for replica in entry.replicas:
                if entry.floating and replica.state is ModelState.UNAVAILABLE and replica.worker is None:
                    self._move(entry, replica)

    def host_draining(self, host: HostEntry) -> None:
        for entry, replica in self.on(host):
            if replica.state in (ModelState.READY, ModelState.LOADING, ModelState.RESTARTING):
                replica.state = ModelState.DRAINING
                if entry.state is ModelState.DRAINING:  # no other replica serves: calls cannot wait
                    self.models.refuse_held_calls(entry, host_down(entry))
        self.drain_timers()

    def drain_timers(self) -> None:
        """Shut down the worker of each draining replica that has nothing left to finish. While the
        model has no other replica serving, what waits in its queue is still served there."""
        for entry in list(self.table.values()):
            for replica in entry.replicas:
                key = (entry.model_id, replica.index)
                if replica.state is not ModelState.DRAINING or replica.running or key in self.draining_sent:
                    continue
                if entry.state is ModelState.DRAINING and entry.queue.waiting:
                    continue
                self.draining_sent.add(key)
                if replica.worker is None:
                    self.unavailable(entry, replica)
                elif not self.workers.send(replica, Shutdown()):
                    self.supervisor.kill(replica.worker)  # still loading: nothing to save

    def host_lost(self, host: HostEntry, detail: dict[str, Any]) -> None:
        """The host is dead or gone: its workers with it."""
        for entry, replica in self.on(host):
            wp = replica.worker
            if wp is not None:
                if replica.state is ModelState.LOADING:
                    replica.last_error = {
                        "code": ErrorCode.HOST_DOWN.value,
                        "message": f"host {host.name!r} was lost",
                    }
                self.models.worker_exited(
                    wp, {"pid": wp.pid, "host": host.name, "host_lost": detail["reason"]}
                )
            if (
                entry.model_id in self.table
                and replica.worker is None
                and replica.state is not ModelState.UNAVAILABLE
            ):
                self.unavailable(entry, replica)
            if entry.floating and entry.model_id in self.table and replica.state is ModelState.UNAVAILABLE:
                self._move(entry, replica)

    def _move(self, entry: ModelEntry, replica: Replica) -> None:
        """Place a replica that was placed by count on another machine that is up and has none of the
        model: a joined host or the broker's own."""
        free = self.hosts.machines(taken=entry.hosts)
        if not free:
            return  # it stays unavailable; it is placed again when its host comes back
        target = free[0]
        log.info(
            "moving %s replica %d from host %s to %s",
            entry.model_id,
            replica.index,
            replica.host,
            target or self.models.cfg.name,
        )
        replica.host = target
        replica.state = ModelState.RESTARTING
        self.supervisor.spawn(entry, replica)

    def unavailable(self, entry: ModelEntry, replica: Replica) -> None:
        """No host to run the replica on, until its host joins again; with no other replica left to serve,
        what waits for the model is refused."""
        self.draining_sent.discard((entry.model_id, replica.index))
        self.requests.router.replaced(entry, replica)
        replica.state = ModelState.UNAVAILABLE
        replica.last_error = {
            "code": ErrorCode.HOST_DOWN.value,
            "message": f"host {replica.host!r} is not up",
        }
        log.warning(
            "model %s replica %d is unavailable: host %s is not up",
            entry.model_id,
            replica.index,
            replica.host,
        )
        if entry.state is not ModelState.UNAVAILABLE:
            self.models.answer_loaders(entry)
            self.requests.dispatch(entry)
            return
        err = host_down(entry)
        for w in entry.load_waiters:
            self.models.front.refuse(w, err)
        entry.load_waiters.clear()
        self.models.refuse_held_calls(entry, err)
        self.requests.fail_waiting(entry, err)

    # --- a host's reports about its workers ----------------------------------------------------------------

    def _placed(self, host: HostEntry, model_id: str, pid: int) -> Replica | None:
        entry = self.table.get(model_id)
        if entry is None:
            return None
        for replica in entry.replicas:
            if replica.host == host.name and replica.worker is not None and replica.worker.pid in (pid, 0):
                return replica
        return None

    def worker_spawned(self, host: HostEntry, msg: WorkerSpawned) -> None:
        replica = self._placed(host, msg.model, msg.pid)
        if replica is not None and replica.worker is not None:
            replica.worker.pid = msg.pid
            log.info("host %s spawned the worker of %s: pid %d", host.name, msg.model, msg.pid)

    def worker_exited(self, host: HostEntry, msg: WorkerExited) -> None:
        replica = self._placed(host, msg.model, msg.pid)
        if replica is None or replica.worker is None:
            return
        entry = self.table[msg.model]
        drained = replica.state is ModelState.DRAINING
        self.models.worker_exited(replica.worker, msg.detail | {"pid": msg.pid, "host": host.name})
        if drained and entry.model_id in self.table and replica.worker is None:
            self.unavailable(entry, replica)
