"""llama.cpp through llama-cpp-python's low-level API: one model, one context, many sequences.

The high-level ``llama_cpp.Llama`` class drives a single sequence; the scheduler needs one
``llama_batch`` carrying rows of several sequences per ``llama_decode``, a sampler chain per
request, and per-sequence KV state, so everything here calls the C functions directly.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import llama_cpp as L
import numpy as np

from erllama.options import LoadOptions, SamplingParams
from erllama.protocol import ErllamaError, ErrorCode, MemoryKind
from erllama.worker.backend import BackendError, BatchRow, Logits
from erllama.worker.fingerprint import files_sha256

log = logging.getLogger(__name__)

GGML_TYPES: Final = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
FLASH_ATTN: Final = {
    "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
SPLIT_MODES: Final = {
    "none": L.LLAMA_SPLIT_MODE_NONE,
    "layer": L.LLAMA_SPLIT_MODE_LAYER,
    "row": L.LLAMA_SPLIT_MODE_ROW,
}
PENALTY_WINDOW_TOKENS: Final = 64
PIECE_BUFFER_BYTES: Final = 256
_GGML_LEVELS: Final = {
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}  # ggml_log_level
# llama_token_data as numpy sees it: a candidates array for sampling from stored logits.
_TOKEN_DATA: Final = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])

# --- llama.cpp's log, routed into ours ----------------------------------------------------------------------

_llama_log = logging.getLogger("llama.cpp")
_recent_errors: deque[str] = deque(maxlen=20)  # quoted in load_failed messages
_last_level = logging.INFO


@L.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    if level != 5:  # 5 = continuation of the previous line
        _last_level = _GGML_LEVELS.get(level, logging.INFO)
    line = text.decode("utf-8", errors="replace").rstrip("\n")
    if not line:
        return
    if _last_level >= logging.WARNING:
        _recent_errors.append(line)
    # llama.cpp is chatty at INFO (every tensor, every KV key): keep that at DEBUG.
    _llama_log.log(logging.DEBUG if _last_level == logging.INFO else _last_level, "%s", line)


_initialized = False


def _init_llama() -> None:
    global _initialized
    if not _initialized:
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
        _initialized = True


def _chain(samplers: Sequence[Any]) -> Any:
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    for s in samplers:
        L.llama_sampler_chain_add(chain, s)
    return chain


class RequestSampler:
    """A request's sampler chain, and on demand a greedy chain for tool-call syntax that shares the
    same grammar and penalty samplers, so both paths see every token and the grammar's state."""

    def __init__(self, chain: Any, shared: list[Any], argmax_only: bool, grammar: Any, greedy_default: bool):
        self.chain = chain
        self.shared = shared
        self.greedy: Any = None
        # Greedy with nothing that reshapes the logits: the token is their argmax, read without the chain
        # (llama.cpp's greedy sampler would first build an n_vocab candidate array for it).
        self.argmax_only = argmax_only
        # Greedy under a grammar and nothing else: the argmax is tried against the grammar alone first
        # (``LlamaBackend.sample``); None when penalties also reshape the logits.
        self.grammar = grammar
        self.greedy_default = greedy_default  # temperature 0: every token is greedy

    def chain_for(self, greedy: bool) -> Any:
        if not greedy:
            return self.chain
        if self.greedy is None:
            self.greedy = _chain(self.shared + [L.llama_sampler_init_greedy()])
        return self.greedy

    def free(self) -> None:
        if self.greedy is not None:
            # The shared samplers belong to the main chain: take them out before freeing this one.
            for _ in self.shared:
                L.llama_sampler_chain_remove(self.greedy, 0)
            L.llama_sampler_free(self.greedy)
        L.llama_sampler_free(self.chain)


def head_dims(model: Any) -> tuple[int, int]:
    """The sizes of the model's K and V attention heads (the GGUF's key/value_length, else n_embd/n_head)."""
    buf = ctypes.create_string_buffer(64)

    def meta(key: str) -> str | None:
        n = L.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    arch = meta("general.architecture") or ""
    n_head = int(L.llama_model_n_head(model))
    default = int(L.llama_model_n_embd(model)) // n_head if n_head > 0 else 0
    k, v = (meta(f"{arch}.attention.{what}_length") for what in ("key", "value"))
    return int(k) if k else default, int(v) if v else default


