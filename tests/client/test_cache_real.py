"""Warm restore on the real model: cached prefixes skip prefill and give the same tokens as cold runs."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from erllama import Client
from erllama.cachestore.client import CacheClient
from tests.conftest import BrokerProcess, remove_runtime, serving, short_tmpdir, start_broker, wait_for
from tests.reference import ReferenceModel, assert_identical

MODEL = "warm"
# Small boundaries so that test prompts of a few hundred tokens exercise every save reason.
OPTIONS = {
    "n_ctx": 2048,
    "n_seq_max": 2,
    "cache_min_tokens": 16,
    "cold_trim_tokens": 4,
    "cold_align_tokens": 16,
    "continued_interval_tokens": 64,
}
STORY = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, "
    "trimmed the wick and polished the great lens until it shone. Ships passed in the night, and the "
    "keeper wrote their names in a leather book: the Albatross, the Morning Star, the Silver Heron. "
)
N_GEN = 16


@pytest.fixture(scope="module")
def warm_broker() -> Iterator[BrokerProcess]:
    with serving("erl-w-", MODEL, "--cache-shm", "0", **OPTIONS) as bp:  # RAM + disk tiers
        yield bp


@pytest.fixture
def c(warm_broker: BrokerProcess) -> Iterator[Client]:
    client = Client(warm_broker.endpoint, timeout_s=120)
    yield client
    client.close()


def cached(c: Client, tokens: list[int], at_least: int) -> int:
    return wait_for(
        lambda: (n := c.cached_prefix_len(MODEL, tokens)) >= at_least and n, 60, "the save to land"
    )


def check_against_reference(reference: ReferenceModel, prompt: list[int], *generated: list[int]) -> None:
    ref, _ = reference.greedy(prompt, N_GEN)
    for g in generated:
        assert_identical(g, ref)


def test_an_exact_hit_restores_the_whole_prompt_and_generates_the_same_tokens(c: Client, reference):
    prompt = c.tokenize(MODEL, STORY * 2 + "The first ship was")
    cold = c.complete(MODEL, prompt, max_tokens=N_GEN)
    assert cold.cache_hit_kind == "cold" and cold.finish_key is not None
    cached(c, prompt, len(prompt))
    warm = c.complete(MODEL, prompt, max_tokens=N_GEN)
    assert warm.cache_hit_kind == "exact"
    assert warm.cache_delta["read"] == len(prompt) - 1  # the last token is decoded again for fresh logits
    check_against_reference(reference, prompt, cold.generated, warm.generated)


def test_a_longer_row_is_truncated_to_the_common_prefix(c: Client, reference):
    base = c.tokenize(MODEL, STORY * 2 + "In winter the sea froze")
    c.complete(
        MODEL, base + c.tokenize(MODEL, " and the gulls left for the south.", add_special=False), max_tokens=4
    )
    other = base + c.tokenize(MODEL, ", but the lamp burned all night", add_special=False)
    common = cached(c, other, len(base))
    warm = c.complete(MODEL, other, max_tokens=N_GEN)
    assert warm.cache_hit_kind == "partial"
    assert len(base) <= warm.cache_delta["read"] == common < len(other)
    check_against_reference(reference, other, warm.generated)


def test_parent_key_resumes_from_an_earlier_finish_row(c: Client, reference):
    first = c.complete(MODEL, STORY + "The keeper's name was", max_tokens=N_GEN)
    assert first.finish_key is not None
    cached(c, first.context_tokens, len(first.context_tokens))
    turn2 = first.context_tokens + c.tokenize(MODEL, " He lived alone.", add_special=False)
    second = c.complete(MODEL, turn2, max_tokens=N_GEN, parent_key=first.finish_key)
    assert second.cache_hit_kind == "partial"
    assert second.cache_delta["read"] == len(first.context_tokens)
    check_against_reference(reference, turn2, second.generated)
    # a parent_key whose row is gone (or never was) falls back to the longest-prefix lookup
    third = c.complete(MODEL, turn2, max_tokens=4, parent_key="0" * 64)
    assert third.cache_hit_kind in ("exact", "partial") and third.cache_delta["read"] >= len(
        first.context_tokens
    )


def test_a_second_turn_that_resends_the_conversation_reads_the_first_turn_from_the_cache(c: Client):
    def chat(turns: list[tuple[str, str]]) -> str:
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        for role, content in turns:
            text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    turn1 = chat([("user", "Tell me about lighthouses. " + STORY)])
    r1 = c.complete(MODEL, c.tokenize(MODEL, turn1, parse_special=True), max_tokens=24)
    cached(c, r1.context_tokens, len(r1.context_tokens))
    turn2 = chat(
        [
            ("user", "Tell me about lighthouses. " + STORY),
            ("assistant", r1.reply),
            ("user", "And the keeper?"),
        ]
    )
    tokens2 = c.tokenize(MODEL, turn2, parse_special=True)
    r2 = c.complete(MODEL, tokens2, max_tokens=8)
    assert r2.cache_hit_kind == "partial"
    assert r2.cache_delta["read"] >= len(c.tokenize(MODEL, turn1, parse_special=True))


def saves_after(c: Client, tokens_generated: int) -> int:
    """The worker's queued saves as of a heartbeat sent after ``tokens_generated`` tokens: a request's
    last token and its finish save happen in one tick, so that heartbeat counts every save of it."""
    info = wait_for(
        lambda: (i := c.model_info(MODEL))["tokens_generated"] >= tokens_generated and i["cache"] and i,
        30,
        "a heartbeat after the request",
    )
    return info["cache"]["saves_queued"]


def test_a_prompt_restored_but_for_a_few_tokens_is_saved_once_and_a_cold_one_twice(c: Client):
    prompt = c.tokenize(MODEL, "Saved how often? " + STORY * 2)
    info = c.model_info(MODEL)
    before = saves_after(c, info["tokens_generated"])
    cold = c.complete(MODEL, prompt, max_tokens=4)
    after_cold = saves_after(c, info["tokens_generated"] + len(cold.generated))
    assert cold.cache_hit_kind == "cold" and after_cold - before == 2  # cold boundary, then finish
    cached(c, cold.context_tokens, len(cold.context_tokens))
    # New tokens past the restored prefix: more than the cold boundary's trim and alignment, fewer
    # than continued_interval_tokens (64).
    turn2 = cold.context_tokens + c.tokenize(
        MODEL,
        " The keeper's daughter asked him why the ships never stopped "
        "at the island, and he told her about the reef.",
        add_special=False,
    )
    warm = c.complete(MODEL, turn2, max_tokens=4)
    assert warm.cache_hit_kind in ("exact", "partial") and warm.cache_delta["read"] >= len(prompt)
    boundary = (
        (len(turn2) - OPTIONS["cold_trim_tokens"])
        // OPTIONS["cold_align_tokens"]
        * OPTIONS["cold_align_tokens"]
    )
    assert (
        warm.cache_delta["read"] < boundary < warm.cache_delta["read"] + OPTIONS["continued_interval_tokens"]
    )
    done = info["tokens_generated"] + len(cold.generated) + len(warm.generated)
    assert saves_after(c, done) - after_cold == 1  # only the finish save


def test_prefill_only_primes_the_cache_and_cached_prefix_len_reports_it(c: Client):
    prompt = c.tokenize(MODEL, STORY + "A storm was coming and")
    assert c.cached_prefix_len(MODEL, prompt) < len(prompt)
    primed = c.prefill_only(MODEL, prompt)
    assert primed.generated == [] and primed.finish_key is not None
    assert cached(c, prompt, len(prompt)) == len(prompt)
    assert c.complete(MODEL, prompt, max_tokens=2).cache_hit_kind == "exact"


def test_rows_survive_a_restart_of_every_process_and_come_back_from_disk():
    rdir = short_tmpdir("erl-rb-")
    prompt_text = STORY * 2 + "After the restart,"
    bp = start_broker(rdir, "--no-default-model", "--cache-shm", "0")
    try:
        c = bp.client(timeout_s=120)
        c.load_model(MODEL, None, **OPTIONS)
        prompt = c.tokenize(MODEL, prompt_text)
        cold = c.complete(MODEL, prompt, max_tokens=8)
        cached(c, prompt, len(prompt))
    finally:
        bp.stop()  # broker, worker and cache store all exit; RAM rows are spilled to disk
    bp = start_broker(rdir, "--no-default-model", "--cache-shm", "0")
    try:
        c = bp.client(timeout_s=120)
        c.load_model(MODEL, None, **OPTIONS)
        warm = c.complete(MODEL, prompt, max_tokens=8)
        assert warm.cache_hit_kind == "exact" and warm.cache_tier == "disk"
        assert warm.generated == cold.generated
    finally:
        bp.stop()
        remove_runtime(rdir)


def test_a_reload_with_another_n_seq_max_stores_and_restores_its_own_rows(reference):
    """The number of KV streams fixes a state's layout, so it is part of the fingerprint: after a reload
    with another ``n_seq_max`` the old rows are not offered (no failed restore, no false hit, no
    ``already_present`` for the new layout's saves), the new layout saves and restores its own, and the
    old layout finds its rows again when it comes back."""
    with serving("erl-ns-", MODEL, "--cache-shm", "0", **OPTIONS) as bp:
        c = Client(bp.endpoint, timeout_s=120)
        try:
            prompt = c.tokenize(MODEL, STORY * 2 + "The keeper counted the ships:")
            two = c.complete(MODEL, prompt, max_tokens=N_GEN)
            cached(c, prompt, len(prompt))
            c.unload_model(MODEL)
            c.load_model(MODEL, None, **OPTIONS | {"n_seq_max": 3})
            assert c.cached_prefix_len(MODEL, prompt) == 0  # the two-stream rows are another layout's
            three_cold = c.complete(MODEL, prompt, max_tokens=N_GEN)
            assert three_cold.cache_hit_kind == "cold" and three_cold.cache_delta["created"] > 0
            cached(c, prompt, len(prompt))
            three_warm = c.complete(MODEL, prompt, max_tokens=N_GEN)
            assert three_warm.cache_hit_kind == "exact"
            counters = c.model_info(MODEL)["cache"]
            assert counters["restore_failures"] == 0 and counters["restores_refused"] == 0, counters
            c.unload_model(MODEL)
            c.load_model(MODEL, None, **OPTIONS)
            two_again = c.complete(MODEL, prompt, max_tokens=N_GEN)
            assert two_again.cache_hit_kind == "exact"
            check_against_reference(
                reference,
                prompt,
                two.generated,
                three_cold.generated,
                three_warm.generated,
                two_again.generated,
            )
        finally:
            c.close()


def is_cachestore(p: psutil.Process) -> bool:
    # the program itself, not a worker whose --cachestore flag names the store's socket
    try:
        argv = p.cmdline()[:3]
    except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a killed store the broker has not reaped yet
        return False
    return any(Path(a).name == "erllama-cachestore" or a == "erllama.cachestore.main" for a in argv)


def test_a_killed_cache_store_costs_only_cache_misses(warm_broker: BrokerProcess, c: Client):
    store = next(p for p in psutil.Process(warm_broker.proc.pid).children() if is_cachestore(p))
    os.kill(store.pid, signal.SIGKILL)
    results = [c.complete(MODEL, STORY + f"Ship number {i} was", max_tokens=4) for i in range(3)]
    assert all(r.finish_reason == "length" for r in results)
    wait_for(
        lambda: any(
            is_cachestore(p) and p.pid != store.pid for p in psutil.Process(warm_broker.proc.pid).children()
        ),
        60,
        "the store's restart",
    )


def test_a_frozen_cache_store_is_killed_and_restarted(warm_broker: BrokerProcess, c: Client):
    store = next(p for p in psutil.Process(warm_broker.proc.pid).children() if is_cachestore(p))
    os.kill(store.pid, signal.SIGSTOP)
    try:
        assert (
            c.complete(MODEL, STORY + "While the store was frozen,", max_tokens=4).finish_reason == "length"
        )
        wait_for(
            lambda: any(
                is_cachestore(p) and p.pid != store.pid
                for p in psutil.Process(warm_broker.proc.pid).children()
            ),
            60,
            "a new store",
        )
    finally:
        if psutil.pid_exists(store.pid):
            os.kill(store.pid, signal.SIGCONT)


def test_rows_written_into_reused_files_restore_exactly(reference):
    """A RAM tier of about three rows: each new row takes the file of the row that leaves for disk,
    and the worker reads it back through the mapping it already has. Every prompt still restores
    exactly (from RAM or disk) and generates what its cold run did."""
    openings = ("At dawn the harbour was quiet.", "Nobody remembered the storm.", "Gulls circled the rock.")
    with serving("erl-w-", MODEL, "--cache-shm", "0", "--cache-ram", "4M", **OPTIONS) as bp:
        c = Client(bp.endpoint, timeout_s=120)
        store = CacheClient(f"ipc://{bp.runtime_dir}/cachestore.sock", timeout_s=10)
        try:
            prompts = [c.tokenize(MODEL, opening + " " + STORY + "The ship was") for opening in openings]
            colds = []
            for prompt in prompts:
                colds.append(c.complete(MODEL, prompt, max_tokens=N_GEN))
                cached(c, prompt, len(prompt))
            counters = store.stats()["counters"]
            assert counters["recycled_files"] > 0 and counters["demotions"] > 0, counters
            for prompt, cold in zip(prompts, colds, strict=True):
                warm = c.complete(MODEL, prompt, max_tokens=N_GEN)
                assert warm.cache_hit_kind == "exact" and warm.cache_tier in ("ram", "disk")
                check_against_reference(reference, prompt, cold.generated, warm.generated)
        finally:
            store.close()
            c.close()
