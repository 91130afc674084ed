"""The row format: round trips, and every kind of corruption is caught (property-based)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erllama.cachestore.codec import (
    CHECKSUM_OFFSET,
    HEADER_BYTES,
    USAGE_OFFSET,
    CorruptRow,
    check_row,
    encode_checksum,
    encode_head,
    encode_usage,
    head_checksum,
    parse_head,
    row_key,
    row_key_bytes,
    tokens_to_bytes,
    verify_fd,
)
from erllama.protocol import ErllamaError, SaveReason

fingerprints = st.binary(min_size=1, max_size=255)
token_lists = st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=1, max_size=300)
payloads = st.binary(min_size=1, max_size=4096)
reasons = st.sampled_from(list(SaveReason))


def build_row(fp: bytes, tokens: list[int], payload: bytes, reason: SaveReason) -> bytes:
    """What a writer produces: head from the daemon, payload, checksum at offset 32."""
    head = bytearray(encode_head(fp, tokens_to_bytes(tokens), len(payload), reason, 123_456_789))
    crc = zlib.crc32(payload, head_checksum(head))
    head[CHECKSUM_OFFSET : CHECKSUM_OFFSET + 4] = encode_checksum(crc)
    return bytes(head) + payload


def verify_bytes(tmp: Path, row: bytes, key: bytes, use_mmap: bool = False) -> None:
    path = tmp / "row.kvr"
    path.write_bytes(row)
    fd = os.open(path, os.O_RDONLY)
    try:
        verify_fd(fd, key, use_mmap=use_mmap)
    finally:
        os.close(fd)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fp=fingerprints, tokens=token_lists, payload=payloads, reason=reasons, use_mmap=st.booleans())
def test_row_round_trips_and_verifies(
    tmp_path: Path, fp: bytes, tokens: list[int], payload: bytes, reason: SaveReason, use_mmap: bool
) -> None:
    row = build_row(fp, tokens, payload, reason)
    key = row_key(fp, tokens)
    header = check_row(row, key)
    assert (header.fingerprint, header.n_tokens, header.reason) == (fp, len(tokens), reason)
    assert header.token_bytes == tokens_to_bytes(tokens)
    assert row[header.payload_offset :] == payload
    assert header.payload_offset % 64 == 0
    verify_bytes(tmp_path, row, key, use_mmap)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fp=fingerprints, tokens=token_lists, payload=payloads, data=st.data())
def test_any_flipped_byte_outside_the_usage_counters_is_caught(
    tmp_path: Path, fp: bytes, tokens: list[int], payload: bytes, data: st.DataObject
) -> None:
    row = bytearray(build_row(fp, tokens, payload, SaveReason.COLD))
    pos = data.draw(st.integers(0, len(row) - 1).filter(lambda i: not USAGE_OFFSET <= i < HEADER_BYTES))
    row[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptRow):
        verify_bytes(tmp_path, bytes(row), row_key(fp, tokens))


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fp=fingerprints, tokens=token_lists, payload=payloads, hits=st.integers(0, 2**32 - 1))
def test_usage_counters_are_outside_the_checksum(
    tmp_path: Path, fp: bytes, tokens: list[int], payload: bytes, hits: int
) -> None:
    row = bytearray(build_row(fp, tokens, payload, SaveReason.FINISH))
    row[USAGE_OFFSET:HEADER_BYTES] = encode_usage(hits, 42)
    verify_bytes(tmp_path, bytes(row), row_key(fp, tokens))
    assert parse_head(row).hits == hits


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fp=fingerprints, tokens=token_lists, payload=payloads, cut=st.integers(1, 64), extra=st.binary(min_size=1)
)
def test_truncated_or_extended_rows_are_caught(
    tmp_path: Path, fp: bytes, tokens: list[int], payload: bytes, cut: int, extra: bytes
) -> None:
    row = build_row(fp, tokens, payload, SaveReason.CONTINUED)
    key = row_key(fp, tokens)
    for bad in (row[: max(0, len(row) - cut)], row + extra):
        with pytest.raises(CorruptRow):
            verify_bytes(tmp_path, bad, key)
        with pytest.raises(CorruptRow):
            check_row(bad, key)


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fp=fingerprints, tokens=token_lists, payload=payloads, other=token_lists)
def test_a_valid_row_under_another_key_is_refused(
    tmp_path: Path, fp: bytes, tokens: list[int], payload: bytes, other: list[int]
) -> None:
    row = build_row(fp, tokens, payload, SaveReason.EVICT)
    if other != tokens:
        with pytest.raises(CorruptRow):
            verify_bytes(tmp_path, row, row_key(fp, other))
        with pytest.raises(CorruptRow):
            check_row(row, row_key(fp, other))


def test_wrong_checksum_claimed_by_the_writer_is_refused(tmp_path: Path) -> None:
    row = build_row(b"fp", [1, 2, 3], b"x" * 100, SaveReason.COLD)
    path = tmp_path / "row.kvr"
    path.write_bytes(row)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CorruptRow):
            verify_fd(
                fd, row_key(b"fp", [1, 2, 3]), use_mmap=False, expected_crc=parse_head(row).checksum ^ 1
            )
    finally:
        os.close(fd)


@given(fp=fingerprints, a=token_lists, b=token_lists)
def test_key_separates_fingerprints_and_tokens(fp: bytes, a: list[int], b: list[int]) -> None:
    assert len(row_key(fp, a)) == 32
    assert (row_key(fp, a) == row_key(fp, b)) == (a == b)
    assert row_key(fp, a) != row_key(fp + b"\x00", a)
    assert row_key(fp, a) == row_key_bytes(fp, tokens_to_bytes(a))


def test_bad_identity_is_refused() -> None:
    for fp, tokens in ((b"", [1]), (b"x" * 256, [1]), (b"x", [])):
        with pytest.raises(ErllamaError):
            encode_head(fp, tokens_to_bytes(tokens), 10, SaveReason.COLD, 0)
    with pytest.raises(ErllamaError):
        tokens_to_bytes([2**32])