def context_params(options: LoadOptions, kv_types: tuple[str, str]) -> Any:
    """The ``llama_context_params`` of a model loaded with ``options`` and KV cache ``kv_types`` (also used
    by ``scripts/bench_batching.py``, so its direct loop decodes with exactly the worker's settings)."""
    cp = L.llama_context_default_params()
    # Every sequence may grow to n_ctx tokens: the cache holds n_ctx cells per sequence.
    cp.n_ctx = options.n_ctx * options.n_seq_max
    cp.n_batch = options.n_batch
    cp.n_ubatch = options.n_ubatch
    cp.n_seq_max = options.n_seq_max
    cp.n_threads = cp.n_threads_batch = options.threads
    # Exact mode needs the flash-attention kernel whatever "auto" would pick (options.py).
    cp.flash_attn_type = FLASH_ATTN["on" if options.exact else options.flash_attn]
    cp.type_k, cp.type_v = GGML_TYPES[kv_types[0]], GGML_TYPES[kv_types[1]]
    # Split by default: with one unified buffer, a sequence's logits move (by up to ~0.9 measured
    # here) as other sequences come and go; per-sequence streams keep every sequence's arithmetic
    # independent of its neighbours, for the same memory.
    cp.kv_unified = options.kv_unified
    cp.no_perf = True
    return cp


def memory_kind(model: Any, refuse_unsupported: bool = True) -> MemoryKind:
    """What the model keeps per sequence. Raises ``unsupported_model`` for kinds whose decoding is not
    a causal prompt-then-generate loop (encoder-decoder models need ``llama_encode`` first and abort
    without it; diffusion models do not decode left to right), unless ``refuse_unsupported`` is off
    (``scripts/memory_facts.py`` probes such models through this backend)."""
    if refuse_unsupported and L.llama_model_has_encoder(model):
        raise ErllamaError(
            ErrorCode.UNSUPPORTED_MODEL,
            "encoder-decoder models (T5 and the like) are not supported",
            {"memory": "encoder"},
        )
    if refuse_unsupported and L.llama_model_is_diffusion(model):
        raise ErllamaError(
            ErrorCode.UNSUPPORTED_MODEL, "diffusion models are not supported", {"memory": "diffusion"}
        )
    if L.llama_model_is_hybrid(model):
        return MemoryKind.HYBRID
    if L.llama_model_is_recurrent(model):
        return MemoryKind.RECURRENT
    return MemoryKind.SWA if L.llama_model_n_swa(model) > 0 else MemoryKind.TRANSFORMER


def llama_build_sha256() -> str:
    """The llama.cpp build's identity: the content of the libraries llama-cpp-python loads. Two builds
    of one release may lay out a state differently (compile options, a patched source)."""
    return files_sha256(list((Path(L.__file__).parent / "lib").glob("lib*.so*")))


def _load_error(what: str) -> str:
    return f"{what}: {' | '.join(_recent_errors) or 'no message from llama.cpp'}"


