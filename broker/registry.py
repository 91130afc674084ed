"""The broker's table of loaded models: how each was loaded, its replicas (one worker process each, on
this machine or on a host), its queue, its health."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from erllama.broker.queues import ModelQueue
from erllama.processes import RestartPolicy, WorkerProcess
from erllama.protocol import MemoryKind, ModelState, Phase, WorkerOp

# A model's state is the best of its replicas' states, in this order (a model with one ready replica is
# ready; one whose replicas have all failed has failed).
_STATE_ORDER = (
    ModelState.READY,
    ModelState.DRAINING,
    ModelState.LOADING,
    ModelState.RESTARTING,
    ModelState.UNAVAILABLE,
    ModelState.FAILED,
)
SERVING_STATES = (ModelState.READY, ModelState.DRAINING)  # a replica in these takes dispatched requests
PREFILL_TOKENS_PER_S_DEFAULT = 500.0  # a replica's speed until its first results measure it (this CPU)
SERVICE_S_DEFAULT = 2.0  # how long a request holds a sequence, until the replica's first result says
SPEED_EWMA_WEIGHT = 0.3  # each new measurement's share of a replica's running estimates


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
class Replica:
    """One worker process serving a model: on the broker's machine (``host`` None) or on a host. Each
    replica has its own sequences (``slots``), running set, restarts and figures; the queue is the
    model's."""

    model_id: str
    index: int  # its place in ``ModelEntry.replicas``; the worker echoes it in ``ready``
    host: str | None
    state: ModelState = ModelState.LOADING
    worker: WorkerProcess | None = None
    slots: int = 0
    running: set[int] = field(default_factory=set)
    reported_phase: Phase = Phase.IDLE  # from the worker's heartbeats
    tokens_generated: int = 0
    tokens_prefilled: int = 0  # the worker's count of prompt tokens decoded
    last_cache_hit: dict[str, Any] | None = None
    cache_stats: dict[str, int] | None = None  # the worker's cache counters, from its heartbeats
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    restart_at_s: float = 0.0
    restarts: int = 0
    last_error: dict[str, Any] | None = None
    prefill_tokens_per_s: float = PREFILL_TOKENS_PER_S_DEFAULT  # measured from its results
    service_s: float = SERVICE_S_DEFAULT  # measured: dispatch to the end of a request
    measured: bool = False  # whether the two figures above come from results yet (else the defaults)
    # rid -> the tokens routing expected it to prefill here, until its first token: this replica's backlog
    prefill_backlog: dict[int, int] = field(default_factory=dict)
    started_s: dict[int, float] = field(default_factory=dict)  # rid -> when it was dispatched here
    routed: int = 0  # requests dispatched to it

    @property
    def phase(self) -> Phase:
        """The worker's reported phase, corrected for what the broker knows first: nothing running
        means idle, and a request dispatched before the worker reported starts by prefilling."""
        if not self.running:
            return Phase.IDLE
        return Phase.PREFILLING if self.reported_phase is Phase.IDLE else self.reported_phase

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.running) if self.state in SERVING_STATES else 0

    @property
    def load(self) -> float:
        """The share of its sequences in use (1.0 when it has none to offer)."""
        return len(self.running) / self.slots if self.slots else 1.0

    def measured_result(self, prefilled: int, prefill_ms: float, service_s: float) -> None:
        """Learn from a finished request: its prefill speed (``prefilled`` tokens in ``prefill_ms``) and
        how long it held its sequence. The first result replaces the defaults, which are guesses."""
        w = SPEED_EWMA_WEIGHT if self.measured else 1.0
        if prefilled >= 64 and prefill_ms > 0:  # too few tokens measure the step's overhead, not the speed
            speed = prefilled * 1000.0 / prefill_ms
            self.prefill_tokens_per_s = (1 - w) * self.prefill_tokens_per_s + w * speed
        self.service_s = (1 - w) * self.service_s + w * service_s
        self.measured = True

    def slot_wait_s(self, now: float) -> float:
        """The expected time until one of its sequences frees: none while one is free, else the least
        expected remaining time of those running. One that has run past its expected time is expected
        to take as much longer again as it has overrun, so a replica stuck on a long request stops
        looking like it frees soon."""
        if self.free_slots > 0 or not self.started_s:
            return 0.0
        return min(abs(self.service_s - (now - t)) for t in self.started_s.values())

    def describe(self, here: str) -> dict[str, Any]:
        """One of ``model_info``'s ``replicas``; ``here``: the name of the broker's own machine."""
        return {
            "index": self.index,
            "host": self.host or here,
            "state": self.state.value,
            "worker_pid": self.worker.pid if self.worker else None,
            "slots": self.slots,
            "running": len(self.running),
            "phase": self.phase.value,
            "last_cache_hit": self.last_cache_hit,
            "tokens_generated": self.tokens_generated,
            "tokens_prefilled": self.tokens_prefilled,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "service_s": round(self.service_s, 3),
            "routed": self.routed,
            "cache": self.cache_stats,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }


