"""scripts/make_lora.py writes an adapter llama.cpp loads; scale 0 is a no-op and scale 1 is not."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import gguf
import llama_cpp as L
import numpy as np
import pytest
from gguf import GGUFReader

from erllama.models import default_model_path
from tests.conftest import load_script

PROMPT = b"The capital of France is"
N_CTX_TOKENS = 128
GREEDY_STEPS = 4
SAME_LOGITS_ATOL = 1e-4  # scale 0 adds exact zeros; allow only float noise
CHANGED_LOGITS_MIN = 0.05  # a rank-8 random adapter on every layer moves logits far more than this


make_lora = load_script("make_lora")


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "random.gguf"
    assert make_lora.main(["--out", str(out), "--rank", "8", "--seed", "7", "--layers", "all"]) == 0
    return out


class Model:
    """The default model and one context through the low-level API (as the worker uses it)."""

    def __init__(self) -> None:
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = False  # AMX repacked buffers segfault in llama_decode on this CPU
        self.model = L.llama_model_load_from_file(str(default_model_path()).encode(), mp)
        assert self.model
        cp = L.llama_context_default_params()
        cp.n_ctx = N_CTX_TOKENS
        cp.n_batch = N_CTX_TOKENS
        cp.n_threads = cp.n_threads_batch = 1  # one thread: spinning workers crawl on a busy 2-core host
        self.ctx = L.llama_init_from_model(self.model, cp)
        assert self.ctx
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        buf = (L.llama_token * 64)()
        n = L.llama_tokenize(self.vocab, PROMPT, len(PROMPT), buf, 64, True, False)
        self.prompt = list(buf[:n])

    def set_adapter(self, adapter, scale: float | None) -> None:
        if scale is None:
            assert L.llama_set_adapters_lora(self.ctx, None, 0, None) == 0
        else:
            arr = (L.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(scale)
            assert L.llama_set_adapters_lora(self.ctx, arr, 1, scales) == 0

    def greedy(self) -> tuple[np.ndarray, list[int]]:
        """Logits after the prompt, and a few greedy tokens, from an empty KV cache."""
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        tokens = list(self.prompt)
        first_logits = None
        out: list[int] = []
        for _ in range(GREEDY_STEPS):
            batch_tokens = tokens if not out else tokens[-1:]
            arr = (L.llama_token * len(batch_tokens))(*batch_tokens)
            assert L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(batch_tokens))) == 0
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()
            if first_logits is None:
                first_logits = logits
            tok = int(np.argmax(logits))
            out.append(tok)
            tokens.append(tok)
        return first_logits, out

    def close(self) -> None:
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    m = Model()
    try:
        yield m
    finally:
        m.close()


def test_adapter_has_the_metadata_and_shapes_llama_cpp_expects(adapter_path):
    r = GGUFReader(str(adapter_path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 8.0
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml order (ne)
    assert len(shapes) == 30 * 2 * 2
    assert shapes["blk.0.attn_q.weight.lora_a"] == (576, 8)  # [n_in, rank]
    assert shapes["blk.0.attn_q.weight.lora_b"] == (8, 576)  # [rank, n_out]
    assert shapes["blk.29.attn_v.weight.lora_b"] == (8, 192)  # 3 KV heads x 64


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    args = ["--rank", "4", "--layers", "0-1,5", "--targets", "attn_k,attn_output"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert make_lora.main(["--out", str(tmp_path / f"{name}.gguf"), "--seed", seed, *args]) == 0
    a, b, c = ((tmp_path / f"{n}.gguf").read_bytes() for n in "abc")
    assert a == b and a != c


def test_bad_arguments_fail_with_a_message_not_a_traceback(tmp_path, capsys):
    assert make_lora.main(["--out", str(tmp_path / "x.gguf"), "--layers", "40"]) == 2
    assert make_lora.main(["--out", str(tmp_path / "x.gguf"), "--targets", "attn_nope"]) == 2
    assert make_lora.main(["--out", str(tmp_path / "x.gguf"), "--rank", "0"]) == 2
    assert "make_lora:" in capsys.readouterr().err


def test_llama_cpp_loads_it_and_scale_zero_changes_nothing_while_scale_one_changes_logits(
    model, adapter_path
):
    base_logits, base_tokens = model.greedy()
    adapter = L.llama_adapter_lora_init(model.model, str(adapter_path).encode())
    assert adapter, "llama.cpp rejected the adapter"
    try:
        model.set_adapter(adapter, 0.0)
        zero_logits, zero_tokens = model.greedy()
        assert zero_tokens == base_tokens
        assert np.max(np.abs(zero_logits - base_logits)) < SAME_LOGITS_ATOL

        model.set_adapter(adapter, 1.0)
        one_logits, _ = model.greedy()
        assert np.max(np.abs(one_logits - base_logits)) > CHANGED_LOGITS_MIN

        model.set_adapter(adapter, None)  # detached: back to the base model
        again_logits, again_tokens = model.greedy()
        assert again_tokens == base_tokens
        assert np.max(np.abs(again_logits - base_logits)) < SAME_LOGITS_ATOL
    finally:
        model.set_adapter(adapter, None)
        L.llama_adapter_lora_free(adapter)


def test_llama_cpp_rejects_an_adapter_for_another_architecture(model, tmp_path):
    # Right tensor names and shapes, but declared for another architecture: llama.cpp must refuse it.
    bad = tmp_path / "other-arch.gguf"
    w = gguf.GGUFWriter(bad, "gpt2")
    w.add_type("adapter")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 576), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((576, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert not L.llama_adapter_lora_init(model.model, str(bad).encode())
