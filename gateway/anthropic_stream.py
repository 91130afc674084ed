"""A request's token events as Anthropic content blocks and stream events.

One ``Blocks`` turns the worker's events (text, thinking deltas and ends, tool-call ends) into the
exact event sequence Anthropic streams: per block ``content_block_start``, its deltas (``text_delta``,
``thinking_delta`` then one ``signature_delta``, one ``input_json_delta``) and ``content_block_stop``,
indexes 0, 1, 2...; the plain response is the same blocks collected, so the two never disagree.

``sse_body`` frames them: ``message_start``, the blocks, ``message_delta`` (stop reason and usage),
``message_stop``. Until the first token arrives, every ping interval it sends a ``ping`` if the model's
worker is prefilling and has decoded prompt tokens since the last look (``PrefillWatch``: a long prompt
on a CPU takes minutes, and the ping tells the client that it is being worked on), and nothing while no
prompt makes progress (the request waits behind replies being generated, or the worker is stuck). An
error after ``message_start`` is an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

from erllama.client import AsyncClient, AsyncInferStream, TokenEvent
from erllama.gateway.anthropic_errors import anthropic_error_event
from erllama.gateway.errors import ApiError
from erllama.gateway.tools import ToolPlan, parse_call, strip_markers
from erllama.protocol import CompletionResult, ErllamaError

log = logging.getLogger(__name__)

PREFILLING: Final = "prefilling"


def event(kind: str, payload: dict[str, Any]) -> str:
    data = json.dumps({"type": kind, **payload}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n"


class Blocks:
    """The reply's content blocks as they form; ``feed`` returns the stream events each token event makes."""

    def __init__(
        self,
        tools: ToolPlan,
        markers: dict[str, str] | None,
        sign: Callable[[str], str],
        tool_id: Callable[[int], str],
    ):
        self.tools = tools
        self.markers = markers
        self.sign = sign  # thinking text -> signature
        self.tool_id = tool_id  # call index -> id
        self.blocks: list[dict[str, Any]] = []
        self.open: str | None = None  # the kind of the open block (text or thinking)
        self.held: list[str] = []  # a forced call without markers: the whole reply is its JSON
        self.calls = 0

    def _start(self, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = self._close()
        self.blocks.append(block)
        self.open = block["type"]
        start = dict(block)
        if block["type"] == "tool_use":
            start["input"] = {}
        elif block["type"] == "thinking":
            start["signature"] = ""
        return [*out, ("content_block_start", {"index": len(self.blocks) - 1, "content_block": start})]

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"index": len(self.blocks) - 1})]

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return ("content_block_delta", {"index": len(self.blocks) - 1, "delta": delta})

    def feed(self, ev: TokenEvent) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        if ev.kind == "text" and ev.text:
            if self.tools.forced and not self.markers:
                self.held.append(ev.text)
                return out
            if self.open != "text":
                out += self._start({"type": "text", "text": ""})
            self.blocks[-1]["text"] += ev.text
            out.append(self._delta({"type": "text_delta", "text": ev.text}))
        elif ev.kind == "thinking" and ev.text:
            if self.open != "thinking":
                out += self._start({"type": "thinking", "thinking": "", "signature": ""})
            self.blocks[-1]["thinking"] += ev.text
            out.append(self._delta({"type": "thinking_delta", "thinking": ev.text}))
        elif ev.kind == "thinking_end":
            if self.open != "thinking":  # an empty block: still a block, so its signature is kept
                out += self._start({"type": "thinking", "thinking": "", "signature": ""})
            block = self.blocks[-1]
            block["signature"] = self.sign(block["thinking"])
            out.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
            out += self._close()
        elif ev.kind == "tool_call_end":
            out += self._call(strip_markers(ev.text, self.markers), ev.text)
        return out

    def _call(self, text: str, raw: str) -> list[tuple[str, dict[str, Any]]]:
        offered = self.tools.auto or self.tools.forced
        call = parse_call(text) if offered else None
        if call is None:  # not a call (or calls were not asked for): the model's text, as it wrote it
            if self.open != "text":
                out = self._start({"type": "text", "text": ""})
            else:
                out = []
            self.blocks[-1]["text"] += raw
            return [*out, self._delta({"type": "text_delta", "text": raw})]
        arguments = json.loads(call.arguments)
        block = {"type": "tool_use", "id": self.tool_id(self.calls), "name": call.name, "input": arguments}
        self.calls += 1
        out = self._start(block)
        out.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        return [*out, *self._close()]

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        if self.held:
            out += self._call("".join(self.held), "".join(self.held))
        return [*out, *self._close()]

    def stop_reason(self, result: CompletionResult) -> str:
        if self.calls:
            return "tool_use"
        if result.stop_sequence is not None:
            return "stop_sequence"
        return "max_tokens" if result.finish_reason == "length" else "end_turn"


