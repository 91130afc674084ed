"""Every message between client, broker and worker, each defined once as a frozen ``msgspec.Struct``.

On the wire a message is one msgpack map: ``t`` (the tag below, unchanged from the dict era), ``v``
(the protocol version) and the fields. Receivers tolerate unknown fields (a newer peer may add optional
ones) and reject unknown types, wrong versions and wrongly typed known fields with a typed
``protocol_error`` (``codec.py``). Messages towards a client are addressed by the client's own request
id ``id``; messages between broker and worker by the broker's ``rid``. The unions at the end say what
each socket may receive.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from erllama.protocol.codes import (
    MAX_ID_CHARS,
    PROTOCOL_VERSION,
    CacheHitKind,
    FinishReason,
    MemoryKind,
    MsgType,
    Phase,
    WorkerOp,
)
from erllama.protocol.params import SamplingParams

Id = Annotated[str, Meta(max_length=MAX_ID_CHARS)]  # request, model and session ids

# A message built in this process gets the current version; one decoded without ``v`` gets
# MISSING_VERSION and is refused. msgspec calls the factory only for a field the map lacks.
MISSING_VERSION: Final = -1
_decoding = threading.local()


def _version() -> int:
    return MISSING_VERSION if getattr(_decoding, "active", False) else PROTOCOL_VERSION


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="t"):
    """Base of every message: the version ``v``; subclasses set the tag ``t``."""

    v: int = msgspec.field(default_factory=_version)


# --- the final result of a request ----------------------------------------------------------------------


class Stats(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0  # waiting in the broker's queue for a free sequence
    ttft_ms: float = 0.0  # broker receipt to the first sampled token
    prefill_ms: float = 0.0
    generation_ms: float = 0.0
    cache_lookup_ms: float = 0.0  # asking the cache store and mapping the row it answered
    state_copy_ms: float = 0.0  # copying a restored row's state into llama.cpp


class VerifyOutcome(msgspec.Struct, frozen=True):
    """A speculative verify: candidates accepted, then the model's own next token (None at end of generation)."""

    accepted: int
    next_token: int | None
    eos: bool


class CompletionResult(msgspec.Struct, frozen=True):
    """The outcome of a request: built by the worker (or by the broker for a request cancelled before
    it reached one), relayed as is, returned by ``complete()`` and at the end of a stream.

    ``context_tokens`` are exactly the tokens whose KV state the worker held at the end: the
    prompt plus every generated token except the last one sampled, which was never decoded.
    """

    reply: str = ""
    generated: list[int] = []
    context_tokens: list[int] = []
    committed_tokens: int = 0
    finish_reason: FinishReason = FinishReason.CANCELLED
    stop_sequence: str | None = None
    finish_key: str | None = None  # names the row the finish save wrote (hex)
    cache_hit_kind: CacheHitKind | None = None  # None: the request never reached a worker
    # read: tokens restored or shared; created: tokens saved
    cache_delta: dict[str, int] = msgspec.field(default_factory=lambda: {"read": 0, "created": 0})
    cache_tier: str | None = None  # where a restored row came from: ram, shm, disk, or shared (Valkey/Redis)
    thinking: list[str] = []  # each closed thinking block
    tool_calls: list[str] = []  # each tool call's exact text
    stats: Stats = Stats()
    verify: VerifyOutcome | None = None


# --- client -> broker -----------------------------------------------------------------------------------


class Infer(Message, frozen=True, tag=MsgType.INFER.value):
    id: Id
    model: Id
    prompt: str | list[Any]  # checked by the broker (options.validate_prompt): invalid_params, not protocol
    params: dict[str, Any] = {}  # parsed into SamplingParams by the broker: invalid_params names the key


class Cancel(Message, frozen=True, tag=MsgType.CANCEL.value):
    id: Id
    target: Id


class LoadModel(Message, frozen=True, tag=MsgType.LOAD_MODEL.value):
    id: Id
    model: Id
    path: str | None = None  # on ``host``, a path on that machine
    options: dict[str, Any] = {}
    host: Id | None = None  # the joined host to run the worker on; None: the broker's own machine
    hosts: list[Id] | None = None  # one replica on each of these hosts
    replicas: int | None = None  # this many replicas, on the hosts that are up (or this machine)


class UnloadModel(Message, frozen=True, tag=MsgType.UNLOAD_MODEL.value):
    id: Id
    model: Id


class ListModels(Message, frozen=True, tag=MsgType.LIST_MODELS.value):
    id: Id


class ModelInfo(Message, frozen=True, tag=MsgType.MODEL_INFO.value):
    id: Id
    model: Id


class QueueDepth(Message, frozen=True, tag=MsgType.QUEUE_DEPTH.value):
    id: Id
    model: Id | None = None


class Call(Message, frozen=True, tag=MsgType.CALL.value):
    """An operation answered by the model's worker (tokenize, detokenize, ...)."""

    id: Id
    model: Id
    op: str  # checked by the broker against WorkerOp: invalid_params, not protocol
    args: dict[str, Any] = {}


class CachedPrefixLen(Message, frozen=True, tag=MsgType.CACHED_PREFIX_LEN.value):
    id: Id
    model: Id
    tokens: list[Any]


class VramInfo(Message, frozen=True, tag=MsgType.VRAM_INFO.value):
    id: Id


class Ping(Message, frozen=True, tag=MsgType.PING.value):
    id: Id


class ListHosts(Message, frozen=True, tag=MsgType.LIST_HOSTS.value):
    id: Id


# --- broker -> client -----------------------------------------------------------------------------------


