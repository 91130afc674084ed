"""KV events: a real store announces the rows it stores, moves and evicts as block hashes, numbered;
a reader that fell behind or knew an earlier daemon gets a snapshot; batches are bounded."""

from __future__ import annotations

import msgspec

from erllama.blockhash import KV_BLOCK_TOKENS, block_hashes
from erllama.cachestore.events import MAX_KV_BATCH_BYTES, MAX_KV_BATCH_EVENTS, KvEventCursor, KvEventLog
from erllama.cachestore.index import RowEntry
from erllama.protocol import CacheKvEvents, CacheTier, KvEventBatch, KvEventKind, SaveOutcome, SaveReason
from tests.cachestore.cachestore_support import Daemon, payload_for

FP = b"kv-events-fp"
ROW_PAYLOAD = 256 * 1024
TWO_ROWS = 2 * ROW_PAYLOAD + 16384


def row_tokens(i: int, n: int = 3 * KV_BLOCK_TOKENS + 10) -> list[int]:
    return [1000 * (i + 1) + t for t in range(n)]


def summary(batch: KvEventBatch) -> list[tuple[KvEventKind, list[int], CacheTier, CacheTier | None]]:
    return [(e.kind, e.blocks, e.tier, e.from_tier) for e in batch.events]


def test_stored_moved_and_evicted_rows_are_announced_in_sequence(daemon: Daemon) -> None:
    daemon.start(ram_bytes=TWO_ROWS, shm_bytes=0, disk_bytes=TWO_ROWS)
    c = daemon.client()
    first = c.kv_events()  # a reader starting afresh: a snapshot of the (empty) store
    assert first.snapshot and first.events == [] and first.last_seq == 0
    assert c.save(FP, [7] * (KV_BLOCK_TOKENS - 1), payload_for(9, 4096), "cold") is SaveOutcome.STORED
    rows = [row_tokens(i) for i in range(3)]
    for i, tokens in enumerate(rows):
        assert c.save(FP, tokens, payload_for(i, ROW_PAYLOAD), "cold") is SaveOutcome.STORED
        daemon.wait_quiet(c)
    c.evict_bytes(TWO_ROWS * 4, [CacheTier.RAM, CacheTier.DISK])
    daemon.wait_quiet(c)

    batch = c.kv_events(first.last_seq, first.publisher)
    assert not batch.snapshot and batch.publisher == first.publisher
    assert (batch.first_seq, batch.last_seq, batch.more) == (1, len(batch.events), False)
    hashes = [block_hashes(FP, tokens) for tokens in rows]
    assert all(len(h) == 3 for h in hashes)  # the row shorter than one block was not announced
    # The third row pushes the first out of RAM to disk; then everything is evicted.
    ram, disk = CacheTier.RAM, CacheTier.DISK
    assert summary(batch)[:4] == [
        (KvEventKind.STORED, hashes[0], ram, None),
        (KvEventKind.STORED, hashes[1], ram, None),
        (KvEventKind.MOVED, hashes[0], disk, ram),
        (KvEventKind.STORED, hashes[2], ram, None),
    ]
    removed = sorted((e.blocks, e.tier) for e in batch.events[4:])
    assert [e.kind for e in batch.events[4:]] == [KvEventKind.REMOVED] * 3
    assert removed == sorted([(hashes[0], disk), (hashes[1], ram), (hashes[2], ram)])
    assert {e.n_tokens for e in batch.events} == {len(rows[0])}
    again = c.kv_events(batch.last_seq, batch.publisher)
    assert (again.snapshot, again.events, again.first_seq) == (False, [], batch.last_seq + 1)


def test_a_restarted_store_answers_a_reader_of_the_old_one_with_a_snapshot(daemon: Daemon) -> None:
    daemon.start(ram_bytes=0, shm_bytes=0, disk_bytes=TWO_ROWS * 4)
    c = daemon.client()
    rows = [row_tokens(i) for i in range(2)]
    for i, tokens in enumerate(rows):
        assert c.save(FP, tokens, payload_for(i, ROW_PAYLOAD), "cold") is SaveOutcome.STORED
    cursor = KvEventCursor()
    cursor.advance(c.kv_events(*_args(cursor)))
    old = cursor.publisher
    daemon.stop()
    daemon.start()
    c = daemon.client()
    snap = c.kv_events(*_args(cursor))
    assert snap.snapshot and snap.publisher != old and (snap.part, snap.parts) == (0, 1)
    assert sorted(e.blocks for e in snap.events) == sorted(block_hashes(FP, t) for t in rows)
    assert {(e.kind, e.tier) for e in snap.events} == {(KvEventKind.STORED, CacheTier.DISK)}
    cursor.advance(snap)
    assert c.kv_events(*_args(cursor)).events == []


