"""The store's KV events: a bounded ring of what rows appeared, left or moved, numbered per publisher.

Every row carries its block hashes (``RowEntry.blocks``, computed once when the row enters the index).
A reader asks for the events after the last ``seq`` it has; the ring answers from memory, or with a
snapshot of the live rows when it no longer holds them (or the reader knew another publisher: the daemon
restarted). A snapshot is cut into parts that are kept (a few, the newest) until their reader fetched them,
so that one taken at ``seq`` S stays consistent however many round trips it takes; events after S follow.
Only the daemon's loop thread touches it.
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from erllama.cachestore.index import RowEntry
from erllama.protocol import CacheKvEvents, CacheTier, KvEvent, KvEventBatch, KvEventKind

MAX_KV_RING_EVENTS: Final = 8192
MAX_KV_BATCH_EVENTS: Final = 4096
# What a batch may take on the wire (estimated): well under MAX_CACHE_CONTROL_BYTES, for a beat carries one.
MAX_KV_BATCH_BYTES: Final = 384 * 1024
_EVENT_OVERHEAD_BYTES: Final = 24  # the array, kind, n_tokens, tiers
_BLOCK_BYTES: Final = 9  # a msgpack uint64
MAX_KEPT_SNAPSHOTS: Final = 4  # snapshots in parts kept for readers still fetching them


def publisher_id() -> str:
    """A new publisher id: one per daemon start, so that a reader tells a restarted store."""
    return uuid.uuid4().hex[:12]


def wire_bytes(fingerprint: bytes, blocks: list[int]) -> int:
    """About what one event takes in a batch's msgpack (an upper bound)."""
    return _EVENT_OVERHEAD_BYTES + len(fingerprint) + _BLOCK_BYTES * len(blocks)


class KvEventLog:
    """The ring, the sequence number and the snapshots of one store."""

    def __init__(self, publisher: str | None = None, ring_events: int = MAX_KV_RING_EVENTS):
        self.publisher = publisher or publisher_id()
        self.seq = 0
        self._ring: deque[tuple[int, KvEvent]] = deque(maxlen=ring_events)
        self._snapshots: OrderedDict[int, list[list[KvEvent]]] = OrderedDict()  # seq -> parts

    def stored(self, entry: RowEntry) -> None:
        self._append(KvEventKind.STORED, entry)

    def removed(self, entry: RowEntry) -> None:
        self._append(KvEventKind.REMOVED, entry)

    def moved(self, entry: RowEntry, from_tier: CacheTier) -> None:
        self._append(KvEventKind.MOVED, entry, from_tier)

    def _append(self, kind: KvEventKind, entry: RowEntry, from_tier: CacheTier | None = None) -> None:
        if not entry.blocks:  # shorter than one block: nothing a router could match
            return
        self.seq += 1
        event = KvEvent(kind, entry.fingerprint, entry.blocks, entry.n_tokens, entry.tier, from_tier)
        self._ring.append((self.seq, event))

    def batch(self, query: CacheKvEvents, rows: Iterable[RowEntry]) -> KvEventBatch:
        """The answer to ``query``: its next snapshot part, the events after its ``since_seq``, or a
        new snapshot of ``rows`` (the live rows) when neither can be given."""
        if query.publisher == self.publisher:
            if query.part > 0:
                parts = self._snapshots.get(query.since_seq)
                if parts is not None and query.part < len(parts):
                    return self._snapshot_part(query.since_seq, parts, query.part)
            elif self._holds_after(query.since_seq):
                return self._events_after(query.since_seq)
        return self._snapshot(rows)

    def _holds_after(self, since_seq: int) -> bool:
        if not 0 <= since_seq <= self.seq:
            return False
        return since_seq == self.seq or self._ring[0][0] <= since_seq + 1

    def _events_after(self, since_seq: int) -> KvEventBatch:
        events: list[KvEvent] = []
        last, nbytes = since_seq, 0
        if since_seq < self.seq:
            start = since_seq + 1 - self._ring[0][0]
            for seq, event in itertools.islice(self._ring, start, None):
                nbytes += wire_bytes(event.fingerprint, event.blocks)
                if events and (len(events) >= MAX_KV_BATCH_EVENTS or nbytes > MAX_KV_BATCH_BYTES):
                    break
                events.append(event)
                last = seq
        return KvEventBatch(self.publisher, since_seq + 1, last, False, events, more=last < self.seq)

    def _snapshot(self, rows: Iterable[RowEntry]) -> KvEventBatch:
        parts: list[list[KvEvent]] = [[]]
        nbytes = 0
        for entry in rows:
            if not entry.blocks:
                continue
            part = parts[-1]
            size = wire_bytes(entry.fingerprint, entry.blocks)
            nbytes += size
            if part and (len(part) >= MAX_KV_BATCH_EVENTS or nbytes > MAX_KV_BATCH_BYTES):
                part = []
                parts.append(part)
                nbytes = size
            part.append(
                KvEvent(KvEventKind.STORED, entry.fingerprint, entry.blocks, entry.n_tokens, entry.tier)
            )
        if len(parts) > 1:
            self._snapshots[self.seq] = parts
            self._snapshots.move_to_end(self.seq)
            while len(self._snapshots) > MAX_KEPT_SNAPSHOTS:
                self._snapshots.popitem(last=False)
        return self._snapshot_part(self.seq, parts, 0)

    def _snapshot_part(self, seq: int, parts: list[list[KvEvent]], part: int) -> KvEventBatch:
        more = part + 1 < len(parts) or seq < self.seq
        if part + 1 == len(parts):
            self._snapshots.pop(seq, None)  # fetched to the end: the reader goes on with events
        return KvEventBatch(
            self.publisher, seq + 1, seq, True, parts[part], part=part, parts=len(parts), more=more
        )


@dataclass(slots=True)
class KvEventCursor:
    """A reader's place in one store's events: what to ask next (hosts, and the broker for its own store)."""

    publisher: str | None = None
    since_seq: int = 0
    part: int = 0

    def query(self, rid: int) -> CacheKvEvents:
        return CacheKvEvents(rid=rid, since_seq=self.since_seq, publisher=self.publisher, part=self.part)

    def advance(self, batch: KvEventBatch) -> None:
        """``batch`` was received (and handed on): ask for what follows it next."""
        self.publisher, self.since_seq = batch.publisher, batch.last_seq
        self.part = batch.part + 1 if batch.snapshot and batch.part + 1 < batch.parts else 0

    def reset(self) -> None:
        """Start from a snapshot again (a (re)join, or the index saw a gap)."""
        self.publisher, self.since_seq, self.part = None, 0, 0
