"""Restart semantics: temps deleted, shm and disk rows re-indexed with their hit counts, RAM rows gone
after a crash (and written out on a clean stop); the inline fallback when rows cannot be mapped."""

from __future__ import annotations

import os
from typing import Any

import pytest

from erllama.cachestore import client as client_module
from erllama.cachestore.codec import row_key
from erllama.protocol import LOCAL_TIERS, CacheTier, SaveOutcome
from tests.cachestore.cachestore_support import Daemon, payload_for

MIB = 1 << 20


def store_one_per_tier(daemon: Daemon) -> dict[CacheTier, bytes]:
    c = daemon.client()
    keys = {}
    for i, tier in enumerate(LOCAL_TIERS):
        assert c.save(b"fp", [i, 77], payload_for(i, MIB), "finish", tier=tier) is SaveOutcome.STORED
        keys[tier] = row_key(b"fp", [i, 77])
    for _ in range(3):
        with c.load(keys[CacheTier.DISK]):
            pass
    daemon.wait_quiet(c)
    return keys


def test_after_a_crash_shm_and_disk_rows_are_back_and_ram_rows_are_gone(daemon: Daemon) -> None:
    daemon.start(ram_bytes=16 * MIB, shm_bytes=16 * MIB)
    keys = store_one_per_tier(daemon)
    c = daemon.client()
    promoted = c.exact(keys[CacheTier.DISK])
    assert promoted is not None and promoted.tier is CacheTier.RAM  # the hits promoted the disk row
    daemon.kill()
    for d in (daemon.shm_dir, daemon.disk_dir):
        (d / "tmp" / "leftover.r1.tmp").write_bytes(b"half a row")
    daemon.start()
    c = daemon.client()
    assert c.exact(keys[CacheTier.RAM]) is None and c.exact(keys[CacheTier.DISK]) is None  # both lived in RAM
    with c.load(keys[CacheTier.SHM]) as row:
        assert row.payload == payload_for(1, MIB)
    assert os.listdir(daemon.shm_dir / "tmp") == [] and os.listdir(daemon.disk_dir / "tmp") == []


def test_a_clean_stop_keeps_ram_rows_and_hit_counts(daemon: Daemon) -> None:
    daemon.start(ram_bytes=16 * MIB, shm_bytes=16 * MIB)
    keys = store_one_per_tier(daemon)
    assert daemon.stop() == 0
    daemon.start()
    c = daemon.client()
    for i, tier in enumerate(LOCAL_TIERS):
        meta = c.exact(keys[tier])
        assert meta is not None and meta.tier is not CacheTier.RAM
        with c.load(keys[tier]) as row:
            assert row.payload == payload_for(i, MIB)
    assert c.exact(keys[CacheTier.DISK]).hits == 4  # three before the restart, one now


@pytest.mark.parametrize("tier", list(LOCAL_TIERS))
def test_rows_that_cannot_be_mapped_travel_inline(daemon: Daemon, tier: CacheTier, monkeypatch: Any) -> None:
    daemon.start()
    c = daemon.client()

    def refuse(path: str, *args: Any) -> int:
        raise PermissionError(13, "not in our pid namespace", path)

    monkeypatch.setattr(client_module.os, "open", refuse)
    payload = payload_for(5, MIB + 3)
    assert c.save(b"fp", [5, 5], payload, "cold", tier=tier) is SaveOutcome.STORED
    with c.load(row_key(b"fp", [5, 5])) as row:
        assert row.payload == payload and row.tokens == [5, 5]  # the failed map promoted it: any tier


def test_a_lease_granted_after_the_reader_gave_up_is_handed_back(daemon: Daemon) -> None:
    from erllama.protocol import ErllamaError

    daemon.start()
    c = daemon.client()
    assert c.save(b"fp", [6], payload_for(6, 64 * MIB), "cold", tier=CacheTier.SHM) is SaveOutcome.STORED
    assert daemon.stop() == 0
    daemon.start()  # the row is unverified again: its first load waits for a 64 MiB checksum
    impatient = daemon.client(timeout_s=0.001)
    try:
        row = impatient.load(row_key(b"fp", [6]))
        if row is not None:
            row.close()
    except ErllamaError:
        pass  # gave up; the grant arrives later
    impatient.timeout_s = 10.0
    daemon.wait_quiet(impatient)  # reading the late grant releases it
    observer = daemon.client()
    while observer.stats()["leases"]:
        pass
    assert c.exact(row_key(b"fp", [6])) is not None
