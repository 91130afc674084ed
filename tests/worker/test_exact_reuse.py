"""What the worker reuses, on each memory kind, and what it files under which fingerprint: the stub
backend imitating llama.cpp's memory kinds, and a real cache-store daemon."""

from __future__ import annotations

import time
from typing import Any

from erllama.cachestore.codec import row_key
from erllama.protocol import CacheHitKind, MemoryKind, SamplingParams, SaveReason
from erllama.worker.backend import BatchRow
from erllama.worker.kvcache import CachePolicy, KVCache
from erllama.worker.kvrow import pack_head
from erllama.worker.placement import Placement
from erllama.worker.prefill import PrefillPolicy
from erllama.worker.request import Request
from erllama.worker.scheduler import Scheduler
from erllama.worker.stub_backend import StubBackend
from tests.cachestore.cachestore_support import Daemon
from tests.conftest import wait_for
from tests.worker.test_scheduler import Recorder

POLICY = CachePolicy(min_tokens=4, cold_trim_tokens=0, cold_align_tokens=4, continued_interval_tokens=1000)
FP_A, FP_B = b"A" * 32, b"B" * 32


def request(rid: int, prompt: list[int], **params: Any) -> Request:
    return Request(rid=rid, prompt=prompt, params=SamplingParams(**params), received_s=time.monotonic())


def scheduler(memory: MemoryKind, cache: KVCache | None = None) -> tuple[Scheduler, Recorder, StubBackend]:
    be = StubBackend(n_ctx=256, n_seq_max=4, n_batch=64, memory=memory)
    rec = Recorder()
    return Scheduler(be, rec, PrefillPolicy.fair(16), cache=cache), rec, be


def run_all(s: Scheduler) -> None:
    while s.has_work():
        s.tick()


def test_a_recurrent_sequence_is_kept_whole_or_not_at_all_and_a_refusal_is_counted_not_fatal() -> None:
    be = StubBackend(n_ctx=64, n_seq_max=2, n_batch=64, memory=MemoryKind.RECURRENT)
    placement = Placement(be, None)
    held = list(range(2, 22))
    for seq in (0, 1):
        be.decode([BatchRow(seq, held, 0, 1)])
    extends = request(1, [*held, 40])  # continues what the sequence holds: kept whole
    extends.seq_id = 0
    assert placement.place(extends, held=20, common=20, kind=CacheHitKind.STICKY)
    assert (extends.n_past, placement.refused) == (20, 0)
    diverges = request(2, [*held[:10], 99, 98])  # would need a cut at 10
    diverges.seq_id = 1
    assert not placement.place(diverges, held=20, common=10, kind=CacheHitKind.PARTIAL)
    assert (diverges.n_past, diverges.cache_hit_kind, placement.refused) == (0, CacheHitKind.COLD, 1)
    resent = request(3, held)  # the whole prompt again, without its logits: a cut by one, refused
    resent.seq_id = 0
    assert not placement.place(resent, held=20, common=20, kind=CacheHitKind.STICKY)
    assert placement.refused == 2


def test_on_every_memory_kind_sessions_and_shared_prefixes_give_the_solo_cold_tokens() -> None:
    for memory in MemoryKind:
        solo, rec_solo, _ = scheduler(memory)
        prompts = [list(range(2, 120)) + [i, i + 1] for i in (200, 210)]
        for rid, p in enumerate(prompts, 1):
            solo.submit(rid, p, SamplingParams(max_tokens=12))
            run_all(solo)
        s, rec, _ = scheduler(memory)
        for rid, p in enumerate(prompts, 1):  # together: the second copies the first's prefix
            s.submit(rid, p, SamplingParams(max_tokens=12))
        run_all(s)
        assert [rec.results[r]["generated"] for r in (1, 2)] == [
            rec_solo.results[r]["generated"] for r in (1, 2)
        ]
        assert rec.results[2]["cache_hit_kind"] == "shared", memory
        # A session extended, then diverging inside what it holds: still its cold tokens.
        first = rec.results[1]["context_tokens"]
        s.submit(3, first + [50, 51, 52], SamplingParams(max_tokens=6, session_id="s"))
        run_all(s)
        s.submit(4, first[:70] + [60, 61], SamplingParams(max_tokens=6, session_id="s"))
        run_all(s)
        for rid, prompt in ((3, first + [50, 51, 52]), (4, first[:70] + [60, 61])):
            cold, rec_cold, _ = scheduler(memory)
            cold.submit(rid, prompt, SamplingParams(max_tokens=6))
            run_all(cold)
            assert rec.results[rid]["generated"] == rec_cold.results[rid]["generated"], (memory, rid)
        assert s.placement.refused == 0, memory


