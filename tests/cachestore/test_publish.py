"""reserve -> write -> commit, with real processes: every tier, duplicate keys, racing writers."""

from __future__ import annotations

import os

import pytest

from erllama.cachestore.codec import row_key
from erllama.protocol import LOCAL_TIERS, Ack, CacheBye, CacheTier, ErllamaError, SaveOutcome
from tests.cachestore.cachestore_support import Daemon, payload_for, spawn_python

FP = b"fingerprint-0123456789abcdef0123"
MIB = 1024 * 1024


@pytest.mark.parametrize("tier", list(LOCAL_TIERS))
def test_saved_row_loads_bit_exact_from_each_tier(daemon: Daemon, tier: CacheTier) -> None:
    daemon.start()
    c = daemon.client()
    tokens = list(range(1000, 1300))
    payload = payload_for(1, 3 * MIB + 17)
    assert c.save(FP, tokens, payload, "cold", tier=tier) is SaveOutcome.STORED
    assert c.save(FP, tokens, payload, "cold", tier=tier) is SaveOutcome.ALREADY_PRESENT
    key = row_key(FP, tokens)
    meta = c.exact(key)
    assert meta is not None and meta.tier is tier and meta.row_tokens == 300
    with c.load(key) as row:
        assert row.tokens == tokens and row.fingerprint == FP
        assert row.payload == payload
        assert row.payload.readonly  # the mapping is PROT_READ: a stray write fails here, not silently
        assert bytes(row.payload_array) == payload  # what C callees such as seq_restore are given
    hit = c.longest_prefix(FP, tokens[:120] + [7])
    assert hit is not None and (hit.key, hit.common_len, hit.row_tokens) == (key, 120, 300)
    assert c.longest_prefix(b"other-model", tokens) is None
    s = c.stats()["counters"]
    assert (s["saves_cold"], s["already_present"], s["hits_exact"], s["hits_prefix"], s["misses"]) == (
        1,
        1,
        1,
        1,
        1,
    )


def test_find_looks_up_and_leases_the_row_in_one_round_trip(daemon: Daemon) -> None:
    daemon.start()
    c = daemon.client()
    tokens = list(range(2000, 2200))
    payload = payload_for(2, MIB + 5)
    assert c.save(FP, tokens, payload, "cold", tier=CacheTier.DISK) is SaveOutcome.STORED
    sent = []
    real_request = c.request
    c.request = lambda msg, *a, **kw: sent.append(type(msg).__name__) or real_request(msg, *a, **kw)  # type: ignore[method-assign]
    found = c.find(FP, tokens[:150] + [5], max_overhang=None)
    assert found is not None and sent == ["CachePrefix"]
    hit, row = found
    with row:
        assert (hit.common_len, hit.row_tokens, hit.tier) == (150, 200, CacheTier.DISK)
        assert row.tokens == tokens and row.payload == payload
        assert c.stats()["counters"]["loads"] == 1
    assert c.find(FP, tokens[:150] + [5], max_overhang=0) is None  # the row runs past the common prefix
    assert c.find(b"other-model", tokens) is None


