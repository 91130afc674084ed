"""Validation of per-request sampling parameters and per-model load options.

Both are checked before anything reaches llama.cpp, which asserts (and so kills the
worker) on many out-of-range values. Every problem is an ``invalid_params`` error that
names the offending key. Unknown keys are rejected too: a misspelt ``temprature`` that
were silently ignored would be worse than an error.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from erllama.protocol import DEFAULT_MAX_QUEUE, WORKER_STALL_TIMEOUT_S, ErllamaError, ErrorCode
from erllama.protocol.params import SAMPLING_KEYS, SamplingParams

KV_TYPES: Final = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
SPLIT_MODES: Final = ("none", "layer", "row")
FLASH_ATTN_MODES: Final = ("auto", "on", "off")
BACKENDS: Final = ("llama", "stub")
STUB_MEMORY_KINDS: Final = ("transformer", "swa", "recurrent", "hybrid")
MAX_SEQUENCES: Final = 64
# llama.cpp's CPU flash-attention kernel has three paths for an F16 or F32 K cache: one query at a time,
# tiles for micro-batches of 64+ queries, and, for a lone query over 512+ cells (one sequence decoding past
# ~256 tokens), the cells split across threads and the partial sums merged. Each rounds differently, so a
# token's logits would depend on how it was batched (measured: 1.2-3.2 on the default model and Gemma 3).
# For any other K type (q8_0, ...) every micro-batch takes the first path: bit-identical whether a token
# is decoded alone, beside other sequences, in a prefill of any micro-batch size, or after a restore.
EXACT_KV_TYPE: Final = "q8_0"
# q8_0 packs 32 values per block, so it needs heads whose size is a multiple of 32 (nearly every model;
# not Phi-2's 80, nor the tiny test models' 16). Those get bf16: as exact, the size of f16.
Q8_0_BLOCK_VALUES: Final = 32
EXACT_KV_FALLBACK_TYPE: Final = "bf16"
BATCH_DEPENDENT_K_TYPES: Final = ("f16", "f32")
# ggml's CPU backend multiplies K-quant and IQ weights (Q4_K_M files and the like) with a tiled kernel
# from 8-token micro-batches on and with its dot-product kernel below: different rounding (measured on
# Gemma 3 270M Q4_K_M: 0.25-0.48 logits). Exact mode keeps the dot-product kernel for every batch
# (read once per process, before the first matrix product; prefill 13% slower on that model).
EXACT_KERNELS_ENV: Final = {"GGML_CPU_TILED_MM": "0"}
MAX_TENSOR_SPLIT: Final = 16


class PrefillOrder(enum.StrEnum):
    """Load option ``prefill_policy``: who gets a tick's prompt tokens (worker/prefill.py)."""

    OLDEST = "oldest"  # admission order, each prompt to its end before the next starts
    SHORTEST = "shortest"  # fewest prompt tokens left first; one waiting 5 s goes first anyway
    FAIR = "fair"  # every prefilling request a slice of prefill_chunk_size per tick


PREFILL_POLICIES: Final = tuple(o.value for o in PrefillOrder)


class RoutingPolicy(enum.StrEnum):
    """How the broker picks one of a model's replicas for a request (broker/routing.py)."""

    CACHE_AWARE = "cache_aware"  # the lowest expected time to first token, from what each replica holds
    LEAST_LOADED = "least_loaded"  # the replica with the most free sequences
    ROUND_ROBIN = "round_robin"  # each in turn


MODEL_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def _bad(key: str, why: str) -> ErllamaError:
    return ErllamaError(ErrorCode.INVALID_PARAMS, f"{key}: {why}", {"key": key})


def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _bad(key, f"{value} is outside [{lo}, {hi}]")
    return value


