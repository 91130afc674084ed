"""The daemon SIGKILLed at any instant (here: while a writer streams commits) never serves a torn row."""

from __future__ import annotations

import os
import random
import time

import pytest

from erllama.cachestore.codec import row_key
from erllama.protocol import SaveOutcome
from tests.cachestore.cachestore_support import Daemon, payload_for, spawn_python

WRITER = """
import random, sys
from erllama.cachestore.client import CacheClient
from erllama.cachestore.codec import row_key
from erllama.protocol import ErllamaError
sys.path.insert(0, sys.argv[2])
from cachestore_support import payload_for
c = CacheClient(sys.argv[1], timeout_s=5)
first = int(sys.argv[3])
rng = random.Random(first)
for i in range(first, 10**6):
    tier = ("disk", "shm")[i % 2]
    try:
        out = c.save(b"crash-fp", [i, i + 1, i + 2], payload_for(i, (2 + i % 5) << 20), "finish", tier=tier)
        if i > 0:  # read an older row too: promotions, and demotions to make room for them
            j = rng.randrange(i)
            row = c.load(row_key(b"crash-fp", [j, j + 1, j + 2]))
            if row is not None:
                row.close()
    except ErllamaError:
        break  # the daemon is gone
    print(i, out.value, flush=True)
"""


def run_kill_cycle(daemon: Daemon, first: int, rng: random.Random) -> tuple[set[int], int, int]:
    writer = spawn_python(WRITER, daemon.endpoint, os.path.dirname(__file__), str(first))
    stored: set[int] = set()
    last = first
    try:
        assert writer.stdout is not None
        target = rng.randint(2, 6)
        while len(stored) < target:
            i, outcome = writer.stdout.readline().split()
            last = int(i)
            if outcome == SaveOutcome.STORED:
                stored.add(last)
        counters = daemon.client().stats()["counters"]
        moves = counters["promotions"] + counters["demotions"]
        time.sleep(rng.uniform(0, 0.05))  # land somewhere inside the next reserve/write/commit or move
        daemon.kill()
    finally:
        writer.kill()
        writer.wait()
    return stored, last + 1, moves


def check_every_row(daemon: Daemon, stored: set[int], upto: int) -> None:
    c = daemon.client()
    daemon.wait_quiet(c)  # the restarted daemon may be moving rows already (its own temps come and go)
    for sub in ("shm", "disk"):
        tmp = (daemon.shm_dir if sub == "shm" else daemon.disk_dir) / "tmp"
        assert os.listdir(tmp) == [], "a temp file survived the restart"
    for i in range(upto + 1):
        key = row_key(b"crash-fp", [i, i + 1, i + 2])
        row = c.load(key)
        if row is None:
            assert i not in stored, f"row {i} was reported stored but is gone"
            continue
        with row:
            assert row.payload == payload_for(i, (2 + i % 5) << 20), f"row {i} is not what was committed"
    assert c.stats()["counters"]["corrupt_rows"] == 0, daemon.log()


# No RAM tier (its rows die with the daemon by design); a small shm tier so that commits and promotions
# keep rows moving between shm and disk while the daemon is killed.
BUDGETS = {"ram_bytes": 0, "shm_bytes": 12 << 20, "disk_bytes": 1 << 30}


@pytest.mark.parametrize("seed", [1, 2])
def test_daemon_killed_mid_commit_restarts_without_temps_and_serves_only_committed_rows(
    daemon: Daemon, seed: int
) -> None:
    rng = random.Random(seed)
    daemon.start(**BUDGETS)
    stored, upto, _ = run_kill_cycle(daemon, 0, rng)
    daemon.start()
    check_every_row(daemon, stored, upto)


@pytest.mark.slow
def test_many_kill_restart_cycles(daemon: Daemon) -> None:
    rng = random.Random(99)
    daemon.start(**BUDGETS)
    first, all_stored, moves = 0, set(), 0
    for _ in range(15):
        stored, first, moved = run_kill_cycle(daemon, first, rng)
        moves += moved
        all_stored |= stored
        daemon.start()
        check_every_row(daemon, all_stored, first)
        daemon.close()
        daemon.start()
    assert moves > 0  # the kills did land among promotions and demotions
