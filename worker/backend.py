"""The interface between the scheduler and a model implementation.

Two implementations exist: ``LlamaBackend`` (llama.cpp through llama-cpp-python's low-level
API, ``llama_backend.py``) and ``StubBackend`` (deterministic, no model file, ``stub_backend.py``)
for fast tests of the layers above. The scheduler only ever talks to this interface.

A backend holds one context with ``n_seq_max`` sequences. One ``decode`` call is one
``llama_decode`` over rows from any number of sequences; afterwards ``sample`` may be called
for every row that asked for logits, until the next ``decode`` overwrites them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from erllama.options import SamplingParams
from erllama.protocol import MemoryKind


@dataclass(slots=True)
class BatchRow:
    """Tokens appended to one sequence in one decode: a prefill chunk or a single decode token."""

    seq_id: int
    tokens: Sequence[int]
    pos: int  # position of tokens[0] in the sequence (== number of tokens already in its KV)
    n_logits: int  # logits for this many trailing tokens (1: sample the next token; 0: none)


class Sampler(Protocol):
    """Opaque per-request sampler state (a llama_sampler chain for the real backend)."""


# Where a token is sampled from: the logits index of a row of the last decode, or the logits a cached
# row carries for its last token (``worker/kvrow.py``).
Logits = int | bytes
S = TypeVar("S")  # a backend's own sampler type: only that backend makes and takes it


class Backend(Protocol[S]):
    n_ctx: int  # KV cells shared by all sequences
    n_ctx_seq: int  # the most tokens one sequence may hold
    n_vocab: int
    n_seq_max: int
    n_batch: int  # the most tokens one decode may carry
    memory: MemoryKind  # what a sequence's KV state holds: decides which rows restore exactly

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text to token ids; ``add_special`` adds BOS where the model wants one."""

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token's piece (may be part of a multi-byte UTF-8 character)."""

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text; invalid UTF-8 is replaced."""

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""

    def decode(self, rows: Sequence[BatchRow]) -> list[int]:
        """Run one decode over all rows. Returns, for each row, the logits index of its last token
        (its other ``n_logits - 1`` are the indices just before), or -1 for rows without logits.
        Raises ``BackendError`` on failure."""

    def new_sampler(self, params: SamplingParams, history: Sequence[int]) -> S:
        """A sampler for one request. ``history`` (the prompt) primes repetition penalties, not the
        grammar. Raises ``BackendError("invalid_grammar")`` for a grammar that does not parse."""

    def sample(self, sampler: S, logits: Logits, greedy: bool = False) -> int:
        """Sample one token from ``logits`` (an index into the last decode, or stored logits) and record
        it in the sampler's state. ``greedy`` takes the most likely token the request's grammar and
        penalties allow (tool-call syntax), instead of the request's own sampling."""

    def logits_blob(self, logits_index: int) -> bytes:
        """A copy of the logits at ``logits_index`` of the last decode, to store with a row."""

    def argmax(self, logits_index: int) -> int:
        """The most likely token at ``logits_index`` of the last decode (speculative verify)."""

    def free_sampler(self, sampler: S) -> None: ...

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """A mean-pooled, L2-normalized embedding of ``tokens`` (an embeddings context of its own)."""

    def set_adapters(self, adapters: Sequence[tuple[Any, float]]) -> None:
        """Apply exactly these (adapter handle, scale) pairs to the context."""

    def load_adapter(self, path: str) -> Any:
        """Load a LoRA adapter file; returns a handle for ``set_adapters``."""

    def free_adapter(self, adapter: Any) -> None: ...

    def seq_clear(self, seq_id: int) -> None:
        """Drop every KV cell of a sequence."""

    def seq_keep(self, seq_id: int, n_held: int, n_keep: int) -> bool:
        """Cut a sequence holding ``n_held`` positions down to its first ``n_keep``. True if it then holds
        exactly the KV a prefill of those positions makes; False if the memory cannot be cut there (a
        recurrent state, or a sliding window that would lack the positions before ``n_keep``), and then
        the sequence must be cleared by the caller."""

    def seq_state_size(self, seq_id: int) -> int:
        """An upper bound of ``seq_state``'s size, computed without copying anything."""

    def seq_state(self, seq_id: int) -> bytes | bytearray:
        """The sequence's KV state (``llama_state_seq_get_data``)."""

    def seq_restore(self, seq_id: int, state: bytes | bytearray | ctypes.Array[ctypes.c_uint8]) -> None:
        """Load a KV state (bytes, a ``seq_state`` copy, or a ctypes array over a cached row) into an
        (empty) sequence. Raises ``BackendError`` if it does not fit."""

    def state_layout(self) -> dict[str, Any]:
        """What fixes the bytes and the layout of a saved sequence state, for the model fingerprint
        (``worker/fingerprint.py``): never the context size or anything else a state does not depend on."""

    def info(self) -> dict[str, Any]:
        """Static facts about the model for ``model_info`` (architecture, sizes, template, ...)."""

    def close(self) -> None: ...


class BackendError(Exception):
    """A backend call failed in a way the scheduler reports to the requests involved."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
