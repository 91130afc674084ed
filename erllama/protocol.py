"""Wire schema, error codes and limits shared by every erllama process.

Every message on every socket is one msgpack map in one ZeroMQ frame (the RAM
tier of the cache store may append one raw payload frame). Each map carries
``v`` (the protocol version) and ``t`` (the message type). Receivers tolerate
unknown fields so that a newer peer can add optional ones; they reject unknown
types, wrong versions and wrongly typed known fields with a typed error.

Nothing here imports llama.cpp or ZeroMQ: the client, the broker, the workers
and the cache store all import this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

import msgpack

PROTOCOL_VERSION: Final = 1

# --- limits ---------------------------------------------------------------------------------------------
# ZMQ_MAXMSGSIZE is per frame: a peer that sends more is disconnected by libzmq before Python sees it.
MAX_CLIENT_FRAME_BYTES: Final = 16 * 1024 * 1024  # a 128k-token prompt as text or ids fits easily
MAX_WORKER_FRAME_BYTES: Final = 64 * 1024 * 1024  # embeddings and tokenize replies of long prompts
MAX_CACHE_CONTROL_BYTES: Final = 1024 * 1024  # control maps to and from the cache store
MAX_CACHE_PAYLOAD_BYTES: Final = 2 * 1024 * 1024 * 1024  # one KV row sent as a raw frame (RAM tier)
MAX_ID_CHARS: Final = 128  # request, model and session ids
MAX_PROMPT_TOKENS: Final = 1 << 20
MAX_STOP_SEQUENCES: Final = 16
MAX_STOP_SEQUENCE_BYTES: Final = 256
MAX_TOKENS_LIMIT: Final = 1 << 20
DEFAULT_MAX_QUEUE: Final = 512
DEFAULT_MODEL_ID: Final = "smollm2-135m"

# --- liveness -------------------------------------------------------------------------------------------
HEARTBEAT_INTERVAL_S: Final = 1.0
# Workers send heartbeats from a thread of their own, so they keep coming while llama_decode
# runs: silence means the process is gone (or frozen), not that a prefill is slow.
WORKER_SILENCE_TIMEOUT_S: Final = 10.0
# A busy worker whose decode counter has not moved for this long is stuck in native code. One
# tick is one llama_decode of at most n_batch tokens: seconds on a CPU, never minutes.
WORKER_STALL_TIMEOUT_S: Final = 120.0
BROKER_SILENCE_TIMEOUT_S: Final = 10.0
MODEL_LOAD_TIMEOUT_S: Final = 300.0
DEFAULT_REQUEST_TIMEOUT_S: Final = 600.0


class ErrorCode(enum.StrEnum):
    """Stable error codes; the client raises ``ErllamaError`` with one of these as ``code``."""

    MODEL_NOT_FOUND = "model_not_found"
    ALREADY_LOADED = "already_loaded"
    INVALID_PARAMS = "invalid_params"
    CONTEXT_OVERFLOW = "context_overflow"
    OVERLOADED = "overloaded"
    LOAD_FAILED = "load_failed"
    MALFORMED_GGUF = "malformed_gguf"
    WORKER_CRASHED = "worker_crashed"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol_error"
    SHUTTING_DOWN = "shutting_down"
    STICKY_BUSY = "sticky_busy"
    INVALID_GRAMMAR = "invalid_grammar"
    INVALID_CONTENT = "invalid_content"  # chat content given as a list of blocks
    NO_TEMPLATE = "no_template"  # the model has no chat template
    TEMPLATE_FAILED = "template_failed"  # another request is using the same session_id
    BROKER_LOST = "broker_lost"  # the connection to the broker dropped while the request was in flight
    CLIENT_CLOSED = "client_closed"  # Client.close() ran while the request was in flight
    MODEL_FAILED = "model_failed"
    NOT_SUPPORTED = "not_supported"
    NO_GPU = "no_gpu"
    UNSUPPORTED_MODEL = "unsupported_model"  # a model kind erllama cannot serve exactly (encoder-decoder)
    INTERNAL = "internal"
    # cache store
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    CORRUPT = "corrupt"
    OVER_BUDGET = "over_budget"
    NO_SPACE = "no_space"
    EXPIRED = "expired"
    IO_ERROR = "io_error"


class ErllamaError(Exception):
    """The one exception family of erllama. ``code`` is an ``ErrorCode`` value (a plain str)."""

    def __init__(self, code: ErrorCode | str, message: str = "", detail: dict[str, Any] | None = None):
        self.code = str(code)
        self.message = message or self.code
        self.detail = detail or {}
        super().__init__(f"{self.code}: {self.message}")

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


class MsgType(enum.StrEnum):
    """Message types between client, broker and worker."""

    # client -> broker
    INFER = "infer"
    CANCEL = "cancel"
    LOAD_MODEL = "load_model"
    UNLOAD_MODEL = "unload_model"
    LIST_MODELS = "list_models"
    MODEL_INFO = "model_info"
    QUEUE_DEPTH = "queue_depth"
    CALL = "call"  # an operation answered by the model's worker (tokenize, detokenize, ...)
    CACHED_PREFIX_LEN = "cached_prefix_len"  # answered by the cache store, no worker hop
    VRAM_INFO = "vram_info"  # answered by the broker (pynvml); no_gpu without one
    PING = "ping"
    # broker -> client (TOKEN, DONE, ERROR also flow worker -> broker)
    OK = "ok"
    TOKEN = "tok"
    DONE = "done"
    ERROR = "err"
    # worker -> broker
    READY = "ready"
    HEARTBEAT = "hb"
    ADMITTED = "admitted"
    SPAN_END = "span_end"  # the end of a thinking block (with its signature) or of a tool call (its bytes)
    # broker -> worker
    RUN = "run"
    CANCEL_RUN = "cancel_run"
    OP = "op"  # a client's CALL, addressed by the broker's rid
    SHUTDOWN = "shutdown"
    BROKER_HEARTBEAT = "bhb"  # to each worker's heartbeat socket; carries the broker's instance id


class WorkerOp(enum.StrEnum):
    """Operations a client may ask of a model's worker through ``MsgType.CALL``."""

    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    END_SESSION = "end_session"
    EVICT = "evict"  # save every running context and idle session (reason evict); nothing stops
    SHUTDOWN_SAVE = "shutdown"  # the same with reason shutdown
    APPLY_CHAT_TEMPLATE = "apply_chat_template"
    EMBED = "embed"
    LOAD_ADAPTER = "load_adapter"
    UNLOAD_ADAPTER = "unload_adapter"
    SET_ADAPTER_SCALE = "set_adapter_scale"
    LIST_ADAPTERS = "list_adapters"


