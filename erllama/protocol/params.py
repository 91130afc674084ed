"""Per-request parameters: one typed definition whose constraints are checked wherever it is decoded.

The broker turns a client's ``params`` map into ``SamplingParams`` once (``erllama.options.parse_sampling``,
which maps a failure to ``invalid_params``); from there the parameters travel typed, inside ``run``, and
the worker's decoder checks the same constraints again in C as part of decoding the message (a ``run``
that breaks them never came from our broker and is a ``protocol_error``). llama.cpp asserts, and so kills
the worker, on many out-of-range values: every bound it needs is here.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from erllama.protocol.codes import MAX_ID_CHARS, MAX_STOP_SEQUENCE_BYTES, MAX_STOP_SEQUENCES, MAX_TOKENS_LIMIT

DEFAULT_MAX_TOKENS: Final = 256
MAX_GRAMMAR_BYTES: Final = 256 * 1024
MAX_VERIFY_TOKENS: Final = 256
ROW_KEY_PATTERN: Final = re.compile(r"^[0-9a-f]{64}$")

_Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
_Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
_TokenId = Annotated[int, Meta(ge=0, le=1 << 31)]


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-request settings: sampling (``temperature`` 0 is greedy; ``seed`` None is random) and how
    the request meets the cache (``session_id`` pins its sequence between requests, ``parent_key``
    names an earlier request's ``finish_key`` to resume from)."""

    max_tokens: Annotated[int, Meta(ge=0, le=MAX_TOKENS_LIMIT)] = DEFAULT_MAX_TOKENS
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    top_k: Annotated[int, Meta(ge=0, le=1 << 20)] = 0
    top_p: _Probability = 1.0
    min_p: _Probability = 0.0
    repetition_penalty: Annotated[float, Meta(ge=1e-3, le=10.0)] = 1.0  # llama.cpp needs > 0 (1 = off)
    # OpenAI's: subtracted from a token's logit once it has appeared at all / per time it has appeared
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    seed: Annotated[int, Meta(ge=0, le=2**32 - 2)] | None = None  # 2**32-1 is llama.cpp's "random"
    stop: Annotated[tuple[Annotated[str, Meta(min_length=1)], ...], Meta(max_length=MAX_STOP_SEQUENCES)] = ()
    session_id: _Id | None = None
    parent_key: Annotated[str, Meta(pattern=ROW_KEY_PATTERN.pattern)] | None = None  # a finish_key
    grammar: str | None = None  # GBNF with a "root" rule; parsed at admission (invalid_grammar)
    thinking: bool = False  # stream thinking spans as thinking deltas (needs the model's thinking_markers)
    thinking_budget_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    # speculative verify: the candidate tokens after the prompt
    verify: Annotated[tuple[_TokenId, ...], Meta(min_length=1, max_length=MAX_VERIFY_TOKENS)] | None = None

    def __post_init__(self) -> None:
        # Byte lengths: what Meta cannot say (it counts characters). msgspec reports a ValueError
        # raised here as a validation error of the whole struct.
        if any(len(s.encode()) > MAX_STOP_SEQUENCE_BYTES for s in self.stop):
            raise ValueError(f"stop: a stop sequence is longer than {MAX_STOP_SEQUENCE_BYTES} bytes")
        if self.grammar is not None and (
            not self.grammar.strip() or len(self.grammar.encode()) > MAX_GRAMMAR_BYTES
        ):
            raise ValueError(f"grammar: expected GBNF text of at most {MAX_GRAMMAR_BYTES} bytes")


SAMPLING_KEYS: Final = frozenset(SamplingParams.__struct_fields__)
