"""Continuous batching on the real model: many requests share every llama_decode."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator

import pytest

from erllama import Client, ErllamaError, TokenEvent
from tests.conftest import BrokerProcess, serving, wait_for
from tests.reference import assert_identical

MODEL = "batch"
PROMPTS = [
    ("The capital of France is", 12),
    ("def fibonacci(n):", 20),
    ("Once upon a time, in a small village,", 8),
    ("List three primary colors:", 16),
    ("Q: What is 12 times 7?\nA:", 10),
    ("The quick brown fox", 24),
    ("1, 2, 3, 4, 5,", 18),
    ("In the beginning of the universe", 14),
]


@pytest.fixture(scope="module")
def bb() -> Iterator[BrokerProcess]:
    with serving("erl-b-", MODEL, n_ctx=2048, n_seq_max=4, prefill_budget_tokens=64) as bp:
        yield bp


@pytest.fixture
def c(bb: BrokerProcess) -> Iterator[Client]:
    client = Client(bb.endpoint, timeout_s=120)
    yield client
    client.close()


def run_concurrently(endpoint: str, jobs: list[tuple[str, dict]]) -> list[list[TokenEvent]]:
    out: list[list[TokenEvent]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def run(i: int, prompt: str, params: dict) -> None:
        try:
            with Client(endpoint, timeout_s=120) as cl:
                out[i] = list(cl.infer(MODEL, prompt, **params))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, p, kw)) for i, (p, kw) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return out


def test_eight_concurrent_greedy_requests_on_four_sequences_each_equal_their_solo_run(
    bb: BrokerProcess, reference
):
    results = run_concurrently(bb.endpoint, [(p, {"max_tokens": n}) for p, n in PROMPTS])
    for (prompt, n), events in zip(PROMPTS, results):
        ours = [t for e in events for t in e.token_ids]
        assert_identical(ours, reference.greedy(reference.tokenize(prompt), n)[0], prompt)


def test_chunked_prefill_gives_the_same_tokens_as_one_chunk(bb: BrokerProcess, c: Client, reference):
    c.load_model("one-chunk", None, n_ctx=2048, n_seq_max=1, prefill_budget_tokens=512, cache=False)
    c.load_model("small-chunks", None, n_ctx=2048, n_seq_max=1, prefill_budget_tokens=16, cache=False)
    try:
        prompt = "The lighthouse keeper climbed the stairs every evening and wound the clock. " * 6
        whole = c.complete("one-chunk", prompt, max_tokens=16).generated
        chunked = c.complete("small-chunks", prompt, max_tokens=16).generated
        ref = reference.greedy(reference.tokenize(prompt), 16)[0]
        assert_identical(whole, ref, "512-token ticks")
        assert_identical(chunked, ref, "16-token ticks")
    finally:
        c.unload_model("one-chunk")
        c.unload_model("small-chunks")


def test_a_long_prefill_does_not_stop_other_streams(bb: BrokerProcess, c: Client):
    running = c.infer(MODEL, "1, 2, 3, 4, 5, 6,", max_tokens=300)
    it = iter(running)
    first = [next(it) for _ in range(3)]
    long_prompt = (
        "A very long document about lighthouses and their keepers. " * 120
    )  # ~1,300 tokens, ~20 chunks
    long_req = c.infer(MODEL, long_prompt, max_tokens=1)
    long_events = list(long_req)
    rest = list(it)
    started = long_events[0].received_ns if long_events else 0
    during = [e for e in first + rest if e.received_ns < started]
    # the running stream kept receiving tokens while the long prompt was being prefilled
    assert len(during) > 3 + 10
    assert running.result.finish_reason == "length"


def test_different_sampling_settings_in_one_batch_do_not_leak(bb: BrokerProcess, c: Client, reference):
    grammar = r'root ::= "Colors: " ("red" | "green" | "blue") (", " ("red" | "green" | "blue")){2} "."'
    jobs = [
        ("The capital of France is", {"max_tokens": 16}),
        ("Write a poem about the sea.", {"max_tokens": 16, "temperature": 1.2, "seed": 7}),
        ("Name three colors.", {"max_tokens": 30, "grammar": grammar, "temperature": 0.9, "seed": 3}),
        ("1, 2, 3, 4, 5, 6,", {"max_tokens": 40, "stop": [" 9,"]}),
        ("Once upon a time", {"max_tokens": 16, "repetition_penalty": 1.3}),
    ]
    batched = run_concurrently(bb.endpoint, jobs)
    greedy = [t for e in batched[0] for t in e.token_ids]
    assert_identical(greedy, reference.greedy(reference.tokenize(jobs[0][0]), 16)[0], jobs[0][0])
    assert re.fullmatch(
        r"Colors: (red|green|blue)(, (red|green|blue)){2}\.", "".join(e.text for e in batched[2])
    )
    counted = "".join(e.text for e in batched[3])
    assert " 9," not in counted and counted.rstrip().endswith("8,")
    solo_seeded = c.complete(MODEL, jobs[1][0], **jobs[1][1]).generated
    assert [t for e in batched[1] for t in e.token_ids][:4] == solo_seeded[
        :4
    ]  # its own seed, not a neighbour's


def test_sticky_session_turn_two_reads_turn_one_without_a_cache_lookup(c: Client):
    c.load_model("sticky", None, n_ctx=1024, n_seq_max=2)  # its own counters
    try:
        first = c.complete("sticky", "Tell me about the sea.", max_tokens=12, session_id="s1")
        wait_for(lambda: (c.model_info("sticky")["cache"] or {}).get("lookups") == 1, 30, "turn 1's lookup")
        turn2 = first.context_tokens + c.tokenize("sticky", " And the mountains?", add_special=False)
        second = c.complete("sticky", turn2, max_tokens=8, session_id="s1")
        assert second.cache_hit_kind == "sticky"
        assert second.cache_delta["read"] == len(first.context_tokens)
        done = len(first.generated) + len(second.generated)
        wait_for(lambda: c.model_info("sticky")["tokens_generated"] >= done, 30, "turn 2's heartbeat")
        assert c.model_info("sticky")["cache"]["lookups"] == 1  # turn 2 never asked the cache store
        assert c.end_session("sticky", "s1") is True
    finally:
        c.unload_model("sticky")


def test_concurrent_use_of_one_session_is_sticky_busy(c: Client):
    stream = c.infer(MODEL, "1, 2, 3, 4, 5,", max_tokens=200, session_id="busy")
    next(iter(stream))
    with pytest.raises(ErllamaError) as exc:
        c.complete(MODEL, "hello", session_id="busy")
    assert exc.value.code == "sticky_busy"
    stream.cancel()
    stream.collect()
    c.end_session(MODEL, "busy")


def test_idle_sessions_pinning_every_sequence_do_not_block_new_requests(bb: BrokerProcess, c: Client):
    c.load_model("pinned", None, n_ctx=512, n_seq_max=2)
    try:
        for sid in ("a", "b"):
            c.complete("pinned", f"Session {sid} says hello.", max_tokens=4, session_id=sid)
        r = c.complete("pinned", "A newcomer arrives.", max_tokens=4)
        assert r.finish_reason == "length"
        assert c.complete("pinned", "Another one.", max_tokens=4, session_id="c").finish_reason == "length"
    finally:
        c.unload_model("pinned")


def test_a_prompt_starting_like_a_running_one_copies_its_kv_and_both_equal_their_solo_runs(
    bb: BrokerProcess, c: Client, reference
):
    start = (
        f"Logbook {uuid.uuid4().hex[:8]}. "
        + "The keeper climbed the stairs, trimmed the wick and wound the clock. " * 20
    )
    # Suffixes whose 12 greedy tokens are far from any tie (top-2 logit gap >= 3.8 measured): a
    # question here often put end-of-text and a word within 0.03 of each other, where any change of
    # batch shape may flip the first token.
    first = c.infer(MODEL, start + "\nNumbers: 1, 2, 3, 4, 5, 6,", max_tokens=12)
    second = c.infer(MODEL, start + "\nNumbers: 10, 20, 30, 40, 50,", max_tokens=12)
    events = [list(first), list(second)]
    assert first.result is not None and second.result is not None
    assert all(len(s.result.generated) == 12 for s in (first, second))
    assert second.result.cache_hit_kind == "shared"
    assert (
        second.result.cache_delta["read"] >= len(reference.tokenize(start)) - 2
    )  # the start, up to a merged token
    for stream, evs in zip((first, second), events):
        prompt_tokens = stream.result.context_tokens[: stream.result.stats.prompt_tokens]
        assert_identical([t for e in evs for t in e.token_ids], reference.greedy(prompt_tokens, 12)[0])
