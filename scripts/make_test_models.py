#!/usr/bin/env python3
"""Tiny random-weight GGUF models, one for each memory kind llama.cpp has, for fast tests.

    python scripts/make_test_models.py --out DIR [--kinds llama swa recurrent hybrid encdec]

Each kind is a real architecture the installed llama.cpp loads, with a few layers of width 64, so a
300-token prefill takes milliseconds:

| kind | architecture | llama.cpp memory |
| --- | --- | --- |
| ``llama`` | ``llama`` (plain transformer, GQA) | ``llama_kv_cache`` |
| ``swa`` | ``gemma3``: 3 sliding-window layers (window 32 tokens) and 1 full-attention layer, as Gemma 3's 5:1 | ``llama_kv_cache_iswa`` |
| ``recurrent`` | ``mamba`` (Mamba 1) | ``llama_memory_recurrent`` |
| ``hybrid`` | ``lfm2``: short-convolution layers and attention layers in turn | ``llama_memory_hybrid`` |
| ``encdec`` | ``t5`` (2 encoder and 2 decoder layers, gated GELU) | encoder output + ``llama_kv_cache`` |

Every model carries the tokenizer of the default model (SmolLM2-135M: every ``tokenizer.*`` key of its
GGUF), so token ids and text are the same as erllama's default model. Weights are random (seeded, so
the same version of this script writes the same bytes) and scaled so that attention moves the residual
stream as much as the token's own embedding does: the next token depends on the context, not only on
the last token, and greedy output is not a constant. The scales are chosen for that, not for any
prompt's margins.

``generator_version()`` names the script's bytes, the ``gguf`` package's version and the tokenizer
source: a cache keyed by it is rebuilt whenever any of them changes.
"""

from __future__ import annotations

import argparse
import enum
import functools
import hashlib
import importlib.metadata
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import gguf
import numpy as np

from erllama.models import default_model_path


class Kind(enum.StrEnum):
    """A llama.cpp memory kind, named by what the worker has to know about it."""

    LLAMA = "llama"
    SWA = "swa"
    RECURRENT = "recurrent"
    HYBRID = "hybrid"
    ENCDEC = "encdec"


ARCHITECTURES: Final = {
    Kind.LLAMA: "llama",
    Kind.SWA: "gemma3",
    Kind.RECURRENT: "mamba",
    Kind.HYBRID: "lfm2",
    Kind.ENCDEC: "t5",
}
SEED: Final = 20240601
N_EMBD: Final = 64
N_HEAD: Final = 4
N_HEAD_KV: Final = 2
HEAD_DIM: Final = N_EMBD // N_HEAD
N_FF: Final = 128
N_LAYER: Final = 4
N_CTX_TRAIN_TOKENS: Final = 8192
RMS_EPS: Final = 1e-6
SWA_WINDOW_TOKENS: Final = 32
# Gemma 3 alternates five sliding-window layers with one full-attention layer; four layers keep the mix.
SWA_LAYERS: Final = (True, True, True, False)
# LFM2 marks a short-convolution (recurrent) layer by 0 KV heads.
HYBRID_HEAD_COUNT_KV: Final = (0, N_HEAD_KV, 0, N_HEAD_KV)
SHORTCONV_L_CACHE: Final = 3
MAMBA_D_INNER: Final = 2 * N_EMBD  # llama.cpp supports only an expansion factor of 2
MAMBA_D_STATE: Final = 16
MAMBA_D_CONV: Final = 4
MAMBA_DT_RANK: Final = 32  # a Q8_0 matrix's rows are whole 32-value blocks
T5_RELATIVE_BUCKETS: Final = 32
T5_LAYERS: Final = 2
# The residual stream starts at about unit RMS (Gemma scales its embeddings up by sqrt(n_embd) itself).
EMBEDDING_STD: Final = 1.0
# The output matrix is not tied to the embedding: with tied random weights a token's own embedding
# dominates its logits and greedy decoding repeats the last token forever. This gain sets the logits'
# spread (RMS about 4 over the vocabulary).
OUTPUT_GAIN: Final = 4.0
# Query/key gain above 1 sharpens attention, so a token's output depends on particular earlier tokens.
QK_GAIN: Final = 2.0
TOKENIZER_PREFIX: Final = "tokenizer."
DEFAULT_KINDS: Final = tuple(Kind)
MODEL_FILE_MODE: Final = 0o644


