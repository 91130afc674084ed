"""The row: key derivation and the versioned on-disk format shared by every tier.

A row file (a memfd for the RAM tier, a file for shm and disk) is, little-endian::

    offset  size  field
         0     4  magic b"EKVR"
         4     2  format version (1)
         6     1  save reason (1 cold, 2 continued, 3 finish, 4 evict, 5 shutdown)
         7     1  fingerprint length F (1..255)
         8     4  token count N (>= 1)
        12     4  reserved, zero
        16     8  payload length P
        24     8  created (unix ns)
        32     4  checksum: CRC-32 (zlib) of bytes [0, 32) followed by bytes [48, end)
        36     4  hit count          } usage counters, rewritten in place by the daemon;
        40     8  last used (unix ns) } outside the checksum so a hit costs a 12-byte pwrite
        48     F  fingerprint
      48+F    4N  token ids, u32
         .     .  zero padding to a multiple of 64 bytes (the payload offset)
         .     P  payload: the opaque bytes of llama_state_seq_get_data

The key is SHA-256 over a domain tag, the fingerprint (length-prefixed) and the u32-LE token ids, so
it is recomputed from a row's own bytes: a reader checks the row it mapped is the row it asked for.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from erllama.protocol import MAX_FINGERPRINT_BYTES, MAX_ROW_TOKENS, ErllamaError, ErrorCode, SaveReason

MAGIC: Final = b"EKVR"
FORMAT_VERSION: Final = 1
HEADER_BYTES: Final = 48
CHECKSUM_OFFSET: Final = 32
USAGE_OFFSET: Final = 36  # hit count u32 + last used u64
PAYLOAD_ALIGN_BYTES: Final = 64
KEY_BYTES: Final = 32
KEY_DOMAIN: Final = b"erllama/kv-row/v1\x00"
ROW_SUFFIX: Final = ".kvr"
VERIFY_CHUNK_BYTES: Final = 4 * 1024 * 1024

_HEADER = struct.Struct("<4sHBBIIQQIIQ")
_USAGE = struct.Struct("<IQ")
assert _HEADER.size == HEADER_BYTES

REASON_CODES: Final[dict[SaveReason, int]] = {
    SaveReason.COLD: 1,
    SaveReason.CONTINUED: 2,
    SaveReason.FINISH: 3,
    SaveReason.EVICT: 4,
    SaveReason.SHUTDOWN: 5,
}
_REASONS_BY_CODE: Final = {code: reason for reason, code in REASON_CODES.items()}


class CorruptRow(ErllamaError):
    """A row whose bytes fail a check: it is removed and counted, never served."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.CORRUPT, message)


def tokens_to_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as u32 little-endian. Raises ``ErllamaError(invalid_params)`` for an id outside u32."""
    try:
        arr = array("I", tokens)
    except (OverflowError, TypeError) as exc:
        raise ErllamaError(ErrorCode.INVALID_PARAMS, f"token ids must be u32: {exc}") from None
    if arr.itemsize != 4:  # pragma: no cover - every Linux ABI we run on has a 4-byte unsigned int
        raise RuntimeError("array('I') is not 32-bit on this platform")
    if sys.byteorder == "big":  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


def bytes_to_tokens(data: bytes | memoryview) -> list[int]:
    arr = array("I")
    arr.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        arr.byteswap()
    return arr.tolist()


def row_key_bytes(fingerprint: bytes, token_bytes: bytes | memoryview) -> bytes:
    """The 32-byte key of (fingerprint, u32-LE token ids)."""
    h = hashlib.sha256(KEY_DOMAIN)
    h.update(len(fingerprint).to_bytes(1, "little"))
    h.update(fingerprint)
    h.update(token_bytes)
    return h.digest()


def row_key(fingerprint: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a row: SHA-256(domain tag, len(fp), fp, token ids as u32-LE)."""
    return row_key_bytes(fingerprint, tokens_to_bytes(tokens))


