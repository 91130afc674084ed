"""The model table: loading and unloading models (each on one or more replicas), what a worker's death
means for its replica (restart with backoff, or failed) and for the model, and the client requests
answered from the table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from erllama.broker.config import BrokerConfig
from erllama.broker.front import FrontEnd
from erllama.broker.lifecycle import Requests, host_down
from erllama.broker.queues import ModelQueue, QueueTotals
from erllama.broker.registry import HeldCall, ModelEntry, Replica, Waiter
from erllama.broker.supervisor import Supervisor
from erllama.broker.workers import WorkerSide
from erllama.cachestore.config import default_disk_dir, default_shm_dir
from erllama.options import parse_load_options, validate_model_id
from erllama.processes import WorkerProcess
from erllama.protocol import (
    Call,
    ErllamaError,
    ErrorCode,
    LoadModel,
    ModelState,
    QueueDepth,
    Shutdown,
    UnloadModel,
    WorkerOp,
)

log = logging.getLogger(__name__)

MAX_REPLICAS = 64


class Models:
    """Owns ``table`` (model id -> entry), shared read-only with the other parts."""

    def __init__(
        self,
        cfg: BrokerConfig,
        table: dict[str, ModelEntry],
        front: FrontEnd,
        requests: Requests,
        workers: WorkerSide,
        supervisor: Supervisor,
        totals: QueueTotals,
        rids: Iterator[int],
    ):
        self.cfg = cfg
        self.table = table
        self.front = front
        self.requests = requests
        self.workers = workers
        self.supervisor = supervisor
        self.totals = totals
        self.rids = rids

    def entry(self, model_id: str) -> ModelEntry:
        entry = self.table.get(model_id)
        if entry is None:
            raise ErllamaError(
                ErrorCode.MODEL_NOT_FOUND, f"no model {model_id!r} is loaded", {"model": model_id}
            )
        return entry

    # --- client requests -----------------------------------------------------------------------------------

    def load(self, client: bytes, msg: LoadModel) -> None:
        model_id = validate_model_id(msg.model)
        if model_id in self.table:
            raise ErllamaError(
                ErrorCode.ALREADY_LOADED, f"model {model_id!r} is already loaded", {"model": model_id}
            )
        path = msg.path
        places = self._places(msg)
        for name in places:
            if name is not None:
                self._check_host(name)
        if None in places and path is not None:  # a replica here: the path must be a file here
            try:
                p = Path(path).resolve()
                is_file = p.is_file()
            except (OSError, ValueError) as exc:  # too long, NUL bytes, a loop of links
                raise ErllamaError(
                    ErrorCode.INVALID_PARAMS, f"unusable model path: {type(exc).__name__}"
                ) from None
            if any(p.is_relative_to(d) for d in self._private_dirs()):
                raise ErllamaError(
                    ErrorCode.INVALID_PARAMS,
                    "model paths may not point into erllama's runtime or cache directories",
                )
            if not is_file:
                raise ErllamaError(
                    ErrorCode.LOAD_FAILED, f"model file {path[:200]} does not exist", {"path": path[:200]}
                )
            path = str(p)
        options = parse_load_options(msg.options).to_wire()
        self.create(model_id, path, options, Waiter(client, msg.id), places)
        self.table[model_id].floating = msg.replicas is not None and any(places)

    def _places(self, msg: LoadModel) -> list[str | None]:
        """Where the model's replicas run: a host name each, None for the broker's own machine (a host
        like the others, named ``cfg.name``)."""
        given = sum(x is not None for x in (msg.host, msg.hosts, msg.replicas))
        if given > 1:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, "give one of host, hosts and replicas")
        if msg.host is not None:
            return [self.here(msg.host)]
        if msg.hosts is not None:
            if not 1 <= len(msg.hosts) <= MAX_REPLICAS or len(set(msg.hosts)) != len(msg.hosts):
                raise ErllamaError(
                    ErrorCode.INVALID_PARAMS,
                    f"hosts: 1-{MAX_REPLICAS} distinct host names (one replica each)",
                )
            return [self.here(h) for h in msg.hosts]
        n = msg.replicas if msg.replicas is not None else 1
        if not 1 <= n <= MAX_REPLICAS:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, f"replicas: 1-{MAX_REPLICAS}")
        hosts = self.supervisor.hosts
        machines: list[str | None] = [None]  # the broker's own machine, and the hosts that are up
        if hosts is not None and n > 1:
            machines = hosts.machines()
        if machines == [None]:
            return [None] * n  # no hosts up: every replica on the broker's own machine
        if len(machines) < n:
            raise ErllamaError(
                ErrorCode.INVALID_PARAMS,
                f"replicas={n} needs {n} hosts that are up; {len(machines)} are",
                {"hosts_up": [name or self.cfg.name for name in machines]},
            )
        return machines[:n]

    def here(self, name: str | None) -> str | None:
        """A host name as placements hold it: None for the broker's own machine."""
        return None if name == self.cfg.name else name

    def _check_host(self, name: str) -> None:
        """A model placed on a host: the host must be up (its path is checked there, by the worker)."""
        hosts = self.supervisor.hosts
        known = hosts.hosts.get(name) if hosts is not None else None
        if known is None:
            raise ErllamaError(ErrorCode.HOST_NOT_FOUND, f"no host {name!r} has joined", {"host": name})
        if hosts is None or hosts.up(name) is None:
            raise ErllamaError(
                ErrorCode.HOST_DOWN,
                f"host {name!r} is {known.state.value}",
                {"host": name, "state": known.state.value},
            )

    def _private_dirs(self) -> list[Path]:
        """Where erllama keeps sockets, locks and cache rows: never a model to load."""
        flags = self.cfg.cache.flags
        disk = Path(flags[flags.index("--disk-dir") + 1]) if "--disk-dir" in flags else default_disk_dir()
        shm = Path(flags[flags.index("--shm-dir") + 1]) if "--shm-dir" in flags else default_shm_dir()
        return [d.resolve() for d in (self.cfg.runtime_dir, disk, shm)]

    def create(
        self,
        model_id: str,
        path: str | None,
        options: dict[str, Any],
        waiter: Waiter | None,
        places: list[str | None],
    ) -> None:
        entry = ModelEntry(model_id, path, options, ModelQueue(model_id, max_queue=options["max_queue"]))
        places = [self.here(p) for p in places]  # a config file names this machine
        entry.replicas = [Replica(model_id, i, host) for i, host in enumerate(places)]
        if waiter is not None:
            entry.load_waiters.append(waiter)
        self.table[model_id] = entry
        where = ", ".join(h or self.cfg.name for h in places)
        log.info("loading model %s: %d replica(s) on %s", model_id, len(places), where)
        for replica in entry.replicas:
            self.supervisor.spawn(entry, replica)

    def unload(self, client: bytes, msg: UnloadModel) -> None:
        entry = self.entry(msg.model)
        entry.unload_waiters.append(Waiter(client, msg.id))
        if entry.unloading:
            return
        entry.unloading = True
        unloaded = ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} was unloaded")
        self.requests.fail_waiting(entry, unloaded)
        self.refuse_held_calls(entry, unloaded)
        for replica in entry.replicas:
            if replica.worker is not None and not self.workers.send(replica, Shutdown()):
                self.supervisor.kill(replica.worker)
        if all(r.worker is None for r in entry.replicas):
            self.forget(entry)

    def queue_depth(self, client: bytes, msg: QueueDepth) -> None:
        depth = self.entry(msg.model).depth if msg.model else self.totals.depth
        self.front.reply(client, msg.id, depth)

    def call(self, client: bytes, msg: Call) -> None:
        """Send a call to the model's worker; one for a model still loading (or restarting after a crash)
        waits for it, as an ``infer`` does."""
        entry = self.entry(msg.model)
        try:
            op = WorkerOp(msg.op)
        except ValueError:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, f"unknown operation {msg.op!r}") from None
        if entry.state in (ModelState.LOADING, ModelState.RESTARTING):
            entry.held_calls.append(HeldCall(Waiter(client, msg.id), op, msg.args))
            return
        if entry.state is ModelState.FAILED:
            raise ErllamaError(
                ErrorCode.MODEL_FAILED, f"model {entry.model_id!r} has failed", entry.last_error
            )
        if entry.state is ModelState.UNAVAILABLE:
            raise host_down(entry)
        if entry.state not in (ModelState.READY, ModelState.DRAINING):
            raise ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} is {entry.state.value}")
        self.workers.call(
            self._replica_for(entry, msg.args), Waiter(client, msg.id), op, msg.args, next(self.rids)
        )

    @staticmethod
    def _replica_for(entry: ModelEntry, args: dict[str, Any]) -> Replica:
        """A call about a session goes to the replica holding it; any other to the first serving one."""
        serving = entry.serving()
        sid = args.get("session_id")
        index = entry.sessions.get(sid) if isinstance(sid, str) else None
        return next((r for r in serving if r.index == index), serving[0])

    def _send_held_calls(self, entry: ModelEntry) -> None:
        held, entry.held_calls = entry.held_calls, []
        for h in held:
            try:
                self.workers.call(self._replica_for(entry, h.args), h.waiter, h.op, h.args, next(self.rids))
            except ErllamaError as err:
                self.front.refuse(h.waiter, err)

    def refuse_held_calls(self, entry: ModelEntry, err: ErllamaError) -> None:
        held, entry.held_calls = entry.held_calls, []
        for h in held:
            self.front.refuse(h.waiter, err)

    # --- a registered worker, and the end of one -----------------------------------------------------------

    def ready(self, entry: ModelEntry, replica: Replica) -> None:
        self.answer_loaders(entry)
        self._send_held_calls(entry)
        self.requests.dispatch(entry)

    def answer_loaders(self, entry: ModelEntry) -> None:
        """A load is answered once no replica is still loading (requests are served from the first)."""
        if any(r.state is ModelState.LOADING for r in entry.replicas):
            return
        for w in entry.load_waiters:
            self.front.answer(w, entry.describe(self.cfg.name))
        entry.load_waiters.clear()

    def worker_exited(self, wp: WorkerProcess, detail: dict[str, Any]) -> None:
        """Decide a replica's future after its worker ended: forgotten (unloading, shutting down), failed
        to load, or crashed (its requests settled, then restarted with backoff or failed for good)."""
        self.workers.forget(wp)
        entry = self.table.get(wp.model_id)
        replica = (
            entry.replicas[wp.replica] if entry is not None and wp.replica < len(entry.replicas) else None
        )
        if entry is None or replica is None or replica.worker is not wp:
            return
        replica.worker = None
        if entry.unloading or self.supervisor.stopping:
            if all(r.worker is None for r in entry.replicas):
                self.forget(entry)
            return
        detail["model"] = entry.model_id
        detail["replica"] = replica.index
        if replica.state is ModelState.DRAINING:  # told to shut down (or its host lost while draining)
            gone = ErllamaError(ErrorCode.WORKER_CRASHED, f"the worker of {entry.model_id!r} ended", detail)
            self.requests.router.replaced(entry, replica)
            self.requests.fail_running(replica, gone)
            self.workers.fail_calls(replica, gone)
            return
        if replica.state is ModelState.LOADING:
            self._load_failed(entry, replica, detail)
            return
        log.error(
            "worker of %s (replica %d) died: %s",
            entry.model_id,
            replica.index,
            {k: v for k, v in detail.items() if k != "stderr_tail"},
        )
        self._crashed(entry, replica, detail)

    def _load_failed(self, entry: ModelEntry, replica: Replica, detail: dict[str, Any]) -> None:
        """A replica that never became ready has failed; the model fails with it when no replica is left
        that serves or may still."""
        reported = replica.last_error or {}
        code = reported.get("code", ErrorCode.LOAD_FAILED)
        message = (
            reported.get("message")
            or f"the worker exited while loading: {detail.get('stderr_tail', '')[-500:]}"
        )
        replica.state = ModelState.FAILED
        replica.last_error = {"code": code, "message": message}
        log.error("loading %s (replica %d) failed: %s", entry.model_id, replica.index, message)
        if entry.state is not ModelState.FAILED:
            self.answer_loaders(entry)  # the others serve; model_info shows this one failed
            return
        err = ErllamaError(code, message, detail)
        for w in entry.load_waiters:
            self.front.refuse(w, err)
        entry.load_waiters.clear()
        self.refuse_held_calls(entry, err)
        self.requests.fail_waiting(entry, err)
        del self.table[entry.model_id]

    def _crashed(self, entry: ModelEntry, replica: Replica, detail: dict[str, Any]) -> None:
        err = ErllamaError(ErrorCode.WORKER_CRASHED, f"the worker of {entry.model_id!r} died", detail)
        self.requests.worker_died(entry, replica, err, detail)
        self.workers.fail_calls(replica, err)
        replica.last_error = {"code": err.code, "message": err.message, "detail": detail}
        now = time.monotonic()
        if entry.spawned and replica.restart.record_crash(now):
            replica.state = ModelState.RESTARTING
            replica.restart_at_s = now + replica.restart.next_delay()
        else:
            replica.state = ModelState.FAILED
        if entry.state is ModelState.FAILED:
            failed = ErllamaError(
                ErrorCode.MODEL_FAILED, f"model {entry.model_id!r} failed", entry.last_error
            )
            self.requests.fail_waiting(entry, failed)
            self.refuse_held_calls(entry, failed)
        else:
            self.requests.dispatch(entry)  # what it re-queued may run on another replica

    def forget(self, entry: ModelEntry) -> None:
        unloaded = ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} was unloaded")
        self.requests.fail_all(entry, unloaded)
        self.refuse_held_calls(entry, unloaded)
        for w in entry.unload_waiters:
            self.front.answer(w, {"unloaded": entry.model_id})
        self.table.pop(entry.model_id, None)
        log.info("model %s unloaded", entry.model_id)