class Phase(enum.StrEnum):
    IDLE = "idle"
    PREFILLING = "prefilling"
    GENERATING = "generating"


class ModelState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    UNLOADING = "unloading"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


class MemoryKind(enum.StrEnum):
    """What a model keeps per sequence, which decides which cached rows restore exactly (README, *The KV cache*)."""

    TRANSFORMER = "transformer"  # attention KV for every position: any prefix of a row restores exactly
    SWA = "swa"  # sliding-window layers keep only the last n_swa positions: a row restores only near its end
    RECURRENT = "recurrent"  # one state per sequence (Mamba, RWKV): a row restores only whole
    HYBRID = "hybrid"  # attention and recurrent layers: a row restores only whole


class CacheHitKind(enum.StrEnum):
    EXACT = "exact"
    PARTIAL = "partial"
    STICKY = "sticky"
    SHARED = "shared"  # copied from a request running in the same worker with the same prompt start
    COLD = "cold"


# --- schema ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a message: the Python types msgpack may decode it to, and whether it must be present."""

    types: tuple[type, ...]
    required: bool = True


_STR = Field((str,))
_OPT_STR = Field((str, type(None)), required=False)
_INT = Field((int,))
_MAP = Field((dict,))
_OPT_MAP = Field((dict,), required=False)
_PROMPT = Field((str, list))

