"""LlamaBackend on the real default model, without processes or sockets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from erllama.models import default_model_path
from erllama.options import parse_load_options
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
