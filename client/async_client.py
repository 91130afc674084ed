"""``erllama.AsyncClient``: the ``Client`` API for asyncio.

    from erllama import AsyncClient

    async with AsyncClient() as c:
        async for ev in await c.infer("smollm2-135m", "Tell me a joke.", max_tokens=64):
            print(ev.text, end="", flush=True)
        r = await c.complete("smollm2-135m", "2+2=", max_tokens=4, temperature=0)

One DEALER socket (``zmq.asyncio``) per client and one reader task that routes every reply to the
queue of the request it answers, so any number of tasks may stream at once. The protocol is the sync
client's (``client/wire.py``): same requests, same results, same ``ErllamaError`` codes. Cancelling a
task that awaits a stream (or ``complete``) cancels the request at the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Self, cast

import msgspec
import zmq
import zmq.asyncio

from erllama import protocol
from erllama.client.results import CompletionResult, Stats, TokenEvent
from erllama.client.wire import (
    ReplyDecoder,
    connection_lost,
    infer_request,
    load_request,
    new_request_id,
    reply_result,
    stream_step,
)
from erllama.protocol import (
    DEFAULT_REQUEST_TIMEOUT_S,
    MODEL_LOAD_TIMEOUT_S,
    CachedPrefixLen,
    Call,
    Cancel,
    ClientRequest,
    ErllamaError,
    ErrorCode,
    ErrorReply,
    ListHosts,
    ListModels,
    ModelInfo,
    Ping,
    QueueDepth,
    RequestEvent,
    UnloadModel,
    VramInfo,
    WorkerOp,
    encode,
)
from erllama.protocol.ops import (
    AdapterArgs,
    AdapterPathArgs,
    AdapterScaleArgs,
    ChatTemplateArgs,
    DetokenizeArgs,
    EmbedArgs,
    NoArgs,
    OpArgs,
    SessionArgs,
    TokenizeArgs,
)
from erllama.transport import default_client_endpoint, make_socket

log = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 30.0
Arrival = tuple[RequestEvent, int]  # a typed event and when it arrived (CLOCK_MONOTONIC ns)


class AsyncInferStream:
    """The events of one ``infer()`` request: ``async for`` gives ``TokenEvent``s; ``result`` is set at
    the end. A task cancelled while it waits on the stream cancels the request at the broker; leaving
    the loop early does not (call ``cancel()``, or use ``async with``)."""

    def __init__(
        self, client: AsyncClient, request_id: str, q: asyncio.Queue[Arrival], timeout_s: float | None
    ):
        self._client = client
        self.request_id = request_id
        self._q = q
        self._timeout_s = timeout_s
        self.result: CompletionResult | None = None
        self._texts: list[str] = []

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[TokenEvent]:
        while self.result is None:
            try:
                event, received_ns = await self._client._wait(
                    self._q, self._timeout_s, f"request {self.request_id} produced nothing"
                )
                step = stream_step(event, received_ns)
            except asyncio.CancelledError:
                await self._abandon()
                raise
            except ErllamaError:
                self._client._close_route(self.request_id)
                raise
            if isinstance(step, CompletionResult):
                self.result = step
                self._client._close_route(self.request_id)
                return
            if step.kind == "text":
                self._texts.append(step.text)
            yield step

    async def _abandon(self) -> None:
        """The awaiting task was cancelled: stop the request at the broker and forget its route."""
        self._client._close_route(self.request_id)
        with contextlib.suppress(ErllamaError, zmq.ZMQError):
            await self.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.result is None:
            await self.cancel()

    async def cancel(self) -> None:
        """Ask the broker to stop this request; the stream then ends with ``finish_reason == "cancelled"``."""
        if self.result is None:
            await self._client._send(encode(Cancel(id=new_request_id(), target=self.request_id)))

    async def collect(self) -> CompletionResult:
        """Consume the rest of the stream and return its result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    @property
    def text(self) -> str:
        """The reply text streamed so far (thinking and tool-call deltas are not part of it)."""
        return "".join(self._texts)

    @property
    def stats(self) -> Stats | None:
        return self.result.stats if self.result else None