def usage(result: CompletionResult) -> dict[str, int]:
    """Anthropic usage: ``input_tokens`` are the prompt tokens neither read from nor written to the cache."""
    prompt = result.stats.prompt_tokens
    read = int(result.cache_delta.get("read", 0))
    created = int(result.cache_delta.get("created", 0))
    return {
        "input_tokens": max(prompt - read - created, 0),
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "output_tokens": result.stats.completion_tokens,
    }


@dataclass(slots=True)
class PrefillWatch:
    """Whether a model's worker made prefill progress since the last look: it is prefilling and its
    count of prompt tokens decoded (``model_info``'s ``tokens_prefilled``, from its heartbeats) grew."""

    client: AsyncClient
    model: str
    seen: int | None = None  # the count at the last look; None before the first

    async def progressed(self) -> bool:
        info = await self.client.model_info(self.model)
        count = int(info.get("tokens_prefilled", 0))
        before, self.seen = self.seen, count
        return info.get("phase") == PREFILLING and before is not None and count > before


async def _with_pings(
    first: asyncio.Future[TokenEvent],
    events: AsyncIterator[TokenEvent],
    prefill: PrefillWatch,
    interval_s: float,
) -> AsyncIterator[tuple[str, TokenEvent | None]]:
    """The stream's events (``first`` is the pending first one), with ("ping", None) every ``interval_s``
    before the first while the model's prefill makes progress."""
    try:
        if not first.done():
            await prefill.progressed()  # the count to measure progress from
        while True:
            done, _ = await asyncio.wait({first}, timeout=interval_s)
            if done:
                break
            if await prefill.progressed():
                yield ("ping", None)
    finally:
        if not first.done():
            first.cancel()
    try:
        yield ("event", first.result())
    except StopAsyncIteration:
        return
    async for ev in events:
        yield ("event", ev)


async def sse_body(
    stream: AsyncInferStream,
    first: asyncio.Future[TokenEvent],
    events: AsyncIterator[TokenEvent],
    blocks: Blocks,
    message: dict[str, Any],
    prompt_tokens: int,
    prefill: PrefillWatch,
    ping_interval_s: float,
    on_done: Callable[[CompletionResult], None],
    on_error: Callable[[ErllamaError | ApiError], None],
) -> AsyncIterator[str]:
    """The whole Anthropic event stream of one request. The request is cancelled if the client leaves."""
    settled = False
    try:
        start_usage = {"input_tokens": prompt_tokens, "output_tokens": 0}
        yield event("message_start", {"message": {**message, "usage": start_usage}})
        try:
            async for what, ev in _with_pings(first, events, prefill, ping_interval_s):
                if ev is None:
                    yield event(what, {})
                    continue
                for kind, payload in blocks.feed(ev):
                    yield event(kind, payload)
            for kind, payload in blocks.finish():
                yield event(kind, payload)
        except (ErllamaError, ApiError) as err:
            settled = True
            on_error(err)
            yield anthropic_error_event(err)
            return
        result = stream.result
        assert result is not None
        settled = True
        on_done(result)
        delta = {"stop_reason": blocks.stop_reason(result), "stop_sequence": result.stop_sequence}
        yield event("message_delta", {"delta": delta, "usage": usage(result)})
        yield event("message_stop", {})
    finally:
        if stream.result is None and not settled:
            try:
                await asyncio.shield(stream.cancel())
            except (ErllamaError, asyncio.CancelledError):
                pass
            log.info("request %s: the client left; cancelled", stream.request_id)
