"""The shared tier on the real model: a prompt served by one broker (its own cache store and
directories) restores on a second broker with other directories, through the same redis-server,
without a prefill, and generates what the cold run generated."""

from __future__ import annotations

from typing import Any

from erllama.cachestore.client import CacheClient
from erllama.transport import CACHESTORE_SOCKET_NAME, ipc_endpoint
from tests.conftest import BrokerProcess, serving, wait_for
from tests.redis_support import RedisServer
from tests.reference import assert_identical

MODEL = "shared"
OPTIONS = {
    "n_ctx": 1024,
    "n_seq_max": 1,
    "cache_min_tokens": 16,
    "cold_trim_tokens": 4,
    "cold_align_tokens": 16,
}
PROMPT = (
    "The cartographer unrolled the old map across the table. Rivers ran like silver threads between "
    "mountains drawn in brown ink, and the coast was dotted with harbours whose names had faded. "
    "She traced the northern road with one finger and said that the pass would be closed by snow"
)
N_GEN = 16


def store_stats(bp: BrokerProcess) -> dict[str, Any]:
    with CacheClient(ipc_endpoint(bp.runtime_dir, CACHESTORE_SOCKET_NAME), timeout_s=10) as c:
        return c.stats()


def all_saves_written_behind(bp: BrokerProcess) -> bool:
    """Every row the store committed has been sent to the shared tier (or found there)."""
    s = store_stats(bp)
    saved = sum(v for k, v in s["counters"].items() if k.startswith("saves_") and k != "saves_dropped")
    shared = s["shared"]
    return (
        saved >= 2  # the cold row and the finish row
        and shared["writes"] + shared["writes_present"] == saved
        and shared["pending_write_bytes"] == 0
    )


def test_a_prompt_served_on_one_host_restores_on_another_through_the_shared_tier(
    redis_server: RedisServer, reference: Any
) -> None:
    with serving("erl-sa-", MODEL, "--shared-url", redis_server.url, "--cache-shm", "0", **OPTIONS) as a:
        c = a.client(timeout_s=120)
        prompt = c.tokenize(MODEL, PROMPT)
        cold = c.complete(MODEL, prompt, max_tokens=N_GEN)
        assert cold.cache_hit_kind == "cold"
        wait_for(lambda: all_saves_written_behind(a), 60, "the rows to reach the shared tier")
        a_dirs = store_stats(a)["dirs"]

    with serving("erl-sb-", MODEL, "--shared-url", redis_server.url, "--cache-shm", "0", **OPTIONS) as b:
        assert store_stats(b)["dirs"] != a_dirs and store_stats(b)["rows"] == 0
        warm = b.client(timeout_s=120).complete(MODEL, prompt, max_tokens=N_GEN)
        assert warm.cache_hit_kind in ("exact", "partial") and warm.cache_tier == "shared"
        assert warm.cache_delta["read"] >= OPTIONS["cache_min_tokens"]
        assert_identical(warm.generated, cold.generated, "warm on host B vs cold on host A")
        shared = store_stats(b)["shared"]
        assert (shared["hits"], shared["errors"], shared["corrupt_rows"]) == (1, 0, 0)
    ref, _ = reference.greedy(prompt, N_GEN)
    assert_identical(cold.generated, ref, "cold vs the reference")
