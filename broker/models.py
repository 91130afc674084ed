"""The model table: loading and unloading models, what a model's worker death means for the model
(restart with backoff, or failed), and the client requests answered from the table.
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
from erllama.broker.registry import HeldCall, ModelEntry, Waiter
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
        if msg.host is not None:
            self._check_host(msg.host)
        elif path is not None:
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
        self.create(model_id, path, options, Waiter(client, msg.id), msg.host)

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
        host: str | None = None,
    ) -> None:
        entry = ModelEntry(model_id, path, options, ModelQueue(model_id, max_queue=options["max_queue"]))
        entry.host = host
        if waiter is not None:
            entry.load_waiters.append(waiter)
        self.table[model_id] = entry
        log.info("loading model %s%s", model_id, f" on host {host}" if host else "")
        self.supervisor.spawn(entry)

    def unload(self, client: bytes, msg: UnloadModel) -> None:
        entry = self.entry(msg.model)
        entry.unload_waiters.append(Waiter(client, msg.id))
        if entry.state is ModelState.UNLOADING:
            return
        entry.state = ModelState.UNLOADING
        unloaded = ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} was unloaded")
        self.requests.fail_waiting(entry, unloaded)
        self.refuse_held_calls(entry, unloaded)
        if entry.worker is None or not self.workers.send(entry, Shutdown()):
            if entry.worker is not None:
                self.supervisor.kill(entry.worker)
            else:
                self.forget(entry)

    def queue_depth(self, client: bytes, msg: QueueDepth) -> None:
        depth = self.entry(msg.model).queue.depth if msg.model else self.totals.depth
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
        self.workers.call(entry, Waiter(client, msg.id), op, msg.args, next(self.rids))

    def _send_held_calls(self, entry: ModelEntry) -> None:
        held, entry.held_calls = entry.held_calls, []
        for h in held:
            try:
                self.workers.call(entry, h.waiter, h.op, h.args, next(self.rids))
            except ErllamaError as err:
                self.front.refuse(h.waiter, err)

    def refuse_held_calls(self, entry: ModelEntry, err: ErllamaError) -> None:
        held, entry.held_calls = entry.held_calls, []
        for h in held:
            self.front.refuse(h.waiter, err)

    # --- a registered worker, and the end of one -----------------------------------------------------------

    def ready(self, entry: ModelEntry) -> None:
        for w in entry.load_waiters:
            self.front.answer(w, entry.describe())
        entry.load_waiters.clear()
        self._send_held_calls(entry)
        self.requests.dispatch(entry)

    def worker_exited(self, wp: WorkerProcess, detail: dict[str, Any]) -> None:
        """Decide a model's future after its worker ended: forgotten (unloading, shutting down), failed to
        load, or crashed (its requests settled, then restarted with backoff or failed for good)."""
        self.workers.forget(wp)
        entry = self.table.get(wp.model_id)
        if entry is None or entry.worker is not wp:
            return
        entry.worker = None
        if entry.state is ModelState.UNLOADING or self.supervisor.stopping:
            self.forget(entry)
            return
        detail["model"] = entry.model_id
        if entry.state is ModelState.DRAINING:  # told to shut down (or its host lost while draining)
            gone = ErllamaError(ErrorCode.WORKER_CRASHED, f"the worker of {entry.model_id!r} ended", detail)
            self.requests.fail_all(entry, gone)
            self.workers.fail_calls(entry.model_id, gone)
            return
        if entry.state is ModelState.LOADING:
            self._load_failed(entry, detail)
            return
        log.error(
            "worker of %s died: %s", entry.model_id, {k: v for k, v in detail.items() if k != "stderr_tail"}
        )
        self._crashed(entry, detail)

    def _load_failed(self, entry: ModelEntry, detail: dict[str, Any]) -> None:
        reported = entry.last_error or {}
        code = reported.get("code", ErrorCode.LOAD_FAILED)
        message = (
            reported.get("message")
            or f"the worker exited while loading: {detail.get('stderr_tail', '')[-500:]}"
        )
        err = ErllamaError(code, message, detail)
        for w in entry.load_waiters:
            self.front.refuse(w, err)
        entry.load_waiters.clear()
        self.refuse_held_calls(entry, err)
        self.requests.fail_waiting(entry, err)
        del self.table[entry.model_id]
        log.error("loading %s failed: %s", entry.model_id, message)

    def _crashed(self, entry: ModelEntry, detail: dict[str, Any]) -> None:
        err = ErllamaError(ErrorCode.WORKER_CRASHED, f"the worker of {entry.model_id!r} died", detail)
        self.requests.worker_died(entry, err, detail)
        self.workers.fail_calls(entry.model_id, err)
        entry.last_error = {"code": err.code, "message": err.message, "detail": detail}
        now = time.monotonic()
        if entry.spawned and entry.restart.record_crash(now):
            entry.state = ModelState.RESTARTING
            entry.restart_at_s = now + entry.restart.next_delay()
        else:
            entry.state = ModelState.FAILED
            failed = ErllamaError(
                ErrorCode.MODEL_FAILED, f"model {entry.model_id!r} failed", entry.last_error
            )
            self.requests.fail_waiting(entry, failed)
            self.refuse_held_calls(entry, failed)

    def forget(self, entry: ModelEntry) -> None:
        unloaded = ErllamaError(ErrorCode.MODEL_NOT_FOUND, f"model {entry.model_id!r} was unloaded")
        self.requests.fail_all(entry, unloaded)
        self.refuse_held_calls(entry, unloaded)
        for w in entry.unload_waiters:
            self.front.answer(w, {"unloaded": entry.model_id})
        self.table.pop(entry.model_id, None)
        log.info("model %s unloaded", entry.model_id)
