"""Where a request is queued: one bounded FIFO per model, and credit-based dispatch.

The broker owns every queue, so queue depth, pending length, phase and the last cache hit
are answered from these tables in O(1) with no worker round-trip. A worker advertises its
sequence slots when it registers; it is never sent more requests than it has slots, so a
request that waits, waits here, where it can be counted, cancelled and re-queued.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from erllama.protocol import ErllamaError, ErrorCode, ModelState, Phase, SamplingParams


@dataclass(slots=True)
class Request:
    """One client request as the broker tracks it, from arrival to its terminal event."""

    rid: int  # the broker's id, unique for its lifetime; workers only ever see this
    client: bytes  # ZeroMQ routing id of the client connection
    client_id: str  # the client's own request id
    model_id: str
    prompt: str | list[int]
    params: SamplingParams  # validated at admission; travels typed to the worker
    received_s: float = field(default_factory=time.monotonic)
    dispatched: bool = False
    tokens_sent: int = 0
    crashes: int = 0  # worker deaths this request was present at


@dataclass(slots=True)
class ModelQueue:
    """The broker's view of one model: its queue, its running set and what its worker reports."""

    model_id: str
    max_queue: int
    state: ModelState = ModelState.LOADING
    slots: int = 0
    waiting: deque[int] = field(default_factory=deque)
    running: set[int] = field(default_factory=set)
    reported_phase: Phase = Phase.IDLE  # from the worker's heartbeats
    last_cache_hit: dict[str, Any] | None = None
    tokens_generated: int = 0
    tokens_prefilled: int = 0  # the worker's count of prompt tokens decoded

    @property
    def phase(self) -> Phase:
        """The worker's reported phase, corrected for what the broker knows first: nothing running
        means idle, and a request dispatched before the worker reported starts by prefilling."""
        if not self.running:
            return Phase.IDLE
        return Phase.PREFILLING if self.reported_phase is Phase.IDLE else self.reported_phase

    @property
    def pending_len(self) -> int:
        return len(self.waiting)

    @property
    def depth(self) -> int:
        """Requests accepted and not yet finished: waiting plus running."""
        return len(self.waiting) + len(self.running)

    def enqueue(self, rid: int, front: bool = False) -> None:
        """Append a request; ``front`` re-queues one that lost its worker before any token."""
        if not front and len(self.waiting) >= self.max_queue:
            raise ErllamaError(
                ErrorCode.OVERLOADED,
                f"model {self.model_id!r} has {len(self.waiting)} requests waiting (max_queue {self.max_queue})",
                {"pending_len": len(self.waiting), "max_queue": self.max_queue},
            )
        if front:
            self.waiting.appendleft(rid)
        else:
            self.waiting.append(rid)

    def next_dispatchable(self) -> int | None:
        """The next request to send to the worker, if it is ready and has a free slot (its credit)."""
        dispatching = self.state is ModelState.READY or self.state is ModelState.DRAINING
        if not dispatching or not self.waiting or len(self.running) >= self.slots:
            return None
        rid = self.waiting.popleft()
        self.running.add(rid)
        return rid

    def remove(self, rid: int) -> bool:
        """Forget a request wherever it is. Returns True if it was waiting (never dispatched)."""
        if rid in self.running:
            self.running.discard(rid)
            return False
        try:
            self.waiting.remove(rid)
        except ValueError:
            return False
        return True


@dataclass(slots=True)
class QueueTotals:
    """Global counters kept alongside the per-model queues so the global depth is O(1)."""

    depth: int = 0
    accepted: int = 0
    completed: int = 0
    failed: int = 0
    rejected_overloaded: int = 0
    bad_messages: int = 0
