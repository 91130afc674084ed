"""Every memory kind llama.cpp has serves warm requests exactly as cold ones, on every reuse path: tiny
random-weight models of each kind (scripts/make_test_models.py) and the real Gemma 3 270M (a sliding
window of 512), each through a real broker, worker and cache store, against a cold reference run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from erllama import Client, ErllamaError
from tests.conftest import BrokerProcess, serving
from tests.exactness import Exactness
from tests.memory_models import gemma3_270m_path
from tests.reference import ReferenceModel

MODEL = "kind"
OPTIONS = {
    "n_ctx": 1024,
    "n_seq_max": 4,
    "cache_min_tokens": 16,
    "cold_trim_tokens": 4,
    "cold_align_tokens": 16,
    "continued_interval_tokens": 32,
}
TINY_PROMPTS = 50
KINDS = {"llama": "transformer", "swa": "swa", "recurrent": "recurrent", "hybrid": "hybrid"}


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def kind_broker(kind: str, memory_model: Callable[[str], Path]) -> Iterator[tuple[BrokerProcess, Path]]:
    path = memory_model(kind)
    with serving("erl-k-", MODEL, model_path=path, **OPTIONS) as bp:
        yield bp, path


def check_paths(run: Exactness, n_prompts: int, memory: str) -> None:
    """What each path reused on this memory kind (every request was compared with the reference)."""
    k = run.kinds
    assert k["cold:cold"] == n_prompts
    assert k["exact:exact"] == n_prompts  # a primed row is the whole prompt and carries its logits
    assert k["sticky-extend:sticky"] == n_prompts
    assert k["parent:partial"] == n_prompts  # the parent row is a prefix of the prompt on every kind
    # A pair copies only when its second request is admitted while the first still prefills; on a
    # tiny model the first is often done within the tick that admits it. Every pair is compared anyway.
    assert k["shared:shared"] > 0
    if memory == "transformer":
        assert k["regenerate:exact"] == n_prompts  # the finish row (prompt + reply), cut back
    else:  # only rows that are a prefix of the prompt: the cold save of its aligned prefix
        assert k["regenerate:partial"] + k["regenerate:cold"] == n_prompts


def test_every_reuse_path_on_every_memory_kind_generates_what_a_cold_reference_run_does(
    kind: str, kind_broker: tuple[BrokerProcess, Path]
) -> None:
    bp, path = kind_broker
    reference = ReferenceModel.load(n_ctx=2048, path=path)
    with Client(bp.endpoint, timeout_s=120) as c:
        info = c.model_info(MODEL)
        assert info["memory"] == KINDS[kind] and info["exact"] is True
        pid = info["worker_pid"]
        # A long request streams beside every path: it must be untouched by what they do.
        bystander = c.tokenize(MODEL, "the lighthouse keeper counted ships " * 12)
        stream = c.infer(MODEL, bystander, max_tokens=120)
        run = Exactness(c, MODEL, reference, seed=len(kind))
        run.run(TINY_PROMPTS)
        run.check("bystander", bystander, stream.collect())
        check_paths(run, TINY_PROMPTS, KINDS[kind])
        after = c.model_info(MODEL)
        assert after["worker_pid"] == pid and after["restarts"] == 0  # no path took the worker down
        assert after["cache"]["restores_refused"] == 0


# Each prompt runs every reuse path past Gemma 3's window (~35 s per prompt on 2 cores): a few in the
# default suite, many more behind ``-m slow``; different seeds, so the slow run adds new prompts.
@pytest.mark.parametrize(
    ("n_prompts", "seed"), [(5, 3), pytest.param(20, 11, marks=pytest.mark.slow)], ids=["default", "many"]
)
def test_gemma3_past_its_sliding_window_serves_warm_requests_exactly(n_prompts: int, seed: int) -> None:
    """The issue's case: a prompt, a reply, and the same prompt again, where prompt + reply pass the
    512-token window (a restored row keeps only the window), then every other path."""
    path = gemma3_270m_path()
    reference = ReferenceModel.load(n_ctx=2048, path=path)
    with serving("erl-g-", MODEL, model_path=path, **OPTIONS | {"n_ctx": 2048, "n_seq_max": 2}) as bp:
        c = bp.client(timeout_s=300)
        assert c.model_info(MODEL)["memory"] == "swa"
        run = Exactness(c, MODEL, reference, seed=seed, n_gen=6, long_reply=64)
        run.run(n_prompts, words=(430, 480))
        check_paths(run, n_prompts, "swa")
        assert c.model_info(MODEL)["cache"]["restores_refused"] == 0


def test_an_encoder_decoder_model_is_refused_at_load_with_unsupported_model(
    broker: BrokerProcess, memory_model: Callable[[str], Path]
) -> None:
    c = broker.client(timeout_s=60)
    with pytest.raises(ErllamaError) as err:
        c.load_model("t5", str(memory_model("encdec")))
    assert err.value.code == "unsupported_model"
    assert all(m["id"] != "t5" for m in c.list_models())  # refused once, not crash-looping
    c.load_model("stub", backend="stub")  # the broker serves on
    assert c.complete("stub", "hello", max_tokens=2).finish_reason == "length"
