"""Where a request is queued: one bounded FIFO per model, whatever its number of replicas.

The broker owns every queue, so queue depth, pending length, phase and the last cache hit
are answered from its tables with no worker round-trip. Each replica's worker advertises its
sequence slots when it registers and is never sent more requests than it has slots (its credit), so
a request that waits, waits here, where it can be counted, cancelled, re-queued and routed
(``broker/routing.py`` picks the replica when a slot frees).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from erllama.protocol import ErllamaError, ErrorCode, SamplingParams


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
    replica: int | None = None  # the replica it was dispatched to


@dataclass(slots=True)
class ModelQueue:
    """One model's waiting requests, oldest first (the replicas hold what runs)."""

    model_id: str
    max_queue: int
    waiting: deque[int] = field(default_factory=deque)
    last_cache_hit: dict[str, Any] | None = None

    @property
    def pending_len(self) -> int:
        return len(self.waiting)

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

    def remove(self, rid: int) -> bool:
        """Take a request out of the queue. Returns True if it was waiting (never dispatched)."""
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