@dataclass(slots=True)
class ModelEntry:
    model_id: str
    path: str | None
    options: dict[str, Any]  # canonical load options, as passed to the worker
    queue: ModelQueue
    replicas: list[Replica] = field(default_factory=list)
    spawned: bool = True  # False for a worker an operator started; the broker cannot respawn it
    unloading: bool = False
    # placed by count (``replicas=N``), not on named hosts: a replica whose host is lost moves to another
    floating: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # what the first worker reported in ``ready``
    fingerprint: str | None = None  # the model's cache fingerprint (hex), from ``ready``
    memory: MemoryKind = MemoryKind.TRANSFORMER  # from ``ready``: which cached rows the model can use
    load_waiters: list[Waiter] = field(default_factory=list)
    # calls to the worker (tokenize, ...) that arrived while it was loading or restarting: sent once it is ready
    held_calls: list[HeldCall] = field(default_factory=list)
    unload_waiters: list[Waiter] = field(default_factory=list)
    sessions: dict[str, int] = field(default_factory=dict)  # session id -> the replica holding its KV
    last_route: dict[str, Any] | None = None  # the last routing decision, for model_info
    loaded_at: float = field(default_factory=time.time)

    @property
    def state(self) -> ModelState:
        if self.unloading:
            return ModelState.UNLOADING
        states = {r.state for r in self.replicas}
        return next((s for s in _STATE_ORDER if s in states), ModelState.FAILED)

    @property
    def hosts(self) -> list[str | None]:
        return [r.host for r in self.replicas]

    @property
    def depth(self) -> int:
        """Requests accepted and not yet finished: waiting plus running on every replica."""
        return len(self.queue.waiting) + sum(len(r.running) for r in self.replicas)

    @property
    def last_error(self) -> dict[str, Any] | None:
        return next((r.last_error for r in self.replicas if r.last_error), None)

    def serving(self) -> list[Replica]:
        """The replicas that take requests: the ready ones; only while none is ready, the draining ones
        (they finish what the model accepted)."""
        ready = [r for r in self.replicas if r.state is ModelState.READY]
        return ready or [r for r in self.replicas if r.state is ModelState.DRAINING]

    def replica_of_pid(self, pid: int) -> Replica | None:
        return next((r for r in self.replicas if r.worker is not None and r.worker.pid == pid), None)

    def describe(self, here: str) -> dict[str, Any]:
        """``model_info``: everything from the broker's own tables, no worker round-trip. The top-level
        worker fields are the first replica's (a model loaded without replicas has just that one).
        ``here``: the name of the broker's own machine, shown as the host of the replicas it runs."""
        first = self.replicas[0]  # a model has at least one replica from its creation on
        running = sum(len(r.running) for r in self.replicas)
        return {
            "id": self.model_id,
            "state": self.state.value,
            "worker_pid": first.worker.pid if first.worker else None,
            "spawned": self.spawned,
            "host": first.host or here,
            "path": self.path,
            "options": self.options,
            "n_ctx": self.info.get("n_ctx"),
            "slots": sum(r.slots for r in self.replicas),
            "queue_depth": self.depth,
            "pending_len": len(self.queue.waiting),
            "running": running,
            "phase": _model_phase(self.replicas).value,
            "last_cache_hit": self.queue.last_cache_hit,
            "tokens_generated": sum(r.tokens_generated for r in self.replicas),
            "tokens_prefilled": sum(r.tokens_prefilled for r in self.replicas),
            "cache": first.cache_stats,
            "restarts": sum(r.restarts for r in self.replicas),
            "last_error": self.last_error,
            "loaded_at": self.loaded_at,
            "backend": self.info.get("backend"),
            "memory": self.memory.value,  # transformer | swa | recurrent | hybrid (README, The KV cache)
            "exact": self.info.get("exact"),  # warm greedy output bit-identical to cold
            "model": {k: v for k, v in self.info.items() if k not in ("options", "path", "n_ctx")},
            "routing": self.options.get("routing"),
            "replicas": [r.describe(here) for r in self.replicas],
            "last_route": self.last_route,
        }


def _model_phase(replicas: list[Replica]) -> Phase:
    phases = {r.phase for r in replicas}
    for p in (Phase.PREFILLING, Phase.GENERATING):
        if p in phases:
            return p
    return Phase.IDLE
