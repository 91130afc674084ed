"""``erllama.Client``: the synchronous client library.

    from erllama import Client

    with Client() as c:                       # $ERLLAMA_BROKER, else the default ipc socket
        for ev in c.infer("smollm2-135m", "Tell me a joke.", max_tokens=64):
            print(ev.text, end="", flush=True)
        r = c.complete("smollm2-135m", "2+2=", max_tokens=4, temperature=0)
        print(r.reply, r.finish_reason, r.stats.ttft_ms)

Every failure raises ``ErllamaError`` whose ``code`` is a stable string (``model_not_found``,
``overloaded``, ``context_overflow``, ``worker_crashed``, ...). A Client is thread-safe.
"""

from __future__ import annotations

import operator
import queue
from collections.abc import Iterator, Sequence
from typing import Any, Self

import msgspec

from erllama.client.connection import Arrival, Connection
from erllama.client.results import CompletionResult, Stats, TokenEvent
from erllama.client.wire import infer_request, load_request, new_request_id, stream_step
from erllama.protocol import (
    DEFAULT_REQUEST_TIMEOUT_S,
    MODEL_LOAD_TIMEOUT_S,
    CachedPrefixLen,
    Call,
    Cancel,
    ErllamaError,
    ErrorCode,
    ListHosts,
    ListModels,
    ModelInfo,
    Ping,
    QueueDepth,
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
from erllama.transport import default_client_endpoint

ADMIN_TIMEOUT_S = 30.0


class InferStream:
    """The events of one ``infer()`` request. Iterate for ``TokenEvent``s; ``result`` is set at the end.

    Leaving the iteration early (``break``, an exception, garbage collection) does not cancel the
    request by itself: call ``cancel()``, or use the stream as a context manager, which cancels a
    request still running when the block exits.
    """

    def __init__(
        self, conn: Connection, request_id: str, q: queue.SimpleQueue[Arrival], timeout_s: float | None
    ):
        self._conn = conn
        self.request_id = request_id
        self._q = q
        self._timeout_s = timeout_s
        self.result: CompletionResult | None = None
        self._texts: list[str] = []

    def __iter__(self) -> Iterator[TokenEvent]:
        while self.result is None:
            try:
                event, received_ns = self._conn.wait(
                    self._q, self._timeout_s, f"request {self.request_id} produced nothing"
                )
                step = stream_step(event, received_ns)
            except ErllamaError:
                self._conn.close_route(self.request_id)
                raise
            if isinstance(step, CompletionResult):
                self.result = step
                self._conn.close_route(self.request_id)
                return
            if step.kind == "text":
                self._texts.append(step.text)
            yield step

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()

    def cancel(self) -> None:
        """Ask the broker to stop this request; the stream then ends with ``finish_reason == "cancelled"``."""
        if self.result is None:
            self._conn.send(encode(Cancel(id=new_request_id(), target=self.request_id)))

    def collect(self) -> CompletionResult:
        """Consume the rest of the stream and return its result."""
        for _ in self:
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


class Client:
    """A connection to an erllama broker. ``endpoint`` defaults to ``$ERLLAMA_BROKER``, else the
    broker's default ipc socket in the runtime directory."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = ADMIN_TIMEOUT_S,
        curve_key: str | None = None,
        curve_server_key: str | None = None,
    ):
        """``curve_key`` (this client's key file, with its secret) and ``curve_server_key`` (the broker's
        public key file) authenticate to a broker whose tcp endpoint requires CURVE."""
        self.endpoint = endpoint or default_client_endpoint()
        self.timeout_s = timeout_s
        curve = (curve_key, curve_server_key) if curve_key and curve_server_key else None
        self._conn = Connection(self.endpoint, curve)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- models --------------------------------------------------------------------------------------------

    def load_model(
        self,
        model_id: str,
        model_path: str | None = None,
        *,
        host: str | None = None,
        hosts: list[str] | None = None,
        replicas: int | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Start a worker for a model file (None: the embedded default) and wait until it is ready.
        Options are llama.cpp and erllama load options (``n_ctx``, ``n_seq_max``, ``type_k``, ...).
        ``host``: the name of a joined ``erllama-host`` to run the worker on (the path is on that machine);
        ``hosts``: one replica on each of these hosts; ``replicas``: that many replicas, on the hosts that
        are up with the most memory free (or all on the broker's machine when no host has joined). The
        load option ``routing`` picks a replica per request (README, Several machines)."""
        request = load_request(model_id, model_path, host, hosts, replicas, options)
        return self._conn.call(request, MODEL_LOAD_TIMEOUT_S)

    def unload_model(self, model_id: str) -> None:
        self._conn.call(UnloadModel(id=new_request_id(), model=model_id), MODEL_LOAD_TIMEOUT_S)

    def list_models(self) -> list[dict[str, Any]]:
        return self._conn.call(ListModels(id=new_request_id()), self.timeout_s)

    def list_hosts(self) -> list[dict[str, Any]]:
        """The broker's own machine (``local``: true, always ``up``), then the hosts that joined: name, state
        (``joining``/``up``/``draining``/``left``/``dead``), pid, ``heartbeat_age_s``, resources (cores,
        memory, GPUs, free KV bytes), workers and models placed."""
        return self._conn.call(ListHosts(id=new_request_id()), self.timeout_s)

    def model_info(self, model_id: str) -> dict[str, Any]:
        """State, worker pid, options, n_ctx, slots, queue depth, pending length, phase, last cache hit."""
        return self._conn.call(ModelInfo(id=new_request_id(), model=model_id), self.timeout_s)

    def queue_depth(self, model_id: str | None = None) -> int:
        """Requests accepted and not finished (waiting + running): for one model, or all of them."""
        return self._conn.call(QueueDepth(id=new_request_id(), model=model_id), self.timeout_s)

    def pending_len(self, model_id: str) -> int:
        """Requests waiting for a free sequence of ``model_id``."""
        return self.model_info(model_id)["pending_len"]

    def phase(self, model_id: str) -> str:
        """``idle``, ``prefilling`` or ``generating``."""
        return self.model_info(model_id)["phase"]

    def last_cache_hit(self, model_id: str) -> dict[str, Any] | None:
        return self.model_info(model_id)["last_cache_hit"]

    def ping(self) -> dict[str, Any]:
        return self._conn.call(Ping(id=new_request_id()), self.timeout_s)

    # --- text ----------------------------------------------------------------------------------------------

    def tokenize(
        self, model_id: str, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        args = TokenizeArgs(text=text, add_special=add_special, parse_special=parse_special)
        return self._call_worker(model_id, WorkerOp.TOKENIZE, args)

    def detokenize(self, model_id: str, tokens: Sequence[int]) -> str:
        return self._call_worker(model_id, WorkerOp.DETOKENIZE, DetokenizeArgs(tokens=list(tokens)))

    def end_session(self, model_id: str, session_id: str) -> bool:
        """Release the sequence a sticky session keeps pinned; False if the worker did not know it."""
        return self._call_worker(model_id, WorkerOp.END_SESSION, SessionArgs(session_id=session_id))

    def _call_worker(self, model_id: str, op: WorkerOp, args: OpArgs) -> Any:
        call = Call(id=new_request_id(), model=model_id, op=op.value, args=msgspec.structs.asdict(args))
        return self._conn.call(call, self.timeout_s)

    # --- generation ----------------------------------------------------------------------------------------

    def infer(
        self,
        model_id: str,
        prompt: str | Sequence[int],
        *,
        timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
        **params: Any,
    ) -> InferStream:
        """Start a request and return its stream. ``prompt`` is text or token ids. Params:
        ``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
        ``seed``, ``stop``; ``session_id`` keeps the sequence's KV for the session's next request;
        ``parent_key`` resumes from an earlier ``finish_key``. ``timeout_s`` bounds the wait for each event, not the whole request."""
        request_id = new_request_id()
        request = infer_request(request_id, model_id, prompt, params)
        q = self._conn.open(request_id)
        try:
            self._conn.send(encode(request))
        except ErllamaError:
            self._conn.close_route(request_id)
            raise
        return InferStream(self._conn, request_id, q, timeout_s)

    def complete(self, model_id: str, prompt: str | Sequence[int], **params: Any) -> CompletionResult:
        """Run a request to its end and return the result (same parameters as ``infer``)."""
        return self.infer(model_id, prompt, **params).collect()

    def chat(
        self,
        model_id: str,
        messages: list[dict[str, str]],
        *,
        system: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> InferStream:
        """Render ``messages`` with the model's chat template and stream the reply (same parameters as
        ``infer``). Resending a growing conversation reads the earlier turns from the cache."""
        return self.infer(
            model_id, self.apply_chat_template(model_id, messages, system=system, tools=tools), **params
        )

    def apply_chat_template(
        self,
        model_id: str,
        messages: list[dict[str, str]],
        *,
        system: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the model's own GGUF template. ``system`` and ``tools``
        become a leading system message (tools go to the template itself when it takes them).
        Errors: ``invalid_content`` (content as a list of blocks), ``no_template``, ``template_failed``."""
        args = ChatTemplateArgs(
            messages=messages, system=system, tools=tools, add_generation_prompt=add_generation_prompt
        )
        return self._call_worker(model_id, WorkerOp.APPLY_CHAT_TEMPLATE, args)

    def embed(self, model_id: str, text_or_tokens: str | Sequence[int]) -> list[float]:
        """A mean-pooled, unit-length embedding of the input, from an embeddings context of the model."""
        source = text_or_tokens if isinstance(text_or_tokens, str) else list(text_or_tokens)
        return self._call_worker(model_id, WorkerOp.EMBED, EmbedArgs(input=source))

    def load_adapter(self, model_id: str, path: str) -> dict[str, Any]:
        """Load a LoRA adapter (scale 1.0); returns ``{handle, path, scale, sha256}``. The adapter set
        and scales are part of the cache fingerprint: rows never cross adapter sets."""
        return self._call_worker(model_id, WorkerOp.LOAD_ADAPTER, AdapterPathArgs(path=path))

    def unload_adapter(self, model_id: str, handle: int) -> bool:
        return self._call_worker(model_id, WorkerOp.UNLOAD_ADAPTER, AdapterArgs(handle=handle))

    def set_adapter_scale(self, model_id: str, handle: int, scale: float) -> dict[str, Any]:
        args = AdapterScaleArgs(handle=handle, scale=scale)
        return self._call_worker(model_id, WorkerOp.SET_ADAPTER_SCALE, args)

    def list_adapters(self, model_id: str) -> list[dict[str, Any]]:
        return self._call_worker(model_id, WorkerOp.LIST_ADAPTERS, NoArgs())

    def evict(self, model_id: str) -> int:
        """Save every running context and idle session of the model to the cache (reason ``evict``);
        nothing stops. Returns how many rows were handed to the store."""
        return self._call_worker(model_id, WorkerOp.EVICT, NoArgs())

    def draft_tokens(self, model_id: str, prefix: Sequence[int], max_tokens: int = 8) -> list[int]:
        """Up to ``max_tokens`` greedy continuation tokens (a draft for speculative decoding)."""
        return self.complete(model_id, list(prefix), max_tokens=max_tokens, temperature=0.0).generated

    def verify(
        self, model_id: str, prefix: Sequence[int], candidates: Sequence[int]
    ) -> tuple[int, int | str]:
        """How many ``candidates`` the model accepts after ``prefix`` (greedy agreement) and its own next
        token there (``"eos"`` at end of generation). Runs on a sequence of its own."""
        r = self.infer(model_id, list(prefix), verify=list(candidates), max_tokens=1).collect()
        v = r.verify
        if v is None:
            raise ErllamaError(
                ErrorCode.PROTOCOL_ERROR, f"verify ended without an outcome ({r.finish_reason})"
            )
        return v.accepted, "eos" if v.eos or v.next_token is None else v.next_token

    def vram_info(self) -> dict[str, int]:
        """Total, free and used GPU memory in bytes; ``no_gpu`` where there is none."""
        return self._conn.call(VramInfo(id=new_request_id()), self.timeout_s)

    def prefill_only(
        self, model_id: str, prompt: str | Sequence[int], parent_key: str | None = None
    ) -> CompletionResult:
        """Prime the cache with ``prompt`` without sampling; the result's ``finish_key`` names the row
        (None if the prompt is shorter than the model's ``cache_min_tokens``)."""
        params: dict[str, Any] = {"max_tokens": 0}
        if parent_key is not None:
            params["parent_key"] = parent_key
        return self.complete(model_id, prompt, **params)

    def cached_prefix_len(self, model_id: str, prompt: str | Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` the cache holds for this model, answered by the cache
        store (a text prompt is tokenized by the model's worker first)."""
        tokens = (
            self.tokenize(model_id, prompt)
            if isinstance(prompt, str)
            else [operator.index(t) for t in prompt]
        )
        return self._conn.call(
            CachedPrefixLen(id=new_request_id(), model=model_id, tokens=tokens), self.timeout_s
        )

    def cancel(self, request_id: str) -> bool:
        """Cancel a request of this client by id; False if it was not in flight."""
        result = self._conn.call(Cancel(id=new_request_id(), target=request_id), self.timeout_s)
        return bool(result and result.get("cancelled"))


__all__ = ["Client", "CompletionResult", "ErllamaError", "ErrorCode", "InferStream", "Stats", "TokenEvent"]