# Fields beyond ``v`` and ``t``. Client messages carry ``id`` (the client's own request id).
SCHEMA: Final[dict[MsgType, dict[str, Field]]] = {
    MsgType.INFER: {"id": _STR, "model": _STR, "prompt": _PROMPT, "params": _OPT_MAP},
    MsgType.CANCEL: {"id": _STR, "target": _STR},
    MsgType.LOAD_MODEL: {"id": _STR, "model": _STR, "path": _OPT_STR, "options": _OPT_MAP},
    MsgType.UNLOAD_MODEL: {"id": _STR, "model": _STR},
    MsgType.LIST_MODELS: {"id": _STR},
    MsgType.MODEL_INFO: {"id": _STR, "model": _STR},
    MsgType.QUEUE_DEPTH: {"id": _STR, "model": _OPT_STR},
    MsgType.CALL: {"id": _STR, "model": _STR, "op": _STR, "args": _OPT_MAP},
    MsgType.PING: {"id": _STR},
    MsgType.VRAM_INFO: {"id": _STR},
    MsgType.CACHED_PREFIX_LEN: {"id": _STR, "model": _STR, "tokens": Field((list,))},
    # worker -> broker
    MsgType.READY: {"model": _STR, "pid": _INT, "slots": _INT, "info": _MAP},
    MsgType.HEARTBEAT: {"model": _STR, "pid": _INT, "progress": _INT, "phase": _STR, "busy": Field((bool,))},
    MsgType.ADMITTED: {"rid": _INT, "cache_hit_kind": _STR, "prefix_len": _INT},
    MsgType.TOKEN: {"rid": _INT, "text": _STR, "token_ids": Field((list,))},
    MsgType.DONE: {"rid": _INT, "result": _MAP},
    MsgType.SPAN_END: {"rid": _INT, "kind": _STR, "data": _STR, "signature": Field((bytes,))},
    MsgType.ERROR: {"rid": Field((int, type(None))), "code": _STR, "message": _STR},
    MsgType.OK: {"rid": _INT, "result": Field((object,))},
    # broker -> worker
    MsgType.RUN: {"rid": _INT, "prompt": _PROMPT, "params": _MAP},
    MsgType.CANCEL_RUN: {"rid": _INT},
    MsgType.OP: {"rid": _INT, "op": _STR, "args": _MAP},
    MsgType.SHUTDOWN: {},
    MsgType.BROKER_HEARTBEAT: {"instance": _STR},
}

CLIENT_TYPES: Final = frozenset(
    {
        MsgType.INFER,
        MsgType.CANCEL,
        MsgType.LOAD_MODEL,
        MsgType.UNLOAD_MODEL,
        MsgType.LIST_MODELS,
        MsgType.MODEL_INFO,
        MsgType.QUEUE_DEPTH,
        MsgType.CALL,
        MsgType.CACHED_PREFIX_LEN,
        MsgType.VRAM_INFO,
        MsgType.PING,
    }
)
WORKER_TYPES: Final = frozenset(
    {MsgType.READY, MsgType.HEARTBEAT, MsgType.ADMITTED, MsgType.TOKEN, MsgType.SPAN_END, MsgType.DONE, MsgType.ERROR,
     MsgType.OK}
)
BROKER_TO_WORKER_TYPES: Final = frozenset(
    {MsgType.RUN, MsgType.CANCEL_RUN, MsgType.OP, MsgType.SHUTDOWN, MsgType.ERROR}
)


