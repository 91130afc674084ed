"""The test models of every llama.cpp memory kind load in the worker's backend, report the memory kind
they stand for, generate what llama-cpp-python's own ``Llama`` generates, and show the hazards of their
kind that the worker has to handle (a short sliding window, no partial truncation of a recurrent state,
no decoding before encoding)."""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import llama_cpp as L
import numpy as np
import pytest

from erllama.options import parse_load_options
from erllama.worker.backend import BatchRow
from erllama.worker.llama_backend import LlamaBackend
from tests.memory_models import GEMMA3_270M_PACKAGE, KINDS, gemma3_270m_path, make_test_models
from tests.reference import ReferenceModel, assert_identical

N_CTX_TOKENS: Final = 256
N_SEQ: Final = 4
PROMPT_WORDS: Final = 40
GREEDY_TOKENS: Final = 8
STATE_PREFILL_TOKENS: Final = 200  # several sliding windows of the swa model
DECODER_ONLY: Final = tuple(k for k in KINDS if k != "encdec")
# (is_recurrent, is_hybrid, n_swa, has_encoder) as llama.cpp reports them
EXPECTED_KIND: Final = {
    "llama": (False, False, 0, False),
    "swa": (False, False, make_test_models.SWA_WINDOW_TOKENS, False),
    "recurrent": (True, False, 0, False),
    "hybrid": (False, True, 0, False),
    "encdec": (False, False, 0, True),
}
SCRIPTS_DIR: Final = Path(__file__).resolve().parents[2] / "scripts"
ABORT_TIMEOUT_S: Final = 120


def open_backend(path: Path, **options: Any) -> LlamaBackend:
    opts = {"n_ctx": N_CTX_TOKENS, "n_seq_max": N_SEQ, "n_threads": 1} | options
    return LlamaBackend(path, parse_load_options(opts), refuse_unsupported=False)  # T5 is probed too


@pytest.fixture(scope="module", params=DECODER_ONLY)
def decoder(
    request: pytest.FixtureRequest, memory_model: Callable[[str], Path]
) -> Iterator[tuple[str, LlamaBackend]]:
    be = open_backend(memory_model(request.param), n_ctx=STATE_PREFILL_TOKENS + 64)
    try:
        yield request.param, be
    finally:
        be.close()


def memory_kind(be: LlamaBackend) -> tuple[bool, bool, int, bool]:
    m = be.model
    return (
        bool(L.llama_model_is_recurrent(m)),
        bool(L.llama_model_is_hybrid(m)),
        int(L.llama_model_n_swa(m)),
        bool(L.llama_model_has_encoder(m)),
    )


def logits_at(be: LlamaBackend, index: int) -> np.ndarray:
    return np.array(
        np.ctypeslib.as_array(L.llama_get_logits_ith(be.ctx, index), shape=(be.n_vocab,)), copy=True
    )


def prompts(be: LlamaBackend) -> list[list[int]]:
    return [be.tokenize(make_test_models.random_text(PROMPT_WORDS, seed=seed)) for seed in range(N_SEQ)]


def greedy_together(be: LlamaBackend, prompt_tokens: Sequence[list[int]]) -> list[list[int]]:
    """Every prompt on its own sequence, all decoded together tick by tick as the scheduler does."""
    out: list[list[int]] = [[] for _ in prompt_tokens]
    rows = [BatchRow(seq, p, 0, 1) for seq, p in enumerate(prompt_tokens)]
    for _ in range(GREEDY_TOKENS):
        for seq, index in enumerate(be.decode(rows)):
            out[seq].append(be.argmax(index))
        rows = [
            BatchRow(seq, [out[seq][-1]], len(p) + len(out[seq]) - 1, 1)
            for seq, p in enumerate(prompt_tokens)
        ]
    return out


def reference_for(path: Path) -> ReferenceModel:
    """llama-cpp-python's ``Llama`` on ``path``, with the worker's exact-mode kernels."""
    return ReferenceModel.load(n_ctx=N_CTX_TOKENS, path=path)


def prefill(be: LlamaBackend, seq: int, tokens: Sequence[int], pos: int = 0) -> np.ndarray:
    return logits_at(be, be.decode([BatchRow(seq, tokens, pos, 1)])[0])


