"""Readers keep their mappings of rows between loads, and a full RAM or shm tier writes each new row
into the file of the row that left: a reader never sees an old row's bytes, and a deleted row's file
holds no memory however long a reader keeps its mapping."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from erllama.cachestore import mapping as mapping_module
from erllama.cachestore.client import CacheClient
from erllama.cachestore.codec import row_key
from erllama.cachestore.mapping import MAPPINGS, RowMapping
from erllama.protocol import LOCAL_TIERS, CacheTier, SaveOutcome
from tests.cachestore.cachestore_support import Daemon, payload_for, spawn_python

FP = b"map-fp"
ROW = 1 << 20
THREE_ROWS = 3 * ROW + 3 * 4096


@pytest.fixture(autouse=True)
def empty_mapping_cache() -> Iterator[None]:
    MAPPINGS.clear()
    yield
    MAPPINGS.clear()


def save(d: Daemon, c: CacheClient, seed: int, size: int = ROW, tier: CacheTier | None = None) -> bytes:
    tokens = [seed, seed + 1]
    assert c.save(FP, tokens, payload_for(seed, size), "cold", tier=tier) is SaveOutcome.STORED
    d.wait_quiet(c)
    return row_key(FP, tokens)


def mapping_of(c: CacheClient, key: bytes) -> RowMapping:
    with c.load(key) as row:
        m = row._mapping
        assert m is not None
        return m


@pytest.mark.parametrize("tier", list(LOCAL_TIERS))
def test_a_row_loaded_again_reuses_the_mapping_the_reader_already_has(
    daemon: Daemon, tier: CacheTier
) -> None:
    daemon.start()
    c = daemon.client()
    key = save(daemon, c, 1, tier=tier)
    first = mapping_of(c, key)
    with c.load(key) as row:
        assert row._mapping is first and row.payload == payload_for(1, ROW)
    assert len(MAPPINGS) == 1


@pytest.mark.parametrize("tier", list(LOCAL_TIERS))
def test_a_deleted_row_is_truncated_so_a_cached_mapping_holds_no_memory(
    daemon: Daemon, tier: CacheTier
) -> None:
    daemon.start()
    c = daemon.client()
    m = mapping_of(c, save(daemon, c, 2, tier=tier))
    assert os.fstat(m.fd).st_size > ROW
    daemon.wait_quiet(c)  # a load from shm or disk promotes the row once released
    c.evict_bytes(1 << 40, tiers=list(LOCAL_TIERS))
    daemon.wait_quiet(c)
    assert c.stats()["rows"] == 0
    assert os.fstat(m.fd).st_size == 0  # the pages are gone even though this process still maps it


class Writer:
    """Another process saving rows (so this one's mappings are a reader's, not the writer's)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.proc = spawn_python(
            """
import sys
from erllama.cachestore.client import CacheClient
from erllama.protocol import CacheTier
sys.path.insert(0, sys.argv[2])
from cachestore_support import payload_for
c = CacheClient(sys.argv[1], timeout_s=10)
for line in sys.stdin:
    seed, tier = line.split()
    print(c.save(b"map-fp", [int(seed), int(seed) + 1], payload_for(int(seed), 1 << 20), "cold",
                 tier=CacheTier(tier)).value, flush=True)
""",
            daemon.endpoint,
            os.path.dirname(__file__),
        )

    def save(self, c: CacheClient, seed: int, tier: CacheTier) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{seed} {tier.value}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == SaveOutcome.STORED.value
        self.daemon.wait_quiet(c)
        return row_key(FP, [seed, seed + 1])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("tier", [CacheTier.RAM, CacheTier.SHM])
def test_a_full_tier_writes_the_new_row_into_the_file_of_the_row_that_left(
    daemon: Daemon, tier: CacheTier
) -> None:
    # With RAM off, a load could not promote the shm rows either: the shm tier is the one measured.
    daemon.start(ram_bytes=THREE_ROWS if tier is CacheTier.RAM else 0, shm_bytes=THREE_ROWS)
    c = daemon.client()
    writer = Writer(daemon)
    try:
        keys = [writer.save(c, seed, tier) for seed in range(3)]
        mapped = {key: mapping_of(c, key) for key in keys}
        assert c.stats()["counters"]["recycled_files"] == 0
        new = writer.save(c, 10, tier)
    finally:
        writer.close()
    s = c.stats()
    assert s["counters"]["recycled_files"] == 1 and s["counters"]["demotions"] == 1
    assert s["tiers"][tier.value]["rows"] == 3
    left = next(k for k in keys if c.exact(k).tier is not tier)
    with c.load(new) as row:
        assert row.tier is tier
        assert row._mapping is mapped[left]  # the file, and this reader's mapping of it, were reused
        assert row.payload == payload_for(10, ROW)  # and it shows the new row, not the old one
    with c.load(left) as row:  # the row that left is intact in the colder tier
        assert row.payload == payload_for(keys.index(left), ROW)


