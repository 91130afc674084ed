"""Sticky sessions and the pool of free sequences.

A request with a ``session_id`` keeps its sequence's KV cells when it finishes: the session
is pinned to that sequence with the exact tokens the cells hold. The session's next request
whose prompt extends those tokens prefills only the new suffix there, with no cache lookup
and no restore. Pins are never allowed to starve the queue: when a new request needs a
sequence and every free one is pinned by an idle session, the least recently used idle
session is saved to the cache and unpinned (erllama deadlocks in that spot).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from erllama.protocol import ErllamaError, ErrorCode


@dataclass(slots=True)
class Session:
    """An idle session's pinned sequence and exactly the tokens its KV cells hold."""

    session_id: str
    seq_id: int
    tokens: list[int] = field(default_factory=list)
    logits: bytes | None = (
        None  # the next-token logits after ``tokens``, if known: a resend of them samples at once
    )
    last_used_s: float = field(default_factory=time.monotonic)


class SequencePool:
    """Which sequences are free, which are running a request, which are pinned by idle sessions."""

    def __init__(
        self, n_seq_max: int, release_kv: Callable[[int], None], save_before_unpin: Callable[[Session], None]
    ):
        # A heap: the lowest free id first keeps running sequences dense (0, 1, 2, ...), and llama.cpp
        # decodes consecutive per-sequence KV streams in one compute, gapped ones in several.
        self.free: list[int] = list(range(n_seq_max))
        self.pinned: dict[str, Session] = {}  # idle sessions holding a sequence
        self.active: dict[str, int] = {}  # session id -> the request using it now
        self._ending: set[str] = set()  # end_session arrived while the session was active
        self._release_kv = release_kv  # clears a sequence's cells
        self._save_before_unpin = save_before_unpin  # hands an idle session's KV to the cache

    # --- sessions ------------------------------------------------------------------------------------------

    def claim(self, session_id: str, rid: int) -> None:
        """Mark a session in use by ``rid``. Raises ``sticky_busy`` if another request uses it."""
        other = self.active.get(session_id)
        if other is not None and other != rid:
            raise ErllamaError(ErrorCode.STICKY_BUSY, f"session {session_id!r} is in use by another request")
        self.active[session_id] = rid

    def unpin(self, session_id: str) -> Session | None:
        """Take a claimed session's pinned sequence for its request (None if it holds none)."""
        return self.pinned.pop(session_id, None)

    def finish(self, session_id: str, seq_id: int, tokens: list[int], logits: bytes | None = None) -> bool:
        """A session's request ended on ``seq_id``. Returns True if the sequence stays pinned (the
        caller must not clear it), False if the session was ended meanwhile."""
        self.active.pop(session_id, None)
        if session_id in self._ending:
            self._ending.discard(session_id)
            return False
        self.pinned[session_id] = Session(session_id, seq_id, tokens, logits)
        return True

    def abandon(self, session_id: str) -> None:
        """A claimed request ended without a sequence (cancelled in the queue, failed)."""
        self.active.pop(session_id, None)
        self._ending.discard(session_id)

    def end(self, session_id: str) -> bool:
        """``end_session``: unpin now, or when its running request finishes. False if unknown."""
        if session_id in self.active:
            self._ending.add(session_id)
            return True
        s = self.pinned.pop(session_id, None)
        if s is None:
            return False
        self._release(s.seq_id)
        return True

    # --- sequences -----------------------------------------------------------------------------------------

    def take(self) -> int | None:
        """A free sequence, unpinning the least recently used idle session if that is the only way."""
        if not self.free:
            if not self.pinned:
                return None
            victim = min(self.pinned.values(), key=lambda s: s.last_used_s)
            self._save_before_unpin(victim)
            del self.pinned[victim.session_id]
            self._release(victim.seq_id)
        return heapq.heappop(self.free)

    def give_back(self, seq_id: int) -> None:
        self._release(seq_id)

    @property
    def available(self) -> int:
        """Sequences a new request could get now: free ones plus those of idle sessions."""
        return len(self.free) + len(self.pinned)

    def _release(self, seq_id: int) -> None:
        self._release_kv(seq_id)
        heapq.heappush(self.free, seq_id)
