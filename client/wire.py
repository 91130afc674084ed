"""The client's wire code, shared by every client whatever its I/O (the threaded ``Client``, an asyncio one).

Outgoing: ``new_request_id``, ``infer_request`` and ``load_request`` (the other requests are the protocol's messages
built directly, e.g. ``ListModels(id=new_request_id())``), packed with ``encode``. Incoming: a
``ReplyDecoder`` per socket turns a frame into the typed events of the requests it concerns (a tick's
tokens for several streams come as one message; none, logged, for one the broker should never have sent); ``reply_result`` turns the answer to a request into its result or raises its error;
``stream_step`` turns a stream's event into a ``TokenEvent`` or, at its end, the ``CompletionResult``.
"""

from __future__ import annotations

import logging
import operator
import uuid
from collections.abc import Sequence
from typing import Any

from erllama.client.results import CompletionResult, TokenEvent
from erllama.protocol import (
    ErllamaError,
    ErrorCode,
    ErrorReply,
    Infer,
    LoadModel,
    Reply,
    RequestEvent,
    StreamDone,
    StreamSpanEnd,
    StreamStep,
    StreamTokens,
    WireError,
    as_exception,
    client_event_decoder,
    encode,
)

log = logging.getLogger(__name__)

__all__ = [
    "ReplyDecoder",
    "connection_lost",
    "encode",
    "infer_request",
    "load_request",
    "new_request_id",
    "reply_result",
    "stream_step",
]


def new_request_id() -> str:
    """A client request id: unique, so replies can be routed by it."""
    return uuid.uuid4().hex


def infer_request(
    request_id: str, model_id: str, prompt: str | Sequence[int], params: dict[str, Any]
) -> Infer:
    """An ``infer``; token ids are checked to be integers here (``invalid_params``), the rest by the broker."""
    try:
        wire_prompt: str | list[Any] = (
            prompt if isinstance(prompt, str) else [operator.index(t) for t in prompt]
        )
    except TypeError:
        raise ErllamaError(ErrorCode.INVALID_PARAMS, "prompt: token ids must be integers") from None
    return Infer(id=request_id, model=model_id, prompt=wire_prompt, params=params)


def load_request(
    model_id: str,
    model_path: str | None,
    host: str | None,
    hosts: list[str] | None,
    replicas: int | None,
    options: dict[str, Any],
) -> LoadModel:
    """A ``load_model`` (placement and options are checked by the broker)."""
    return LoadModel(
        id=new_request_id(),
        model=model_id,
        path=model_path,
        options=options,
        host=host,
        hosts=hosts,
        replicas=replicas,
    )


class ReplyDecoder:
    """Frames from the broker to typed events (one per socket)."""

    def __init__(self) -> None:
        self._decoder = client_event_decoder()

    def decode(self, frame: bytes | memoryview) -> Sequence[RequestEvent]:
        try:
            event = self._decoder.decode(frame)
        except WireError as err:
            log.warning("undecodable message from the broker: %s", err)
            return ()
        return event.steps if isinstance(event, StreamTokens) else (event,)


def connection_lost(code: ErrorCode, message: str) -> ErrorReply:
    """The event every waiting request gets when the connection (or the client) goes away."""
    return ErrorReply(id=None, code=code.value, message=message, detail={"retryable": True})


def reply_result(event: RequestEvent) -> Any:
    """The ``result`` of a request's answer; its error raised."""
    if isinstance(event, ErrorReply):
        raise as_exception(event)
    if isinstance(event, Reply):
        return event.result
    raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"unexpected {type(event).__name__} in answer to a request")


def stream_step(event: RequestEvent, received_ns: int) -> TokenEvent | CompletionResult:
    """One event of an ``infer`` stream: a ``TokenEvent``, or the result that ends it; its error raised."""
    if isinstance(event, StreamStep):
        return TokenEvent(event.text, event.token_ids, event.ts_ns, received_ns, event.kind)
    if isinstance(event, StreamSpanEnd):
        return TokenEvent(event.data, [], None, received_ns, event.kind, event.signature)
    if isinstance(event, StreamDone):
        return event.result
    if isinstance(event, ErrorReply):
        raise as_exception(event)
    raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"unexpected {type(event).__name__} in a stream")