@functools.cache
def _tokenizer_fields() -> tuple[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None], ...]:
    """Every ``tokenizer.*`` key of the default model's GGUF, with its value and types (read once)."""
    reader = gguf.GGUFReader(default_model_path())
    out = []
    for key, field in reader.fields.items():
        if key.startswith(TOKENIZER_PREFIX):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            out.append((key, field.contents(), vtype, sub))
    return tuple(out)


def generator_version() -> str:
    """A short hash of what the built files depend on: this script, ``gguf``, the tokenizer source."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(importlib.metadata.version("gguf").encode())
    src = default_model_path()
    h.update(f"{src.name}:{src.stat().st_size}".encode())
    return h.hexdigest()[:16]


class _Weights:
    """Adds seeded random tensors to a writer; names and shapes are llama.cpp's (ggml ``ne`` order is
    the reverse of numpy's, so a matrix from ``n_in`` to ``n_out`` is a numpy array ``(n_out, n_in)``)."""

    def __init__(self, writer: gguf.GGUFWriter, seed: int):
        self.writer = writer
        self.rng = np.random.default_rng(seed)

    def add(self, name: str, value: np.ndarray, dtype: type = np.float32) -> None:
        self.writer.add_tensor(name, np.ascontiguousarray(value, dtype=dtype))

    def matrix(self, name: str, n_in: int, n_out: int, gain: float = 1.0) -> None:
        """A linear map whose output has about ``gain`` times the RMS of its input, stored Q8_0 as the
        weights of a released GGUF are (quantized): llama.cpp's CPU multiplies F32 and F16 weights with
        another kernel (llamafile's tinyBLAS) when a micro-batch has two tokens or more than when it has
        one, so float test weights would make a token's logits depend on how it is batched."""
        value = self.rng.standard_normal((n_out, n_in)) * (gain / math.sqrt(n_in))
        packed = gguf.quants.quantize(value.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        self.writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(self, name: str, n: int, scale: float = 1.0) -> None:
        """Norm weights near ``scale`` (not all equal, so no channel is special)."""
        self.add(name, scale * (1.0 + 0.1 * self.rng.standard_normal(n)))

    def embeddings(self, n_vocab: int, embedding_std: float) -> None:
        """The token embedding (f16: it is looked up, not multiplied) and the output matrix."""
        self.add("token_embd.weight", self.rng.standard_normal((n_vocab, N_EMBD)) * embedding_std, np.float16)
        self.matrix("output.weight", N_EMBD, n_vocab, OUTPUT_GAIN)

    def attention(self, prefix: str, n_head_kv: int = N_HEAD_KV, qk: float = QK_GAIN) -> None:
        self.matrix(f"{prefix}attn_q.weight", N_EMBD, N_HEAD * HEAD_DIM, qk)
        self.matrix(f"{prefix}attn_k.weight", N_EMBD, n_head_kv * HEAD_DIM, qk)
        self.matrix(f"{prefix}attn_v.weight", N_EMBD, n_head_kv * HEAD_DIM)
        self.matrix(f"{prefix}attn_output.weight", N_HEAD * HEAD_DIM, N_EMBD)

    def gated_ffn(self, prefix: str) -> None:
        self.matrix(f"{prefix}ffn_gate.weight", N_EMBD, N_FF)
        self.matrix(f"{prefix}ffn_up.weight", N_EMBD, N_FF)
        self.matrix(f"{prefix}ffn_down.weight", N_FF, N_EMBD)


def _common_keys(w: gguf.GGUFWriter, kind: Kind, n_layer: int) -> None:
    w.add_name(f"erllama-test-{kind.value}")
    w.add_context_length(N_CTX_TRAIN_TOKENS)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(N_FF)
    w.add_layer_norm_rms_eps(RMS_EPS)
    for key, value, vtype, sub in _tokenizer_fields():
        w.add_key_value(key, value, vtype, sub)


def _attention_keys(w: gguf.GGUFWriter, head_count_kv: int | Sequence[int] = N_HEAD_KV) -> None:
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(head_count_kv)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)


def _llama(w: gguf.GGUFWriter, t: _Weights) -> None:
    _common_keys(w, Kind.LLAMA, N_LAYER)
    _attention_keys(w)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(100_000.0)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t.norm(f"{p}attn_norm.weight", N_EMBD)
        t.attention(p)
        t.norm(f"{p}ffn_norm.weight", N_EMBD)
        t.gated_ffn(p)
    t.norm("output_norm.weight", N_EMBD)


