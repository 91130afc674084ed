"""The scheduler's tick, driven directly over the stub backend (no processes, no sockets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from erllama import ErllamaError
from erllama.options import SamplingParams
from erllama.worker.prefill import PrefillPolicy
from erllama.worker.scheduler import Scheduler
from erllama.worker.stub_backend import StubBackend


@dataclass
class Recorder:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    texts: dict[int, list[str]] = field(default_factory=dict)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, ErllamaError] = field(default_factory=dict)
    log: list[tuple[str, int]] = field(default_factory=list)

    def admitted(self, rid, kind, prefix_len):
        self.log.append(("admitted", rid))

    def token(self, rid, text, ids, kind="text"):
        self.tokens.setdefault(rid, []).extend(ids)
        self.texts.setdefault(rid, []).append(text)
        self.log.append(("token", rid))

    def span_end(self, rid, kind, data, signature):
        self.log.append((kind, rid))

    def done(self, rid, result):
        self.results[rid] = msgspec.to_builtins(result)  # the tests read the result as the client's map
        self.log.append(("done", rid))

    def error(self, rid, err):
        self.errors[rid] = err

    def flush(self):
        pass  # every event above is recorded as it comes


def make(n_seq_max=4, n_batch=64, chunk=16, n_ctx=256) -> tuple[Scheduler, Recorder, StubBackend]:
    be = StubBackend(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch)
    rec = Recorder()
    return Scheduler(be, rec, PrefillPolicy.fair(chunk)), rec, be


def run_all(s: Scheduler, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not s.has_work():
            return
        s.tick()
    raise AssertionError("scheduler did not drain")


def alone(prompt: str, max_tokens: int, **kw) -> list[int]:
    s, rec, _ = make(**kw)
    s.submit(1, prompt, SamplingParams(max_tokens=max_tokens))
    run_all(s)
    return rec.results[1]["generated"]


def test_requests_beyond_the_sequence_count_wait_and_match_their_solo_runs():
    s, rec, _ = make(n_seq_max=2)
    prompts = {i: f"prompt number {i} " * (i + 1) for i in range(6)}
    for rid, p in prompts.items():
        s.submit(rid, p, SamplingParams(max_tokens=5 + rid))
    run_all(s)
    for rid, p in prompts.items():
        assert rec.results[rid]["generated"] == alone(p, 5 + rid, n_seq_max=2)
        assert rec.results[rid]["finish_reason"] == "length"


def test_chunked_prefill_gives_the_same_tokens_as_one_chunk():
    prompt = "a long prompt " * 12
    assert alone(prompt, 12, chunk=7, n_batch=64) == alone(prompt, 12, chunk=512, n_batch=512)


def test_a_long_prefill_does_not_stop_a_running_stream():
    s, rec, _ = make(n_seq_max=2, n_batch=32, chunk=16)
    s.submit(1, "short", SamplingParams(max_tokens=200))
    for _ in range(3):
        s.tick()
    s.submit(2, "x" * 200, SamplingParams(max_tokens=1))  # 201 tokens: many chunks
    before = len(rec.tokens[1])
    ticks = 0
    while 2 not in rec.results:
        s.tick()
        ticks += 1
    assert ticks >= 200 // 16
    assert len(rec.tokens[1]) - before == ticks  # one token for stream 1 on every tick


def test_context_tokens_are_the_prompt_and_every_decoded_token():
    s, rec, be = make()
    s.submit(1, "hello", SamplingParams(max_tokens=4))
    run_all(s)
    r = rec.results[1]
    prompt = be.tokenize("hello")
    assert r["context_tokens"] == prompt + r["generated"][:-1]
    assert r["committed_tokens"] == len(prompt) + 3


def test_cancel_ends_with_cancelled_and_frees_the_sequence():
    s, rec, _ = make(n_seq_max=1)
    s.submit(1, "one", SamplingParams(max_tokens=200))
    s.tick()
    s.tick()
    s.cancel(1)
    s.submit(2, "two", SamplingParams(max_tokens=3))
    run_all(s)
    assert rec.results[1]["finish_reason"] == "cancelled"
    assert rec.results[2]["finish_reason"] == "length"
    assert s.pool.free == [0]


def test_max_tokens_zero_only_prefills():
    s, rec, _ = make()
    s.submit(1, "abc", SamplingParams(max_tokens=0))
    run_all(s)
    assert rec.results[1]["generated"] == [] and rec.results[1]["finish_reason"] == "length"


def test_prompt_that_fills_the_context_is_context_overflow():
    s, _, _ = make(n_ctx=32)
    with pytest.raises(ErllamaError) as exc:
        s.submit(1, "x" * 40, SamplingParams())
    assert exc.value.code == "context_overflow"


def test_generation_stops_with_length_when_the_context_is_full():
    s, rec, _ = make(n_ctx=32)
    s.submit(1, "x" * 20, SamplingParams(max_tokens=30))
    run_all(s)
    assert rec.results[1]["finish_reason"] == "length"
    assert rec.results[1]["committed_tokens"] == 32


def test_seeded_sampling_differs_from_greedy_and_repeats_with_the_same_seed():
    outs = []
    for seed in (1, 1, 2):
        s, rec, _ = make()
        s.submit(1, "hi", SamplingParams(max_tokens=20, temperature=0.8, seed=seed))
        run_all(s)
        outs.append(rec.results[1]["generated"])
    assert outs[0] == outs[1] != outs[2]


def test_a_session_s_next_turn_prefills_only_the_new_suffix_on_its_pinned_sequence():
    s, rec, be = make(n_seq_max=2)
    s.submit(1, "turn one", SamplingParams(max_tokens=4, session_id="chat"))
    run_all(s)
    first = rec.results[1]
    turn2 = first["context_tokens"] + be.tokenize(" and turn two", add_special=False)
    s.submit(2, turn2, SamplingParams(max_tokens=4, session_id="chat"))
    run_all(s)
    second = rec.results[2]
    assert second["cache_hit_kind"] == "sticky"
    assert second["cache_delta"]["read"] == first["committed_tokens"]
    fresh, frec, _ = make(n_seq_max=2)
    fresh.submit(2, turn2, SamplingParams(max_tokens=4))
    run_all(fresh)
    assert second["generated"] == frec.results[2]["generated"]


def test_concurrent_use_of_one_session_is_sticky_busy():
    s, _, _ = make()
    s.submit(1, "a", SamplingParams(max_tokens=50, session_id="x"))
    with pytest.raises(ErllamaError) as exc:
        s.submit(2, "b", SamplingParams(session_id="x"))
    assert exc.value.code == "sticky_busy"


def test_a_diverging_prompt_leaves_the_sticky_path():
    s, rec, _ = make()
    s.submit(1, "alpha", SamplingParams(max_tokens=3, session_id="x"))
    run_all(s)
    s.submit(2, "beta", SamplingParams(max_tokens=3, session_id="x"))
    run_all(s)
    assert rec.results[2]["cache_hit_kind"] == "cold"


def test_idle_sessions_pinning_every_sequence_never_block_new_requests():
    s, rec, _ = make(n_seq_max=2)
    for rid, sid in ((1, "a"), (2, "b")):
        s.submit(rid, f"session {sid}", SamplingParams(max_tokens=2, session_id=sid))
    run_all(s)
    assert s.pool.free == [] and set(s.pool.pinned) == {"a", "b"}
    s.submit(3, "a newcomer", SamplingParams(max_tokens=2))
    run_all(s)
    assert rec.results[3]["finish_reason"] == "length"
    assert len(s.pool.pinned) == 1  # the least recently used session gave up its sequence


def test_end_session_frees_the_pinned_sequence():
    s, _, _ = make(n_seq_max=1)
    s.submit(1, "hello", SamplingParams(max_tokens=2, session_id="x"))
    run_all(s)
    assert s.pool.free == []
    assert s.end_session("x") is True and s.pool.free == [0]
    assert s.end_session("x") is False


def test_freed_sequences_are_reused_lowest_id_first_so_running_ones_stay_consecutive():
    """llama.cpp decodes consecutive per-sequence KV streams in one compute and gapped ones in
    several: whatever order requests finish in, the next ones get the lowest free ids."""
    s, _, _ = make(n_seq_max=4)
    for rid, n in ((1, 8), (2, 2), (3, 6), (4, 4)):
        s.submit(rid, f"prompt {rid}", SamplingParams(max_tokens=n))
    run_all(s)
    for rid in (5, 6):
        s.submit(rid, f"prompt {rid}", SamplingParams(max_tokens=4))
    s.tick()
    assert sorted(r.seq_id for r in s.running.values()) == [0, 1]


def test_a_second_request_under_a_running_request_id_is_refused_and_the_first_completes():
    s, rec, _ = make()
    s.submit(1, "the first", SamplingParams(max_tokens=5))
    s.tick()
    with pytest.raises(ErllamaError) as exc:
        s.submit(1, "the second", SamplingParams(max_tokens=2))
    assert exc.value.code == "protocol_error"
    run_all(s)
    assert len(rec.results[1]["generated"]) == 5


# --- prompts that start like a running request's (worker/sharing.py) ------------------------------------------

SHARED_START = (
    "You are a careful assistant. Answer in one short sentence, and cite the source. " * 2
)  # 163 tokens


def counting_decodes(be: StubBackend) -> list[tuple[int, int]]:
    """Record (seq_id, tokens) of every decode row from now on."""
    rows: list[tuple[int, int]] = []
    real = be.decode

    def decode(batch):
        rows.extend((r.seq_id, len(r.tokens)) for r in batch)
        return real(batch)

    be.decode = decode  # type: ignore[method-assign]
    return rows


def test_a_request_starting_like_a_running_one_copies_its_kv_and_prefills_only_its_own_suffix():
    s, rec, be = make(n_seq_max=4, n_batch=64, chunk=16)
    rows = counting_decodes(be)
    first, second = SHARED_START + "What is the tallest mountain?", SHARED_START + "Why is the sky blue?"
    s.submit(1, first, SamplingParams(max_tokens=6))
    s.tick()  # the first is prefilling when the second arrives
    s.submit(2, second, SamplingParams(max_tokens=6))
    run_all(s)
    a, b = be.tokenize(first), be.tokenize(second)
    shared = next(i for i in range(len(a)) if a[i] != b[i])  # the start plus "Wh"
    assert rec.results[2]["cache_hit_kind"] == "shared"
    assert rec.results[2]["cache_delta"]["read"] == shared
    assert rec.results[1]["generated"] == alone(first, 6)
    assert rec.results[2]["generated"] == alone(second, 6)
    prefilled_by_second = sum(n for seq, n in rows if seq == 1)  # the second request runs in sequence 1
    assert prefilled_by_second == len(be.tokenize(second)) - shared + 5  # its suffix, then 5 decoded tokens


def test_a_waiting_request_takes_no_batch_rows_until_its_donor_has_prefilled_the_shared_part():
    s, rec, be = make(n_seq_max=4, n_batch=64, chunk=16)
    rows = counting_decodes(be)
    s.submit(1, SHARED_START + "first question", SamplingParams(max_tokens=4))
    s.submit(2, SHARED_START + "second question", SamplingParams(max_tokens=4))
    s.tick()
    donor_ticks = 0
    while s.running[2].donor_rid is not None:
        assert all(seq != 1 for seq, _ in rows)
        s.tick()
        donor_ticks += 1
    assert donor_ticks >= len(be.tokenize(SHARED_START)) // 16 - 1  # it waited for the donor's chunks
    assert ("admitted", 2) in rec.log  # announced once it knew what it holds
    run_all(s)
    assert rec.results[2]["cache_hit_kind"] == "shared"


def test_a_cancelled_donor_hands_over_what_it_prefilled_or_lets_the_waiter_prefill_alone():
    # chunk 16: after k ticks the donor holds 16 k tokens; 64 or more are worth copying
    for cancel_after_ticks, kind, read in ((1, "cold", 0), (6, "shared", 96)):
        s, rec, _ = make(n_seq_max=4, n_batch=64, chunk=16)
        first, second = SHARED_START + "first question", SHARED_START + "second question"
        s.submit(1, first, SamplingParams(max_tokens=50))
        s.submit(2, second, SamplingParams(max_tokens=6))
        for _ in range(cancel_after_ticks):
            s.tick()
        assert s.running[2].donor_rid == 1
        s.cancel(1)
        run_all(s)
        assert rec.results[1]["finish_reason"] == "cancelled"
        assert rec.results[2]["generated"] == alone(second, 6)
        assert not rec.errors
        assert (rec.results[2]["cache_hit_kind"], rec.results[2]["cache_delta"]["read"]) == (kind, read)


def test_with_share_prefix_off_a_request_never_waits_for_another():
    be = StubBackend(n_ctx=256, n_seq_max=4, n_batch=64)
    rec = Recorder()
    s = Scheduler(be, rec, PrefillPolicy.fair(16), share_prefix=False)
    s.submit(1, SHARED_START + "first question", SamplingParams(max_tokens=4))
    s.submit(2, SHARED_START + "second question", SamplingParams(max_tokens=4))
    s.tick()
    assert s.running[2].donor_rid is None
    run_all(s)
    assert rec.results[2]["cache_hit_kind"] == "cold"


def test_a_short_common_start_does_not_make_a_request_wait():
    s, rec, _ = make(n_seq_max=4, n_batch=64, chunk=16)
    s.submit(1, "Hello there, tell me about volcanoes and how they form.", SamplingParams(max_tokens=4))
    s.submit(2, "Hello there, tell me about rivers.", SamplingParams(max_tokens=4))
    s.tick()
    assert s.running[2].donor_rid is None
    run_all(s)
    assert rec.results[2]["cache_hit_kind"] == "cold"
