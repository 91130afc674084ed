"""LlamaBackend on the real default model, without processes or sockets."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from erllama.models import default_model_path
from erllama.options import SamplingParams, parse_load_options
from erllama.worker.backend import BatchRow
from erllama.worker.llama_backend import LlamaBackend

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    be = LlamaBackend(default_model_path(), parse_load_options({"n_ctx": 256, "n_seq_max": len(PROMPTS)}))
    try:
        yield be
    finally:
        be.close()


def next_tokens(be: LlamaBackend, order: list[int]) -> dict[int, int]:
    """Prefill PROMPTS[i] on sequence i in one decode with rows in ``order``; each row's argmax."""
    for seq in range(be.n_seq_max):
        be.seq_clear(seq)
    rows = [BatchRow(seq, be.tokenize(PROMPTS[seq]), 0, 1) for seq in order]
    indices = be.decode(rows)
    return {row.seq_id: be.argmax(idx) for row, idx in zip(rows, indices)}


def test_rows_in_any_sequence_order_get_the_logits_of_their_own_sequence(backend: LlamaBackend):
    # The backend reorders rows by sequence id for llama.cpp; the indices it returns must follow.
    ascending = next_tokens(backend, [0, 1, 2, 3])
    assert len(set(ascending.values())) > 1, "the prompts must lead to different tokens"
    assert next_tokens(backend, [3, 1, 0, 2]) == ascending
    assert next_tokens(backend, [2, 0]) == {2: ascending[2], 0: ascending[0]}


def test_greedy_reads_the_argmax_and_picks_what_llama_cpps_greedy_sampler_picks(backend: LlamaBackend):
    fast = backend.new_sampler(SamplingParams(temperature=0.0), [])
    assert fast.argmax_only
    chain = backend.new_sampler(SamplingParams(temperature=0.0), [])
    chain.argmax_only = False  # the same request through llama.cpp's greedy sampler chain
    rng = np.random.default_rng(0)
    try:
        for _ in range(20):
            logits = rng.normal(size=backend.n_vocab).astype(np.float32)
            top = int(rng.integers(backend.n_vocab))
            logits[top] = logits[rng.integers(backend.n_vocab)] = logits.max() + 1  # a tie for first
            blob = logits.tobytes()
            assert backend.sample(fast, blob) == backend.sample(chain, blob) == int(np.argmax(logits))
        backend.seq_clear(0)
        idx = backend.decode([BatchRow(0, backend.tokenize(PROMPTS[0]), 0, 1)])[0]
        assert backend.sample(fast, idx) == backend.sample(chain, idx)
    finally:
        backend.free_sampler(fast)
        backend.free_sampler(chain)
    penalized = backend.new_sampler(SamplingParams(temperature=0.0, repetition_penalty=1.2), [])
    assert not penalized.argmax_only  # a penalty reshapes the logits: the chain decides
    backend.free_sampler(penalized)
