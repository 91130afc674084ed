"""``POST /v1/chat/completions``: messages rendered with the model's own chat template, the reply
plain or streamed, with tool calls, structured output and reasoning text."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from erllama.client import AsyncInferStream, TokenEvent
from erllama.gateway.errors import bad_param
from erllama.gateway.grammar import response_format_grammar
from erllama.gateway.openai_common import backend_of, finish_reason, track, usage
from erllama.gateway.parsing import decode_body
from erllama.gateway.replay_openai import openai_conversation, openai_identity
from erllama.gateway.sampling import SamplingFields, infer_params
from erllama.gateway.streaming import opened, sse, sse_response, until_disconnected
from erllama.gateway.tools import ToolCall, ToolPlan, parse_call, plan, strip_markers
from erllama.protocol import CompletionResult, ErllamaError

ENDPOINT = "chat"


class ChatRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def _text_of(content: Any, where: str) -> Any:
    """OpenAI content parts (``[{"type": "text", "text": ...}]``) as the plain text a template takes."""
    if not isinstance(content, list):
        return content
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_param(f"{where}[{i}]", "Only text content parts are supported.", "unsupported_content")
        texts.append(part["text"])
    return "".join(texts)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if "content" in m:
            m["content"] = _text_of(m["content"], f"messages[{i}].content")
        if m.get("content") is None and m.get("tool_calls"):  # OpenAI sends null beside tool calls
            m["content"] = ""
        if m.get("role") == "developer":  # OpenAI's newer name for the system role
            m["role"] = "system"
        out.append(m)
    return out


class _Reply:
    """One request's answer under construction: the calls and the reasoning text, by the model's markers."""

    def __init__(self, tools: ToolPlan, markers: dict[str, str] | None, thinking: dict[str, str] | None):
        self.tools = tools
        self.markers = markers
        self.thinking = thinking
        self.calls: list[ToolCall] = []

    def reasoning(self, text: str) -> str:
        for marker in (self.thinking or {}).values():
            text = text.replace(marker, "")
        return text

    def call_of_span(self, span: str) -> ToolCall | None:
        return parse_call(strip_markers(span, self.markers)) if self.tools.auto else None

    def finish(self, result: CompletionResult) -> str:
        return "tool_calls" if self.calls else finish_reason(result)


async def chat_completions(request: Request) -> Response:
    backend = backend_of(request)
    req = decode_body(await request.body(), ChatRequest)
    track(request, req.model, ENDPOINT)
    tools = plan(req.tools, req.tool_choice)
    grammar = response_format_grammar(req.response_format)
    for param, other in (("grammar", req.grammar), ("tool_choice", tools.grammar)):
        if other is not None:
            if grammar is not None:
                raise bad_param(param, f"{param} cannot be combined with another output constraint.")
            grammar = other
    conv = openai_conversation(req.model, normalize_messages(req.messages), tools.tools)
    prompt = (await backend.replay.prompt(backend.client, conv)).tokens  # exact replay of earlier replies
    facts = await backend.facts(req.model)
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = infer_params(req, limit if limit is not None else max(facts.n_ctx - len(prompt), 1))
    if grammar is not None:
        params["grammar"] = grammar
    if facts.thinking_markers:
        params["thinking"] = True
    stream = await backend.client.infer(req.model, prompt, **params)
    reply = _Reply(tools, facts.tool_call_markers, facts.thinking_markers)

    def remember(result: CompletionResult, message: dict[str, Any]) -> None:
        if result.generated and result.finish_reason != "cancelled":
            backend.replay.remember(conv, openai_identity(message), prompt, result.generated)

    head = {"id": f"chatcmpl-{stream.request_id}", "created": int(time.time()), "model": req.model}
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def on_error(err: ErllamaError) -> None:
            backend.metrics.failed(req.model, ENDPOINT, err.code)

        events = await opened(request, stream)
        body = _events(request, stream, events, reply, head, include_usage, remember)
        return sse_response(stream, body, on_error)
    result = await until_disconnected(request, stream.collect())
    backend.metrics.observe(req.model, ENDPOINT, result)
    completion = _completion(result, reply, head)
    remember(result, completion["choices"][0]["message"])
    return JSONResponse(completion)


def _completion(result: CompletionResult, reply: _Reply, head: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.reply}
    if reply.tools.forced:
        call = parse_call(result.reply)
        if call is not None:
            reply.calls.append(call)
    else:
        reply.calls += [c for span in result.tool_calls if (c := reply.call_of_span(span)) is not None]
    if reply.calls:
        message["content"] = None if reply.tools.forced or not result.reply else result.reply
        message["tool_calls"] = [c.as_message() for c in reply.calls]
    if result.thinking:
        message["reasoning_content"] = reply.reasoning("".join(result.thinking))
    choice = {"index": 0, "message": message, "finish_reason": reply.finish(result), "logprobs": None}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(result)}


async def _events(
    request: Request,
    stream: AsyncInferStream,
    events: AsyncIterator[TokenEvent],
    reply: _Reply,
    head: dict[str, Any],
    include_usage: bool,
    remember: Callable[[CompletionResult, dict[str, Any]], None],
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

    def call_chunks(call: ToolCall) -> list[str]:
        index = len(reply.calls)
        reply.calls.append(call)
        opening = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        return [
            chunk({"tool_calls": [opening]}),
            chunk({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}),
        ]

    yield chunk({"role": "assistant", "content": ""})
    held: list[str] = []  # a forced call's JSON: sent as a call once complete
    sent: list[str] = []
    async for ev in events:
        if ev.kind == "text" and ev.text:
            if reply.tools.forced:
                held.append(ev.text)
            else:
                sent.append(ev.text)
                yield chunk({"content": ev.text})
        elif ev.kind == "thinking" and (text := reply.reasoning(ev.text)):
            yield chunk({"reasoning_content": text})
        elif ev.kind == "tool_call_end" and (call := reply.call_of_span(ev.text)) is not None:
            for c in call_chunks(call):
                yield c
    result = stream.result
    assert result is not None
    if held:
        call = parse_call("".join(held))
        for c in call_chunks(call) if call is not None else [chunk({"content": "".join(held)})]:
            yield c
    backend_of(request).metrics.observe(head["model"], ENDPOINT, result)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(sent) or None}
    if reply.calls:
        message["tool_calls"] = [c.as_message() for c in reply.calls]
    remember(result, message)
    yield chunk({}, reply.finish(result))
    if include_usage:
        yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(result)})
