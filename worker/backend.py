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


@dataclass(slots=True)
class BatchRow:
    """Tokens appended to one sequence in one decode: a prefill chunk or a single decode token."""

    seq_id: int
    tokens: Sequence[int]
    pos: int  # position of tokens[0] in the sequence (== number of tokens already in its KV)
    n_logits: int  # logits for this many trailing tokens (1: sample the next token; 0: none)


class Sampler(Protocol):
    """Opaque per-request sampler state (a llama_sampler chain for the real backend)."""


S = TypeVar("S")  # a backend's own sampler type: only that backend makes and takes it


class Backend(Protocol[S]):
    n_ctx: int  # KV cells shared by all sequences
    n_ctx_seq: int  # the most tokens one sequence may hold
    n_vocab: int
    n_seq_max: int
    n_batch: int  # the most tokens one decode may carry

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

    def sample(self, sampler: S, logits_index: int, greedy: bool = False) -> int:
        """Sample one token from the logits at ``logits_index`` of the last decode and record it in
        the sampler's state. ``greedy`` takes the most likely token the request's grammar and
        penalties allow (tool-call syntax), instead of the request's own sampling."""

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

    def seq_truncate(self, seq_id: int, n_keep: int) -> None:
        """Keep the first ``n_keep`` positions of a sequence, drop the rest."""

    def seq_state(self, seq_id: int) -> bytes | bytearray:
        """The sequence's KV state (``llama_state_seq_get_data``)."""

    def seq_restore(self, seq_id: int, state: bytes | bytearray | ctypes.Array[ctypes.c_uint8]) -> None:
        """Load a KV state (bytes, a ``seq_state`` copy, or a ctypes array over a cached row) into an
        (empty) sequence. Raises ``BackendError`` if it does not fit."""

    def info(self) -> dict[str, Any]:
        """Static facts about the model for ``model_info`` (architecture, sizes, template, ...)."""

    def close(self) -> None: ...


class BackendError(Exception):
    """A backend call failed in a way the scheduler reports to the requests involved."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