def _gemma3(w: gguf.GGUFWriter, t: _Weights) -> None:
    _common_keys(w, Kind.SWA, len(SWA_LAYERS))
    _attention_keys(w)
    w.add_sliding_window(SWA_WINDOW_TOKENS)
    w.add_sliding_window_pattern(list(SWA_LAYERS))
    w.add_rope_freq_base(1_000_000.0)
    w.add_rope_freq_base_swa(10_000.0)
    for i in range(len(SWA_LAYERS)):
        p = f"blk.{i}."
        t.norm(f"{p}attn_norm.weight", N_EMBD)
        # Gemma normalizes q and k per head: their norm weights set how sharp attention is.
        t.attention(p, qk=1.0)
        t.norm(f"{p}attn_q_norm.weight", HEAD_DIM, QK_GAIN)
        t.norm(f"{p}attn_k_norm.weight", HEAD_DIM, QK_GAIN)
        t.norm(f"{p}post_attention_norm.weight", N_EMBD)
        t.norm(f"{p}ffn_norm.weight", N_EMBD)
        t.gated_ffn(p)
        t.norm(f"{p}post_ffw_norm.weight", N_EMBD)
    t.norm("output_norm.weight", N_EMBD)


def _mamba(w: gguf.GGUFWriter, t: _Weights) -> None:
    _common_keys(w, Kind.RECURRENT, N_LAYER)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(MAMBA_D_CONV)
    w.add_ssm_inner_size(MAMBA_D_INNER)
    w.add_ssm_state_size(MAMBA_D_STATE)
    w.add_ssm_time_step_rank(MAMBA_DT_RANK)
    d_inner, d_state = MAMBA_D_INNER, MAMBA_D_STATE
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t.norm(f"{p}attn_norm.weight", N_EMBD)
        t.matrix(f"{p}ssm_in.weight", N_EMBD, 2 * d_inner)
        t.add(
            f"{p}ssm_conv1d.weight", t.rng.standard_normal((d_inner, MAMBA_D_CONV)) / math.sqrt(MAMBA_D_CONV)
        )
        t.add(f"{p}ssm_conv1d.bias", 0.1 * t.rng.standard_normal(d_inner))
        t.matrix(f"{p}ssm_x.weight", d_inner, MAMBA_DT_RANK + 2 * d_state)
        t.matrix(f"{p}ssm_dt.weight", MAMBA_DT_RANK, d_inner)
        # Mamba's own initialization: step sizes log-uniform in [0.001, 0.1] through softplus,
        # A = -(1..d_state) per channel (llama.cpp stores A itself, not log(-A)).
        dt = np.exp(t.rng.uniform(math.log(1e-3), math.log(1e-1), d_inner))
        t.add(f"{p}ssm_dt.bias", dt + np.log(-np.expm1(-dt)))
        t.add(f"{p}ssm_a", -np.tile(np.arange(1, d_state + 1, dtype=np.float64), (d_inner, 1)))
        t.add(f"{p}ssm_d", np.ones(d_inner))
        t.matrix(f"{p}ssm_out.weight", d_inner, N_EMBD)
    t.norm("output_norm.weight", N_EMBD)


def _lfm2(w: gguf.GGUFWriter, t: _Weights) -> None:
    _common_keys(w, Kind.HYBRID, len(HYBRID_HEAD_COUNT_KV))
    _attention_keys(w, list(HYBRID_HEAD_COUNT_KV))
    w.add_rope_freq_base(1_000_000.0)
    w.add_shortconv_l_cache(SHORTCONV_L_CACHE)
    for i, n_head_kv in enumerate(HYBRID_HEAD_COUNT_KV):
        p = f"blk.{i}."
        t.norm(f"{p}attn_norm.weight", N_EMBD)
        if n_head_kv:
            t.attention(p, n_head_kv, qk=1.0)
            t.norm(f"{p}attn_q_norm.weight", HEAD_DIM, QK_GAIN)
            t.norm(f"{p}attn_k_norm.weight", HEAD_DIM, QK_GAIN)
        else:
            t.add(f"{p}shortconv.conv.weight", t.rng.standard_normal((N_EMBD, SHORTCONV_L_CACHE)))
            t.matrix(f"{p}shortconv.in_proj.weight", N_EMBD, 3 * N_EMBD)
            t.matrix(f"{p}shortconv.out_proj.weight", N_EMBD, N_EMBD)
        t.norm(f"{p}ffn_norm.weight", N_EMBD)
        t.gated_ffn(p)
    t.norm("token_embd_norm.weight", N_EMBD)  # LFM2's output norm is stored under this name