class AsyncClient:
    """An asyncio connection to an erllama broker (``endpoint`` as for ``Client``). Use it from one
    event loop; the socket and its reader task start on first use."""

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = ADMIN_TIMEOUT_S):
        self.endpoint = endpoint or default_client_endpoint()
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context()
        # make_socket is typed for the sync context; on an asyncio context it makes an asyncio socket
        self._sock = cast(
            zmq.asyncio.Socket, make_socket(self._ctx, zmq.DEALER, protocol.MAX_CLIENT_FRAME_BYTES)
        )
        self._sock.connect(self.endpoint)
        self._routes: dict[str, asyncio.Queue[Arrival]] = {}
        self._decoder = ReplyDecoder()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.close(linger=0)
        self._ctx.term()
        self._fail_all(ErrorCode.CLIENT_CLOSED, "the client was closed while the request was in flight")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- routing -------------------------------------------------------------------------------------------

    def _open(self, request_id: str) -> asyncio.Queue[Arrival]:
        if self._closed:
            raise ErllamaError(ErrorCode.PROTOCOL_ERROR, "the client is closed")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="erllama-reader")
        q: asyncio.Queue[Arrival] = asyncio.Queue()
        self._routes[request_id] = q
        return q

    def _close_route(self, request_id: str) -> None:
        self._routes.pop(request_id, None)

    async def _send(self, payload: bytes) -> None:
        if self._closed:
            raise ErllamaError(ErrorCode.PROTOCOL_ERROR, "the client is closed")
        await self._sock.send(payload)

    @staticmethod
    async def _wait(q: asyncio.Queue[Arrival], timeout_s: float | None, what: str) -> Arrival:
        try:
            return await asyncio.wait_for(q.get(), timeout_s)
        except TimeoutError:
            raise ErllamaError(ErrorCode.TIMEOUT, f"{what} within {timeout_s} s") from None

    async def _call(self, request: ClientRequest, timeout_s: float | None) -> Any:
        """Send one request and wait for its ``ok`` (returning ``result``) or ``err`` (raising)."""
        q = self._open(request.id)
        try:
            await self._send(encode(request))
            event, _ = await self._wait(q, timeout_s, f"{type(request).__name__} got no reply")
        finally:
            self._close_route(request.id)
        return reply_result(event)

    async def _read_loop(self) -> None:
        # As the sync client: a dropped connection fails every request in flight with broker_lost.
        watcher = asyncio.get_running_loop().create_task(self._watch_connection())
        try:
            while True:
                frame = await self._sock.recv()
                received_ns = time.monotonic_ns()
                for event in self._decoder.decode(frame):
                    q = self._routes.get(event.id) if event.id is not None else None
                    if q is not None:
                        q.put_nowait((event, received_ns))
                    elif isinstance(event, ErrorReply):
                        log.warning("broker error not tied to a request: %s %s", event.code, event.message)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_connection(self) -> None:
        monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                await monitor.recv_multipart()
                self._fail_all(ErrorCode.BROKER_LOST, f"the connection to {self.endpoint} dropped")
        finally:
            self._sock.disable_monitor()
            monitor.close(linger=0)

    def _fail_all(self, code: ErrorCode, message: str) -> None:
        lost = connection_lost(code, message)
        for q in list(self._routes.values()):
            q.put_nowait((lost, time.monotonic_ns()))

    # --- models --------------------------------------------------------------------------------------------

    async def load_model(
        self,
        model_id: str,
        model_path: str | None = None,
        *,
        host: str | None = None,
        hosts: list[str] | None = None,
        replicas: int | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """As ``Client.load_model``."""
        request = load_request(model_id, model_path, host, hosts, replicas, options)
        return await self._call(request, MODEL_LOAD_TIMEOUT_S)

    async def unload_model(self, model_id: str) -> None:
        await self._call(UnloadModel(id=new_request_id(), model=model_id), MODEL_LOAD_TIMEOUT_S)

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._call(ListModels(id=new_request_id()), self.timeout_s)

    async def list_hosts(self) -> list[dict[str, Any]]:
        """As ``Client.list_hosts``."""
        return await self._call(ListHosts(id=new_request_id()), self.timeout_s)

    async def model_info(self, model_id: str) -> dict[str, Any]:
        return await self._call(ModelInfo(id=new_request_id(), model=model_id), self.timeout_s)

    async def queue_depth(self, model_id: str | None = None) -> int:
        return await self._call(QueueDepth(id=new_request_id(), model=model_id), self.timeout_s)

    async def pending_len(self, model_id: str) -> int:
        return (await self.model_info(model_id))["pending_len"]

    async def phase(self, model_id: str) -> str:
        return (await self.model_info(model_id))["phase"]

    async def last_cache_hit(self, model_id: str) -> dict[str, Any] | None:
        return (await self.model_info(model_id))["last_cache_hit"]

    async def ping(self) -> dict[str, Any]:
        return await self._call(Ping(id=new_request_id()), self.timeout_s)

    async def vram_info(self) -> dict[str, int]:
        return await self._call(VramInfo(id=new_request_id()), self.timeout_s)

    # --- text ----------------------------------------------------------------------------------------------

    async def tokenize(
        self, model_id: str, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        args = TokenizeArgs(text=text, add_special=add_special, parse_special=parse_special)
        return await self._call_worker(model_id, WorkerOp.TOKENIZE, args)

    async def detokenize(self, model_id: str, tokens: Sequence[int]) -> str:
        return await self._call_worker(model_id, WorkerOp.DETOKENIZE, DetokenizeArgs(tokens=list(tokens)))

    async def end_session(self, model_id: str, session_id: str) -> bool:
        return await self._call_worker(model_id, WorkerOp.END_SESSION, SessionArgs(session_id=session_id))

    async def evict(self, model_id: str) -> int:
        return await self._call_worker(model_id, WorkerOp.EVICT, NoArgs())

    async def _call_worker(self, model_id: str, op: WorkerOp, args: OpArgs) -> Any:
        call = Call(id=new_request_id(), model=model_id, op=op.value, args=msgspec.structs.asdict(args))
        return await self._call(call, self.timeout_s)

    async def apply_chat_template(
        self,
        model_id: str,
        messages: list[dict[str, Any]],
        *,
        system: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """As ``Client.apply_chat_template``."""
        args = ChatTemplateArgs(
            messages=messages, system=system, tools=tools, add_generation_prompt=add_generation_prompt
        )
        return await self._call_worker(model_id, WorkerOp.APPLY_CHAT_TEMPLATE, args)

    async def embed(self, model_id: str, text_or_tokens: str | Sequence[int]) -> list[float]:
        """As ``Client.embed``."""
        source = text_or_tokens if isinstance(text_or_tokens, str) else list(text_or_tokens)
        return await self._call_worker(model_id, WorkerOp.EMBED, EmbedArgs(input=source))

    async def load_adapter(self, model_id: str, path: str) -> dict[str, Any]:
        """As ``Client.load_adapter``."""
        return await self._call_worker(model_id, WorkerOp.LOAD_ADAPTER, AdapterPathArgs(path=path))

    async def unload_adapter(self, model_id: str, handle: int) -> bool:
        return await self._call_worker(model_id, WorkerOp.UNLOAD_ADAPTER, AdapterArgs(handle=handle))

    async def set_adapter_scale(self, model_id: str, handle: int, scale: float) -> dict[str, Any]:
        args = AdapterScaleArgs(handle=handle, scale=scale)
        return await self._call_worker(model_id, WorkerOp.SET_ADAPTER_SCALE, args)

    async def list_adapters(self, model_id: str) -> list[dict[str, Any]]:
        return await self._call_worker(model_id, WorkerOp.LIST_ADAPTERS, NoArgs())

    async def cached_prefix_len(self, model_id: str, prompt: str | Sequence[int]) -> int:
        tokens = (
            await self.tokenize(model_id, prompt)
            if isinstance(prompt, str)
            else [operator.index(t) for t in prompt]
        )
        return await self._call(
            CachedPrefixLen(id=new_request_id(), model=model_id, tokens=tokens), self.timeout_s
        )

    # --- generation ----------------------------------------------------------------------------------------

    async def infer(
        self,
        model_id: str,
        prompt: str | Sequence[int],
        *,
        timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
        **params: Any,
    ) -> AsyncInferStream:
        """Start a request and return its stream (parameters as ``Client.infer``)."""
        request_id = new_request_id()
        request = infer_request(request_id, model_id, prompt, params)
        q = self._open(request_id)
        try:
            await self._send(encode(request))
        except (ErllamaError, asyncio.CancelledError):
            self._close_route(request_id)
            raise
        return AsyncInferStream(self, request_id, q, timeout_s)

    async def complete(self, model_id: str, prompt: str | Sequence[int], **params: Any) -> CompletionResult:
        """Run a request to its end and return the result; cancelling the awaiting task cancels it."""
        stream = await self.infer(model_id, prompt, **params)
        return await stream.collect()

    async def chat(
        self,
        model_id: str,
        messages: list[dict[str, Any]],
        *,
        system: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> AsyncInferStream:
        """As ``Client.chat``."""
        prompt = await self.apply_chat_template(model_id, messages, system=system, tools=tools)
        return await self.infer(model_id, prompt, **params)

    async def prefill_only(
        self, model_id: str, prompt: str | Sequence[int], parent_key: str | None = None
    ) -> CompletionResult:
        """As ``Client.prefill_only``: prime the cache without sampling."""
        params: dict[str, Any] = {"max_tokens": 0}
        if parent_key is not None:
            params["parent_key"] = parent_key
        return await self.complete(model_id, prompt, **params)

    async def draft_tokens(self, model_id: str, prefix: Sequence[int], max_tokens: int = 8) -> list[int]:
        """As ``Client.draft_tokens``."""
        r = await self.complete(model_id, list(prefix), max_tokens=max_tokens, temperature=0.0)
        return r.generated

    async def verify(
        self, model_id: str, prefix: Sequence[int], candidates: Sequence[int]
    ) -> tuple[int, int | str]:
        """As ``Client.verify``."""
        r = await self.complete(model_id, list(prefix), verify=list(candidates), max_tokens=1)
        v = r.verify
        if v is None:
            raise ErllamaError(
                ErrorCode.PROTOCOL_ERROR, f"verify ended without an outcome ({r.finish_reason})"
            )
        return v.accepted, "eos" if v.eos or v.next_token is None else v.next_token

    async def cancel(self, request_id: str) -> bool:
        result = await self._call(Cancel(id=new_request_id(), target=request_id), self.timeout_s)
        return bool(result and result.get("cancelled"))


__all__ = ["AsyncClient", "AsyncInferStream", "CompletionResult", "TokenEvent"]