class LlamaBackend:
    """See ``erllama.worker.backend.Backend``."""

    def __init__(self, path: Path, options: LoadOptions, refuse_unsupported: bool = True):
        _init_llama()
        if (options.n_gpu_layers != 0 or options.tensor_split) and not L.llama_supports_gpu_offload():
            raise ErllamaError(
                ErrorCode.NO_GPU, "n_gpu_layers/tensor_split need a GPU build of llama.cpp and a GPU"
            )
        self.options = options
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = options.n_gpu_layers
        mp.split_mode = SPLIT_MODES[options.split_mode]
        mp.main_gpu = options.main_gpu
        if options.tensor_split:
            n = L.llama_max_devices()
            self._tensor_split = (ctypes.c_float * n)(*options.tensor_split[:n])  # kept alive with the model
            mp.tensor_split = self._tensor_split
        mp.load_mode = {
            (True, True): L.LLAMA_LOAD_MODE_MMAP_MLOCK,
            (True, False): L.LLAMA_LOAD_MODE_MMAP,
            (False, True): L.LLAMA_LOAD_MODE_MLOCK,
            (False, False): L.LLAMA_LOAD_MODE_NONE,
        }[(options.use_mmap, options.use_mlock)]
        # Off by default: with AMX, the repacked-weight buffers segfault inside llama_decode.
        mp.use_extra_bufts = options.use_extra_bufts
        _recent_errors.clear()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise ErllamaError(ErrorCode.LOAD_FAILED, _load_error(f"llama.cpp could not load {path}"))
        try:
            self.memory = memory_kind(self.model, refuse_unsupported)
        except ErllamaError:
            L.llama_model_free(self.model)
            raise
        self.n_swa = int(L.llama_model_n_swa(self.model))
        self.kv_types = options.kv_types(*head_dims(self.model))
        self.ctx = L.llama_init_from_model(self.model, context_params(options, self.kv_types))
        if not self.ctx:
            L.llama_model_free(self.model)
            raise ErllamaError(ErrorCode.LOAD_FAILED, _load_error("llama.cpp could not create a context"))
        self.vocab = L.llama_model_get_vocab(self.model)
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_seq_max = options.n_seq_max
        self.n_batch = L.llama_n_batch(self.ctx)
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.n_ctx_seq = min(options.n_ctx, L.llama_n_ctx_seq(self.ctx))
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._embed_ctx: Any = None  # created on the first embed()
        self._piece_buf = ctypes.create_string_buffer(PIECE_BUFFER_BYTES)
        self._candidates = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)  # reused for stored logits
        self._one_candidate = np.zeros(1, dtype=_TOKEN_DATA)  # one token checked against a grammar

    # --- text ----------------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            n = L.llama_token_to_piece(self.vocab, token, self._piece_buf, PIECE_BUFFER_BYTES, 0, False)
            piece = self._piece_buf.raw[: max(n, 0)]
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    # --- decoding ------------------------------------------------------------------------------------------

    def decode(self, rows: Sequence[BatchRow]) -> list[int]:
        b = self.batch
        k = 0
        out = [-1] * len(rows)
        # With per-sequence KV streams llama.cpp splits a batch into one ubatch (one graph compute)
        # per run of ascending, consecutive sequence ids: rows in seq_id order keep 8 streams in one
        # compute (measured here: 154 tok/s in order, ~95 shuffled or reversed).
        for r in sorted(range(len(rows)), key=lambda i: rows[i].seq_id):
            row = rows[r]
            n = len(row.tokens)
            if k + n > self.n_batch:
                raise BackendError("batch_overflow", f"{k + n} tokens exceed n_batch {self.n_batch}")
            for i, tok in enumerate(row.tokens):
                b.token[k + i] = tok
                b.pos[k + i] = row.pos + i
                b.n_seq_id[k + i] = 1
                b.seq_id[k + i][0] = row.seq_id
                b.logits[k + i] = 0
            k += n
            for i in range(k - min(row.n_logits, n), k):
                b.logits[i] = 1
            if row.n_logits:
                out[r] = k - 1
        b.n_tokens = k
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            # 1: no KV slot for the batch; 2: aborted; <0: invalid batch or compute error
            raise BackendError("decode_failed", f"llama_decode returned {rc}")
        return out

    def new_sampler(self, params: SamplingParams, history: Sequence[int]) -> RequestSampler:
        shared: list[Any] = []  # constraints that also guard the greedy path: grammar, penalties
        if params.grammar is not None:
            _recent_errors.clear()
            grammar = L.llama_sampler_init_grammar(self.vocab, params.grammar.encode(), b"root")
            if not grammar:
                raise BackendError(
                    "invalid_grammar", " | ".join(_recent_errors) or "the grammar does not parse"
                )
            shared.append(grammar)
        if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            penalties = L.llama_sampler_init_penalties(
                self.n_vocab,
                PENALTY_WINDOW_TOKENS,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
            # Primed with the prompt before joining a chain: the grammar must not see the prompt.
            for tok in history[-PENALTY_WINDOW_TOKENS:]:
                L.llama_sampler_accept(penalties, tok)
            shared.append(penalties)
        stages = [L.llama_sampler_init_greedy()]
        if params.temperature > 0.0:
            stages = []
            if params.top_k > 0:
                stages.append(L.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                stages.append(L.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                stages.append(L.llama_sampler_init_min_p(params.min_p, 1))
            seed = L.LLAMA_DEFAULT_SEED if params.seed is None else params.seed
            stages += [L.llama_sampler_init_temp(params.temperature), L.llama_sampler_init_dist(seed)]
        greedy = params.temperature <= 0.0
        grammar_only = shared[0] if len(shared) == 1 and params.grammar is not None else None
        return RequestSampler(_chain(shared + stages), shared, not shared and greedy, grammar_only, greedy)

    def sample(self, sampler: RequestSampler, logits: Logits, greedy: bool = False) -> int:
        if sampler.argmax_only:
            return self._argmax_of(logits)  # nothing to accept
        chain = sampler.chain_for(greedy)
        if sampler.grammar is not None and (greedy or sampler.greedy_default):
            token = self._grammar_argmax(sampler.grammar, logits)
            if token is not None:
                L.llama_sampler_accept(chain, token)  # the grammar's state advances as the chain's would
                return token
        if isinstance(logits, int):
            # llama_sampler_sample also accepts the token into the chain (grammar state, penalty history).
            return int(L.llama_sampler_sample(chain, self.ctx, logits))
        # Stored logits: the same steps llama_sampler_sample takes (candidates in vocabulary order, apply
        # the chain, accept), so a token sampled here is the one a fresh decode would have given.
        cand = self._candidates
        cand["id"] = np.arange(self.n_vocab, dtype=np.int32)
        cand["logit"] = np.frombuffer(logits, dtype=np.float32, count=self.n_vocab)
        cand["p"] = 0.0
        arr = L.llama_token_data_array(
            data=cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data)),
            size=self.n_vocab,
            selected=-1,
            sorted=False,
        )
        L.llama_sampler_apply(chain, ctypes.byref(arr))
        token = int(arr.data[arr.selected].id)
        L.llama_sampler_accept(chain, token)
        return token

    def _grammar_argmax(self, grammar: Any, logits: Logits) -> int | None:
        """The argmax of ``logits`` if the grammar allows it, else None. Greedy under a grammar picks the
        first of the largest logits among the tokens the grammar allows; when the overall argmax is
        allowed that is the argmax itself, so checking that one token (instead of the grammar over the
        whole vocabulary, milliseconds a token) gives the same token."""
        token = self._argmax_of(logits)
        one = self._one_candidate
        one["id"], one["logit"], one["p"] = token, 0.0, 0.0
        arr = L.llama_token_data_array(
            data=one.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), size=1, selected=-1, sorted=False
        )
        L.llama_sampler_apply(grammar, ctypes.byref(arr))
        return token if np.isfinite(one["logit"][0]) else None

    def logits_blob(self, logits_index: int) -> bytes:
        return ctypes.string_at(L.llama_get_logits_ith(self.ctx, logits_index), self.n_vocab * 4)

    def argmax(self, logits_index: int) -> int:
        logits = L.llama_get_logits_ith(self.ctx, logits_index)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def _argmax_of(self, logits: Logits) -> int:
        """The first of equal maxima, as llama.cpp's greedy sampler picks: of the context's logits at an
        index, or of stored ones."""
        if isinstance(logits, int):
            return self.argmax(logits)
        return int(np.argmax(np.frombuffer(logits, dtype=np.float32, count=self.n_vocab)))

    def free_sampler(self, sampler: RequestSampler) -> None:
        sampler.free()

    # --- embeddings and adapters ---------------------------------------------------------------------------

    def embed(self, tokens: Sequence[int]) -> list[float]:
        if self._embed_ctx is None:
            cp = L.llama_context_default_params()
            cp.n_ctx = cp.n_batch = cp.n_ubatch = self.options.n_ctx
            cp.n_seq_max = 1
            cp.n_threads = cp.n_threads_batch = self.options.threads
            cp.embeddings = True
            cp.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
            cp.no_perf = True
            self._embed_ctx = L.llama_init_from_model(self.model, cp)
            if not self._embed_ctx:
                self._embed_ctx = None
                raise BackendError(
                    "embed_failed", _load_error("llama.cpp could not create an embeddings context")
                )
        ctx = self._embed_ctx
        n = len(tokens)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = n
            L.llama_memory_seq_rm(L.llama_get_memory(ctx), 0, -1, -1)
            if L.llama_decode(ctx, batch) != 0:
                raise BackendError("embed_failed", "llama_decode failed on the embeddings context")
            dim = L.llama_model_n_embd(self.model)
            vec = np.array(
                np.ctypeslib.as_array(L.llama_get_embeddings_seq(ctx, 0), shape=(dim,)), dtype=np.float64
            )
        finally:
            L.llama_batch_free(batch)
        norm = float(np.linalg.norm(vec))
        return (vec / norm if norm > 0 else vec).tolist()

    def load_adapter(self, path: str) -> Any:
        _recent_errors.clear()
        adapter = L.llama_adapter_lora_init(self.model, path.encode())
        if not adapter:
            raise BackendError("load_failed", _load_error(f"llama.cpp could not load the adapter {path}"))
        return adapter

    def set_adapters(self, adapters: Sequence[tuple[Any, float]]) -> None:
        n = len(adapters)
        arr = (L.llama_adapter_lora_p_ctypes * n)(*(a for a, _ in adapters)) if n else None
        scales = (ctypes.c_float * n)(*(s for _, s in adapters)) if n else None
        if L.llama_set_adapters_lora(self.ctx, arr, n, scales) != 0:
            raise BackendError("adapter_failed", "llama.cpp refused the adapter set")

    def free_adapter(self, adapter: Any) -> None:
        L.llama_adapter_lora_free(adapter)

    # --- sequences -----------------------------------------------------------------------------------------

    def seq_clear(self, seq_id: int) -> None:
        L.llama_memory_seq_rm(self.mem, seq_id, -1, -1)

    def seq_keep(self, seq_id: int, n_held: int, n_keep: int) -> bool:
        if n_keep >= n_held:
            return True
        if self.memory in (MemoryKind.RECURRENT, MemoryKind.HYBRID):
            return False  # one state per sequence: it cannot go back to an earlier position
        if not L.llama_memory_seq_rm(self.mem, seq_id, n_keep, -1):
            return False
        if self.memory is MemoryKind.SWA and n_keep > 0:
            # A state holds the sliding-window layers' cells of only its last ~n_swa positions, and
            # llama_memory_seq_rm succeeds anyway. The next position needs the n_swa before it: the same
            # threshold llama-server applies before it reuses a slot's cache.
            pos_min = L.llama_memory_seq_pos_min(self.mem, seq_id)
            return 0 <= pos_min <= max(0, n_keep - self.n_swa)
        return True

    def seq_state_size(self, seq_id: int) -> int:
        return int(L.llama_state_seq_get_size(self.ctx, seq_id))

    def seq_state(self, seq_id: int) -> bytearray:
        # Returned as is: a bytes() copy of a 40 MB state would cost ~10 ms on the decode thread.
        size = L.llama_state_seq_get_size(self.ctx, seq_id)
        buf = bytearray(size)
        n = L.llama_state_seq_get_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(buf), size, seq_id)
        del buf[n:]  # the size is an upper bound
        return buf

    def seq_restore(self, seq_id: int, state: bytes | bytearray | ctypes.Array[ctypes.c_uint8]) -> None:
        size = len(state)
        src: Any  # a pointer to the state's first byte, however it is held
        if isinstance(state, bytes):
            src = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))  # no copy
        elif isinstance(state, bytearray):  # a state copied from another sequence (prefix sharing)
            src = (ctypes.c_uint8 * size).from_buffer(state)
        else:  # a cached row's bytes where the store keeps them (``LoadedRow.payload_array``)
            src = ctypes.cast(state, ctypes.POINTER(ctypes.c_uint8))
        if L.llama_state_seq_set_data(self.ctx, src, size, seq_id) == 0:
            self.seq_clear(seq_id)
            raise BackendError(
                "restore_failed", f"llama.cpp rejected a {size}-byte state for sequence {seq_id}"
            )

    # --- facts and teardown --------------------------------------------------------------------------------

    def state_layout(self) -> dict[str, Any]:
        o = self.options
        # "auto" enables flash attention wherever the device supports it, which the CPU always does.
        flash_on = o.exact or o.flash_attn == "on" or (o.flash_attn == "auto" and o.n_gpu_layers == 0)
        return {
            "llama.cpp": llama_build_sha256(),
            # Exact and fast kernels compute the same token's KV with different rounding: an exact worker
            # must never restore a row a fast one wrote.
            "kernels": "exact" if o.exact else "fast",
            "type_k": self.kv_types[0],
            "type_v": self.kv_types[1],
            "flash_attn": "on" if flash_on else o.flash_attn,
            "kv_streams": 1 if o.kv_unified else o.n_seq_max,  # a restore refuses a state of another count
            "swa_full": bool(context_params(o, self.kv_types).swa_full),
        }

    def info(self) -> dict[str, Any]:
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, desc, 256)
        template = L.llama_model_chat_template(self.model, None)
        return {
            "backend": "llama.cpp",
            "description": desc.value.decode(errors="replace"),
            "n_params": int(L.llama_model_n_params(self.model)),
            "size_bytes": int(L.llama_model_size(self.model)),
            "n_ctx_train": int(L.llama_model_n_ctx_train(self.model)),
            "n_layer": int(L.llama_model_n_layer(self.model)),
            "n_vocab": self.n_vocab,
            "chat_template": template.decode(errors="replace") if template else None,
            "memory": self.memory.value,
            "n_swa": self.n_swa,
            "type_k": self.kv_types[0],  # in effect (a load option left unset resolves by mode and head size)
            "type_v": self.kv_types[1],
            "bos_token_id": int(L.llama_vocab_bos(self.vocab)),
            "eos_token_id": int(L.llama_vocab_eos(self.vocab)),
            "gpu_offload": bool(L.llama_supports_gpu_offload()),
        }

    def close(self) -> None:
        if self._embed_ctx is not None:
            L.llama_free(self._embed_ctx)
            self._embed_ctx = None
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = self.model = None
