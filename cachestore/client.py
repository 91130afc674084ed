"""``CacheClient``: the synchronous library workers (and the broker, and the CLI) use to talk to
``erllama-cachestore``. One client = one DEALER socket: use one per thread.

Row bytes never cross the socket on the normal path. ``load`` maps the row file the daemon names
(read-only, and kept for the next load of the same row: see ``mapping``); ``save``/``begin_save`` map
the temp the daemon created and write the payload straight into it. Only where the mapping is
impossible (a daemon in another pid namespace) do bytes travel as one raw frame ("inline").
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import time
from collections.abc import Sequence
from typing import Any, Final, Self, TypeVar

import msgspec
import zmq

from erllama.cachestore.codec import (
    CorruptRow,
    tokens_to_bytes,
)
from erllama.cachestore.config import default_endpoint
from erllama.cachestore.mapping import MAPPINGS
from erllama.cachestore.rows import (
    DROPPED_CODES,
    LoadedRow,
    PendingRow,
    PrefixHit,
    RowMeta,
    copy_releasing_gil,
)
from erllama.logsetup import CURRENT_REQUEST
from erllama.protocol import (
    MAX_CACHE_PAYLOAD_BYTES,
    Ack,
    CacheAbort,
    CacheBye,
    CacheCall,
    CacheEvict,
    CacheExact,
    CacheKvEvents,
    CacheLoad,
    CachePrefix,
    CacheRelease,
    CacheReply,
    CacheReserve,
    CacheStats,
    CacheTier,
    Decoder,
    ErllamaError,
    ErrorCode,
    EvictReply,
    ExactReply,
    KvEventBatch,
    KvEventsReply,
    LateReply,
    LoadReply,
    PrefixHitInfo,
    PrefixReply,
    ReserveReply,
    ReserveStatus,
    SaveOutcome,
    SaveReason,
    StatsReply,
    WireError,
    as_exception,
    cache_reply_decoder,
    encode,
)
from erllama.transport import make_socket

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

# Lookups and loads are on a request's path to its first token and the store answers them from memory
# in tens of microseconds; what a round trip costs is mostly waking threads. Polling for the reply
# without sleeping first halves it (ipc ping-pong on the 2-core test machine: 0.24 -> 0.13 ms), for at
# most this much CPU per call.
REPLY_SPIN_S: Final = 0.0005
BYE_TIMEOUT_S: Final = 0.2


R = TypeVar("R", bound=CacheReply)


class _ReplyHead(msgspec.Struct):
    """Just enough of a reply to tell whether it answers the request we wait for."""

    rid: int | None = None


def _remaining_ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))


class CacheClient:
    """Synchronous client of the cache store. Expected outcomes are return values; transport failure or
    a timeout raises ``ErllamaError(timeout)`` so the caller can drop (and count) what it was doing."""

    def __init__(self, endpoint: str | None = None, timeout_s: float = 2.0):
        self.endpoint = endpoint or default_endpoint()
        self.timeout_s = timeout_s
        self._pid = os.getpid()
        self._rids = itertools.count(1)
        self._sock = make_socket(zmq.Context.instance(), zmq.DEALER, MAX_CACHE_PAYLOAD_BYTES)
        # Queue nothing for a store that is not there: a load sent to a dead store and delivered to its
        # successor after we gave up would hold a lease nobody releases.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(self.endpoint)
        self._head = msgspec.msgpack.Decoder(_ReplyHead)
        self._late = cache_reply_decoder(LateReply)
        self._decoders: dict[type[CacheReply], Decoder[Any]] = {}

    def request(
        self,
        msg: CacheCall,
        reply: type[R],
        frame: Any = None,
        timeout_s: float | None = None,
        spin_s: float = 0.0,
    ) -> tuple[R, zmq.Frame | None]:
        """One round trip: ``msg`` (its ``rid`` is replaced by ours, its ``req`` by the request this thread
        works for, if any) for its ``reply`` and payload frame; raises ``ErllamaError``. ``spin_s``: poll for
        the reply without sleeping this long first (see ``REPLY_SPIN_S``)."""
        rid = next(self._rids)
        ctrl = encode(msgspec.structs.replace(msg, rid=rid, req=CURRENT_REQUEST.get()))
        decoder = self._decoders.get(reply)
        if decoder is None:
            decoder = self._decoders[reply] = cache_reply_decoder(reply)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            if not self._sock.poll(_remaining_ms(deadline), zmq.POLLOUT):  # not connected (yet)
                raise ErllamaError(ErrorCode.TIMEOUT, f"no cache store at {self.endpoint}")
            if frame is None:
                self._sock.send(ctrl, zmq.NOBLOCK)
            else:
                self._sock.send_multipart([ctrl, frame], zmq.NOBLOCK, copy=False)
            spin_until = time.perf_counter() + spin_s
            while True:
                try:
                    parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    if time.perf_counter() < spin_until:
                        continue
                    if not self._sock.poll(_remaining_ms(deadline), zmq.POLLIN):
                        raise ErllamaError(
                            ErrorCode.TIMEOUT,
                            f"cache store at {self.endpoint} did not answer {type(msg).__name__}",
                        ) from None
                    continue
                head = self._head.decode(parts[0].buffer)
                if head.rid == rid:
                    break
                self._late_reply(parts[0].buffer)
            answer = decoder.decode(parts[0].buffer)
        except zmq.ZMQError as exc:
            raise ErllamaError(ErrorCode.TIMEOUT, f"cache store transport failed: {exc}") from None
        except (WireError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ErllamaError(
                ErrorCode.PROTOCOL_ERROR, f"unusable reply from the cache store: {exc}"
            ) from None
        if not isinstance(answer, reply):
            raise as_exception(answer)
        return answer, (parts[1] if len(parts) > 1 else None)

    def _late_reply(self, frame: memoryview) -> None:
        """A reply to a request we gave up on (or a release): hand back what it granted."""
        try:
            msg = self._late.decode(frame)
        except WireError:
            return
        if not isinstance(msg, LateReply):
            return
        if msg.lease is not None:
            self.release(msg.lease)
        elif msg.status == ReserveStatus.RESERVED and msg.res is not None:
            self._sock.send(encode(CacheAbort(rid=next(self._rids), res=msg.res)), zmq.NOBLOCK)

    # --- lookups -----------------------------------------------------------------------------------------

    def exact(self, key: bytes) -> RowMeta | None:
        row = self.request(CacheExact(rid=0, key=key), ExactReply, spin_s=REPLY_SPIN_S)[0].row
        return RowMeta.from_wire(row) if row is not None else None

    def longest_prefix(
        self,
        fingerprint: bytes,
        tokens: Sequence[int],
        min_len: int | None = None,
        max_len: int | None = None,
        max_overhang: int | None = None,
    ) -> PrefixHit | None:
        """The stored row sharing the most leading tokens with ``tokens`` among the usable ones: at most
        ``max_len`` tokens long, extending at most ``max_overhang`` tokens past the shared part (0: a
        prefix of ``tokens``). None if fewer than ``min_len`` tokens are shared."""
        reply = self._prefix(fingerprint, tokens, min_len, max_len, max_overhang, load=False)
        return None if reply.hit is None else _hit(reply.hit)

    def find(
        self,
        fingerprint: bytes,
        tokens: Sequence[int],
        min_len: int | None = None,
        max_len: int | None = None,
        max_overhang: int | None = None,
    ) -> tuple[PrefixHit, LoadedRow] | None:
        """``longest_prefix`` and ``load`` of what it finds in one round trip; None on a miss, or if the
        row went away or is unusable."""
        try:
            reply = self._prefix(fingerprint, tokens, min_len, max_len, max_overhang, load=True)
        except ErllamaError as err:
            if err.code in (ErrorCode.NOT_FOUND, ErrorCode.CORRUPT):
                return None  # gone between the lookup and the lease, inside the store
            raise
        if reply.hit is None or reply.load is None:
            return None
        row = self._map(reply.hit.key, reply.load)
        return None if row is None else (_hit(reply.hit), row)

    def _prefix(
        self,
        fingerprint: bytes,
        tokens: Sequence[int],
        min_len: int | None,
        max_len: int | None,
        max_overhang: int | None,
        load: bool,
    ) -> PrefixReply:
        query = CachePrefix(
            rid=0,
            fp=fingerprint,
            tokens=tokens_to_bytes(tokens),
            min_len=min_len,
            max_len=max_len,
            max_overhang=max_overhang,
            load_pid=self._pid if load else None,
        )
        return self.request(query, PrefixReply, spin_s=REPLY_SPIN_S)[0]

    # --- reading -----------------------------------------------------------------------------------------

    def load(self, key: bytes) -> LoadedRow | None:
        """Lease and map the row ``key``; None if it is gone (evicted, or found corrupt and removed)."""
        try:
            msg, _ = self.request(CacheLoad(rid=0, key=key, pid=self._pid), LoadReply, spin_s=REPLY_SPIN_S)
        except ErllamaError as err:
            if err.code in (ErrorCode.NOT_FOUND, ErrorCode.CORRUPT):
                return None
            raise
        return self._map(key, msg)

    def _map(self, key: bytes, msg: LoadReply) -> LoadedRow | None:
        """Map a leased row where the store keeps it (or read it inline where it cannot be mapped)."""
        tier, size = msg.row.tier, msg.row.size
        try:
            mapping = MAPPINGS.acquire(tier, msg.path, msg.ino, size)
        except CorruptRow as exc:
            log.warning("row %s unusable: %s", key.hex()[:16], exc)
            self.release(msg.lease, bad=True)
            return None
        except OSError as exc:
            log.info("cannot map %s (%s): loading inline", msg.path, exc)
            self.release(msg.lease)
            return self._load_inline(key)
        try:
            return LoadedRow(self, key, msg.lease, tier, size, mapping=mapping)
        except CorruptRow as exc:
            log.warning("row %s failed the reader's check: %s", key.hex()[:16], exc)
            MAPPINGS.release(mapping)
            self.release(msg.lease, bad=True)
            return None

    def _load_inline(self, key: bytes) -> LoadedRow | None:
        try:
            msg, frame = self.request(CacheLoad(rid=0, key=key, pid=self._pid, inline=True), LoadReply)
        except ErllamaError as err:
            if err.code in (ErrorCode.NOT_FOUND, ErrorCode.CORRUPT):
                return None
            raise
        assert frame is not None
        try:
            return LoadedRow(self, key, msg.lease, msg.row.tier, msg.row.size, inline=bytearray(frame.buffer))
        except CorruptRow:
            self.release(msg.lease, bad=True)
            return None

    def release(self, lease: int, bad: bool = False) -> None:
        """End a lease (``LoadedRow.close`` does this). Fire and forget: the reply is skipped by the
        next request, and a release that never arrives ends with our process or our ``close()``."""
        try:
            self._sock.send(encode(CacheRelease(rid=next(self._rids), lease=lease, bad=bad)), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("lease %d release not sent: %s", lease, exc)

    # --- writing -----------------------------------------------------------------------------------------

    def begin_save(
        self,
        fingerprint: bytes,
        tokens: Sequence[int],
        payload_len: int,
        reason: SaveReason | str,
        tier: CacheTier | None = None,
    ) -> PendingRow | SaveOutcome:
        """Reserve a row: a ``PendingRow`` to fill and commit, or the outcome if there is nothing to write."""
        reserve = CacheReserve(
            rid=0,
            fp=fingerprint,
            tokens=tokens_to_bytes(tokens),
            payload_len=payload_len,
            reason=SaveReason(reason).value,
            pid=self._pid,
            tier=CacheTier(tier).value if tier is not None else None,
        )
        try:
            msg, _ = self.request(reserve, ReserveReply)
        except ErllamaError as err:
            if err.code in DROPPED_CODES:
                log.info("save dropped at reserve: %s", err)
                return SaveOutcome.DROPPED
            raise
        if msg.status != ReserveStatus.RESERVED or msg.path is None or msg.res is None:
            return SaveOutcome(msg.status)
        try:
            fd = os.open(msg.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            log.info("cannot map temp %s (%s): writing inline", msg.path, exc)
            return PendingRow(self, msg, None, -1, payload_len)
        try:
            if os.fstat(fd).st_ino != msg.ino:  # a memfd number reused after the reservation expired
                log.warning("temp %s is no longer ours: save dropped", msg.path)
                os.close(fd)
                self.request(CacheAbort(rid=0, res=msg.res), Ack)
                return SaveOutcome.DROPPED
            # Populate: one bulk fault-in of the temp instead of a page fault per 4 KiB while writing.
            mm = mmap.mmap(fd, msg.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(fd)
            raise
        return PendingRow(self, msg, mm, fd, payload_len)

    def save(
        self,
        fingerprint: bytes,
        tokens: Sequence[int],
        payload: Buffer | Sequence[Buffer],
        reason: SaveReason | str,
        tier: CacheTier | None = None,
    ) -> SaveOutcome:
        """Store one row (reserve, write, commit). ``payload`` may come in parts, written one after the
        other (the caller need not join them first). Never raises for an expected outcome."""
        parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
        views = [memoryview(p).cast("B") for p in parts]
        pending = self.begin_save(fingerprint, tokens, sum(len(v) for v in views), reason, tier)
        if isinstance(pending, SaveOutcome):
            return pending
        with pending:
            offset = 0
            for view in views:
                copy_releasing_gil(pending.payload[offset : offset + len(view)], view)
                offset += len(view)
            return pending.commit()

    # --- admin -------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self.request(CacheStats(rid=0), StatsReply)[0].stats

    def kv_events(self, since_seq: int = 0, publisher: str | None = None, part: int = 0) -> KvEventBatch:
        """The store's KV events after ``since_seq`` of ``publisher``, or a snapshot part (see
        ``protocol.kvevents``; ``cachestore.events.KvEventCursor`` keeps a reader's place)."""
        query = CacheKvEvents(rid=0, since_seq=since_seq, publisher=publisher, part=part)
        return self.request(query, KvEventsReply)[0].batch

    def evict_bytes(self, nbytes: int, tiers: Sequence[CacheTier] = (CacheTier.RAM, CacheTier.SHM)) -> int:
        """Free at least ``nbytes`` from ``tiers`` (rows move to a colder tier not listed, else go).
        Returns the bytes scheduled to leave."""
        evict = CacheEvict(rid=0, nbytes=nbytes, tiers=[CacheTier(t).value for t in tiers])
        return self.request(evict, EvictReply)[0].nbytes

    def close(self) -> None:
        """Say bye (the daemon ends our leases and reservations now) and close the socket."""
        if self._sock.closed:
            return
        try:
            self.request(CacheBye(rid=0), Ack, timeout_s=BYE_TIMEOUT_S)
        except ErllamaError:
            pass
        self._sock.close(linger=0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hit(info: PrefixHitInfo) -> PrefixHit:
    return PrefixHit(info.key, info.row_tokens, info.common_len, info.tier)
