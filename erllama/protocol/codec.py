"""Encoding and decoding: one typed decoder per socket, a typed ``protocol_error`` for anything else.

A decoder is built for the union of what its socket may receive and returns the typed message, checked
in one pass in C (field types, the constraints of ``SamplingParams``). Everything it refuses is an
``ErllamaError(protocol_error)`` whose message says what was wrong, worked out again on that (rare)
path from the untyped map: an undecodable frame, a frame that is not a map, an unsupported version, a
type that is unknown or not accepted on this socket, or a field. No ext types, no pickle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast, get_args

import msgspec

from erllama.protocol.cache import CacheReply, CacheRequest
from erllama.protocol.codes import (
    PROTOCOL_VERSION,
    CacheMsgType,
    ErllamaError,
    ErrorCode,
    HostMsgType,
    MsgType,
)
from erllama.protocol.hosts import HostCommand, HostMessage
from erllama.protocol.messages import (
    MISSING_VERSION,
    BrokerHeartbeat,
    ClientEvent,
    ClientRequest,
    Error,
    ErrorReply,
    Message,
    WorkerCommand,
    WorkerMessage,
    _decoding,
)

M = TypeVar("M", bound=Message)
# What decoding hostile bytes can raise: msgspec's own errors, our ext_hook's ValueError, and
# RecursionError for containers nested past the interpreter's limit.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError)
KNOWN_TYPES = (
    frozenset(t.value for t in MsgType)
    | frozenset(t.value for t in CacheMsgType)
    | frozenset(t.value for t in HostMsgType)
)

_encode = msgspec.msgpack.Encoder().encode


def encode(msg: Message) -> bytes:
    """Pack one message (``v`` and ``t`` are part of every ``Message``)."""
    return _encode(msg)


def _reject_ext(code: int, data: memoryview) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


class WireError(ErllamaError):
    """A ``protocol_error`` from a decoder. ``raw`` is the frame as an untyped map when it was one, so
    the receiver can still address its error reply (a client's ``id``, a ``rid``)."""

    def __init__(self, message: str, raw: dict[str, Any] | None = None, detail: dict[str, Any] | None = None):
        super().__init__(ErrorCode.PROTOCOL_ERROR, message, detail)
        self.raw = raw

    def field(self, name: str, kind: type) -> Any:
        """The raw map's ``name`` if it has type ``kind`` (never a bool for an int), else None."""
        value = self.raw.get(name) if self.raw is not None else None
        if isinstance(value, bool) and kind is not bool:
            return None
        return value if isinstance(value, kind) else None


class Decoder(Generic[M]):
    """Decodes the frames of one socket into the messages of ``union`` (one instance per socket)."""

    def __init__(self, union: Any):
        self._decoder = msgspec.msgpack.Decoder(union, ext_hook=_reject_ext)
        members = get_args(union) or (union,)
        self.accepted = frozenset(m.__struct_config__.tag for m in members)

    def decode(self, frame: bytes | memoryview) -> M:
        _decoding.active = True
        try:
            msg = self._decoder.decode(frame)
        except _DECODE_ERRORS as exc:
            raise self._diagnose(frame, exc) from None
        finally:
            _decoding.active = False
        if msg.v != PROTOCOL_VERSION:
            raise self._diagnose(frame, None)
        return cast(M, msg)

    def _diagnose(self, frame: bytes | memoryview, exc: Exception | None) -> WireError:
        try:
            raw = msgspec.msgpack.decode(frame, ext_hook=_reject_ext)
        except _DECODE_ERRORS as err:
            return WireError(f"undecodable frame: {type(err).__name__}")
        if not isinstance(raw, dict):
            return WireError("a message must be a msgpack map")
        v = raw.get("v")
        if type(v) is not int or v != PROTOCOL_VERSION:
            shown = None if v == MISSING_VERSION else v
            return WireError(
                f"unsupported protocol version {shown!r}", raw, {"supported": [PROTOCOL_VERSION]}
            )
        t = raw.get("t")
        if not isinstance(t, str):
            return WireError("a message needs a str 't'", raw)
        if t not in KNOWN_TYPES:
            return WireError(f"unknown message type {t!r}", raw)
        if t not in self.accepted:
            return WireError(f"message type {t!r} is not accepted here", raw)
        return WireError(f"{t}: {exc}", raw)


def client_request_decoder() -> Decoder[ClientRequest]:
    """The broker's client sockets."""
    return Decoder(ClientRequest)


def client_event_decoder() -> Decoder[ClientEvent]:
    """A client's socket to the broker."""
    return Decoder(ClientEvent)


def worker_message_decoder() -> Decoder[WorkerMessage]:
    """The broker's worker socket."""
    return Decoder(WorkerMessage)


def worker_command_decoder() -> Decoder[WorkerCommand]:
    """A worker's socket to the broker."""
    return Decoder(WorkerCommand)


def broker_heartbeat_decoder() -> Decoder[BrokerHeartbeat]:
    """A worker's heartbeat socket."""
    return Decoder(BrokerHeartbeat)


def host_message_decoder() -> Decoder[HostMessage]:
    """The broker's host socket."""
    return Decoder(HostMessage)


def host_command_decoder() -> Decoder[HostCommand]:
    """A host's socket to the broker."""
    return Decoder(HostCommand)


def cache_request_decoder() -> Decoder[CacheRequest]:
    """The cache store's socket."""
    return Decoder(CacheRequest)


def cache_reply_decoder(reply: type[CacheReply]) -> Decoder[Any]:
    """What a cache client expects after a request whose ``c.ok`` is ``reply``: that, or ``err``."""
    return Decoder(reply | Error)


def frame_or_error(payload: bytes, limit: int, error: Callable[[ErllamaError], Message]) -> bytes:
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
    return encode(error(err))


def error_of(err: ErllamaError, rid: int | None) -> Error:
    """``err`` as the message between broker, worker and cache store."""
    return Error(rid=rid, code=err.code, message=err.message, detail=err.detail)


def as_exception(msg: Error | Any) -> ErllamaError:
    """An ``err`` message as the exception it stands for."""
    return ErllamaError(msg.code, msg.message, msg.detail)


def error_reply_of(err: ErllamaError, client_id: str | None) -> ErrorReply:
    """``err`` as the message to a client, addressed by its request id."""
    return ErrorReply(id=client_id, code=err.code, message=err.message, detail=err.detail)
