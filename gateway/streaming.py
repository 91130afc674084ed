"""Server-sent events and client disconnects.

A stream is ``data: <json>`` events and ``data: [DONE]``; an error after the stream started becomes one
``data:`` event carrying the OpenAI error object (the status line is gone by then). A client that goes
away cancels its request at once: for a stream, Starlette stops the event generator and its ``finally``
cancels the request; for a plain request, ``until_disconnected`` races the work against the client's
``http.disconnect`` and cancels the work, which cancels the request at the broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from erllama.client import AsyncInferStream, TokenEvent
from erllama.gateway.errors import sse_error
from erllama.protocol import ErllamaError

log = logging.getLogger(__name__)
T = TypeVar("T")

DONE_EVENT: Final = "data: [DONE]\n\n"
SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_response(
    stream: AsyncInferStream, events: AsyncIterator[str], on_error: Callable[[ErllamaError], None]
) -> StreamingResponse:
    """A ``text/event-stream`` of ``events`` (already rendered), then ``[DONE]``. ``stream`` is cancelled
    at the broker when the client leaves early; ``on_error`` hears about a failure mid-stream."""

    async def body() -> AsyncIterator[str]:
        settled = False  # the request ended (done or failed): nothing to cancel
        try:
            try:
                async for event in events:
                    yield event
            except ErllamaError as err:
                settled = True
                on_error(err)
                yield sse_error(err)
            yield DONE_EVENT
        finally:
            if stream.result is None and not settled:
                await _cancel_quietly(stream)

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _cancel_quietly(stream: AsyncInferStream) -> None:
    try:
        await asyncio.shield(stream.cancel())
    except (ErllamaError, asyncio.CancelledError):
        pass
    log.info("request %s: the client left; cancelled", stream.request_id)


async def opened(request: Request, stream: AsyncInferStream) -> AsyncIterator[TokenEvent]:
    """The stream's events once the first has arrived. An error before it (a full queue, a prompt over
    the context, a bad grammar) raises here, while the HTTP status can still say it."""
    events = aiter(stream)
    try:
        first: TokenEvent | None = await until_disconnected(request, anext(events))
    except StopAsyncIteration:
        first = None
    return _prepend(first, events)


async def _prepend(first: TokenEvent | None, rest: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    if first is not None:
        yield first
    async for ev in rest:
        yield ev


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled (an awaited
    ``complete`` cancels its request at the broker) and ``ClientGone`` raised."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()
    return task.result()