def pos_range(be: LlamaBackend, seq: int) -> tuple[int, int]:
    return int(L.llama_memory_seq_pos_min(be.mem, seq)), int(L.llama_memory_seq_pos_max(be.mem, seq))


def clear_all(be: LlamaBackend) -> None:
    for seq in range(be.n_seq_max):
        be.seq_clear(seq)


# --- every decoder-only kind ------------------------------------------------------------------------------


def test_each_model_reports_the_memory_kind_it_stands_for(decoder: tuple[str, LlamaBackend]):
    kind, be = decoder
    assert memory_kind(be) == EXPECTED_KIND[kind]


def test_each_model_generates_what_llama_cpp_pythons_llama_generates(
    decoder: tuple[str, LlamaBackend], memory_model: Callable[[str], Path]
):
    kind, be = decoder
    clear_all(be)
    tokens = prompts(be)
    ours = greedy_together(be, tokens)
    ref = reference_for(memory_model(kind))
    try:
        for prompt, got in zip(tokens, ours):
            expected, _ = ref.greedy(prompt, GREEDY_TOKENS)
            # The reference stops at an end-of-generation token, as the scheduler would.
            ends = [i for i, t in enumerate(got) if be.is_eog(t)]
            assert_identical(got[: ends[0]] if ends else got, expected, kind)
    finally:
        ref.llm.close()
    # Random weights that still depend on the context: the prompts lead to different continuations,
    # and no continuation is one token repeated.
    assert len({tuple(t) for t in ours}) == len(ours)
    assert all(len(set(t)) > 1 for t in ours)


def test_a_state_restored_into_another_sequence_continues_with_bit_identical_logits(
    decoder: tuple[str, LlamaBackend],
):
    _, be = decoder
    clear_all(be)
    tokens = be.tokenize(make_test_models.random_text(STATE_PREFILL_TOKENS, seed=100))[:STATE_PREFILL_TOKENS]
    nxt = int(prefill(be, 0, tokens).argmax())
    be.seq_restore(1, be.seq_state(0))
    continued = prefill(be, 0, [nxt], len(tokens))
    restored = prefill(be, 1, [nxt], len(tokens))
    assert np.array_equal(continued, restored)


# --- the hazards of each kind -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swa_backend(memory_model: Callable[[str], Path]) -> Iterator[LlamaBackend]:
    be = open_backend(memory_model("swa"), n_ctx=STATE_PREFILL_TOKENS + 64)
    try:
        yield be
    finally:
        be.close()


def test_a_restored_swa_state_holds_only_the_last_window_and_truncating_it_silently_breaks_the_output(
    swa_backend: LlamaBackend,
):
    be = swa_backend
    clear_all(be)
    window = make_test_models.SWA_WINDOW_TOKENS
    tokens = be.tokenize(make_test_models.random_text(STATE_PREFILL_TOKENS, seed=101))[:STATE_PREFILL_TOKENS]
    n = len(tokens)
    cold = prefill(be, 0, tokens)
    assert pos_range(be, 0) == (0, n - 1)  # the prefilled sequence keeps every cell (swa_full)
    be.seq_restore(1, be.seq_state(0))
    assert pos_range(be, 1) == (n - window, n - 1)  # a saved state carries only the window
    # Re-decoding the last token works; any shorter keep leaves the window short, and llama.cpp says yes.
    assert L.llama_memory_seq_rm(be.mem, 1, n - 1, -1)
    assert np.array_equal(prefill(be, 1, tokens[n - 1 :], n - 1), cold)
    be.seq_clear(1)
    be.seq_restore(1, be.seq_state(0))
    keep = n - window // 2
    assert L.llama_memory_seq_rm(be.mem, 1, keep, -1)
    assert not np.array_equal(prefill(be, 1, tokens[keep:], keep), cold)
    # The sequence that was prefilled (not restored) truncates correctly far below the window.
    keep = n // 2
    assert L.llama_memory_seq_rm(be.mem, 0, keep, -1)
    assert np.array_equal(prefill(be, 0, tokens[keep:], keep), cold)


