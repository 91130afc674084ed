"""``KvIndex``: overlapping rows counted per block, prefix matches per source and tier, gaps refused until
a snapshot, snapshots replacing what was known, dead sources dropped."""

from __future__ import annotations

from erllama.blockhash import KV_BLOCK_TOKENS, block_hashes
from erllama.broker.kvindex import KvIndex
from erllama.protocol import CacheTier, KvEvent, KvEventBatch, KvEventKind

FP = b"model-fp"
RAM, SHM, DISK = CacheTier.RAM, CacheTier.SHM, CacheTier.DISK
PROMPT = list(range(20 * KV_BLOCK_TOKENS))
HASHES = block_hashes(FP, PROMPT)  # 20 blocks


def ev(kind: KvEventKind, n: int, tier: CacheTier, from_tier: CacheTier | None = None) -> KvEvent:
    """The event of the row holding the prompt's first ``n`` blocks."""
    return KvEvent(kind, FP, HASHES[:n], n * KV_BLOCK_TOKENS, tier, from_tier)


def events(publisher: str, first: int, *evs: KvEvent) -> KvEventBatch:
    return KvEventBatch(publisher, first, first + len(evs) - 1, False, list(evs))


def snapshot(publisher: str, seq: int, *evs: KvEvent, part: int = 0, parts: int = 1) -> KvEventBatch:
    return KvEventBatch(publisher, seq + 1, seq, True, list(evs), part=part, parts=parts)


STORED, REMOVED, MOVED = KvEventKind.STORED, KvEventKind.REMOVED, KvEventKind.MOVED


def test_overlapping_rows_keep_their_shared_blocks_until_both_are_gone() -> None:
    idx = KvIndex()
    assert idx.apply("a", snapshot("p1", 0))
    assert idx.apply("a", events("p1", 1, ev(STORED, 10, RAM), ev(STORED, 12, DISK)))
    assert idx.match(FP, HASHES) == {"a": (12, DISK)}
    assert idx.match(FP, HASHES[:8]) == {"a": (8, RAM)}  # block 8 is in both rows: the hotter tier
    assert idx.apply("a", events("p1", 3, ev(REMOVED, 12, DISK)))
    assert idx.match(FP, HASHES) == {"a": (10, RAM)}
    assert idx.apply("a", events("p1", 4, ev(MOVED, 10, SHM, RAM)))
    assert idx.match(FP, HASHES) == {"a": (10, SHM)}
    assert idx.apply("a", events("p1", 5, ev(REMOVED, 10, SHM)))
    assert idx.match(FP, HASHES) == {}
    assert idx.describe() == {"a": {"publisher": "p1", "seq": 5, "blocks": 0, "stale": False}}


def test_match_counts_leading_blocks_per_source_and_ignores_other_models() -> None:
    idx = KvIndex()
    idx.apply("", snapshot("local", 7, ev(STORED, 4, RAM)))
    idx.apply("h1", snapshot("p1", 3, ev(STORED, 15, DISK)))
    other = block_hashes(b"other-fp", PROMPT)
    idx.apply("h2", snapshot("p2", 0, KvEvent(STORED, b"other-fp", other, len(PROMPT), RAM)))
    assert idx.match(FP, HASHES) == {"": (4, RAM), "h1": (15, DISK)}
    forked = block_hashes(FP, PROMPT[: 2 * KV_BLOCK_TOKENS] + [7] * (10 * KV_BLOCK_TOKENS))
    assert idx.match(FP, forked) == {"": (2, RAM), "h1": (2, DISK)}  # the prompts part after 2 blocks
    assert idx.match(b"other-fp", other[:3]) == {"h2": (3, RAM)}
    assert idx.match(FP, []) == {}


def test_a_gap_is_refused_and_the_source_stays_stale_until_a_snapshot_replaces_it() -> None:
    idx = KvIndex()
    assert not idx.apply("a", events("p1", 1, ev(STORED, 2, RAM)))  # never had a snapshot
    assert idx.apply("a", snapshot("p1", 0, ev(STORED, 3, RAM)))
    assert idx.apply("a", events("p1", 1, ev(STORED, 5, RAM)))
    assert not idx.apply("a", events("p1", 3, ev(STORED, 9, RAM)))  # seq 2 is missing
    assert idx.describe()["a"]["stale"]
    assert not idx.apply("a", events("p1", 4, ev(STORED, 9, RAM)))  # still stale: only a snapshot helps
    assert idx.match(FP, HASHES) == {"a": (5, RAM)}  # what was known is still the best guess
    assert not idx.apply("a", events("p2", 1, ev(STORED, 9, RAM)))  # a restarted store, no snapshot

    assert idx.apply("a", snapshot("p2", 40, ev(STORED, 6, SHM)))
    assert idx.match(FP, HASHES) == {"a": (6, SHM)}  # replaced: the earlier rows are forgotten
    assert idx.describe()["a"] == {"publisher": "p2", "seq": 40, "blocks": 6, "stale": False}
    assert idx.apply("a", events("p2", 41))  # an empty batch: nothing new
    assert idx.apply("a", events("p2", 41, ev(REMOVED, 6, SHM)))
    assert idx.match(FP, HASHES) == {}


def test_snapshot_parts_add_up_in_order_and_an_out_of_order_part_is_a_gap() -> None:
    idx = KvIndex()
    assert idx.apply("a", snapshot("p1", 9, ev(STORED, 2, RAM), part=0, parts=2))
    assert idx.describe()["a"]["stale"]  # half a snapshot
    assert not idx.apply("a", events("p1", 10, ev(STORED, 4, RAM)))  # events before the last part
    assert idx.apply("a", snapshot("p1", 9, ev(STORED, 3, RAM), part=0, parts=2))  # started over
    assert idx.apply("a", snapshot("p1", 9, ev(STORED, 7, DISK), part=1, parts=2))
    assert idx.match(FP, HASHES) == {"a": (7, DISK)} and not idx.describe()["a"]["stale"]
    assert idx.apply("a", events("p1", 10, ev(STORED, 8, RAM)))
    assert not idx.apply("a", snapshot("p1", 9, ev(STORED, 1, RAM), part=1, parts=2))  # a stray part


def test_a_dropped_source_is_forgotten() -> None:
    idx = KvIndex()
    idx.apply("a", snapshot("p1", 0, ev(STORED, 3, RAM)))
    idx.apply("b", snapshot("p2", 0, ev(STORED, 2, RAM)))
    idx.drop("a")
    idx.drop("never-seen")
    assert idx.match(FP, HASHES) == {"b": (2, RAM)}
    assert list(idx.describe()) == ["b"]
