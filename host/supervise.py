"""One machine's supervision of its processes: its cache store (restarted with backoff when it dies) and
the workers placed on it. One code serves every machine: each ``erllama-host`` runs a
``MachineSupervisor`` for the machine it is on, and the broker runs one in-process for its own machine
(``broker/supervisor.py`` keeps the decisions: restarts of replicas, liveness timers, hosts).
What a worker's death means for its model is the broker's decision, so an exit is only reported
(``on_worker_exit``).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

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
from erllama.protocol import HostWorker

log = logging.getLogger(__name__)

WorkerKey = tuple[str, int]  # (model id, replica index)


@dataclass(slots=True)
class MachineSettings:
    """How this machine's children are started and where they reach the broker and the cache store."""

    runtime_dir: Path
    worker_endpoint: str  # the broker's worker endpoint (a host learns its port when it joins)
    cachestore_endpoint: str | None  # where workers find the cache store; None: no KV cache
    spawns_cachestore: bool = True  # False: no cache, or an external store that someone else runs
    log_level: str = "INFO"
    curve: tuple[str, str] | None = None  # workers over tcp: (our key file with its secret, the broker's)
    cache_flags: list[str] = field(default_factory=list)  # passed through to erllama-cachestore
    shared_url: str | None = None  # handed to the store in its environment, never its argv


class MachineSupervisor:
    """This machine's children; ``workers`` maps (model id, replica) to its worker process."""

    def __init__(self, settings: MachineSettings, poller: zmq.Poller):
        self.settings = settings
        self.watcher = FdWatch(poller)
        self.workers: dict[WorkerKey, WorkerProcess] = {}
        self.cachestore: ChildProcess | None = None
        self.cachestore_restart = RestartPolicy()
        self.cachestore_restart_at_s = 0.0
        self.stopping = False
        self.on_worker_exit: Callable[[WorkerProcess, dict[str, Any]], None] = lambda wp, detail: None

    @property
    def fds(self) -> dict[int, ChildProcess]:
        """The watched pidfds and stderr pipes: the owner's poll loop hands each to ``on_fd``."""
        return self.watcher.fds

    # --- workers -------------------------------------------------------------------------------------------

    def spawn(
        self, model_id: str, path: str | None, options: dict[str, Any], replica: int = 0
    ) -> WorkerProcess:
        s = self.settings
        wp = spawn_worker(
            model_id,
            path,
            options,
            s.worker_endpoint,
            s.runtime_dir,
            s.log_level,
            s.cachestore_endpoint,
            s.curve,
            replica,
        )
        self.workers[(model_id, replica)] = wp
        self.watcher.watch(wp)
        return wp

    def host_workers(self) -> list[HostWorker]:
        """The workers running here, as the broker lists them (``list_hosts``, a host's beats)."""
        return [HostWorker(model=m, pid=wp.pid) for (m, _), wp in self.workers.items()]

    def runs(self, model_id: str) -> bool:
        """Whether a worker of ``model_id`` (any replica) runs here."""
        return any(m == model_id for m, _ in self.workers)

    def kill(self, model_id: str, pid: int = 0, replica: int | None = None) -> None:
        """SIGKILL the model's worker (``replica``: that one only; ``pid``: if it is still that process,
        0 for whichever). Its pidfd fires next and its exit is reported."""
        for (m, r), wp in list(self.workers.items()):
            if m == model_id and replica in (None, r) and pid in (0, wp.pid):
                log.warning("killing the worker of %s (replica %d, pid %d)", model_id, r, wp.pid)
                wp.kill()

    def kill_all(self) -> None:
        for wp in self.workers.values():
            wp.kill()

    def on_fd(self, fd: int) -> None:
        child = self.watcher.on_fd(fd)
        if child is None:
            return
        self.watcher.unwatch(child)
        detail = child.exit_detail()
        child.close_fds()
        if child is self.cachestore:
            self._cachestore_exited(detail)
            return
        assert isinstance(child, WorkerProcess)
        key = (child.model_id, child.replica)
        if self.workers.get(key) is child:
            del self.workers[key]
        log.info("worker of %s (pid %d) ended: %s", child.model_id, child.pid, _shown(detail))
        self.on_worker_exit(child, detail)

    def wait_workers(self, timeout_s: float) -> None:
        """Reap workers already told to stop, reporting each (at the end of a drain or a shutdown)."""
        deadline = time.monotonic() + timeout_s
        for wp in list(self.workers.values()):
            if wp.proc is not None:
                try:
                    wp.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    wp.kill()
                    wp.proc.wait()
            self.on_fd(wp.pidfd)

    # --- the cache store -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn this machine's cache store, if it runs one."""
        if self.settings.spawns_cachestore:
            self.spawn_cachestore()

    def spawn_cachestore(self) -> None:
        s = self.settings
        args = ["--endpoint", s.cachestore_endpoint or "", "--log-level", s.log_level, *s.cache_flags]
        self.cachestore = spawn_cachestore(args, {SHARED_URL_ENV: s.shared_url} if s.shared_url else None)
        self.watcher.watch(self.cachestore)

    def _cachestore_exited(self, detail: dict[str, Any]) -> None:
        """Workers keep serving (with cache misses) while the store is restarted with backoff."""
        self.cachestore = None
        if self.stopping:
            return
        now = time.monotonic()
        self.cachestore_restart.record_crash(now)
        self.cachestore_restart_at_s = now + self.cachestore_restart.next_delay()
        log.error("the cache store died (%s); restarting it", _shown(detail))

    def cachestore_timers(self, now: float) -> None:
        """Restart a dead store after its backoff; one that has stayed up is restarted quickly next time."""
        if not self.settings.spawns_cachestore or self.stopping:
            return
        if self.cachestore is None and now >= self.cachestore_restart_at_s:
            self.spawn_cachestore()
        elif self.cachestore is not None and now - self.cachestore.started_s > RESTART_BACKOFF_MAX_S:
            self.cachestore_restart.reset()

    def kill_cachestore(self, reason: str) -> None:
        """SIGKILL a store that is alive but useless (frozen): it restarts like a crashed one."""
        cs = self.cachestore
        if cs is not None and cs.kill_reason is None:
            cs.kill_reason = reason
            log.error("the cache store is %s; killing it", reason)
            cs.kill()

    def stop_cachestore(self) -> None:
        """Last, after the workers (their shutdown saves must reach it): SIGTERM lets it spill RAM rows."""
        self.stopping = True
        cs = self.cachestore
        if cs is None or cs.proc is None:
            return
        cs.stop(TERMINATE_GRACE_S + 5)
        self.watcher.unwatch(cs)
        cs.close_fds()
        self.cachestore = None


def _shown(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in detail.items() if k != "stderr_tail"}