@pytest.mark.parametrize("kind", ["recurrent", "hybrid"])
def test_recurrent_and_hybrid_memories_refuse_a_partial_truncation(
    kind: str, memory_model: Callable[[str], Path]
):
    be = open_backend(memory_model(kind))
    try:
        tokens = be.tokenize(make_test_models.random_text(PROMPT_WORDS, seed=102))
        n = len(tokens)
        prefill(be, 0, tokens)
        assert pos_range(be, 0) == (n - 1, n - 1)
        assert not L.llama_memory_seq_rm(be.mem, 0, n - 2, -1)
        assert not L.llama_memory_seq_rm(be.mem, 0, 1, -1)
        assert L.llama_memory_seq_rm(be.mem, 0, n, -1)  # nothing past the end: nothing to undo
        assert L.llama_memory_seq_rm(be.mem, 0, -1, -1)  # the whole sequence
    finally:
        be.close()


# --- the encoder-decoder kind -----------------------------------------------------------------------------


def encode(be: LlamaBackend, seq: int, tokens: Sequence[int]) -> int:
    b = be.batch
    for i, tok in enumerate(tokens):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, 0
        b.seq_id[i][0] = seq
    b.n_tokens = len(tokens)
    return int(L.llama_encode(be.ctx, b))


def test_the_encoder_decoder_model_decodes_after_llama_encode_in_the_backends_context(
    memory_model: Callable[[str], Path],
):
    # One sequence: with split KV and several sequences llama.cpp aborts creating a T5 context (below).
    # llama_encode takes the whole input in one micro-batch: exact mode's 32 tokens are too few.
    be = open_backend(memory_model("encdec"), n_seq_max=1, exact=False)
    try:
        assert memory_kind(be) == EXPECTED_KIND["encdec"]
        start = int(L.llama_model_decoder_start_token(be.model))
        assert start == L.llama_vocab_bos(be.vocab)
        outputs = []
        for seed in range(2):
            be.seq_clear(0)
            assert encode(be, 0, be.tokenize(make_test_models.random_text(PROMPT_WORDS, seed=seed))) == 0
            out = [start]
            for pos in range(GREEDY_TOKENS):
                out.append(be.argmax(be.decode([BatchRow(0, [out[-1]], pos, 1)])[0]))
            outputs.append(out[1:])
        assert outputs[0] != outputs[1], "the decoder must depend on what was encoded"
    finally:
        be.close()


def abort_probe(probe: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / "memory_facts.py"), "--probe", probe, str(path)],
        capture_output=True,
        text=True,
        timeout=ABORT_TIMEOUT_S,
        env=os.environ | {"GGML_NO_BACKTRACE": "1"},
        check=False,
    )


@pytest.mark.parametrize(
    ("probe", "says"),
    [
        ("decode_without_encode", "llama_encode must be called first"),
        ("split_kv", "ggml_can_repeat"),
    ],
)
def test_llama_cpp_aborts_an_encoder_decoder_decoded_before_encoding_or_given_split_kv(
    probe: str, says: str, memory_model: Callable[[str], Path]
):
    proc = abort_probe(probe, memory_model("encdec"))
    assert proc.returncode < 0, proc.stdout + proc.stderr[-2000:]  # killed by SIGABRT
    assert says in proc.stderr


# --- the generator and Gemma 3 ----------------------------------------------------------------------------


def test_the_generator_writes_the_same_bytes_twice(tmp_path: Path, memory_model: Callable[[str], Path]):
    first = make_test_models.build("hybrid", tmp_path / "a")
    second = make_test_models.build("hybrid", tmp_path / "b")
    assert first.read_bytes() == second.read_bytes() == memory_model("hybrid").read_bytes()


def test_an_unknown_kind_is_a_value_error(memory_model: Callable[[str], Path]):
    with pytest.raises(ValueError):
        memory_model("transformer")


def test_gemma3_270m_is_assembled_from_its_packages_and_is_a_sliding_window_model():
    path = gemma3_270m_path()
    package = importlib.import_module(GEMMA3_270M_PACKAGE)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == package.EXPECTED_SHA256
    be = open_backend(path, n_seq_max=1)
    try:
        assert memory_kind(be) == (False, False, 512, False)
        logits = prefill(be, 0, be.tokenize("The capital of France is"))
        assert np.isfinite(logits).all()
        desc = ctypes.create_string_buffer(128)
        L.llama_model_desc(be.model, desc, 128)
        assert desc.value.startswith(b"gemma3")
    finally:
        be.close()
