"""The shared tier on a real redis-server: a row saved by one daemon is found by another through it,
and every fault of the server (down, evicting, corrupt, wrong password) is a miss, never an error."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from erllama.blockhash import block_hashes
from erllama.cachestore.cli import render
from erllama.cachestore.client import CacheClient
from erllama.cachestore.codec import row_key
from erllama.cachestore.sharedkv import PART_BYTES, Manifest, lengths_key, manifest_key
from erllama.protocol import LOCAL_TIERS, CacheTier, KvEventKind, SaveOutcome
from tests.cachestore.cachestore_support import Daemon, payload_for
from tests.redis_support import PASSWORD, RedisServer

FP = b"fingerprint-shared-tier-0123456789"
MIB = 1024 * 1024
WAIT_S = 60.0  # a bound on waiting for background work, not a performance assertion


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons on private directories (each its own runtime, shm and disk), killed after the test."""
    made: list[Daemon] = []
    roots: list[Path] = []

    def new() -> Daemon:
        root = Path(tempfile.mkdtemp(prefix="ecs-", dir="/tmp"))
        roots.append(root)
        d = Daemon(root, root / "shm", root / "disk")
        made.append(d)
        return d

    made_factory: Any = new
    try:
        yield made_factory
    finally:
        for d in made:
            d.close()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def shared_stats(c: CacheClient) -> dict[str, Any]:
    shared: dict[str, Any] = c.stats()["shared"]
    return shared