def check_identity(fingerprint: bytes, token_bytes: bytes) -> None:
    """Reject a fingerprint or token list the format cannot hold (``invalid_params``)."""
    if not 1 <= len(fingerprint) <= MAX_FINGERPRINT_BYTES:
        raise ErllamaError(ErrorCode.INVALID_PARAMS, f"fingerprint must be 1..{MAX_FINGERPRINT_BYTES} bytes")
    if len(token_bytes) % 4 or not 1 <= len(token_bytes) // 4 <= MAX_ROW_TOKENS:
        raise ErllamaError(ErrorCode.INVALID_PARAMS, f"a row holds 1..{MAX_ROW_TOKENS} u32 token ids")


def payload_offset(fp_len: int, n_tokens: int) -> int:
    end = HEADER_BYTES + fp_len + 4 * n_tokens
    return -(-end // PAYLOAD_ALIGN_BYTES) * PAYLOAD_ALIGN_BYTES


@dataclass(frozen=True, slots=True)
class RowHeader:
    """Everything in a row except its payload."""

    reason: SaveReason
    fingerprint: bytes
    token_bytes: bytes
    payload_len: int
    created_ns: int
    checksum: int
    hits: int
    last_used_ns: int

    @property
    def n_tokens(self) -> int:
        return len(self.token_bytes) // 4

    @property
    def payload_offset(self) -> int:
        return payload_offset(len(self.fingerprint), self.n_tokens)

    @property
    def size(self) -> int:
        return self.payload_offset + self.payload_len

    @property
    def key(self) -> bytes:
        return row_key_bytes(self.fingerprint, self.token_bytes)


def encode_head(
    fingerprint: bytes, token_bytes: bytes, payload_len: int, reason: SaveReason, created_ns: int
) -> bytes:
    """Header, fingerprint, tokens and padding of a new row, with checksum 0 and no hits yet."""
    check_identity(fingerprint, token_bytes)
    fixed = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        REASON_CODES[reason],
        len(fingerprint),
        len(token_bytes) // 4,
        0,
        payload_len,
        created_ns,
        0,
        0,
        created_ns,
    )
    body = fixed + fingerprint + token_bytes
    return body + bytes(payload_offset(len(fingerprint), len(token_bytes) // 4) - len(body))


def head_checksum(head: bytes | memoryview) -> int:
    """CRC-32 of a head's checksummed bytes; ``zlib.crc32(payload, head_checksum(head))`` is the row's."""
    return zlib.crc32(head[HEADER_BYTES:], zlib.crc32(head[:CHECKSUM_OFFSET]))


def encode_checksum(crc: int) -> bytes:
    return crc.to_bytes(4, "little")


def encode_usage(hits: int, last_used_ns: int) -> bytes:
    return _USAGE.pack(min(hits, 0xFFFFFFFF), last_used_ns)


def _head_length(fixed: bytes | memoryview) -> int:
    if len(fixed) < HEADER_BYTES:
        raise CorruptRow(f"row shorter than its {HEADER_BYTES}-byte header")
    magic, version, _, fp_len, n_tokens = _HEADER.unpack_from(fixed)[:5]
    if magic != MAGIC:
        raise CorruptRow("bad magic")
    if version != FORMAT_VERSION:
        raise CorruptRow(f"unsupported row format version {version}")
    if fp_len == 0 or not 1 <= n_tokens <= MAX_ROW_TOKENS:
        raise CorruptRow("bad fingerprint length or token count")
    return payload_offset(fp_len, n_tokens)


def parse_head(buf: bytes | memoryview | mmap.mmap) -> RowHeader:
    """Decode and sanity-check a row's head (no payload checksum). Raises ``CorruptRow``."""
    view = memoryview(buf)
    try:
        end = _head_length(view[:HEADER_BYTES])
        if len(view) < end:
            raise CorruptRow("row shorter than its head")
        _, _, reason_code, fp_len, n_tokens, reserved, plen, created, crc, hits, used = _HEADER.unpack_from(
            view
        )
        reason = _REASONS_BY_CODE.get(reason_code)
        if reason is None or reserved != 0:
            raise CorruptRow("bad save reason or reserved field")
        fp = bytes(view[HEADER_BYTES : HEADER_BYTES + fp_len])
        tokens_end = HEADER_BYTES + fp_len + 4 * n_tokens
        if any(view[tokens_end:end]):
            raise CorruptRow("non-zero padding")
        return RowHeader(
            reason, fp, bytes(view[HEADER_BYTES + fp_len : tokens_end]), plen, created, crc, hits, used
        )
    finally:
        view.release()


def check_row(buf: bytes | memoryview | mmap.mmap, expected_key: bytes) -> RowHeader:
    """The cheap reader-side check: head, size and key (the payload checksum is the daemon's job)."""
    header = parse_head(buf)
    if len(buf) != header.size:
        raise CorruptRow(f"row is {len(buf)} bytes, its header says {header.size}")
    if header.key != expected_key:
        raise CorruptRow("key recomputed from the row does not match")
    return header


def read_head(fd: int) -> RowHeader:
    """Read and parse the head of the row open as ``fd`` with two preads."""
    fixed = os.pread(fd, HEADER_BYTES, 0)
    end = _head_length(fixed)
    return parse_head(os.pread(fd, end, 0) if end > HEADER_BYTES else fixed)


def buffer_checksum(view: memoryview) -> int:
    """The row checksum of a whole row held in memory (bytes [0, 32) then [48, end))."""
    return zlib.crc32(view[HEADER_BYTES:], zlib.crc32(view[:CHECKSUM_OFFSET]))


def verify_image(image: bytes | bytearray | memoryview, expected_key: bytes) -> RowHeader:
    """Full verification of a whole row held in memory (one fetched from, or sent to, the shared tier):
    head, size, key and checksum. Raises ``CorruptRow``."""
    view = memoryview(image)
    try:
        header = check_row(view, expected_key)
        if buffer_checksum(view) != header.checksum:
            raise CorruptRow("checksum mismatch")
    finally:
        view.release()
    return header


def file_checksum(fd: int, size: int, *, use_mmap: bool) -> int:
    """The row checksum of an open row file of ``size`` bytes.

    ``use_mmap`` is faster (no copy into a buffer) but a mapping raises SIGBUS if the file shrinks
    or the device fails under it; callers pass it only for memfds and tmpfs files, which the daemon
    never shrinks while it reads them.
    """
    if size < HEADER_BYTES:
        raise CorruptRow("row shorter than its header")
    if use_mmap:
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return buffer_checksum(view)
            finally:
                view.release()
    crc = zlib.crc32(os.pread(fd, CHECKSUM_OFFSET, 0))
    buf = bytearray(min(VERIFY_CHUNK_BYTES, size))
    view = memoryview(buf)
    offset = HEADER_BYTES
    while offset < size:
        n = os.preadv(fd, [view[: min(len(buf), size - offset)]], offset)
        if n == 0:
            raise CorruptRow("row file shrank while it was verified")
        crc = zlib.crc32(view[:n], crc)
        offset += n
    return crc


def verify_fd(fd: int, expected_key: bytes, *, use_mmap: bool, expected_crc: int | None = None) -> RowHeader:
    """Full verification: head, size, key recomputed from the stored fingerprint and tokens, and the
    checksum (against the stored one and, at commit, the one the writer computed). Raises ``CorruptRow``."""
    header = read_head(fd)
    size = os.fstat(fd).st_size
    if size != header.size:
        raise CorruptRow(f"row file is {size} bytes, its header says {header.size}")
    if header.key != expected_key:
        raise CorruptRow("key recomputed from the row does not match")
    crc = file_checksum(fd, size, use_mmap=use_mmap)
    if crc != header.checksum or (expected_crc is not None and crc != expected_crc):
        raise CorruptRow("checksum mismatch")
    return header