def _float(key: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, f"expected a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or not lo <= value <= hi:
        raise _bad(key, f"{value} is outside [{lo}, {hi}]")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(key, f"expected true or false, got {type(value).__name__}")
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _bad(key, f"{value!r} is not one of {', '.join(choices)}")
    return str(value)


def validate_model_id(model_id: Any) -> str:
    """Model ids name files and sockets in places; keep them to a safe alphabet (no path traversal)."""
    if not isinstance(model_id, str) or not MODEL_ID_PATTERN.match(model_id):
        raise _bad("model", "ids are 1-128 characters of letters, digits, '.', '_', ':' and '-'")
    return model_id


MARKER_KEYS: Final = {
    "thinking_markers": ("start", "end"),
    "tool_call_markers": ("start", "end", "payload_start", "payload_end"),
}
MAX_MARKER_CHARS: Final = 64
_FIELD_PATH: Final = re.compile(r"`\$\.(\w+)")


def parse_sampling(params: dict[str, Any] | None) -> SamplingParams:
    """Turn a request's ``params`` map into ``SamplingParams`` or raise ``invalid_params`` naming the key.

    The constraints are ``SamplingParams``'s own; two spellings clients use are accepted here
    (``stop`` as one string, ``thinking`` as ``"enabled"``/``"disabled"``)."""
    params = dict(params or {})
    for key in params:
        if key not in SAMPLING_KEYS:
            raise _bad(str(key), "unknown parameter")
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    if params.get("stop") is None:
        params.pop("stop", None)
    if params.get("thinking") in ("enabled", "disabled"):
        params["thinking"] = params["thinking"] == "enabled"
    try:
        return msgspec.convert(params, SamplingParams)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = _FIELD_PATH.search(text)
        if where is not None:
            raise _bad(where.group(1), text) from None
        key, _, why = text.partition(": ")  # SamplingParams.__post_init__ names the key itself
        raise _bad(key, why) from None


def validate_prompt(prompt: Any, n_vocab: int | None = None) -> str | list[int]:
    """A prompt is a non-empty string or a non-empty list of token ids inside the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "empty prompt")
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise _bad("prompt", "empty token list")
        for tok in prompt:
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise _bad("prompt", "token ids must be integers")
            if tok < 0 or (n_vocab is not None and tok >= n_vocab):
                raise _bad("prompt", f"token id {tok} is outside the vocabulary [0, {n_vocab})")
        return prompt
    raise _bad("prompt", f"expected a string or a list of token ids, got {type(prompt).__name__}")


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """Per-model options: llama.cpp model and context parameters plus erllama's own.

    ``use_extra_bufts`` defaults to False: on CPUs with AMX, llama.cpp's repacked-weight
    buffers segfault inside ``llama_decode`` for some models (see the README).
    """

    backend: str = "llama"
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 0  # 0 = one per core
    n_seq_max: int = 4
    kv_unified: bool = False  # one KV buffer for all sequences instead of one stream per sequence (README)
    n_gpu_layers: int = 0
    main_gpu: int = 0
    split_mode: str = "layer"
    tensor_split: tuple[float, ...] = ()
    use_mmap: bool = True
    use_mlock: bool = False
    # exact: a token's logits do not depend on how it is batched (alone, in a prefill chunk, beside other
    # sequences, after a restore), so warm output is bit-identical to cold. llama.cpp's CPU kernels give
    # that with flash attention on, a K cache of a type other than f16/f32 (EXACT_KV_TYPE by default) and
    # the dot-product kernel for K-quant weights (EXACT_KERNELS_ENV). exact=False allows any flash_attn
    # and KV types and keeps the tiled kernels (README, *The KV cache*: what it costs).
    exact: bool = True
    flash_attn: str = "auto"
    type_k: str | None = None  # None: EXACT_KV_TYPE (or its fallback) in exact mode, else f16 (``kv_types``)
    type_v: str | None = None
    use_extra_bufts: bool = False
    max_queue: int = DEFAULT_MAX_QUEUE
    prefill_policy: str = PrefillOrder.OLDEST.value
    prefill_budget_tokens: int = 512  # prompt tokens per tick beside the decode rows (at most n_batch)
    prefill_chunk_size: int = 256  # ``fair``: each prefilling request's slice of a tick
    share_prefix: bool = True  # a request starting like a running one copies its KV (worker/sharing.py)
    routing: str = RoutingPolicy.CACHE_AWARE.value  # how the broker picks a replica (broker/routing.py)
    stub_decode_ms: int = 0  # the stub backend sleeps this long per decode, standing in for compute
    stub_prefill_us_per_token: int = 0  # and this much more per token of the batch: a prefill's cost
    stub_memory: str = "transformer"  # the memory kind the stub backend imitates (worker/stub_backend.py)
    stall_timeout_s: int = int(
        WORKER_STALL_TIMEOUT_S
    )  # a busy worker without decode progress this long is killed
    # KV cache policy (see worker/kvcache.py): rows shorter than cache_min_tokens are neither saved nor
    # restored; a cold prompt is saved at floor((len - cold_trim_tokens) / cold_align_tokens) * align;
    # a generating request saves its context every continued_interval_tokens.
    cache: bool = True
    cache_min_tokens: int = 64
    cold_trim_tokens: int = 32
    cold_align_tokens: int = 64
    continued_interval_tokens: int = 512
    # Span markers, tokenized at load: thinking {start, end}; tool calls {start, end, payload_start?,
    # payload_end?}. Tokens inside spans are streamed as thinking / tool-call deltas.
    thinking_markers: dict[str, str] | None = None
    tool_call_markers: dict[str, str] | None = None

    def to_wire(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tensor_split"] = list(self.tensor_split)
        return d

    def kv_types(self, head_dim_k: int = 0, head_dim_v: int = 0) -> tuple[str, str]:
        """The K and V cache types in effect for a model with heads of these sizes (0: not known yet)."""

        def pick(given: str | None, head_dim: int) -> str:
            if given is not None:
                return given
            if not self.exact:
                return "f16"
            return EXACT_KV_TYPE if head_dim % Q8_0_BLOCK_VALUES == 0 else EXACT_KV_FALLBACK_TYPE

        return pick(self.type_k, head_dim_k), pick(self.type_v, head_dim_v)

    @property
    def threads(self) -> int:
        return self.n_threads or (os.cpu_count() or 1)


def parse_load_options(options: dict[str, Any] | None) -> LoadOptions:
    """Validate a ``load_model`` options map (types, ranges, cross-field rules)."""
    options = options or {}
    known = {f.name for f in dataclasses.fields(LoadOptions)}
    for key in options:
        if key not in known:
            raise _bad(str(key), "unknown load option")
    o: dict[str, Any] = {}
    ints = {
        "n_ctx": (16, 1 << 20),
        "n_batch": (1, 1 << 16),
        "n_ubatch": (1, 1 << 16),
        "n_threads": (0, 1024),
        "n_seq_max": (1, MAX_SEQUENCES),
        "n_gpu_layers": (-1, 100_000),
        "main_gpu": (0, 64),
        "max_queue": (0, 1 << 20),
        "prefill_chunk_size": (1, 1 << 16),
        "prefill_budget_tokens": (1, 1 << 16),
        "stub_decode_ms": (0, 60_000),
        "stub_prefill_us_per_token": (0, 1_000_000),
        "stall_timeout_s": (1, 86_400),
        "cache_min_tokens": (1, 1 << 20),
        "cold_trim_tokens": (0, 1 << 20),
        "cold_align_tokens": (1, 1 << 20),
        "continued_interval_tokens": (1, 1 << 20),
    }
    for key, (lo, hi) in ints.items():
        if key in options:
            o[key] = _int(key, options[key], lo, hi)
    for key in ("use_mmap", "use_mlock", "use_extra_bufts", "cache", "kv_unified", "share_prefix", "exact"):
        if key in options:
            o[key] = _bool(key, options[key])
    for key, choices in (
        ("backend", BACKENDS),
        ("split_mode", SPLIT_MODES),
        ("flash_attn", FLASH_ATTN_MODES),
        ("stub_memory", STUB_MEMORY_KINDS),
        ("prefill_policy", PREFILL_POLICIES),
        ("routing", tuple(r.value for r in RoutingPolicy)),
        ("type_k", KV_TYPES),
        ("type_v", KV_TYPES),
    ):
        if options.get(key) is not None:  # a KV type left None resolves once the model's heads are known
            o[key] = _choice(key, options[key], choices)
    if "tensor_split" in options:
        ts = options["tensor_split"]
        if not isinstance(ts, (list, tuple)) or len(ts) > MAX_TENSOR_SPLIT:
            raise _bad("tensor_split", f"expected a list of at most {MAX_TENSOR_SPLIT} numbers")
        o["tensor_split"] = tuple(_float("tensor_split", x, 0.0, 1e6) for x in ts)
    for key, allowed in MARKER_KEYS.items():
        if options.get(key) is not None:
            m = options[key]
            if not isinstance(m, dict) or not {"start", "end"} <= set(m) or not set(m) <= set(allowed):
                raise _bad(key, f"expected a map with keys {', '.join(allowed)} (start and end required)")
            if not all(isinstance(v, str) and 0 < len(v) <= MAX_MARKER_CHARS for v in m.values()):
                raise _bad(key, f"markers are strings of 1-{MAX_MARKER_CHARS} characters")
            o[key] = dict(m)
    opts = LoadOptions(**o)
    if opts.n_ubatch > opts.n_batch:
        raise _bad("n_ubatch", f"{opts.n_ubatch} exceeds n_batch {opts.n_batch}")
    if opts.exact and opts.flash_attn == "off":
        raise _bad(
            "flash_attn", "exact mode needs flash attention (auto or on); set exact=false to turn it off"
        )
    type_k, type_v = opts.kv_types()
    if opts.exact and type_k in BATCH_DEPENDENT_K_TYPES:
        raise _bad(
            "type_k",
            f"exact mode needs a K cache other than {' or '.join(BATCH_DEPENDENT_K_TYPES)} (flash attention "
            f"over those rounds differently by batch shape); use {EXACT_KV_TYPE} or set exact=false",
        )
    if opts.n_seq_max > opts.n_batch:
        raise _bad(
            "n_seq_max", "every running sequence needs a row of the batch: n_seq_max must be <= n_batch"
        )
    if opts.n_seq_max * 16 > opts.n_ctx:
        raise _bad("n_seq_max", f"n_ctx {opts.n_ctx} leaves fewer than 16 cells per sequence")
    if type_v not in ("f16", "f32") and opts.flash_attn == "off":
        raise _bad("type_v", "a quantized V cache needs flash_attn (auto or on): set flash_attn too")
    return opts
