"""A host's supervision of its own processes: its cache store (restarted with backoff when it dies) and
the workers the broker places here. The same code as the broker's for its machine (``erllama.processes``:
spawning, pidfds, stderr tails, exit details, backoff); what a worker's death means for its model is
the broker's decision, so an exit is only reported (``on_worker_exit``).
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

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HostSettings:
    name: str
    broker: str  # tcp://ADDRESS:PORT of the broker's host endpoint
    runtime_dir: Path
    log_level: str = "INFO"
    curve: tuple[str, str] | None = None  # (our key file with its secret, the broker's public key file)
    cache: bool = True
    cache_flags: list[str] = field(default_factory=list)  # passed through to erllama-cachestore
    shared_url: str | None = None  # handed to the store in its environment, never its argv

    @property
    def cachestore_endpoint(self) -> str | None:
        return f"ipc://{self.runtime_dir / 'cachestore.sock'}" if self.cache else None

    def worker_endpoint(self, port: int) -> str:
        """The broker's worker endpoint: the address we reached it at, with the port it told us."""
        address = self.broker.rsplit(":", 1)[0]
        return f"{address}:{port}"


class HostSupervisor:
    """This machine's children; ``workers`` maps a model id to its worker process."""

    def __init__(self, settings: HostSettings, poller: zmq.Poller):
        self.settings = settings
        self.watcher = FdWatch(poller)
        self.workers: dict[str, WorkerProcess] = {}
        self.cachestore: ChildProcess | None = None
        self.cachestore_restart = RestartPolicy()
        self.cachestore_restart_at_s = 0.0
        self.stopping = False
        self.on_worker_exit: Callable[[WorkerProcess, dict[str, Any]], None] = lambda wp, detail: None

    # --- workers -------------------------------------------------------------------------------------------

    def spawn(
        self, model_id: str, path: str | None, options: dict[str, Any], worker_port: int, replica: int = 0
    ) -> WorkerProcess:
        s = self.settings
        wp = spawn_worker(
            model_id,
            path,
            options,
            s.worker_endpoint(worker_port),
            s.runtime_dir,
            s.log_level,
            s.cachestore_endpoint,
            s.curve,
            replica,
        )
        self.workers[model_id] = wp
        self.watcher.watch(wp)
        return wp

    def kill(self, model_id: str, pid: int | None = None) -> None:
        wp = self.workers.get(model_id)
        if wp is not None and (pid is None or pid in (0, wp.pid)):
            log.warning("killing the worker of %s (pid %d) at the broker's request", model_id, wp.pid)
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
        if self.workers.get(child.model_id) is child:
            del self.workers[child.model_id]
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

    def spawn_cachestore(self) -> None:
        s = self.settings
        args = ["--endpoint", s.cachestore_endpoint or "", "--log-level", s.log_level, *s.cache_flags]
        self.cachestore = spawn_cachestore(args, {SHARED_URL_ENV: s.shared_url} if s.shared_url else None)
        self.watcher.watch(self.cachestore)

    def _cachestore_exited(self, detail: dict[str, Any]) -> None:
        self.cachestore = None
        if self.stopping:
            return
        now = time.monotonic()
        self.cachestore_restart.record_crash(now)
        self.cachestore_restart_at_s = now + self.cachestore_restart.next_delay()
        log.error("the cache store died (%s); restarting it", _shown(detail))

    def cachestore_timers(self, now: float) -> None:
        if not self.settings.cache or self.stopping:
            return
        if self.cachestore is None and now >= self.cachestore_restart_at_s:
            self.spawn_cachestore()
        elif self.cachestore is not None and now - self.cachestore.started_s > RESTART_BACKOFF_MAX_S:
            self.cachestore_restart.reset()

    def stop_cachestore(self) -> None:
        """Last, after the workers: SIGTERM lets the store spill its RAM rows."""
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