def test_second_writer_of_a_key_gets_conflict_until_the_first_commits(daemon: Daemon) -> None:
    daemon.start()
    writer = spawn_python(
        """
import sys
from erllama.cachestore.client import CacheClient
c = CacheClient(sys.argv[1], timeout_s=10)
pending = c.begin_save(b"fp", [1, 2, 3], 1 << 20, "finish")
pending.payload[:] = b"A" * (1 << 20)
print("READY", flush=True)
sys.stdin.readline()
print(pending.commit().value, flush=True)
c.close()
""",
        daemon.endpoint,
    )
    try:
        assert writer.stdout.readline().strip() == "READY"
        c = daemon.client()
        assert c.save(b"fp", [1, 2, 3], b"B" * (1 << 20), "finish") is SaveOutcome.CONFLICT
        writer.stdin.write("commit\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "stored"
        assert c.save(b"fp", [1, 2, 3], b"B" * (1 << 20), "finish") is SaveOutcome.ALREADY_PRESENT
        with c.load(row_key(b"fp", [1, 2, 3])) as row:
            assert row.payload == b"A" * (1 << 20)
        assert c.stats()["counters"]["conflicts"] == 1
    finally:
        writer.kill()
        writer.wait()


def test_racing_writers_store_exactly_one_row(daemon: Daemon) -> None:
    daemon.start()
    code = """
import sys
from erllama.cachestore.client import CacheClient
c = CacheClient(sys.argv[1], timeout_s=30)
sys.stdin.readline()
print(c.save(b"fp", list(range(500)), bytes([int(sys.argv[2])]) * (4 << 20), "cold").value, flush=True)
c.close()
"""
    writers = [spawn_python(code, daemon.endpoint, str(i)) for i in range(4)]
    try:
        for w in writers:
            w.stdin.write("go\n")
            w.stdin.flush()
        outcomes = [w.stdout.readline().strip() for w in writers]
    finally:
        for w in writers:
            w.kill()
            w.wait()
    assert outcomes.count("stored") == 1
    assert set(outcomes) <= {"stored", "conflict", "already_present"}
    winner = outcomes.index("stored")
    with daemon.client().load(row_key(b"fp", list(range(500)))) as row:
        assert row.payload == bytes([winner]) * (4 << 20)


def test_writer_killed_mid_write_leaves_no_temp_and_frees_the_key(daemon: Daemon) -> None:
    daemon.start(ram_bytes=0)  # shm: the temp is a file we can look for
    writer = spawn_python(
        """
import sys, time
from erllama.cachestore.client import CacheClient
c = CacheClient(sys.argv[1], timeout_s=10)
pending = c.begin_save(b"fp", [9, 9, 9], 8 << 20, "continued")
pending.payload[: 4 << 20] = b"x" * (4 << 20)
print("HALF", flush=True)
time.sleep(600)
""",
        daemon.endpoint,
    )
    assert writer.stdout.readline().strip() == "HALF"
    assert os.listdir(daemon.shm_dir / "tmp")  # the half-written temp
    writer.kill()
    writer.wait()
    c = daemon.client()
    payload = payload_for(3, 8 << 20)
    while (outcome := c.save(b"fp", [9, 9, 9], payload, "continued")) is SaveOutcome.CONFLICT:
        pass  # until the sweep notices the writer is dead (about a second)
    assert outcome is SaveOutcome.STORED
    s = daemon.wait_quiet(c)
    assert s["counters"]["expired_reservations"] == 1
    assert os.listdir(daemon.shm_dir / "tmp") == []
    with c.load(row_key(b"fp", [9, 9, 9])) as row:
        assert row.payload == payload


def test_commit_after_the_reservation_ended_is_dropped_not_raised(daemon: Daemon) -> None:
    daemon.start()
    c = daemon.client()
    pending = c.begin_save(b"fp", [5], 1024, "cold")
    assert not isinstance(pending, SaveOutcome)
    pending.payload[:] = b"z" * 1024
    c.request(CacheBye(rid=0), Ack)  # ends this client's reservations, as a writer's death would
    assert pending.commit() is SaveOutcome.DROPPED
    assert c.stats()["counters"]["saves_dropped"] == 1
    assert c.exact(row_key(b"fp", [5])) is None


def test_zero_copy_writer_fills_the_mapped_temp_through_ctypes(daemon: Daemon) -> None:
    import ctypes

    daemon.start()
    c = daemon.client()
    data = payload_for(7, MIB)
    for i, tier in enumerate(LOCAL_TIERS):
        tokens = [7, i]
        pending = c.begin_save(FP, tokens, MIB, "continued", tier=tier)
        assert not isinstance(pending, SaveOutcome)
        with pending:
            buf = (ctypes.c_uint8 * MIB).from_buffer(pending.payload)  # what llama_state_seq_get_data fills
            ctypes.memmove(buf, data, MIB)
            with pytest.raises(ErllamaError):  # a live view would let the row change after verification
                pending.commit()
            del buf
        assert c.exact(row_key(FP, tokens)) is None  # that commit was refused and aborted
        pending = c.begin_save(FP, tokens, MIB, "continued", tier=tier)
        with pending:
            buf = (ctypes.c_uint8 * MIB).from_buffer(pending.payload)
            ctypes.memmove(buf, data, MIB)
            del buf
            assert pending.commit() is SaveOutcome.STORED
        with c.load(row_key(FP, tokens)) as row:
            assert row.payload == data
