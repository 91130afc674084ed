"""The broker's table of loaded models: how each was loaded, its worker, its queue, its health."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from erllama.broker.queues import ModelQueue
from erllama.processes import RestartPolicy, WorkerProcess
from erllama.protocol import MemoryKind, ModelState, WorkerOp


@dataclass(slots=True)
class Waiter:
    """A client waiting for a reply that arrives later (load, unload, a call to the worker)."""

    client: bytes
    client_id: str


@dataclass(slots=True)
class HeldCall:
    """A call to a worker that is not ready yet, as ``Models.call`` will send it."""

    waiter: Waiter
    op: WorkerOp
    args: dict[str, Any]


@dataclass(slots=True)
class ModelEntry:
    model_id: str
    path: str | None
    options: dict[str, Any]  # canonical load options, as passed to the worker
    queue: ModelQueue
    spawned: bool = True  # False for a worker an operator started; the broker cannot respawn it
    host: str | None = None  # the erllama-host it is placed on; None: the broker's own machine
    worker: WorkerProcess | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what the worker reported in ``ready``
    fingerprint: str | None = None  # the model's cache fingerprint (hex), from ``ready``
    memory: MemoryKind = MemoryKind.TRANSFORMER  # from ``ready``: which cached rows the model can use
    load_waiters: list[Waiter] = field(default_factory=list)
    # calls to the worker (tokenize, ...) that arrived while it was loading or restarting: sent once it is ready
    held_calls: list[HeldCall] = field(default_factory=list)
    unload_waiters: list[Waiter] = field(default_factory=list)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    restart_at_s: float = 0.0
    restarts: int = 0
    last_error: dict[str, Any] | None = None
    cache_stats: dict[str, int] | None = None  # the worker's cache counters, from its heartbeats
    loaded_at: float = field(default_factory=time.time)

    @property
    def state(self) -> ModelState:
        return self.queue.state

    @state.setter
    def state(self, value: ModelState) -> None:
        self.queue.state = value

    def describe(self) -> dict[str, Any]:
        """``model_info``: everything from the broker's own tables, no worker round-trip."""
        q = self.queue
        return {
            "id": self.model_id,
            "state": q.state.value,
            "worker_pid": self.worker.pid if self.worker else None,
            "spawned": self.spawned,
            "host": self.host,
            "path": self.path,
            "options": self.options,
            "n_ctx": self.info.get("n_ctx"),
            "slots": q.slots,
            "queue_depth": q.depth,
            "pending_len": q.pending_len,
            "running": len(q.running),
            "phase": q.phase.value,
            "last_cache_hit": q.last_cache_hit,
            "tokens_generated": q.tokens_generated,
            "tokens_prefilled": q.tokens_prefilled,
            "cache": self.cache_stats,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "loaded_at": self.loaded_at,
            "backend": self.info.get("backend"),
            "memory": self.memory.value,  # transformer | swa | recurrent | hybrid (README, The KV cache)
            "exact": self.info.get("exact"),  # warm greedy output bit-identical to cold
            "model": {k: v for k, v in self.info.items() if k not in ("options", "path", "n_ctx")},
        }