def _t5(w: gguf.GGUFWriter, t: _Weights) -> None:
    _common_keys(w, Kind.ENCDEC, T5_LAYERS)
    _attention_keys(w, N_HEAD)  # T5 has no grouped-query attention
    w.add_relative_attn_buckets_count(T5_RELATIVE_BUCKETS)
    bos = next(v for k, v, _, _ in _tokenizer_fields() if k == "tokenizer.ggml.bos_token_id")
    w.add_decoder_start_token_id(int(bos))
    for side in ("enc", "dec"):
        for i in range(T5_LAYERS):
            p = f"{side}.blk.{i}."
            t.norm(f"{p}attn_norm.weight", N_EMBD)
            if i == 0:  # T5 learns relative-position biases in the first layer and shares them
                t.add(f"{p}attn_rel_b.weight", t.rng.standard_normal((T5_RELATIVE_BUCKETS, N_HEAD)))
            for proj in ("q", "k", "v", "o"):
                gain = QK_GAIN if proj in ("q", "k") else 1.0
                t.matrix(f"{p}attn_{proj}.weight", N_EMBD, N_EMBD, gain)
            if side == "dec":
                t.norm(f"{p}cross_attn_norm.weight", N_EMBD)
                for proj in ("q", "k", "v", "o"):
                    t.matrix(f"{p}cross_attn_{proj}.weight", N_EMBD, N_EMBD)
            t.norm(f"{p}ffn_norm.weight", N_EMBD)
            t.gated_ffn(p)
        t.norm(f"{side}.output_norm.weight", N_EMBD)


_BUILDERS: Final[dict[Kind, Callable[[gguf.GGUFWriter, _Weights], None]]] = {
    Kind.LLAMA: _llama,
    Kind.SWA: _gemma3,
    Kind.RECURRENT: _mamba,
    Kind.HYBRID: _lfm2,
    Kind.ENCDEC: _t5,
}


def _tokens() -> list[str]:
    return next(list(v) for k, v, _, _ in _tokenizer_fields() if k == "tokenizer.ggml.tokens")


@functools.cache
def _words() -> tuple[str, ...]:
    # GPT-2 BPE marks a leading space with "\u0120": whole lowercase words of the vocabulary.
    return tuple(
        t[1:]
        for t in _tokens()
        if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha() and t[1:].islower() and len(t) > 3
    )


def random_text(n_words: int, seed: int) -> str:
    """``n_words`` words drawn at random (seeded) from the tokenizer's vocabulary: prompts that nobody
    chose for how the models answer them."""
    rng = np.random.default_rng(seed)
    words = _words()
    return " ".join(words[i] for i in rng.integers(0, len(words), n_words)).capitalize()


def build(kind: str, dest: Path) -> Path:
    """Write the model of ``kind`` to ``dest`` (a directory: the file is ``<kind>.gguf`` in it) and
    return its path. The file appears whole or not at all (written beside it, then renamed)."""
    k = Kind(kind)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{k.value}.gguf"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{k.value}-", suffix=".gguf.tmp", dir=dest)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURES[k])
        weights = _Weights(writer, SEED + list(Kind).index(k))
        # Gemma multiplies embeddings by sqrt(n_embd) in its graph.
        weights.embeddings(len(_tokens()), EMBEDDING_STD / (math.sqrt(N_EMBD) if k == Kind.SWA else 1.0))
        _BUILDERS[k](writer, weights)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(MODEL_FILE_MODE)  # mkstemp makes it private; a model file is readable by all
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write <kind>.gguf into")
    ap.add_argument(
        "--kinds", nargs="+", choices=[k.value for k in Kind], default=[k.value for k in DEFAULT_KINDS]
    )
    args = ap.parse_args(argv)
    for kind in args.kinds:
        path = build(kind, args.out)
        print(f"{kind:10} {ARCHITECTURES[Kind(kind)]:7} {path.stat().st_size:>10,} bytes  {path}")
    print(f"generator version {generator_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
