"""Rows as a cache client holds them: ``LoadedRow`` (a leased row, mapped where the store keeps it) and
``PendingRow`` (a reserved row being written), and what lookups return (``RowMeta``, ``PrefixHit``).
They reach the store only through their ``CacheClient``.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Self

from erllama.cachestore.codec import CHECKSUM_OFFSET, CorruptRow, bytes_to_tokens, check_row, encode_checksum
from erllama.cachestore.mapping import MAPPINGS, RowMapping, make_read_only
from erllama.protocol import (
    Ack,
    CacheAbort,
    CacheCommit,
    CacheTier,
    CommitReply,
    ErllamaError,
    ErrorCode,
    ReserveReply,
    RowInfo,
    SaveOutcome,
    SaveReason,
)

if TYPE_CHECKING:
    from erllama.cachestore.client import CacheClient

log = logging.getLogger(__name__)

COMMIT_MIN_BYTES_PER_S: Final = 100 * 1024 * 1024  # a commit verifies (and on disk fsyncs) the row
DROPPED_CODES: Final = frozenset(
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

    def close(self, bad: bool = False) -> None:
        """End the lease. The mapping stays cached for the next load of this row (see ``mapping``).
        ``bad``: the row proved unusable (its bytes did not restore), and the store drops it."""
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
        self._client.release(lease, bad=bad)

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
            if err.code in DROPPED_CODES:
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


def copy_releasing_gil(dst: memoryview, src: memoryview) -> None:
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
