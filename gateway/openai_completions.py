"""``POST /v1/completions``: a text or token-id prompt continued as is (no template)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from erllama.client import AsyncInferStream, TokenEvent
from erllama.gateway.errors import bad_param
from erllama.gateway.openai_common import backend_of, finish_reason, track, usage
from erllama.gateway.parsing import decode_body
from erllama.gateway.sampling import SamplingFields, infer_params
from erllama.gateway.streaming import opened, sse, sse_response, until_disconnected
from erllama.protocol import ErllamaError

ENDPOINT = "completions"
# Asked for by scripts/bench_gateway.py: each streamed event carries, as an SSE comment (which clients
# ignore), the worker's CLOCK_MONOTONIC when it sent the token, to measure the time the gateway adds.
TIMING_HEADER: Final = "x-erllama-timing"
OPENAI_DEFAULT_MAX_TOKENS: Final = 16  # the legacy endpoint's documented default


class CompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[Any]  # text, token ids, or a batch of one of either (checked by single_prompt)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def single_prompt(prompt: str | list[Any]) -> str | list[int]:
    """The one prompt of a request: a string or token ids (a batch of several is refused)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_param("prompt", "Only one prompt per request is supported.", "unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise bad_param("prompt", "A prompt is a string or a list of token ids.", "invalid_type")
    return prompt


async def completions(request: Request) -> Response:
    backend = backend_of(request)
    req = decode_body(await request.body(), CompletionRequest)
    track(request, req.model, ENDPOINT)
    unsupported = {"echo": req.echo, "suffix": req.suffix, "best_of": req.best_of not in (None, 1)}
    for name, used in unsupported.items():
        if used:
            raise bad_param(name, f"{name} is not supported by this server.", "unsupported_parameter")
    prompt = single_prompt(req.prompt)
    params = infer_params(req, OPENAI_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens)
    stream = await backend.client.infer(req.model, prompt, **params)
    head = {"id": f"cmpl-{stream.request_id}", "created": int(time.time()), "model": req.model}
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def on_error(err: ErllamaError) -> None:
            backend.metrics.failed(req.model, ENDPOINT, err.code)

        timing = TIMING_HEADER in request.headers
        events = await opened(request, stream)
        return sse_response(stream, _events(request, stream, events, head, include_usage, timing), on_error)
    result = await until_disconnected(request, stream.collect())
    backend.metrics.observe(req.model, ENDPOINT, result)
    choice = {"index": 0, "text": result.reply, "finish_reason": finish_reason(result), "logprobs": None}
    return JSONResponse({**head, "object": "text_completion", "choices": [choice], "usage": usage(result)})


async def _events(
    request: Request,
    stream: AsyncInferStream,
    events: AsyncIterator[TokenEvent],
    head: dict[str, Any],
    include_usage: bool,
    timing: bool,
) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None) -> str:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return sse({**head, "object": "text_completion", "choices": [choice]})

    async for ev in events:
        if ev.kind == "text" and ev.text:
            yield f": sent_ns={ev.sent_ns}\n{chunk(ev.text)}" if timing else chunk(ev.text)
    result = stream.result
    assert result is not None
    backend_of(request).metrics.observe(head["model"], ENDPOINT, result)
    yield chunk("", finish_reason(result))
    if include_usage:
        yield sse({**head, "object": "text_completion", "choices": [], "usage": usage(result)})
