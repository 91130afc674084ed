"""The default model (a plain transformer) serves warm requests exactly as cold ones, on every reuse path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from erllama import Client
from tests.conftest import BrokerProcess, serving
from tests.exactness import Exactness

MODEL = "exact"
# Small save boundaries so that prompts of a few dozen words exercise every save reason.
OPTIONS = {
    "n_ctx": 1024,
    "n_seq_max": 4,
    "cache_min_tokens": 16,
    "cold_trim_tokens": 4,
    "cold_align_tokens": 16,
    "continued_interval_tokens": 32,
}


@pytest.fixture(scope="module")
def exact_broker() -> Iterator[BrokerProcess]:
    with serving("erl-x-", MODEL, **OPTIONS) as bp:
        yield bp


def test_every_reuse_path_generates_what_a_cold_reference_run_does(
    exact_broker: BrokerProcess, reference
) -> None:
    with Client(exact_broker.endpoint, timeout_s=120) as c:
        info = c.model_info(MODEL)
        assert info["memory"] == "transformer" and info["exact"] is True
        run = Exactness(c, MODEL, reference, seed=13)
        # Up to ~500 tokens: past 256 a lone decode would take another attention kernel than a prefill.
        run.run(10, words=(30, 360))
        kinds = run.kinds
        # Every path reused what it should (and was still compared with the cold reference).
        assert kinds["cold:cold"] == 10
        assert kinds["exact:exact"] == 10 and kinds["regenerate:exact"] == 10
        assert kinds["extend:exact"] + kinds["extend:partial"] == 10
        assert kinds["parent:partial"] == 10
        assert kinds["sticky-extend:sticky"] == 10
        assert kinds["shared:shared"] >= 5
        assert c.model_info(MODEL)["cache"]["restores_refused"] == 0
