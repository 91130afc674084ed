"""Budgets give the documented demotion and eviction order; leases block eviction and die with
their holder."""

from __future__ import annotations

from erllama.cachestore.client import CacheClient
from erllama.cachestore.codec import row_key
from erllama.protocol import CacheTier, SaveOutcome
from tests.cachestore.cachestore_support import Daemon, payload_for, spawn_python

FP = b"budget-fp"
ROW_PAYLOAD = 1 << 20  # every row here is 1 MiB + a small head
TWO_ROWS = 2 * ROW_PAYLOAD + 4096


def tiers_of(c: CacheClient, rows: dict[str, list[int]]) -> dict[str, str | None]:
    out = {}
    for name, tokens in rows.items():
        meta = c.exact(row_key(FP, tokens))
        out[name] = meta.tier.value if meta else None
    return out


def save(d: Daemon, c: CacheClient, tokens: list[int], seed: int) -> None:
    assert c.save(FP, tokens, payload_for(seed, ROW_PAYLOAD), "cold") is SaveOutcome.STORED
    d.wait_quiet(c)


def test_rows_cascade_ram_to_shm_to_disk_then_leave_coldest_first(daemon: Daemon) -> None:
    daemon.start(ram_bytes=TWO_ROWS, shm_bytes=TWO_ROWS, disk_bytes=TWO_ROWS)
    c = daemon.client()
    rows = {f"r{i}": [100 + i] * 10 for i in range(7)}
    for i, tokens in enumerate(rows.values()):
        save(daemon, c, tokens, i)
    assert tiers_of(c, rows) == {
        "r0": None,
        "r1": "disk",
        "r2": "disk",
        "r3": "shm",
        "r4": "shm",
        "r5": "ram",
        "r6": "ram",
    }
    s = c.stats()["counters"]
    assert (s["demotions"], s["evictions"]) == (8, 1)  # r0..r4 left RAM, r0..r2 left shm, r0 left disk

    # A hit on the disk tier promotes the row to RAM once released; the cascade makes room.
    with c.load(row_key(FP, rows["r1"])) as row:
        assert row.tier is CacheTier.DISK and row.payload == payload_for(1, ROW_PAYLOAD)
    daemon.wait_quiet(c)
    placed = tiers_of(c, rows)
    assert placed["r1"] == "ram" and placed["r6"] == "ram"
    assert placed["r5"] == "shm" and placed["r3"] == "disk"
    assert c.stats()["counters"]["promotions"] == 1
    with c.load(row_key(FP, rows["r1"])) as row:  # still bit-exact after two moves
        assert row.payload == payload_for(1, ROW_PAYLOAD)


def test_a_shared_prefix_outlives_its_extensions(daemon: Daemon) -> None:
    daemon.start(ram_bytes=0, shm_bytes=0, disk_bytes=3 * ROW_PAYLOAD + 8192)
    c = daemon.client()
    prefix = list(range(50))
    save(daemon, c, prefix, 0)  # the oldest row of all
    save(daemon, c, prefix + [1000], 1)
    save(daemon, c, prefix + [1001], 2)
    rows = {
        "prefix": prefix,
        "e1": prefix + [1000],
        "e2": prefix + [1001],
        "u1": [7, 7],
        "u2": [8, 8],
        "u3": [9, 9],
    }
    save(daemon, c, rows["u1"], 3)
    assert tiers_of(c, rows)["e1"] is None and tiers_of(c, rows)["prefix"] == "disk"
    save(daemon, c, rows["u2"], 4)
    assert tiers_of(c, rows)["e2"] is None and tiers_of(c, rows)["prefix"] == "disk"
    save(daemon, c, rows["u3"], 5)  # no extension left: now the prefix is just the oldest row
    assert tiers_of(c, rows) == {
        "prefix": None,
        "e1": None,
        "e2": None,
        "u1": "disk",
        "u2": "disk",
        "u3": "disk",
    }


HOLDER = """
import sys, time
from erllama.cachestore.client import CacheClient
c = CacheClient(sys.argv[1], timeout_s=10)
row = c.load(bytes.fromhex(sys.argv[2]))
print("HOLD" if row is not None else "MISS", flush=True)
time.sleep(600)
"""


def test_leased_row_is_never_evicted_and_the_lease_dies_with_its_holder(daemon: Daemon) -> None:
    daemon.start(ram_bytes=0, shm_bytes=0, disk_bytes=ROW_PAYLOAD + 4096)
    c = daemon.client()
    save(daemon, c, [1], 1)
    key_a = row_key(FP, [1])
    holder = spawn_python(HOLDER, daemon.endpoint, key_a.hex())
    try:
        assert holder.stdout.readline().strip() == "HOLD"
        # The only row is leased: the new one cannot make room, and nothing is evicted for it.
        assert c.save(FP, [2], payload_for(2, ROW_PAYLOAD), "cold") is SaveOutcome.DROPPED
        assert c.evict_bytes(1 << 30, tiers=[CacheTier.DISK]) == 0
        assert c.exact(key_a) is not None
        holder.kill()
        holder.wait()
        while (outcome := c.save(FP, [2], payload_for(2, ROW_PAYLOAD), "cold")) is SaveOutcome.DROPPED:
            pass  # until the sweep notices the holder died (about a second)
        assert outcome is SaveOutcome.STORED
        daemon.wait_quiet(c)
        assert c.exact(key_a) is None
        s = c.stats()["counters"]
        assert s["leases_reaped"] == 1 and s["evictions"] == 1
    finally:
        holder.kill()
        holder.wait()


def test_evict_bytes_demotes_out_of_the_listed_tiers(daemon: Daemon) -> None:
    daemon.start()
    c = daemon.client()
    for i in range(3):
        save(daemon, c, [50 + i], i)
    assert c.evict_bytes(2 * ROW_PAYLOAD, tiers=[CacheTier.RAM, CacheTier.SHM]) >= 2 * ROW_PAYLOAD
    s = daemon.wait_quiet(c)
    assert s["tiers"]["disk"]["rows"] == 2 and s["tiers"]["ram"]["rows"] == 1
    assert s["counters"]["demotions"] == 2 and s["counters"]["evictions"] == 0
