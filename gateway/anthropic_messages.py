"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic Messages API.

The prompt is built by exact replay (gateway/replay.py) from the conversation (gateway/anthropic_request.py);
the reply is streamed or collected as content blocks (gateway/anthropic_stream.py), and remembered for
replay once it is complete. Model names go through the configured aliases (``claude-*`` to a loaded model),
and the configured session header (Claude Code's ``X-Claude-Code-Session-Id``) becomes the request's sticky
``session_id``, so an agent's turns find their sequence still holding the conversation.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from erllama.client import AsyncInferStream, TokenEvent
from erllama.gateway.anthropic_request import (
    CountTokensRequest,
    MessagesRequest,
    conversation,
    reply_identity,
)
from erllama.gateway.anthropic_stream import Blocks, PrefillWatch, sse_body, usage
from erllama.gateway.backend import Backend
from erllama.gateway.config import GatewayConfig
from erllama.gateway.errors import ApiError, bad_param
from erllama.gateway.grammar import schema_grammar, tool_call_schema
from erllama.gateway.openai_common import backend_of, track
from erllama.gateway.parsing import decode_body
from erllama.gateway.replay import Conversation, Prompt
from erllama.gateway.streaming import SSE_HEADERS, ClientGone, until_disconnected
from erllama.gateway.tools import ToolPlan
from erllama.protocol import CompletionResult, ErllamaError

ENDPOINT: Final = "messages"
ANTHROPIC_DEFAULT_TEMPERATURE: Final = 1.0
# how long a stream waits for its first event before it starts: an early refusal (a full queue, a prompt
# over the context) is still an HTTP status; a long prefill gets its message_start and pings
COMMIT_AFTER_S: Final = 2.0
TOOL_ID_CHARS: Final = 24
REPLAYED_HEADER: Final = "x-erllama-replayed-tokens"  # prompt tokens rebuilt from a replay record
_ROOT_RULE: Final = re.compile(r"^root ::=", re.MULTILINE)


def resolve_model(cfg: GatewayConfig, name: str) -> str:
    """The loaded model serving ``name``: the first alias whose glob matches, else ``name`` itself."""
    for pattern, target in cfg.aliases:
        if fnmatch.fnmatchcase(name, pattern):
            return target
    return name


def tool_plan(
    tools: list[dict[str, Any]] | None, choice: dict[str, Any] | None, markers: dict[str, str] | None
) -> ToolPlan:
    """Anthropic's ``tool_choice`` (``auto``, ``any``, ``tool``, ``none``). A forced call is constrained
    by a grammar to one call, written between the model's own markers when it has them, so that the
    worker sees a tool-call span as when the model calls a tool by itself."""
    kind = (choice or {}).get("type", "auto")
    if kind not in ("auto", "any", "tool", "none"):
        raise bad_param("tool_choice.type", "tool_choice.type is auto, any, tool or none.")
    if not tools:
        if kind in ("any", "tool"):
            raise bad_param("tool_choice", "tool_choice needs tools.")
        return ToolPlan(None, None, False)
    if kind in ("auto", "none"):
        return ToolPlan(tools, None, kind == "auto")
    chosen = tools
    if kind == "tool":
        name = (choice or {}).get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise bad_param("tool_choice.name", f"No tool named {name!r} among the tools.")
    grammar = schema_grammar(tool_call_schema(chosen), "tools")
    if markers:
        start, end = markers.get("start", ""), markers.get("end", "")
        call = _ROOT_RULE.sub("tool-call ::=", grammar)
        # json.dumps writes a marker as a GBNF string literal (the same escapes)
        grammar = f"root ::= {_literal(start)} tool-call {_literal(end)}\n{call}"
    return ToolPlan(tools, grammar, False)


def _literal(text: str) -> str:
    return json.dumps(text)


def _params(
    req: MessagesRequest, tools: ToolPlan, thinking_markers: bool, session: str | None
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_tokens": req.max_tokens,
        "temperature": ANTHROPIC_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
    }
    optional = {"top_p": req.top_p, "top_k": req.top_k, "stop": req.stop_sequences or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    if req.grammar is not None and tools.grammar is not None:
        raise bad_param("grammar", "grammar cannot be combined with a forced tool call.")
    if (grammar := req.grammar or tools.grammar) is not None:
        params["grammar"] = grammar
    thinking = req.thinking or {}
    if thinking.get("type") not in (None, "enabled", "disabled", "adaptive"):
        raise bad_param("thinking.type", "thinking.type is enabled or disabled.")
    if thinking_markers:  # the model's thinking is always its own block, never reply text
        params["thinking"] = True
        budget = thinking.get("budget_tokens")
        if thinking.get("type") == "enabled" and budget is not None:
            if not isinstance(budget, int) or budget < 1:
                raise bad_param("thinking.budget_tokens", "budget_tokens is a positive integer.")
            params["thinking_budget_tokens"] = budget
    if session:
        params["session_id"] = session
    return params


async def _prepare(
    request: Request, backend: Backend, req: MessagesRequest | CountTokensRequest
) -> tuple[str, Conversation, ToolPlan, Prompt, dict[str, str] | None, bool]:
    model = resolve_model(backend.cfg, req.model)
    track(request, model, ENDPOINT)
    facts = await backend.facts(model)
    markers = facts.tool_call_markers
    conv = conversation(model, req.system, req.messages, req.tools, backend.cfg.system_normalize, markers)
    tools = tool_plan(conv.tools, req.tool_choice, markers)
    prompt = await backend.replay.prompt(backend.client, conv)
    return model, conv, tools, prompt, markers, bool(facts.thinking_markers)


async def count_tokens(request: Request) -> Response:
    """The prompt's length in tokens, as ``messages`` would build it (replay included)."""
    backend = backend_of(request)
    req = decode_body(await request.body(), CountTokensRequest)
    _, _, _, prompt, _, _ = await _prepare(request, backend, req)
    return JSONResponse({"input_tokens": len(prompt.tokens)})


async def messages(request: Request) -> Response:
    backend = backend_of(request)
    req = decode_body(await request.body(), MessagesRequest)
    if req.max_tokens < 1:
        raise bad_param("max_tokens", "max_tokens must be at least 1.")
    model, conv, tools, prompt, markers, thinks = await _prepare(request, backend, req)
    session = request.headers.get(backend.cfg.session_header)
    stream = await backend.client.infer(model, prompt.tokens, **_params(req, tools, thinks, session))
    message_id = f"msg_{stream.request_id}"
    replay = backend.replay
    blocks = Blocks(
        tools,
        markers,
        sign=lambda text: replay.sign("thinking", text),
        tool_id=lambda i: "toolu_" + replay.sign("tool_use", message_id, str(i))[:TOOL_ID_CHARS],
    )
    message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }

    def done(result: CompletionResult) -> None:
        backend.metrics.observe(model, ENDPOINT, result)
        if result.generated and result.finish_reason != "cancelled":
            replay.remember(conv, reply_identity(blocks.blocks, markers), prompt.tokens, result.generated)

    def failed(err: ErllamaError | ApiError) -> None:
        backend.metrics.failed(model, ENDPOINT, err.code if isinstance(err, ErllamaError) else str(err.code))

    if req.stream:
        events = aiter(stream)
        first = asyncio.ensure_future(anext(events))
        await _commit_or_fail(request, stream, first)
        prefill = PrefillWatch(backend.client, model)
        ping_s = backend.cfg.ping_interval_s
        body = sse_body(
            stream, first, events, blocks, message, len(prompt.tokens), prefill, ping_s, done, failed
        )
        headers = {**SSE_HEADERS, REPLAYED_HEADER: str(prompt.replayed_tokens)}
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)
    result = await until_disconnected(request, _collect(stream, blocks))
    done(result)
    message.update(
        content=blocks.blocks,
        stop_reason=blocks.stop_reason(result),
        stop_sequence=result.stop_sequence,
        usage=usage(result),
    )
    return JSONResponse(message, headers={REPLAYED_HEADER: str(prompt.replayed_tokens)})


async def _commit_or_fail(
    request: Request, stream: AsyncInferStream, first: asyncio.Future[TokenEvent]
) -> None:
    """Wait up to COMMIT_AFTER_S for the first event; an error by then raises (an HTTP status)."""
    try:
        await until_disconnected(request, asyncio.wait({first}, timeout=COMMIT_AFTER_S))
    except ClientGone:
        first.cancel()
        await stream.cancel()
        raise
    if first.done() and not first.cancelled() and isinstance(first.exception(), ErllamaError):
        first.result()


async def _collect(stream: AsyncInferStream, blocks: Blocks) -> CompletionResult:
    async for ev in stream:
        blocks.feed(ev)
    blocks.finish()
    assert stream.result is not None
    return stream.result
