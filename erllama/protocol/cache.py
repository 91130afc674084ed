"""Messages to and from ``erllama-cachestore`` (from workers, the broker and the ``erllama cache`` CLI).

Each request carries ``rid`` (the requester's id) and gets exactly one reply with the same ``rid``: the
``c.ok`` reply of its kind, or ``err`` (``messages.Error``). Keys, fingerprints and token ids travel as
msgpack bin (tokens as u32 little-endian). Row bytes never travel here except on the inline fallback
(one raw frame after the map); see cachestore/README.md. Every ``c.ok`` reply shares the tag, so a
requester decodes a reply with the decoder of what it asked (``codec.cache_reply_decoder``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from erllama.protocol.codes import CacheMsgType, CacheTier
from erllama.protocol.kvevents import KvEventBatch
from erllama.protocol.messages import Message

# --- requests -------------------------------------------------------------------------------------------


class CacheCall(Message, frozen=True, kw_only=True):
    """Base of the requests. ``rid`` is the requester's id for this round trip (the reply carries it);
    ``req`` is the broker's id of the request the call serves, if any, written in the store's logs."""

    rid: int
    req: int | None = None


class CacheExact(CacheCall, frozen=True, tag=CacheMsgType.EXACT.value):
    """key -> the row's metadata, or null."""

    key: bytes


class CachePrefix(CacheCall, frozen=True, tag=CacheMsgType.PREFIX.value):
    """fingerprint, tokens -> the stored usable row sharing the longest token prefix, or null. A row is
    usable if it has at most ``max_len`` tokens and extends at most ``max_overhang`` tokens past its common
    prefix with the query (0: only rows that are a prefix of it); None: no limit."""

    fp: bytes
    tokens: bytes
    min_len: int | None = None
    max_len: int | None = None
    max_overhang: int | None = None
    # Also lease the row found for this process (one round trip for a hit: the reply's ``load``).
    load_pid: int | None = None


class CacheLoad(CacheCall, frozen=True, tag=CacheMsgType.LOAD.value):
    """key -> a lease and where to map the row (inline: the row follows as a raw frame)."""

    key: bytes
    pid: int
    inline: bool = False


class CacheRelease(CacheCall, frozen=True, tag=CacheMsgType.RELEASE.value):
    lease: int
    bad: bool = False  # the reader found the row corrupt: verify it again


class CacheReserve(CacheCall, frozen=True, tag=CacheMsgType.RESERVE.value):
    """Announce a row: get a temp to fill, or already_present / conflict. ``reason`` and ``tier`` are
    checked by the store (an unknown one is invalid_params)."""

    fp: bytes
    tokens: bytes
    payload_len: int
    reason: str
    pid: int
    tier: str | None = None


class CacheCommit(CacheCall, frozen=True, tag=CacheMsgType.COMMIT.value):
    """The temp is written (inline: the payload follows as a raw frame); verify and publish it."""

    res: int
    crc: int
    inline: bool = False


class CacheAbort(CacheCall, frozen=True, tag=CacheMsgType.ABORT.value):
    res: int


class CacheStats(CacheCall, frozen=True, tag=CacheMsgType.STATS.value):
    """The store's counters, tiers and directories."""


class CacheEvict(CacheCall, frozen=True, tag=CacheMsgType.EVICT.value):
    """Free ``nbytes`` (``bytes`` on the wire) from ``tiers`` (memory-pressure watcher, CLI)."""

    nbytes: int = msgspec.field(name="bytes")
    tiers: list[str] = msgspec.field(default_factory=lambda: [CacheTier.RAM.value, CacheTier.SHM.value])


class CacheBye(CacheCall, frozen=True, tag=CacheMsgType.BYE.value):
    """The client is closing: end its leases and reservations now."""


class CacheKvEvents(CacheCall, frozen=True, tag=CacheMsgType.KV_EVENTS.value):
    """The KV events after ``since_seq`` of ``publisher`` (None: a reader starting afresh gets a
    snapshot); ``part``: the next part of the snapshot at ``since_seq`` (see ``kvevents.KvEventBatch``)."""

    since_seq: int = 0
    publisher: str | None = None
    part: int = 0


CacheRequest = (
    CacheExact
    | CachePrefix
    | CacheLoad
    | CacheRelease
    | CacheReserve
    | CacheCommit
    | CacheAbort
    | CacheStats
    | CacheEvict
    | CacheBye
    | CacheKvEvents
)

# --- replies --------------------------------------------------------------------------------------------


class CacheReply(Message, frozen=True, tag=CacheMsgType.OK.value, kw_only=True):
    """Base of the ``c.ok`` replies; the server sets ``rid`` when it sends one."""

    rid: int | None = None


class RowInfo(msgspec.Struct, frozen=True):
    """How a stored row is described."""

    key: bytes
    tier: CacheTier
    row_tokens: int
    size: int
    payload_len: int
    hits: int
    reason: str
    created_ns: int
    last_used_ns: int


class PrefixHitInfo(msgspec.Struct, frozen=True):
    key: bytes
    row_tokens: int
    common_len: int  # may be shorter than row_tokens: restore, then drop the KV cells from here on
    tier: CacheTier


class ExactReply(CacheReply, frozen=True):
    row: RowInfo | None = None


class LoadReply(CacheReply, frozen=True):
    lease: int
    path: str
    ino: int
    offset: int
    row: RowInfo


class PrefixReply(CacheReply, frozen=True):
    hit: PrefixHitInfo | None = None
    load: LoadReply | None = None  # the hit's lease, when the query asked for it (``load_pid``)


class ReserveReply(CacheReply, frozen=True):
    """``status`` reserved: fill the temp at ``path`` (``ino``) from ``offset``, then commit ``res``."""

    status: str
    key: bytes
    res: int | None = None
    tier: CacheTier | None = None
    path: str | None = None
    ino: int | None = None
    offset: int = 0
    size: int = 0
    head_crc: int = 0
    ttl_s: float = 0.0


class CommitReply(CacheReply, frozen=True):
    status: str
    key: bytes
    tier: CacheTier


class EvictReply(CacheReply, frozen=True):
    rows: int
    nbytes: int = msgspec.field(name="bytes")


class StatsReply(CacheReply, frozen=True):
    stats: dict[str, Any]


class KvEventsReply(CacheReply, frozen=True):
    batch: KvEventBatch


class Ack(CacheReply, frozen=True):
    """release, abort, bye."""


class LateReply(CacheReply, frozen=True):
    """A reply to a request its sender gave up on: what it granted, to hand back."""

    lease: int | None = None
    status: str | None = None
    res: int | None = None