def wait_for(c: CacheClient, done: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        s = shared_stats(c)
        if done(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}: {s}")
        time.sleep(0.02)


def save_and_share(c: CacheClient, tokens: list[int], payload: bytes) -> None:
    """Save a row and wait until its write-behind reached the server."""
    before = shared_stats(c)["writes"]
    assert c.save(FP, tokens, payload, "cold") is SaveOutcome.STORED
    wait_for(c, lambda s: s["writes"] > before, "wrote the row behind")


def test_a_row_saved_by_one_store_is_found_by_another_through_the_shared_tier(
    redis_server: RedisServer, daemons: Any
) -> None:
    a = daemons().start(shared_url=redis_server.url)
    b = daemons().start(shared_url=redis_server.url)
    ca, cb = a.client(), b.client()
    tokens = list(range(5000, 5400))
    payload = payload_for(11, 9 * MIB + 123)  # three parts
    save_and_share(ca, tokens, payload)
    s = shared_stats(ca)
    assert s["state"] == "up" and s["bytes_written"] > len(payload) and s["errors"] == 0
    shown = render(ca.stats())  # erllama cache
    assert f"shared tier redis://:***@127.0.0.1:{redis_server.port}/0: up" in shown and PASSWORD not in shown

    before = cb.kv_events()  # B's KV events start empty
    found = cb.find(FP, [*tokens, 1, 2, 3])
    assert found is not None
    hit, row = found
    with row:
        assert hit.tier is CacheTier.SHARED and hit.common_len == len(tokens)
        assert row.tokens == tokens and row.fingerprint == FP
        assert row.payload == payload
    # The fetched row is announced as B's own, in the local tier it landed in.
    [stored] = cb.kv_events(before.last_seq, before.publisher).events
    assert (stored.kind, stored.blocks) == (KvEventKind.STORED, block_hashes(FP, tokens))
    assert stored.tier in LOCAL_TIERS
    s = shared_stats(cb)
    assert (s["hits"], s["misses"], s["errors"]) == (1, 0, 0) and s["bytes_read"] > len(payload)
    # Now it is B's own: the next lookup is a local hit, and B does not write it back.
    found = cb.find(FP, tokens)
    assert found is not None and found[0].tier is not CacheTier.SHARED
    found[1].close()
    assert shared_stats(cb)["writes"] == 0
    # A prefix the server never saw is a miss (asked, not found), not an error.
    assert cb.find(FP, list(range(9000, 9300))) is None
    s = shared_stats(cb)
    assert (s["misses"], s["errors"]) == (1, 0)


def test_a_longer_row_on_the_shared_tier_wins_over_a_shorter_local_hit(
    redis_server: RedisServer, daemons: Any
) -> None:
    """Every host holds the shared system prompt's row: a conversation saved on another host must still
    be found, so a local hit a block or more shorter than the query asks the shared tier too."""
    a = daemons().start(shared_url=redis_server.url)
    b = daemons().start(shared_url=redis_server.url)
    ca, cb = a.client(), b.client()
    system = list(range(7000, 7128))
    conversation = [*system, *range(8000, 8300)]
    save_and_share(cb, system, payload_for(3, MIB))  # B's own row of the system prompt
    save_and_share(ca, conversation, payload_for(4, 2 * MIB + 7))  # the conversation, saved on A

    found = cb.find(FP, [*conversation, *range(9500, 9600)])
    assert found is not None
    hit, row = found
    with row:
        assert hit.tier is CacheTier.SHARED and hit.common_len == len(conversation)
        assert row.tokens == conversation and row.payload == payload_for(4, 2 * MIB + 7)
    asked = shared_stats(cb)["lookups"]
    # A local hit that leaves less than a block of the query uncovered is answered without asking.
    found = cb.find(FP, [*system, *range(9700, 9710)])
    assert found is not None and found[0].common_len == len(system) and found[0].tier is not CacheTier.SHARED
    found[1].close()
    # Nothing longer on the server: the shorter local hit is the answer, not a miss.
    found = cb.find(FP, [*system, *range(9800, 9900)])
    assert found is not None and found[0].common_len == len(system) and found[0].tier is not CacheTier.SHARED
    found[1].close()
    s = shared_stats(cb)
    assert s["lookups"] == asked + 1 and s["errors"] == 0


def test_a_row_evicted_from_disk_is_written_to_the_shared_tier_before_it_goes(
    redis_server: RedisServer, daemons: Any
) -> None:
    a = daemons().start(shared_url=redis_server.url, ram_bytes=0, shm_bytes=0, disk_bytes=3 * MIB)
    ca = a.client()
    first, second = list(range(100, 300)), list(range(700, 900))
    # The write-behind of the first row is refused by the server (its lengths set is a string, so ZADD
    # fails): the row is only written when the disk evicts it.
    redis_server.client().set(lengths_key(FP), b"not a sorted set")
    assert ca.save(FP, first, payload_for(1, 2 * MIB), "cold") is SaveOutcome.STORED
    wait_for(ca, lambda s: s["writes_failed"] == 1, "failed the write-behind")
    redis_server.client().flushall()
    assert ca.save(FP, second, payload_for(2, 2 * MIB), "cold") is SaveOutcome.STORED  # evicts the first
    s = wait_for(ca, lambda s: s["writes"] == 2, "wrote both rows")
    assert ca.exact(row_key(FP, first)) is None and s["writes_failed"] == 1

    b = daemons().start(shared_url=redis_server.url)
    found = b.client().find(FP, first)
    assert found is not None and found[0].tier is CacheTier.SHARED
    with found[1] as row:
        assert row.payload == payload_for(1, 2 * MIB)


def test_redis_killed_mid_run_means_misses_then_hits_again_once_it_is_back(
    redis_server: RedisServer, daemons: Any
) -> None:
    a = daemons().start(shared_url=redis_server.url)
    b = daemons().start(shared_url=redis_server.url)
    ca, cb = a.client(), b.client()
    save_and_share(ca, list(range(10, 210)), payload_for(3, MIB))

    redis_server.kill()
    tokens = list(range(20, 220))
    assert ca.save(FP, tokens, payload_for(4, MIB), "cold") is SaveOutcome.STORED  # local save still works
    wait_for(ca, lambda s: s["state"] == "down" and s["writes_failed"] >= 1, "noticed the server is down")
    assert cb.find(FP, tokens) is None  # a miss, not an error
    wait_for(cb, lambda s: s["state"] == "down", "noticed the server is down")
    assert cb.find(FP, tokens) is None
    assert ca.exact(row_key(FP, tokens)) is not None

    redis_server.start()  # empty: nothing survived the kill
    fresh = list(range(30, 230))
    payload = payload_for(5, MIB + 7)
    deadline = time.monotonic() + WAIT_S
    while True:  # the first save after the retry delay reconnects
        assert ca.save(FP, [*fresh, len(fresh)], payload, "cold") in (
            SaveOutcome.STORED,
            SaveOutcome.ALREADY_PRESENT,
        )
        if shared_stats(ca)["writes"] >= 2:
            break
        assert time.monotonic() < deadline, shared_stats(ca)
        fresh = [t + 1 for t in fresh]
        time.sleep(0.2)
    assert shared_stats(ca)["state"] == "up"
    deadline = time.monotonic() + WAIT_S
    while (found := cb.find(FP, [*fresh, len(fresh), 99])) is None:  # B reconnects at its next lookup
        assert time.monotonic() < deadline, shared_stats(cb)
        time.sleep(0.2)
    with found[1] as row:
        assert found[0].tier is CacheTier.SHARED and row.payload == payload


def test_a_manifest_whose_part_was_evicted_is_a_miss_and_is_deleted(
    redis_server: RedisServer, daemons: Any
) -> None:
    a = daemons().start(shared_url=redis_server.url)
    b = daemons().start(shared_url=redis_server.url)
    tokens = list(range(300, 500))
    save_and_share(a.client(), tokens, payload_for(6, PART_BYTES + MIB))
    r = redis_server.client()
    mkey = manifest_key(row_key(FP, tokens))
    manifest = msgspec.msgpack.decode(r.get(mkey), type=Manifest)
    assert len(manifest.parts) == 2
    r.delete(manifest.parts[1])  # what allkeys-lru may do to any key

    cb = b.client()
    assert cb.find(FP, tokens) is None
    s = shared_stats(cb)
    assert (s["stale_manifests"], s["hits"], s["misses"]) == (1, 0, 1)
    assert not r.exists(mkey) and not r.exists(manifest.parts[0])
    assert cb.stats()["rows"] == 0


def test_a_corrupted_part_is_a_miss_and_never_served(redis_server: RedisServer, daemons: Any) -> None:
    a = daemons().start(shared_url=redis_server.url)
    b = daemons().start(shared_url=redis_server.url)
    tokens = list(range(600, 800))
    save_and_share(a.client(), tokens, payload_for(7, 2 * MIB))
    r = redis_server.client()
    mkey = manifest_key(row_key(FP, tokens))
    manifest = msgspec.msgpack.decode(r.get(mkey), type=Manifest)
    part = bytearray(r.get(manifest.parts[0]))
    part[-1000] ^= 0xFF  # a flipped bit in the payload: the row's checksum catches it
    r.set(manifest.parts[0], bytes(part))

    cb = b.client()
    assert cb.find(FP, tokens) is None
    s = shared_stats(cb)
    assert (s["corrupt_rows"], s["hits"]) == (1, 0)
    assert not r.exists(mkey)
    assert cb.stats()["rows"] == 0


def test_a_wrong_password_turns_the_shared_tier_off_and_the_store_still_works(
    redis_server: RedisServer, daemons: Any
) -> None:
    d = daemons().start(shared_url=redis_server.url_with_password("not-the-password"))
    c = d.client()
    s = wait_for(c, lambda s: s["state"] == "off", "turned the shared tier off")
    assert not s["enabled"] and "not-the-password" not in str(c.stats())
    tokens = list(range(40, 240))
    assert c.save(FP, tokens, payload_for(8, MIB), "cold") is SaveOutcome.STORED
    assert c.find(FP, [*tokens, 5]) is not None
    assert c.find(FP, list(range(7000, 7100))) is None
    s = shared_stats(c)
    assert (s["lookups"], s["writes"], s["writes_skipped"]) == (0, 0, 0)
    assert "refused the credentials" in d.log() and "not-the-password" not in d.log()


def test_a_slow_server_costs_a_miss_within_the_lookup_budget_and_the_row_lands_for_the_next_one(
    redis_server: RedisServer, daemons: Any
) -> None:
    a = daemons().start(shared_url=redis_server.url)
    b = daemons().start(shared_url=redis_server.url)
    tokens = list(range(900, 1100))
    payload = payload_for(9, MIB)
    save_and_share(a.client(), tokens, payload)
    cb = b.client()
    redis_server.client().execute_command("CLIENT", "PAUSE", 1500, "ALL")  # every command waits 1.5 s
    assert cb.find(FP, tokens) is None  # answered after SHARED_LOOKUP_BUDGET_S, not after the pause
    assert shared_stats(cb)["late"] == 1
    wait_for(cb, lambda s: s["hits"] == 1, "published the fetched row")
    found = cb.find(FP, tokens)
    assert found is not None and found[0].tier is not CacheTier.SHARED
    with found[1] as row:
        assert row.payload == payload


def test_lookups_racing_for_the_same_shared_row_publish_it_once(
    redis_server: RedisServer, daemons: Any
) -> None:
    a = daemons().start(shared_url=redis_server.url)
    b = daemons().start(shared_url=redis_server.url, ram_bytes=0)  # shm and disk: rows have file names
    tokens = list(range(1200, 1400))
    payload = payload_for(10, 3 * MIB)
    save_and_share(a.client(), tokens, payload)
    clients = [b.client() for _ in range(4)]
    results: list[Any] = [None] * len(clients)

    def look(i: int) -> None:
        found = clients[i].find(FP, [*tokens, i])
        if found is not None:
            with found[1] as row:
                results[i] = (found[0].tier, row.payload == payload)

    threads = [threading.Thread(target=look, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r[1] for r in results), results
    s = b.wait_quiet(clients[0])
    assert s["rows"] == 1 and s["counters"]["corrupt_rows"] == 0
    assert shared_stats(clients[0])["errors"] == 0
