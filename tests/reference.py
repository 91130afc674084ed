"""An independent reference: greedy decoding of the same model file with llama-cpp-python's
high-level ``Llama`` class, in the test process.

In exact mode (erllama's default: flash attention on, micro-batches of at most 48 tokens) llama.cpp's
CPU arithmetic gives a token the same logits however it is batched (alone, beside other sequences,
in any chunk, after a restore), so the worker's greedy tokens must equal the reference's exactly:
``assert_identical``. Outside it they may not (a token's logits depend on the micro-batch it is
decoded in), and ``assert_same_greedy`` accepts a difference only at a near tie, shown from the
reference's own logits.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as llama_lowlevel
import numpy as np

from erllama.models import default_model_path
from erllama.options import EXACT_KERNELS_ENV, LoadOptions
from erllama.worker.llama_backend import GGML_TYPES, head_dims


def _params_without_extra_bufts():
    params = _default_model_params()
    # The AMX repacked-weight path segfaults in llama_decode on this machine (see DESIGN.md);
    # Llama() has no keyword for it, so the default params are patched.
    params.use_extra_bufts = False
    return params


_default_model_params = llama_lowlevel.llama_model_default_params
# The worker's exact mode takes ggml's dot-product kernel for every K-quant matrix product; the
# reference must too (read once per process, at the first product).
os.environ.update(EXACT_KERNELS_ENV)


def exact_kv_type(path: Path) -> str:
    """The KV cache type exact mode takes for this model (its heads decide: erllama/options.py)."""
    params = _params_without_extra_bufts()  # mapped, not read: no context is made
    model = llama_lowlevel.llama_model_load_from_file(str(path).encode(), params)
    try:
        type_k, type_v = LoadOptions().kv_types(*head_dims(model))
    finally:
        llama_lowlevel.llama_model_free(model)
    assert type_k == type_v, "the reference sets one type for both"
    return type_k


@dataclass
class ReferenceModel:
    llm: llama_cpp.Llama

    @classmethod
    def load(cls, n_ctx: int = 2048, path: Path | None = None, exact: bool = True) -> ReferenceModel:
        """``path`` defaults to the embedded model; ``exact`` decodes with the kernels of the worker's
        exact mode (flash attention, the KV cache type it picks for the model's heads), else with
        llama.cpp's defaults. Micro-batches are llama.cpp's default size, whatever the worker uses."""
        path = path or default_model_path()
        kv_type = GGML_TYPES[exact_kv_type(path)] if exact else None
        llama_lowlevel.llama_model_default_params = _params_without_extra_bufts
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=512,
                n_ubatch=512,
                n_threads=os.cpu_count(),
                n_threads_batch=os.cpu_count(),
                flash_attn=True,
                type_k=kv_type,
                type_v=kv_type,
                logits_all=False,  # greedy reads the last row only (Gemma 3: 262k logits a row)
                verbose=False,
            )
        finally:
            llama_lowlevel.llama_model_default_params = _default_model_params
        return cls(llm)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True, special=False)

    def greedy(self, prompt: Sequence[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        """``n`` greedy tokens after ``prompt`` (stopping at end-of-generation) and the logits
        each was chosen from."""
        self.llm.reset()
        self.llm.eval(list(prompt))
        out: list[int] = []
        logits: list[np.ndarray] = []
        for _ in range(n):
            last = llama_lowlevel.llama_get_logits_ith(self.llm._ctx.ctx, -1)  # the last eval's only output
            row = np.ctypeslib.as_array(last, shape=(self.llm.n_vocab(),)).copy()
            tok = int(np.argmax(row))
            logits.append(row)
            if llama_lowlevel.llama_vocab_is_eog(self.llm._model.vocab, tok):
                break
            out.append(tok)
            self.llm.eval([tok])
        return out, logits

    def greedy_under_grammar(self, prompt: Sequence[int], n: int, grammar: str) -> list[int]:
        """``n`` greedy tokens after ``prompt`` under ``grammar``, the way llama.cpp constrains them: the
        grammar applied to the whole vocabulary at every step, then the first of the largest logits left."""
        vocab = self.llm._model.vocab
        sampler = llama_lowlevel.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        n_vocab = self.llm.n_vocab()
        cand = np.zeros(n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        out: list[int] = []
        self.llm.reset()
        self.llm.eval(list(prompt))
        try:
            for _ in range(n):
                last = llama_lowlevel.llama_get_logits_ith(self.llm._ctx.ctx, -1)
                cand["id"] = np.arange(n_vocab, dtype=np.int32)
                cand["logit"] = np.ctypeslib.as_array(last, shape=(n_vocab,))
                cand["p"] = 0.0
                arr = llama_lowlevel.llama_token_data_array(
                    data=cand.ctypes.data_as(ctypes.POINTER(llama_lowlevel.llama_token_data)),
                    size=n_vocab,
                    selected=-1,
                    sorted=False,
                )
                llama_lowlevel.llama_sampler_apply(sampler, ctypes.byref(arr))
                tok = int(np.argmax(cand["logit"]))
                if llama_lowlevel.llama_vocab_is_eog(vocab, tok):
                    break
                llama_lowlevel.llama_sampler_accept(sampler, tok)
                out.append(tok)
                self.llm.eval([tok])
        finally:
            llama_lowlevel.llama_sampler_free(sampler)
        return out


def assert_identical(ours: Sequence[int], ref: Sequence[int], what: str = "") -> None:
    """Assert ``ours`` equals the reference token for token (exact mode: no tolerance)."""
    for i, (a, b) in enumerate(zip(ours, ref, strict=False)):
        assert a == b, (
            f"{what}: token {i}: ours {a} != reference {b} (ours {list(ours)}, reference {list(ref)})"
        )
    assert len(ours) == len(ref), f"{what}: lengths differ: ours {len(ours)}, reference {len(ref)}"


def top_two_gap(row: np.ndarray) -> float:
    a, b = np.partition(row, -2)[-2:]
    return float(abs(b - a))