def encode(t: str, **fields: Any) -> bytes:
    """Pack one message. ``t`` is its type; ``v`` is added here so no sender can forget it."""
    fields["v"] = PROTOCOL_VERSION
    fields["t"] = str(t)
    return msgpack.packb(fields, use_bin_type=True)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def decode(frame: bytes | memoryview) -> dict[str, Any]:
    """Unpack one frame into a map with a supported ``v`` and a str ``t``.

    Raises ``ErllamaError(protocol_error)`` for anything else. The frame size is already
    bounded by the socket's ZMQ_MAXMSGSIZE, and ``unpackb`` bounds every container by it.
    """
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"undecodable frame: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise ErllamaError(ErrorCode.PROTOCOL_ERROR, "a message must be a msgpack map")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ErllamaError(
            ErrorCode.PROTOCOL_ERROR,
            f"unsupported protocol version {msg.get('v')!r}",
            {"supported": [PROTOCOL_VERSION]},
        )
    if not isinstance(msg.get("t"), str):
        raise ErllamaError(ErrorCode.PROTOCOL_ERROR, "a message needs a str 't'")
    return msg


def validate(
    msg: dict[str, Any], allowed: frozenset[Any], schema: dict[Any, dict[str, Field]] | None = None
) -> Any:
    """Check ``msg`` against the schema of its type; return the type.

    ``schema`` defaults to ``SCHEMA`` (``MsgType``); the cache store passes ``CACHE_SCHEMA``. The
    type is parsed with the enum class of ``allowed``'s members.
    Raises ``ErllamaError(protocol_error)`` for an unknown or unexpected type, a missing
    required field or a field of the wrong type.
    """
    table = SCHEMA if schema is None else schema
    kind = type(next(iter(allowed)))
    try:
        t = kind(msg["t"])
    except ValueError:
        raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"unknown message type {msg['t']!r}") from None
    if t not in allowed:
        raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"message type {t.value!r} is not accepted here")
    for name, spec in table[t].items():
        if name not in msg:
            if spec.required:
                raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"{t.value}: missing field {name!r}")
            continue
        value = msg[name]
        # bool is an int subclass; an int field never accepts True/False.
        if not isinstance(value, spec.types) or (isinstance(value, bool) and int in spec.types):
            raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"{t.value}: field {name!r} has the wrong type")
        if isinstance(value, str) and name in ("id", "model", "target") and len(value) > MAX_ID_CHARS:
            raise ErllamaError(ErrorCode.PROTOCOL_ERROR, f"{t.value}: field {name!r} is too long")
    return t


def error_reply(rid_field: str, rid: Any, err: ErllamaError) -> bytes:
    """Encode an ``err`` message addressed by ``rid_field`` (``id`` towards clients, ``rid`` towards the broker)."""
    return encode(MsgType.ERROR, **{rid_field: rid}, code=err.code, message=err.message, detail=err.detail)


def within_frame_limit(payload: bytes, limit: int, rid_field: str, rid: Any) -> bytes:
    """``payload``, or a typed error for the same request if the receiver would refuse a frame that large.

    A frame over the receiving socket's ZMQ_MAXMSGSIZE makes libzmq drop the whole connection, and
    the receiver never learns why: an oversized reply must be replaced before it is sent.
    """
    if len(payload) <= limit:
        return payload
    err = ErllamaError(
        ErrorCode.INVALID_PARAMS,
        f"the reply is {len(payload)} bytes, over the {limit}-byte frame limit; ask for less at a time",
        {"reply_bytes": len(payload), "limit_bytes": limit},
    )
    return error_reply(rid_field, rid, err)


# --- cache store messages -------------------------------------------------------------------------------
# Requests to erllama-cachestore (from workers, the broker and the ``erllama cache`` CLI). Each carries
# ``rid`` (the client's request id) and gets exactly one reply with the same ``rid``: ``c.ok`` or ``err``.
# Keys, fingerprints and token ids travel as msgpack bin (tokens as u32 little-endian). Row bytes never
# travel here except on the inline fallback (one raw frame after the map); see cachestore/README.md.

MAX_ROW_TOKENS: Final = 131_072  # 512 KiB of token ids: a reserve map stays well under MAX_CACHE_CONTROL_BYTES
MAX_FINGERPRINT_BYTES: Final = 255  # stored as a u8 length in the row header