class Reply(Message, frozen=True, tag=MsgType.OK.value):
    """The answer to a client's request (``result`` depends on the request)."""

    id: str | None
    result: Any = None


class StreamStep(msgspec.Struct, frozen=True, array_like=True):
    """One streamed step of one ``infer``; ``ts_ns`` is the worker's CLOCK_MONOTONIC when it sent it."""

    id: str
    text: str
    token_ids: list[int]
    kind: str = "text"
    ts_ns: int | None = None


class StreamTokens(Message, frozen=True, tag=MsgType.TOKEN.value):
    """One worker tick's steps for the streams of one client: one message however many streams it runs,
    so the per-token cost of the broker and the client falls as streams are added."""

    steps: list[StreamStep]


class StreamSpanEnd(Message, frozen=True, tag=MsgType.SPAN_END.value):
    id: str
    kind: str
    data: str
    signature: bytes


class StreamDone(Message, frozen=True, tag=MsgType.DONE.value):
    id: str
    result: CompletionResult


class ErrorReply(Message, frozen=True, tag=MsgType.ERROR.value):
    """A typed failure addressed to a client's request (``id`` None when it had no usable id)."""

    id: str | None
    code: str
    message: str
    detail: dict[str, Any] = {}


# --- worker -> broker -----------------------------------------------------------------------------------


class WorkerInfo(msgspec.Struct, frozen=True):
    """What the broker reads from a ``ready``'s ``info`` (the whole map is shown in ``model_info``)."""

    path: str | None = None
    options: dict[str, Any] = {}
    n_ctx: int | None = None
    fingerprint: str | None = None  # hex; None when the worker has no cache
    backend: str | None = None
    memory: MemoryKind = MemoryKind.TRANSFORMER  # which cached rows the model can use
    exact: bool = True  # warm greedy output bit-identical to cold


class Ready(Message, frozen=True, tag=MsgType.READY.value):
    model: str
    pid: int
    slots: int
    info: dict[str, Any]
    replica: int = 0  # which of the model's replicas it is (its ``--replica``)


class Heartbeat(Message, frozen=True, tag=MsgType.HEARTBEAT.value):
    """From the worker's heartbeat thread (and its main socket on a phase change): one status snapshot."""

    model: str
    pid: int
    progress: int  # the decode counter: a busy worker whose counter stands still is stuck
    phase: Phase
    busy: bool
    running: int = 0
    waiting: int = 0
    tokens_generated: int = 0
    tokens_prefilled: int = 0  # prompt tokens decoded (a prefill's progress)
    cache: dict[str, int] | None = None  # the worker's cache counters


class Admitted(Message, frozen=True, tag=MsgType.ADMITTED.value):
    rid: int
    cache_hit_kind: CacheHitKind
    prefix_len: int


class TokenStep(msgspec.Struct, frozen=True, array_like=True):
    rid: int
    text: str
    token_ids: list[int]
    kind: str = "text"


class Tokens(Message, frozen=True, tag=MsgType.TOKEN.value):
    """Every step one tick produced (``ts_ns``: the worker's CLOCK_MONOTONIC when it sent them)."""

    steps: list[TokenStep]
    ts_ns: int | None = None


class SpanEnd(Message, frozen=True, tag=MsgType.SPAN_END.value):
    """The end of a thinking block (with its signature) or of a tool call (its bytes)."""

    rid: int
    kind: str
    data: str
    signature: bytes


class Done(Message, frozen=True, tag=MsgType.DONE.value):
    rid: int
    result: CompletionResult


class Error(Message, frozen=True, tag=MsgType.ERROR.value):
    """A typed failure between broker, worker and cache store, addressed by ``rid`` (None: about the
    sender itself, such as a failed load or a refused registration)."""

    rid: int | None
    code: str
    message: str
    detail: dict[str, Any] = {}


class OpResult(Message, frozen=True, tag=MsgType.OK.value):
    rid: int
    result: Any


# --- broker -> worker -----------------------------------------------------------------------------------


class Run(Message, frozen=True, tag=MsgType.RUN.value):
    rid: int
    prompt: str | list[int]
    params: SamplingParams
    queue_ms: float = 0.0


class CancelRun(Message, frozen=True, tag=MsgType.CANCEL_RUN.value):
    rid: int


class Op(Message, frozen=True, tag=MsgType.OP.value):
    """A client's ``call``, addressed by the broker's rid."""

    rid: int
    op: WorkerOp
    args: dict[str, Any]


class Shutdown(Message, frozen=True, tag=MsgType.SHUTDOWN.value):
    pass


class BrokerHeartbeat(Message, frozen=True, tag=MsgType.BROKER_HEARTBEAT.value):
    """The answer to each heartbeat: the broker's instance id (a new one means it restarted)."""

    instance: str


# --- what each socket receives --------------------------------------------------------------------------

ClientRequest = (
    Infer
    | Cancel
    | LoadModel
    | UnloadModel
    | ListModels
    | ModelInfo
    | QueueDepth
    | Call
    | CachedPrefixLen
    | VramInfo
    | Ping
    | ListHosts
)
ClientEvent = Reply | StreamTokens | StreamSpanEnd | StreamDone | ErrorReply
# What one request's route receives: a ``StreamTokens`` is split into its steps by the client.
RequestEvent = Reply | StreamStep | StreamSpanEnd | StreamDone | ErrorReply
WorkerMessage = Ready | Heartbeat | Admitted | Tokens | SpanEnd | Done | Error | OpResult
WorkerCommand = Run | CancelRun | Op | Shutdown | Error
