"""The request fields every OpenAI generation endpoint shares, and their translation into erllama's
``infer`` parameters (OpenAI's defaults, not erllama's: ``temperature`` 1 unless the request says)."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from erllama.gateway.errors import bad_param

OPENAI_DEFAULT_TEMPERATURE: Final = 1.0


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields of ``/v1/chat/completions`` and ``/v1/completions`` alike. ``top_k``, ``min_p``,
    ``repetition_penalty`` and ``grammar`` (GBNF) are the llama.cpp extensions llama-server accepts too."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    grammar: str | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    user: str | None = None


def infer_params(req: SamplingFields, max_tokens: int) -> dict[str, Any]:
    """erllama ``infer`` parameters for ``req``; what erllama cannot do exactly is a 400 naming it."""
    if req.n not in (None, 1):
        raise bad_param("n", "Only n=1 is supported.", "unsupported_value")
    if req.logprobs not in (None, False, 0) or req.top_logprobs not in (None, 0):
        param = "logprobs" if req.logprobs not in (None, False, 0) else "top_logprobs"
        raise bad_param(param, "logprobs are not supported by this server.", "unsupported_parameter")
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
    }
    optional = {
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "seed": req.seed,
        "stop": req.stop,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "grammar": req.grammar,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params
