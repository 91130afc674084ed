"""``scripts/chaos.py`` in the suite: a mixed load while workers and the cache store are SIGKILLed and
SIGSTOPped; nothing may be lost, hung or served from a corrupt cache row.

The default suite runs half a minute over the stub models (about 45 s with setup and the recovery
check); ``-m slow`` runs five minutes with the real model too. The script bounds every wait itself
(a request with no event for 120 s is counted as hung), so nothing here asserts on elapsed time.
"""

from __future__ import annotations

from types import ModuleType
from typing import Final

import pytest

from tests.conftest import load_script

SHORT_MINUTES: Final = 0.5
SHORT_CLIENTS: Final = 4
LONG_MINUTES: Final = 5.0
LONG_CLIENTS: Final = 6


@pytest.fixture(scope="module")
def chaos() -> ModuleType:
    return load_script("chaos")


def check(report) -> None:
    table = report.table()
    print(table)
    assert report.lost == 0, table
    assert report.hung == 0, table
    assert report.corrupt == 0, table
    assert report.anomalies == 0, table
    assert report.recovered, table
    assert report.kills > 0, table  # the first chaos action is always a worker SIGKILL
    assert report.tally.completed > 0, table
    restored = report.tally.hit_kinds["exact"] + report.tally.hit_kinds["partial"]
    assert restored > 0, table


def test_the_expected_tokens_are_what_the_stub_backend_serves(chaos: ModuleType, stub_client):
    tokens = chaos.stub_tokenize("a prompt whose output the chaos run predicts")
    greedy = stub_client.complete("stub", tokens, max_tokens=24)
    assert tuple(greedy.generated) == chaos.stub_expected(tuple(tokens), 24, 0.0, None)
    seeded = stub_client.complete("stub", tokens, max_tokens=24, temperature=0.8, seed=1234)
    assert tuple(seeded.generated) == chaos.stub_expected(tuple(tokens), 24, 0.8, 1234)
    assert seeded.generated != greedy.generated


def test_a_short_chaos_run_over_stub_models_loses_hangs_and_corrupts_nothing(chaos: ModuleType):
    # A RAM tier of a few hundred rows: they move to shm and back, and new rows reuse the files of the
    # rows that leave, all while the store is killed and frozen.
    cfg = chaos.ChaosConfig(minutes=SHORT_MINUTES, seed=7, clients=SHORT_CLIENTS, cache_ram="256K")
    report = chaos.run_chaos(cfg)
    check(report)
    lives = report.tally.store_counters.values()
    assert sum(c["demotions"] for c in lives) > 0 and sum(c["recycled_files"] for c in lives) > 0, (
        report.table()
    )


@pytest.mark.slow
def test_a_long_chaos_run_with_the_real_model_loses_hangs_and_corrupts_nothing(chaos: ModuleType):
    cfg = chaos.ChaosConfig(minutes=LONG_MINUTES, seed=11, clients=LONG_CLIENTS, real_model=True)
    report = chaos.run_chaos(cfg)
    check(report)
    assert report.tally.actions, report.table()
