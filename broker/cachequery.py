"""The broker's own questions to the cache store: ``cached_prefix_len`` for clients (no worker hop), the
stats ping that tells a live store from a frozen one (its answer kept for ``list_hosts``), evictions for
the memory-pressure watcher, and the store's KV events for the routing index (source ``""``: this
machine).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import msgspec
import zmq

from erllama import protocol
from erllama.broker.front import FrontEnd
from erllama.broker.registry import ModelEntry, Waiter
from erllama.cachestore.client import CacheClient
from erllama.cachestore.events import KvEventCursor
from erllama.protocol import (
    CachePrefix,
    CacheStats,
    ErllamaError,
    ErrorCode,
    KvEventBatch,
    KvEventsReply,
    MemoryKind,
    PrefixReply,
    StatsReply,
    WireError,
    as_exception,
    encode,
)
from erllama.transport import make_socket

log = logging.getLogger(__name__)

CACHE_QUERY_TIMEOUT_S: Final = 2.0
MAX_TOKEN_ID: Final = 2**31  # token ids travel to the cache store as u32; no vocabulary comes near this
PING_RID: Final = 0  # the stats ping's; queries take theirs from the broker's ids, which start at 1
KV_POLL_INTERVAL_S: Final = 1.0  # as often as a host relays its store's events (once per beat)


class _ReplyHead(msgspec.Struct):
    """Enough of a reply to tell the answer to a KV events query from the others."""

    rid: int | None = None


class CacheQueries:
    """A DEALER to the store; answers are matched to the waiting client by ``rid``."""

    def __init__(self, ctx: zmq.Context, endpoint: str, front: FrontEnd, rids: Iterator[int]):
        self.endpoint = endpoint
        self.front = front
        self.rids = rids
        self.sock = make_socket(ctx, zmq.DEALER, protocol.MAX_CACHE_CONTROL_BYTES)
        self.sock.connect(endpoint)
        self.pending: dict[int, tuple[Waiter, float]] = {}  # rid -> who asked, deadline
        self.heard_s = time.monotonic()  # the store's last reply: a frozen store is killed
        self.pinged_s = 0.0
        self._decoder = protocol.cache_reply_decoder(PrefixReply)
        self._pressure_client: CacheClient | None = None  # used only from the watcher's thread
        self._head = msgspec.msgpack.Decoder(_ReplyHead)
        self._kv_decoder = protocol.cache_reply_decoder(KvEventsReply)
        self._stats_decoder = protocol.cache_reply_decoder(StatsReply)
        self.stats: dict[str, Any] | None = None  # the last ping's answer
        self.kv_cursor = KvEventCursor()
        self._kv_rid: int | None = None  # the KV events query under way
        self._kv_deadline_s = 0.0
        self._kv_next_s = 0.0
        # The batches for the routing index (``KvIndex.apply("", batch)``); False: a gap, read the store
        # from a snapshot again.
        self.on_kv_events: Callable[[str, KvEventBatch], bool] = lambda source, batch: True

    def cached_prefix_len(self, client: bytes, client_id: str, tokens: list[int], entry: ModelEntry) -> None:
        """How many leading ``tokens`` (checked by the caller) the cache holds for this model: asked of
        the store directly with the fingerprint the worker reported."""
        try:  # it came from a worker's ready message: trust nothing about it
            fp = bytes.fromhex(entry.fingerprint or "")
        except ValueError:
            fp = b""
        if not fp:
            self.front.reply(client, client_id, 0)
            return
        rid = next(self.rids)
        # A recurrent, hybrid or sliding-window model can use only rows that are a prefix of the prompt.
        overhang = None if entry.memory is MemoryKind.TRANSFORMER else 0
        tokens_bytes = struct.pack(f"<{len(tokens)}I", *tokens)
        query = CachePrefix(rid=rid, fp=fp, tokens=tokens_bytes, min_len=1, max_overhang=overhang)
        try:
            self.sock.send(encode(query), zmq.NOBLOCK)
        except zmq.Again:
            raise ErllamaError(ErrorCode.TIMEOUT, "the cache store is not accepting queries") from None
        self.pending[rid] = (Waiter(client, client_id), time.monotonic() + CACHE_QUERY_TIMEOUT_S)

    def ping(self, now: float) -> None:
        self.pinged_s = now
        try:
            self.sock.send(encode(CacheStats(rid=PING_RID)), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def poll_kv_events(self, now: float) -> None:
        """Ask the store for its KV events once per ``KV_POLL_INTERVAL_S`` (at once while it has more)."""
        if now < self._kv_next_s or (self._kv_rid is not None and now < self._kv_deadline_s):
            return
        rid = next(self.rids)
        try:
            self.sock.send(encode(self.kv_cursor.query(rid)), zmq.NOBLOCK)
        except zmq.Again:
            return
        self._kv_rid, self._kv_deadline_s = rid, now + CACHE_QUERY_TIMEOUT_S
        self._kv_next_s = now + KV_POLL_INTERVAL_S

    def _on_kv_reply(self, frame: bytes) -> None:
        self._kv_rid = None
        try:
            msg = self._kv_decoder.decode(frame)
        except WireError:
            return
        if not isinstance(msg, KvEventsReply):
            log.warning("the cache store refused a KV events query: %s", as_exception(msg))
            return
        self.kv_cursor.advance(msg.batch)
        applied = self.on_kv_events("", msg.batch)
        if not applied:  # a gap: a snapshot next
            self.kv_cursor.reset()
        if msg.batch.more or not applied:
            self._kv_next_s = 0.0

    def on_frames(self, frames: list[bytes]) -> None:
        self.heard_s = time.monotonic()  # any reply, the pings' included, shows the store is alive
        try:
            rid = self._head.decode(frames[0]).rid
        except (msgspec.DecodeError, msgspec.ValidationError):
            rid = None
        if rid is not None and rid == self._kv_rid:
            self._on_kv_reply(frames[0])
            return
        if rid == PING_RID:
            try:
                stats = self._stats_decoder.decode(frames[0])
            except WireError:
                return
            self.stats = stats.stats if isinstance(stats, StatsReply) else None
            return
        try:
            msg = self._decoder.decode(frames[0])
        except WireError:
            return  # garbage
        query = self.pending.pop(msg.rid, None) if msg.rid is not None else None
        if query is None:
            return
        waiter = query[0]
        if isinstance(msg, PrefixReply):
            self.front.answer(waiter, msg.hit.common_len if msg.hit is not None else 0)
        else:
            self.front.refuse(waiter, as_exception(msg))

    def timers(self, now: float) -> None:
        for rid, (waiter, deadline) in list(self.pending.items()):
            if now > deadline:
                del self.pending[rid]
                self.front.refuse(waiter, ErllamaError(ErrorCode.TIMEOUT, "the cache store did not answer"))

    def evict_bytes(self, nbytes: int) -> int:
        """The memory-pressure watcher's hand on the cache (called from its thread, with its own socket)."""
        if self._pressure_client is None:
            self._pressure_client = CacheClient(self.endpoint)
        return self._pressure_client.evict_bytes(nbytes)

    def close(self) -> None:
        self.sock.close(linger=500)