def test_the_writer_keeps_a_read_only_mapping_of_the_row_it_stored(daemon: Daemon) -> None:
    daemon.start()
    c = daemon.client()
    key = save(daemon, c, 4)
    assert len(MAPPINGS) == 1
    with c.load(key) as row:
        m = row._mapping
        assert m is not None and row.payload == payload_for(4, ROW)
    assert m.view(0, 4).readonly
    start = f"{m.address:x}-"
    maps = Path("/proc/self/maps").read_text().splitlines()
    perms = next(line.split()[1] for line in maps if line.startswith(start))
    assert perms == "r--s"  # the writer can no longer change the row it stored


def test_reused_files_serve_every_row_bit_exact_under_churn(daemon: Daemon) -> None:
    """Rows of changing sizes through a RAM tier of three rows: files grow and shrink as they are
    reused, readers' mappings go stale, and every load is still the row that was saved."""
    daemon.start(ram_bytes=THREE_ROWS, shm_bytes=THREE_ROWS, disk_bytes=40 * ROW)
    c = daemon.client()
    rng = random.Random(5)
    sizes: dict[int, int] = {}
    for seed in range(40):
        sizes[seed] = rng.choice([ROW // 2, ROW, ROW + 12345])
        save(daemon, c, seed, sizes[seed], tier=CacheTier.RAM)
        for old in rng.sample(sorted(sizes), min(3, len(sizes))):
            with c.load(row_key(FP, [old, old + 1])) as row:
                assert row.payload == payload_for(old, sizes[old]), f"row {old} after {seed} saves"
        daemon.wait_quiet(c)
    assert c.stats()["counters"]["recycled_files"] > 10


def test_another_process_reads_a_reused_file_correctly(daemon: Daemon) -> None:
    """A second reader process keeps its own mappings: the new row in a reused file is still right."""
    daemon.start(ram_bytes=THREE_ROWS, shm_bytes=THREE_ROWS)
    c = daemon.client()
    keys = [save(daemon, c, seed, tier=CacheTier.RAM) for seed in range(3)]
    reader = spawn_python(
        """
import sys
from erllama.cachestore.client import CacheClient
c = CacheClient(sys.argv[1], timeout_s=10)
for line in sys.stdin:
    with c.load(bytes.fromhex(line.strip())) as row:
        print(row.payload.hex()[:64] + ":" + str(len(row.payload)), flush=True)
""",
        daemon.endpoint,
    )
    try:

        def read(key: bytes) -> str:
            assert reader.stdin is not None and reader.stdout is not None
            reader.stdin.write(key.hex() + "\n")
            reader.stdin.flush()
            return reader.stdout.readline().strip()

        def expect(seed: int) -> str:
            return payload_for(seed, ROW).hex()[:64] + ":" + str(ROW)

        for seed, key in enumerate(keys):
            assert read(key) == expect(seed)
        for seed in range(10, 16):
            key = save(daemon, c, seed, tier=CacheTier.RAM)
            assert read(key) == expect(seed)
        assert c.stats()["counters"]["recycled_files"] == 6
    finally:
        reader.kill()
        reader.wait()


def test_the_cache_unmaps_idle_mappings_beyond_its_limit(daemon: Daemon, monkeypatch: Any) -> None:
    monkeypatch.setattr(mapping_module, "MAX_MAPPINGS", 2)
    daemon.start()
    c = daemon.client()
    keys = [save(daemon, c, seed) for seed in range(4)]
    held = c.load(keys[0])
    for key in keys[1:]:
        c.load(key).close()
    assert len(MAPPINGS) == 2
    assert held.payload == payload_for(0, ROW)  # a mapping in use is never unmapped under its reader
    held.close()


def test_a_view_kept_past_close_keeps_its_mapping(daemon: Daemon) -> None:
    daemon.start()
    c = daemon.client()
    key = save(daemon, c, 3)
    row = c.load(key)
    kept = row.payload[:16]
    row.close()
    MAPPINGS.clear()  # the cache lets go of the mapping; the view still holds it
    assert bytes(kept) == payload_for(3, ROW)[:16]
    with pytest.raises(ValueError):
        bytes(row.payload)  # the row's own view ends with its lease
