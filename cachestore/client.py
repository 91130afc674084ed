"""``CacheClient``: the synchronous library workers (and the broker, and the CLI) use to talk to
``erllama-cachestore``. One client = one DEALER socket: use one per thread.

Row bytes never cross the socket on the normal path. ``load`` maps the row file the daemon names
(read-only, and kept for the next load of the same row: see ``mapping``); ``save``/``begin_save`` map
the temp the daemon created and write the payload straight into it. Only where the mapping is
impossible (a daemon in another pid namespace) do bytes travel as one raw frame ("inline").
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Self, TypeVar

import msgspec
import zmq

from erllama.cachestore.codec import (
    CHECKSUM_OFFSET,
    CorruptRow,
    bytes_to_tokens,
    check_row,
    encode_checksum,
    tokens_to_bytes,
)
from erllama.cachestore.config import default_endpoint
from erllama.cachestore.mapping import MAPPINGS, RowMapping, make_read_only
from erllama.logsetup import CURRENT_REQUEST
from erllama.protocol import (
    MAX_CACHE_PAYLOAD_BYTES,
    Ack,
    CacheAbort,
    CacheBye,
    CacheCall,
    CacheCommit,
    CacheEvict,
    CacheExact,
    CacheLoad,
    CachePrefix,
    CacheRelease,
    CacheReply,
    CacheReserve,
    CacheStats,
    CacheTier,
    CommitReply,
    Decoder,
    ErllamaError,
    ErrorCode,
    EvictReply,
    ExactReply,
    LateReply,
    LoadReply,
    PrefixReply,
    ReserveReply,
    ReserveStatus,
    RowInfo,
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

COMMIT_MIN_BYTES_PER_S: Final = 100 * 1024 * 1024  # a commit verifies (and on disk fsyncs) the row
# Lookups and loads are on a request's path to its first token and the store answers them from memory
# in tens of microseconds; what a round trip costs is mostly waking threads. Polling for the reply
# without sleeping first halves it (ipc ping-pong on the 2-core test machine: 0.24 -> 0.13 ms), for at
# most this much CPU per call.
REPLY_SPIN_S: Final = 0.0005
BYE_TIMEOUT_S: Final = 0.2
_DROPPED_CODES: Final = frozenset(
    {
        ErrorCode.OVER_BUDGET,
        ErrorCode.NO_SPACE,
        ErrorCode.IO_ERROR,
        ErrorCode.EXPIRED,
        ErrorCode.CORRUPT,
        ErrorCode.CONFLICT,
        ErrorCode.SHUTTING_DOWN,
    }
)


@dataclass(frozen=True, slots=True)
class RowMeta:
    key: bytes
    tier: CacheTier
    row_tokens: int
    size: int
    payload_len: int
    hits: int
    reason: SaveReason

    @classmethod
    def from_wire(cls, row: RowInfo) -> RowMeta:
        return cls(
            row.key, row.tier, row.row_tokens, row.size, row.payload_len, row.hits, SaveReason(row.reason)
        )


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """The stored row sharing the most leading tokens with a query. ``common_len`` may be shorter than
    ``row_tokens``: restore the row, then drop its KV cells from ``common_len`` on."""

    key: bytes
    row_tokens: int
    common_len: int
    tier: CacheTier


class LoadedRow:
    """A leased row: ``tokens``, ``fingerprint``, ``payload`` (a read-only view of the row's bytes where
    the store keeps them, no copy) and ``payload_array`` (the same bytes as a ctypes array, for C callees
    such as ``llama_state_seq_set_data``; the memory is read-only). Use as a context manager; leaving it
    (or ``close()``) ends the lease and invalidates ``payload``: drop views made from it, and do not use
    ``payload_array``, after that."""

    def __init__(
        self,
        client: CacheClient,
        key: bytes,
        lease: int,
        tier: CacheTier,
        size: int,
        mapping: RowMapping | None = None,
        inline: bytearray | None = None,
    ):
        if mapping is not None:
            whole = mapping.view(0, size)
        else:
            assert inline is not None, "a row is read from a mapping or from an inline copy"
            whole = memoryview(inline).toreadonly()
        try:
            header = check_row(whole, key)  # head, size and key: cheap; the daemon verified the checksum
        except CorruptRow:
            whole.release()
            raise
        self.key, self.tier, self._client, self._lease, self._mapping = key, tier, client, lease, mapping
        self.fingerprint = header.fingerprint
        self.tokens: list[int] = bytes_to_tokens(header.token_bytes)
        self.reason = header.reason
        self._whole = whole
        self.payload: memoryview = whole[header.payload_offset : header.size]
        n = header.payload_len
        self.payload_array: ctypes.Array[ctypes.c_uint8] = (
            mapping.array(header.payload_offset, n)
            if mapping is not None
            else (ctypes.c_uint8 * n).from_buffer(inline, header.payload_offset)  # type: ignore[arg-type]
        )

    def close(self) -> None:
        """End the lease. The mapping stays cached for the next load of this row (see ``mapping``)."""
        if self._lease < 0:
            return
        lease, self._lease = self._lease, -1
        try:
            self.payload.release()
            self._whole.release()
        except BufferError:  # a view made from payload: the mapping lives on until it goes
            log.warning("a view of row %s outlives its lease; drop views before close()", self.key.hex()[:16])
        if self._mapping is not None:
            MAPPINGS.release(self._mapping)
        self._client.release(lease)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PendingRow:
    """A reserved row being written: fill ``payload`` (a writable buffer of exactly the payload's size,
    mapped over the daemon's temp), then ``commit()``. Leaving the context without a commit aborts.

    Once the row is stored the mapping is not dropped: it is made read-only and kept for this process's
    next load of the row (``mapping``), since the worker that saves a row is usually the one that loads
    it back, and its pages are all mapped already."""

    def __init__(
        self, client: CacheClient, reply: ReserveReply, mm: mmap.mmap | None, fd: int, payload_len: int
    ):
        assert reply.res is not None and reply.tier is not None and reply.ino is not None
        self._client, self._res, self._mm, self._fd = client, reply.res, mm, fd
        self._head_crc, self.size, self.tier = reply.head_crc, reply.size, reply.tier
        self._ino = reply.ino
        offset = reply.offset
        self._buf: Any = mm if mm is not None else bytearray(payload_len)
        self._view = memoryview(self._buf)
        self.payload: memoryview = self._view[offset : offset + payload_len] if mm is not None else self._view
        self._done = False

    def _drop_views(self) -> None:
        """Raises ``BufferError`` while the caller still holds a view of ``payload``."""
        self.payload.release()
        self._view.release()
        if self._mm is not None:
            # A ctypes array made from payload (``from_buffer``) holds an export of the mapping itself,
            # not of our views. Resizing to the same size changes nothing, and mmap refuses it with
            # BufferError while any export is alive.
            self._mm.resize(len(self._mm))

    def _unmap(self) -> None:
        """Drop our mapping of the temp (left to the garbage collector if the caller still views it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                log.warning("a view of an unstored row's payload is still alive; its mapping outlives it")

    def commit(self) -> SaveOutcome:
        """Checksum the payload and publish the row. Raises ``ErllamaError(timeout)`` when the store does
        not answer, ``ErllamaError(invalid_params)`` if a view of ``payload`` is still alive."""
        if self._done:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, "this row was already committed or aborted")
        self._done = True
        crc = zlib.crc32(self.payload, self._head_crc)
        if self._mm is not None:
            self._mm[CHECKSUM_OFFSET : CHECKSUM_OFFSET + 4] = encode_checksum(crc)
        inline = self._buf if self._mm is None else None
        try:
            self._drop_views()
        except BufferError:
            self._send_abort()
            self._unmap()
            raise ErllamaError(
                ErrorCode.INVALID_PARAMS, "drop every view of payload before commit()"
            ) from None
        if self._mm is not None:
            # The writer must not be able to change a row after the store verified it.
            make_read_only(self._mm)
        timeout_s = self._client.timeout_s + self.size / COMMIT_MIN_BYTES_PER_S
        commit = CacheCommit(rid=0, res=self._res, crc=crc, inline=inline is not None)
        try:
            self._client.request(commit, CommitReply, inline, timeout_s)
        except ErllamaError as err:
            self._unmap()
            if err.code in _DROPPED_CODES:
                log.warning("save dropped at commit: %s", err)
                return SaveOutcome.DROPPED
            raise
        if self._mm is not None:
            MAPPINGS.adopt(self.tier, self._ino, self._fd, self._mm)
            self._fd, self._mm = -1, None
        return SaveOutcome.STORED

    def abort(self) -> None:
        """Give the reservation back (leaving the context without a commit does this)."""
        if self._done:
            return
        self._done = True
        try:
            self._drop_views()
        except BufferError:
            pass  # _unmap leaves such a mapping to the garbage collector
        self._unmap()
        self._send_abort()

    def _send_abort(self) -> None:
        try:
            self._client.request(CacheAbort(rid=0, res=self._res), Ack)
        except ErllamaError as err:
            log.debug("abort not acknowledged: %s", err)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _copy_releasing_gil(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src``, but through ctypes, which drops the GIL for the call: a memoryview copy holds
    it, and copying a 40 MB row (~5 ms) would stall every other thread of the writer, such as the
    worker's tick loop sampling between decodes."""
    if src.readonly or not src.c_contiguous:
        dst[:] = src  # bytes and the like: no writable view for ctypes; small in practice
        return
    n = len(src)
    target = (ctypes.c_char * n).from_buffer(dst)
    source = (ctypes.c_char * n).from_buffer(src)
    try:
        ctypes.memmove(target, source, n)
    finally:
        del target, source  # the exports must end before the temp is unmapped at commit


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
        self, fingerprint: bytes, tokens: Sequence[int], min_len: int | None = None
    ) -> PrefixHit | None:
        query = CachePrefix(rid=0, fp=fingerprint, tokens=tokens_to_bytes(tokens), min_len=min_len)
        hit = self.request(query, PrefixReply, spin_s=REPLY_SPIN_S)[0].hit
        if hit is None:
            return None
        return PrefixHit(hit.key, hit.row_tokens, hit.common_len, hit.tier)

    # --- reading -----------------------------------------------------------------------------------------

    def load(self, key: bytes) -> LoadedRow | None:
        """Lease and map the row ``key``; None if it is gone (evicted, or found corrupt and removed)."""
        try:
            msg, _ = self.request(CacheLoad(rid=0, key=key, pid=self._pid), LoadReply, spin_s=REPLY_SPIN_S)
        except ErllamaError as err:
            if err.code in (ErrorCode.NOT_FOUND, ErrorCode.CORRUPT):
                return None
            raise
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
            if err.code in _DROPPED_CODES:
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
        payload: bytes | bytearray | memoryview,
        reason: SaveReason | str,
        tier: CacheTier | None = None,
    ) -> SaveOutcome:
        """Store one row (reserve, write, commit). Never raises for an expected outcome."""
        view = memoryview(payload).cast("B")
        pending = self.begin_save(fingerprint, tokens, len(view), reason, tier)
        if isinstance(pending, SaveOutcome):
            return pending
        with pending:
            _copy_releasing_gil(pending.payload, view)
            return pending.commit()

    # --- admin -------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self.request(CacheStats(rid=0), StatsReply)[0].stats

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
