"""``Host``: one machine's part in a cluster. It joins the broker, runs this machine's cache store, spawns
and supervises the workers the broker places here, beats with its resources, and drains on SIGTERM.
The processes are supervised by ``MachineSupervisor``, the code the broker runs for its own machine.

Every join starts from a clean slate: workers left from an earlier session (the broker restarted, or
declared us dead across a partition) are stopped, and the broker places its models again.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq

from erllama.cachestore.client import CacheClient
from erllama.cachestore.events import KvEventCursor
from erllama.host.link import BrokerLink
from erllama.host.resources import gpus, host_resources
from erllama.host.supervise import MachineSettings, MachineSupervisor
from erllama.processes import TERMINATE_GRACE_S, WorkerProcess
from erllama.protocol import (
    HEARTBEAT_INTERVAL_S,
    ErllamaError,
    Error,
    ErrorCode,
    HostBeat,
    HostCommand,
    HostDrain,
    HostJoin,
    HostKvResync,
    HostLeave,
    HostWelcome,
    KvEventBatch,
    SpawnWorker,
    StopWorker,
    WorkerExited,
    WorkerSpawned,
)

log = logging.getLogger(__name__)

POLL_INTERVAL_MS: Final = 100
STORE_STATS_TIMEOUT_S: Final = 0.25  # asked once per beat; a slow store costs one beat's free-KV figure
HOST_DRAIN_TIMEOUT_S: Final = 600.0  # a drain whose workers the broker has not stopped by then ends anyway
LEAVE_LINGER_MS: Final = 1000  # time for our last word (leave) to reach the broker
JOIN_RETRY_S: Final = 5.0  # a join unanswered this long is sent again (the broker restarted meanwhile)
EXIT_REFUSED: Final = 2


@dataclass(slots=True)
class HostSettings:
    """What ``erllama-host`` was started with (its flags)."""

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

    @property
    def machine(self) -> MachineSettings:
        """This machine's supervision; its workers' endpoint is set when the broker welcomes us."""
        return MachineSettings(
            runtime_dir=self.runtime_dir,
            worker_endpoint="",
            cachestore_endpoint=self.cachestore_endpoint,
            spawns_cachestore=self.cache,
            log_level=self.log_level,
            curve=self.curve,
            cache_flags=self.cache_flags,
            shared_url=self.shared_url,
        )


class HostPhase(enum.StrEnum):
    JOINING = "joining"  # join sent, no welcome yet
    JOINED = "joined"
    DRAINING = "draining"  # SIGTERM: waiting for the broker to stop our workers


class Host:
    def __init__(self, settings: HostSettings):
        self.settings = settings
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.link = BrokerLink(self.ctx, settings.name, settings.broker, settings.curve)
        self.sup = MachineSupervisor(settings.machine, self.poller)
        self.sup.on_worker_exit = self._worker_exited
        self.store = (
            CacheClient(settings.cachestore_endpoint, STORE_STATS_TIMEOUT_S) if settings.cache else None
        )
        self.gpus, self.gpu_error = (
            gpus()
        )  # asked once: NVML is slow to start, and devices do not come and go
        self.phase = HostPhase.JOINING
        self.instance: str | None = None
        self.store_stats: dict[str, Any] | None = None
        self.kv_cursor = KvEventCursor()  # where our beats are in the store's KV events
        self.beat_at_s = 0.0
        self.joined_at_s = 0.0  # when our last join was sent
        self.drain_deadline_s = 0.0
        self.stop_now = False
        self.exit_code = 0

    # --- the loop ------------------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.poller.register(self.link.sock, zmq.POLLIN)
        self.sup.start()
        self._join()
        try:
            while not self._finished():
                for item, _ in self.poller.poll(POLL_INTERVAL_MS):
                    if item is self.link.sock:
                        for msg in self.link.receive():
                            self._on_command(msg)
                    elif isinstance(item, int) and item in self.sup.fds:
                        self.sup.on_fd(item)
                refused = self.link.refusal()
                if refused is not None:
                    log.error("%s: %s", refused.code, refused.message)
                    self.exit_code = EXIT_REFUSED
                    break
                self._timers(time.monotonic())
        finally:
            self._shutdown()
        return self.exit_code

    def _finished(self) -> bool:
        if self.stop_now:
            return True
        if self.phase is HostPhase.DRAINING:
            return not self.sup.workers or time.monotonic() > self.drain_deadline_s
        return False

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.phase is HostPhase.JOINED:
            log.info("received %s: draining", signal.Signals(signum).name)
            self.phase = HostPhase.DRAINING
            self.drain_deadline_s = time.monotonic() + HOST_DRAIN_TIMEOUT_S
            self.link.send(HostDrain(name=self.settings.name))
        else:  # not joined, or a second signal while draining: stop now
            log.info("received %s: stopping", signal.Signals(signum).name)
            self.stop_now = True

    def _timers(self, now: float) -> None:
        self.sup.cachestore_timers(now)
        if self.phase is HostPhase.JOINING and now - self.joined_at_s > JOIN_RETRY_S:
            self._join()
        if now >= self.beat_at_s:
            self.beat_at_s = now + HEARTBEAT_INTERVAL_S
            self._beat()

    def _shutdown(self) -> None:
        self.sup.kill_all()
        self.sup.wait_workers(TERMINATE_GRACE_S)
        if self.phase is not HostPhase.JOINING and self.exit_code == 0:
            self.link.send(HostLeave(name=self.settings.name))
        if self.store is not None:
            self.store.close()
        self.sup.stop_cachestore()
        self.link.close(LEAVE_LINGER_MS)
        self.ctx.term()
        log.info("host %s stopped", self.settings.name)

    # --- talking to the broker -----------------------------------------------------------------------------

    def _join(self) -> None:
        """Join (again): a clean slate, so workers of an earlier session are stopped first."""
        if self.sup.workers:
            log.info("stopping %d worker(s) of an earlier session before joining", len(self.sup.workers))
            self.sup.kill_all()
            self.sup.wait_workers(TERMINATE_GRACE_S)
        self.phase = HostPhase.JOINING
        self.kv_cursor.reset()  # the broker's index starts us from a snapshot
        self.joined_at_s = time.monotonic()
        resources = host_resources(self.gpus, self.gpu_error, self.store_stats)
        self.link.send(HostJoin(name=self.settings.name, pid=os.getpid(), resources=resources))

    def _beat(self) -> None:
        cachestore_up = True
        if self.store is not None:
            try:
                self.store_stats = self.store.stats()
            except ErllamaError:
                self.store_stats = None
            cachestore_up = self.store_stats is not None
        if self.phase is HostPhase.JOINING:
            return
        resources = host_resources(self.gpus, self.gpu_error, self.store_stats)
        kv = self._kv_events() if cachestore_up and self.store is not None else None
        self.link.send(
            HostBeat(
                name=self.settings.name,
                resources=resources,
                workers=self.sup.host_workers(),
                cachestore_up=cachestore_up,
                kv=kv,
            )
        )

    def _kv_events(self) -> KvEventBatch | None:
        """The store's KV events since the last beat's, for the broker's routing index (a snapshot
        after a join or a resync); None if the store did not answer in time (asked again next beat)."""
        assert self.store is not None
        cur = self.kv_cursor
        try:
            batch = self.store.kv_events(cur.since_seq, cur.publisher, cur.part)
        except ErllamaError:
            return None
        cur.advance(batch)  # a beat lost on the way is a gap the broker sees: it asks for a resync
        return batch

    def _on_command(self, msg: HostCommand) -> None:
        if isinstance(msg, HostWelcome):
            if self.instance is not None and msg.instance != self.instance:
                log.warning("the broker restarted (instance %s)", msg.instance)
            self.instance = msg.instance
            self.sup.settings.worker_endpoint = self.settings.worker_endpoint(msg.worker_port)
            if self.phase is HostPhase.JOINING:
                self.phase = HostPhase.JOINED
                self.beat_at_s = 0.0  # beat at once: the broker waits for our store to be up
            log.info("joined the broker at %s (workers: port %d)", self.settings.broker, msg.worker_port)
        elif isinstance(msg, SpawnWorker):
            self._spawn(msg)
        elif isinstance(msg, StopWorker):
            self.sup.kill(msg.model, msg.pid)
        elif isinstance(msg, HostKvResync):
            log.info("the broker asks for our cache store's KV events from a snapshot")
            self.kv_cursor.reset()
        elif isinstance(msg, Error):
            self._on_error(msg)

    def _on_error(self, msg: Error) -> None:
        if msg.code == ErrorCode.HOST_REFUSED:
            log.error("%s: %s", msg.code, msg.message)
            self.exit_code = EXIT_REFUSED
            self.stop_now = True
        elif msg.code == ErrorCode.HOST_DOWN and self.phase is HostPhase.JOINED:
            # (beats queued while the broker was away each get this answer: one join answers them all)
            log.warning("the broker does not know us (%s); joining again", msg.message)
            self._join()
        else:
            log.warning("the broker says %s: %s", msg.code, msg.message)

    def _spawn(self, msg: SpawnWorker) -> None:
        if self.phase is not HostPhase.JOINED or self.sup.runs(msg.model):
            reason = "draining" if self.phase is HostPhase.DRAINING else "a worker of it already runs here"
            log.warning("not spawning %s: %s", msg.model, reason)
            self.link.send(WorkerExited(model=msg.model, pid=0, detail={"refused": reason}))
            return
        try:
            wp = self.sup.spawn(msg.model, msg.path, msg.options, msg.replica)
        except OSError as exc:
            self.link.send(WorkerExited(model=msg.model, pid=0, detail={"spawn_failed": str(exc)}))
            return
        self.link.send(WorkerSpawned(model=msg.model, pid=wp.pid))

    def _worker_exited(self, wp: WorkerProcess, detail: dict[str, Any]) -> None:
        self.link.send(WorkerExited(model=wp.model_id, pid=wp.pid, detail=detail))