class CacheMsgType(enum.StrEnum):
    EXACT = "c.exact"  # key -> row metadata or null
    PREFIX = "c.prefix"  # fp, tokens -> the stored row sharing the longest token prefix, or null
    LOAD = "c.load"  # key -> a lease and where to map the row (inline: the row as a raw frame)
    RELEASE = "c.release"  # end a lease
    RESERVE = "c.reserve"  # announce a row; get a temp to fill, or already_present / conflict
    COMMIT = "c.commit"  # the temp is written (inline: the payload follows as a raw frame); verify, publish
    ABORT = "c.abort"  # give a reservation back
    STATS = "c.stats"
    EVICT = "c.evict"  # free bytes in some tiers (memory-pressure watcher)
    BYE = "c.bye"  # the client is closing: end its leases and reservations now
    OK = "c.ok"
    ERROR = "err"  # same wire value as MsgType.ERROR; encoded with error_reply("rid", ...)


class CacheTier(enum.StrEnum):
    RAM = "ram"  # memfds owned by the daemon: gone when it exits
    SHM = "shm"  # files under /dev/shm: survive a daemon restart
    DISK = "disk"  # files in the cache directory: survive a reboot


class SaveReason(enum.StrEnum):
    COLD = "cold"
    CONTINUED = "continued"
    FINISH = "finish"
    EVICT = "evict"
    SHUTDOWN = "shutdown"


class ReserveStatus(enum.StrEnum):
    RESERVED = "reserved"
    ALREADY_PRESENT = "already_present"
    CONFLICT = "conflict"


class SaveOutcome(enum.StrEnum):
    """What ``CacheClient.save`` reports; none of these is an error for the caller."""

    STORED = "stored"
    ALREADY_PRESENT = "already_present"
    CONFLICT = "conflict"  # another writer is publishing the same key right now
    DROPPED = "dropped"  # the store refused or lost it (over budget, no space, expired, bad checksum)


_BIN = Field((bytes,))
_OPT_BOOL = Field((bool,), required=False)
_OPT_INT = Field((int,), required=False)

CACHE_SCHEMA: Final[dict[CacheMsgType, dict[str, Field]]] = {
    CacheMsgType.EXACT: {"rid": _INT, "key": _BIN},
    # max_len: skip rows longer than this; max_overhang: skip rows extending more than this many tokens past
    # their common prefix with the query (0: only rows that are a prefix of it). Absent: no limit.
    CacheMsgType.PREFIX: {
        "rid": _INT,
        "fp": _BIN,
        "tokens": _BIN,
        "min_len": _OPT_INT,
        "max_len": _OPT_INT,
        "max_overhang": _OPT_INT,
    },
    CacheMsgType.LOAD: {"rid": _INT, "key": _BIN, "pid": _INT, "inline": _OPT_BOOL},
    CacheMsgType.RELEASE: {"rid": _INT, "lease": _INT, "bad": _OPT_BOOL},
    CacheMsgType.RESERVE: {
        "rid": _INT, "fp": _BIN, "tokens": _BIN, "payload_len": _INT, "reason": _STR, "pid": _INT, "tier": _OPT_STR,
    },  # fmt: skip
    CacheMsgType.COMMIT: {"rid": _INT, "res": _INT, "crc": _INT, "inline": _OPT_BOOL},
    CacheMsgType.ABORT: {"rid": _INT, "res": _INT},
    CacheMsgType.STATS: {"rid": _INT},
    CacheMsgType.EVICT: {"rid": _INT, "bytes": _INT, "tiers": Field((list,), required=False)},
    CacheMsgType.BYE: {"rid": _INT},
    CacheMsgType.OK: {"rid": _INT},
    CacheMsgType.ERROR: {"rid": Field((int, type(None))), "code": _STR, "message": _STR},
}
CACHE_REQUEST_TYPES: Final = frozenset(set(CacheMsgType) - {CacheMsgType.OK, CacheMsgType.ERROR})