def _args(cursor: KvEventCursor) -> tuple[int, str | None, int]:
    return cursor.since_seq, cursor.publisher, cursor.part


# --- the ring itself, without a daemon ---------------------------------------------------------------


def entry(i: int, blocks: int = 1) -> RowEntry:
    tokens = row_tokens(i, blocks * KV_BLOCK_TOKENS)
    return RowEntry(
        key=i.to_bytes(32, "little"),
        fingerprint=FP,
        token_bytes=b"\0" * (4 * len(tokens)),
        size=1,
        payload_offset=0,
        payload_len=1,
        reason=SaveReason.COLD,
        created_ns=0,
        hits=0,
        last_used_ns=0,
        tier=CacheTier.RAM,
        path="",
        blocks=block_hashes(FP, tokens),
    )


def ask(log: KvEventLog, cursor: KvEventCursor, rows: list[RowEntry]) -> KvEventBatch:
    batch = log.batch(cursor.query(0), rows)
    cursor.advance(batch)
    return batch


def test_a_reader_behind_the_ring_gets_a_snapshot_then_events_again() -> None:
    log = KvEventLog(ring_events=4)
    rows = [entry(i) for i in range(6)]
    cursor = KvEventCursor()
    assert ask(log, cursor, []).snapshot
    for row in rows[:3]:
        log.stored(row)
    batch = ask(log, cursor, rows[:3])
    assert not batch.snapshot and (batch.first_seq, batch.last_seq) == (1, 3)
    for row in rows[3:]:  # 3 more: seq 4..6, the ring keeps 3..6
        log.stored(row)
    assert not ask(log, KvEventCursor(log.publisher, 2), rows).snapshot  # 3.. are still held
    behind = KvEventCursor(log.publisher, 1)
    snap = ask(log, behind, rows)
    assert snap.snapshot and snap.last_seq == 6 and len(snap.events) == 6
    log.removed(rows[0])
    follow = ask(log, behind, rows[1:])
    assert not follow.snapshot and [e.kind for e in follow.events] == [KvEventKind.REMOVED]
    assert ask(log, KvEventCursor("another", 7), rows[1:]).snapshot
    assert ask(log, KvEventCursor(log.publisher, 99), rows[1:]).snapshot  # from the future: start over


def test_batches_and_snapshots_are_bounded_and_a_snapshot_comes_in_consistent_parts() -> None:
    log = KvEventLog()
    rows = [entry(i) for i in range(MAX_KV_BATCH_EVENTS + 100)]
    for row in rows:
        log.stored(row)
    cursor = KvEventCursor(log.publisher, 0)
    first = ask(log, cursor, rows)
    assert len(first.events) == MAX_KV_BATCH_EVENTS and first.more and not first.snapshot
    rest = ask(log, cursor, rows)
    assert len(rest.events) == 100 and not rest.more and rest.last_seq == len(rows)

    fresh = KvEventCursor()
    part0 = ask(log, fresh, rows)
    assert (part0.snapshot, part0.part, part0.parts, len(part0.events)) == (True, 0, 2, MAX_KV_BATCH_EVENTS)
    log.removed(rows[0])  # after the snapshot was taken: follows its parts as an event
    part1 = ask(log, fresh, rows[1:])
    assert (part1.snapshot, part1.part, len(part1.events), part1.more) == (True, 1, 100, True)
    assert part1.last_seq == part0.last_seq == len(rows)
    after = ask(log, fresh, rows[1:])
    assert not after.snapshot and [e.kind for e in after.events] == [KvEventKind.REMOVED]

    big = [entry(i, blocks=1000) for i in range(80)]  # 80,000 blocks: over the per-batch byte budget
    snap = log.batch(CacheKvEvents(rid=0), big)
    assert snap.parts > 1 and 0 < len(snap.events) < 80
    assert len(msgspec.msgpack.encode(snap)) <= MAX_KV_BATCH_BYTES