def test_saves_queued_before_a_fingerprint_change_are_filed_under_the_one_they_were_queued_with(
    daemon: Daemon,
) -> None:
    daemon.start()
    kv = KVCache(daemon.endpoint, FP_A, POLICY)
    try:
        tokens = [5, 6, 7, 8, 9]
        parts = (pack_head(3, 0), b"abc", b"")
        with kv._cond:  # the saver thread cannot take either save until both are queued
            kv.save(tokens, parts, SaveReason.FINISH)
            kv.fingerprint = FP_B  # a LoRA adapter was loaded meanwhile
            kv.save(tokens + [10], parts, SaveReason.FINISH)
        assert kv.flush()
        c = daemon.client()
        assert c.exact(row_key(FP_A, tokens)) is not None and c.exact(row_key(FP_B, tokens)) is None
        assert (
            c.exact(row_key(FP_B, tokens + [10])) is not None
            and c.exact(row_key(FP_A, tokens + [10])) is None
        )
    finally:
        kv.close()


class CountingStub(StubBackend):
    """Counts KV copies (``seq_state``)."""

    copies = 0

    def seq_state(self, seq_id: int) -> bytes:
        self.copies += 1
        return super().seq_state(seq_id)


def test_a_state_larger_than_every_tier_is_never_copied(daemon: Daemon) -> None:
    daemon.start(ram_bytes=4096, shm_bytes=0, disk_bytes=8192)
    kv = KVCache(daemon.endpoint, FP_A, POLICY)
    try:
        wait_for(lambda: kv._max_row_bytes is not None, 10, "the saver to learn the tier budgets")
        be = CountingStub(n_ctx=4096, n_seq_max=1, n_batch=4096)
        s = Scheduler(be, Recorder(), PrefillPolicy.fair(4096), cache=kv)
        s.submit(1, list(range(2, 12)), SamplingParams(max_tokens=2))  # a small state: saved
        run_all(s)
        small = be.copies
        assert small > 0
        s.submit(2, [2 + i % 250 for i in range(3000)], SamplingParams(max_tokens=2))  # ~12 KB: too large
        run_all(s)
        assert be.copies == small and kv.counters.saves_too_large > 0
    finally:
        kv.close()


def test_a_row_that_does_not_restore_is_dropped_is_no_hit_and_does_not_block_our_save(daemon: Daemon) -> None:
    daemon.start()
    prompt = list(range(2, 30))
    c = daemon.client()
    junk = pack_head(8, 0) + b"not a KV"  # a row in our format whose state the backend rejects
    c.save(FP_A, prompt[:20], junk, SaveReason.COLD)
    kv = KVCache(daemon.endpoint, FP_A, POLICY)
    try:
        s, rec, _ = scheduler(MemoryKind.TRANSFORMER, kv)
        s.submit(1, prompt, SamplingParams(max_tokens=3))
        run_all(s)
        assert rec.results[1]["cache_hit_kind"] == "cold"
        assert kv.counters.restore_failures == 1
        assert kv.counters.hits_exact + kv.counters.hits_partial + kv.counters.hits_parent == 0
        assert kv.flush()
        assert c.exact(row_key(FP_A, prompt[:20])) is None or kv.counters.saves_already_present == 0
        s.submit(2, prompt, SamplingParams(max_tokens=3))
        run_all(s)
        assert rec.results[2]["cache_hit_kind"] == "exact"
        assert rec.results[2]["generated"] == rec.results[1]["generated"]
    finally:
        kv.close()
