"""KV events: what a cache store holds, announced as prefix-block hashes (``erllama.blockhash``).

A store numbers its events (``seq``, from 1, per ``publisher``: a random id per daemon start). A reader
asks for the events after the last ``seq`` it has (``c.kv_events``); when the store cannot give them (a
new publisher, events older than its ring, or a reader that asks afresh) it answers with a snapshot: one
``stored`` event per live row, in parts when it is large. Hosts relay the batches to the broker in their
beats (``HostBeat.kv``); the broker's index (``broker/kvindex.py``) asks for a snapshot again
(``HostKvResync``) when it sees a gap.
"""

from __future__ import annotations

import msgspec

from erllama.protocol.codes import CacheTier, KvEventKind


class KvEvent(msgspec.Struct, frozen=True, array_like=True):
    """One row's change. ``blocks``: the row's block hashes (whole blocks only; rows shorter than one
    block are not announced); ``tier``: where the row is (stored, moved) or was (removed);
    ``from_tier``: where a moved row was."""

    kind: KvEventKind
    fingerprint: bytes
    blocks: list[int]
    n_tokens: int
    tier: CacheTier
    from_tier: CacheTier | None = None


class KvEventBatch(msgspec.Struct, frozen=True):
    """The events ``first_seq..last_seq`` of ``publisher`` (none: ``last_seq == first_seq - 1``).

    A snapshot (``snapshot``) holds the rows live at ``last_seq`` in ``parts`` parts: part 0 replaces
    what a reader knew of the publisher, parts 1.. (asked with ``since_seq = last_seq`` and ``part``) add
    to it. ``more``: the store has more to send now (the next part, or events past ``last_seq``)."""

    publisher: str
    first_seq: int
    last_seq: int
    snapshot: bool
    events: list[KvEvent]
    part: int = 0
    parts: int = 1
    more: bool = False
