"""Hostile input on every socket: generated messages of every type, raw bytes, multi-frame messages.

Three targets, each fed batches of messages that ``hypothesis`` generates from the wire schema
(the typed messages of ``erllama.protocol``, so a type added later is fuzzed without touching this file):

(a) the broker's client ROUTER, through raw DEALER sockets: every message gets exactly one
    terminal reply (``ok``, ``done`` or an ``err`` whose code is an ``ErrorCode``), addressed to
    its ``id`` when it had a usable one, else to ``id`` None; streams carry only ``tok`` before it;
(b) the broker's worker ROUTER, from a fake worker: nothing crashes and the real worker beside it
    keeps serving from the same process;
(c) a worker process, through a ROUTER of our own standing in for the broker: it stays alive and
    answers every well-formed ``run`` and ``op`` with exactly one typed result.

Messages are pipelined (a whole batch is sent, then the replies are drained). The default suite
sends ~10,000 generated messages; ``-m slow`` sends more than 100,000 (hypothesis draws about
300-1500 messages per second on the 2-core CI machine, so 100,000 do not fit the default suite).

Then the values that would make llama.cpp assert, sent to the real model: each must be
``invalid_params`` or ``context_overflow`` with the worker still the same process.
Known defects have focused tests here; each says what the generated fuzz would otherwise hit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import msgspec
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from erllama import Client, ErllamaError, protocol
from erllama.options import LoadOptions, SamplingParams
from erllama.protocol import (
    MAX_WORKER_FRAME_BYTES,
    PROTOCOL_VERSION,
    BrokerHeartbeat,
    ClientRequest,
    Error,
    ErrorCode,
    Infer,
    MsgType,
    Op,
    Run,
    Shutdown,
    WireError,
    WorkerCommand,
    WorkerMessage,
    WorkerOp,
)
from erllama.transport import WORKER_SOCKET_NAME, ipc_endpoint
from tests.conftest import REAL_MODEL_ID, BrokerProcess, remove_runtime, short_tmpdir, start_broker
from tests.wire_support import raw_frame

FUZZ_MODEL: Final = "fz"
# max_tokens defaults to 256: a valid request without it is context_overflow here, not a long stream.
STUB_N_CTX: Final = 64
BATCH: Final = 50
DRAIN_TIMEOUT_S: Final = 120.0  # liveness guard for a whole batch; never a timing assertion
KNOWN_CODES: Final = frozenset(c.value for c in ErrorCode)
TERMINAL: Final = frozenset({MsgType.OK, MsgType.DONE, MsgType.ERROR})

# Generated messages per target. Default suite: ~10,000 in all; -m slow: > 100,000.
DEFAULT_EXAMPLES: Final = {"client": 120, "broker_workers": 40, "worker": 40}
SLOW_EXAMPLES: Final = {"client": 1200, "broker_workers": 400, "worker": 500}

FUZZ_SETTINGS: Final = {
    "deadline": None,
    "database": None,  # no .hypothesis directory left behind
    "phases": (
        Phase.generate,
    ),  # a failure is reported with its batch; shrinking would replay against a live broker
    "suppress_health_check": list(HealthCheck),
}

# --- strategies -------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),  # NaN and the infinities included
    st.text(max_size=12),
    st.binary(max_size=12),
)
ANY = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)


class Ref:
    """Placeholders the batch assembler turns into unique ids, or ids of earlier messages."""

    ID = "\x00id"  # a fresh unique client id
    LONG_ID = "\x00long"  # a fresh unique id longer than MAX_ID_CHARS
    EARLIER = "\x00earlier"  # the id (or rid) of an earlier request in the batch, for cancel targets
    RID = -(2**62) + 1  # a fresh unique rid (an int, so the field type stays right)
    EARLIER_RID = -(2**62) + 2


def _by_type(types: tuple[type, ...]) -> st.SearchStrategy[Any]:
    options: list[st.SearchStrategy[Any]] = []
    for t in types:
        if t is str:
            options.append(st.text(max_size=16))
        elif t is int:
            options.append(st.integers(-(2**63), 2**63 - 1))
        elif t is bool:
            options.append(st.booleans())
        elif t is dict:
            options.append(st.dictionaries(st.text(max_size=6), SCALARS, max_size=3))
        elif t is list:
            options.append(st.lists(SCALARS, max_size=4))
        elif t is bytes:
            options.append(st.binary(max_size=16))
        elif t is type(None):
            options.append(st.none())
        else:
            options.append(ANY)
    return st.one_of(options)


SAMPLING_KEYS: Final = list(SamplingParams.__struct_fields__)
LOAD_OPTION_KEYS: Final = [f.name for f in dataclasses.fields(LoadOptions)]

# Values that reach past the schema into option parsing, prompt checks and the worker.
SAMPLING = st.dictionaries(
    st.sampled_from(SAMPLING_KEYS) | st.text(max_size=8),
    st.one_of(
        st.integers(0, 6),
        st.floats(),
        st.integers(-(2**63), 2**63 - 1),
        st.lists(st.text(min_size=1, max_size=3), max_size=3),
        SCALARS,
    ),
    max_size=4,
).map(lambda p: p if "max_tokens" in p or len(p) % 2 else p | {"max_tokens": 4})
PROMPTS = st.one_of(
    st.text(min_size=1, max_size=24),
    st.lists(st.integers(0, 257), min_size=1, max_size=12),  # inside the stub's vocabulary
    st.lists(st.integers(-3, 400), max_size=12),
    st.lists(SCALARS, max_size=3),
    st.just(""),
)
SEMANTIC: Final[dict[str, st.SearchStrategy[Any]]] = {
    "id": st.sampled_from([Ref.ID] * 8 + [Ref.LONG_ID]),
    "rid": st.sampled_from([Ref.RID] * 6 + [Ref.EARLIER_RID, 0, -1, 2**63 - 1]),
    "target": st.sampled_from([Ref.EARLIER, Ref.EARLIER, "not-in-flight"]),
    "model": st.sampled_from([FUZZ_MODEL] * 4 + ["nope", "", "a/../b", "m" * 129]),
    "prompt": PROMPTS,
    "params": SAMPLING,
    "options": st.dictionaries(st.sampled_from(LOAD_OPTION_KEYS) | st.text(max_size=8), SCALARS, max_size=3),
    "path": st.sampled_from(["/nonexistent/model.gguf", "", ".", "/", "nul\x00byte.gguf", "n" * 300])
    | st.text(max_size=16),
    "op": st.sampled_from(list(WorkerOp)) | st.text(max_size=8),
    "args": st.one_of(
        st.fixed_dictionaries({"text": st.text(max_size=20)}),
        st.fixed_dictionaries({"tokens": st.lists(st.integers(-1, 300), max_size=8)}),
        st.dictionaries(st.text(max_size=8), SCALARS, max_size=3),
    ),
    "tokens": st.lists(st.integers(0, 300), max_size=8)
    | st.lists(st.sampled_from([0, 2**31, 2**32, 2**40, 2**64 - 1]), min_size=1, max_size=3)
    | st.lists(SCALARS, max_size=3),
    "phase": st.sampled_from(["idle", "prefilling", "generating", "bogus"]),
    "code": st.sampled_from(sorted(KNOWN_CODES)) | st.text(max_size=8),
}


# Optional fields the processes read beyond the schema: prime targets for wrongly typed values.
IMPLEMENTATION_FIELDS: Final = [
    "detail",
    "queue_ms",
    "ts_ns",
    "kind",
    "tokens_generated",
    "tokens_prefilled",
    "running",
    "waiting",
    "busy",
    "instance",
    "hit",
    "info",
    "result",
]


def _python_types(t: msgspec.inspect.Type) -> tuple[type, ...]:
    """The Python types msgpack decodes a field of this wire type to."""
    mi = msgspec.inspect
    if isinstance(t, mi.UnionType):
        return tuple(p for member in t.types for p in _python_types(member))
    simple: dict[type, type] = {
        mi.StrType: str,
        mi.IntType: int,
        mi.BoolType: bool,
        mi.BytesType: bytes,
        mi.NoneType: type(None),
        mi.EnumType: str,
        mi.LiteralType: str,
        mi.FloatType: float,
        mi.DictType: dict,
        mi.StructType: dict,
        mi.ListType: list,
        mi.TupleType: list,
    }
    return (simple[type(t)],) if type(t) in simple else (object,)


def _wire_schema() -> dict[MsgType, dict[str, tuple[tuple[type, ...], bool]]]:
    """Each message type's fields (beyond ``v`` and ``t``): their types and whether they are required."""
    schema: dict[MsgType, dict[str, tuple[tuple[type, ...], bool]]] = {}
    for union in (ClientRequest, WorkerMessage, WorkerCommand, BrokerHeartbeat):
        for cls in typing.get_args(union) or (union,):
            info = msgspec.inspect.type_info(cls)
            schema[MsgType(cls.__struct_config__.tag)] = {
                f.encode_name: (_python_types(f.type), f.required)
                for f in info.fields
                if f.encode_name != "v"
            }
    return schema


SCHEMA: Final = _wire_schema()


def _field_value(name: str, types: tuple[type, ...]) -> st.SearchStrategy[Any]:
    return SEMANTIC.get(name, _by_type(types))


def _typed_message(t: MsgType) -> st.SearchStrategy[dict[str, Any]]:
    fields = SCHEMA[t]
    required = {n: _field_value(n, types) for n, (types, req) in fields.items() if req}
    optional = {n: _field_value(n, types) for n, (types, req) in fields.items() if not req}
    return st.fixed_dictionaries(required, optional=optional).map(
        lambda m: {"v": PROTOCOL_VERSION, "t": t.value} | m
    )


@dataclass(frozen=True)
class Deep:
    """A list nested ``depth`` levels deep, expanded only when packed (so reports stay printable)."""

    depth: int

    def expand(self) -> Any:
        value: Any = "bottom"
        for _ in range(self.depth):
            value = [value]
        return value


@st.composite
def _mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """One message: as the schema wants it, or with one defect."""
    msg = dict(draw(base))
    kind = draw(
        st.sampled_from(
            ["valid"] * 5 + ["drop", "retype", "extra", "version", "unknown_type", "huge", "deep", "bad_key"]
        )
    )
    keys = sorted(msg)
    if kind == "drop":
        del msg[draw(st.sampled_from(keys))]
    elif kind == "retype":
        msg[draw(st.sampled_from(keys))] = draw(ANY)
    elif kind == "extra":
        names = st.sampled_from(IMPLEMENTATION_FIELDS) | st.text(min_size=1, max_size=8).filter(
            lambda k: k not in ("v", "t")
        )
        msg |= draw(st.dictionaries(names, ANY, min_size=1, max_size=3))
    elif kind == "version":
        msg["v"] = draw(
            st.one_of(
                st.integers(-5, 5).filter(lambda v: v != PROTOCOL_VERSION),
                st.text(max_size=3),
                st.none(),
                st.floats(),
            )
        )
    elif kind == "unknown_type":
        msg["t"] = draw(st.text(max_size=12).filter(lambda s: s not in {m.value for m in MsgType}))
    elif kind == "huge":
        msg[draw(st.sampled_from([k for k in keys if k not in ("v",)] or ["t"]))] = "x" * draw(
            st.sampled_from([4096, 65_536, 300_000])
        )
    elif kind == "deep":
        msg[draw(st.sampled_from(keys))] = Deep(draw(st.sampled_from([64, 300, 500])))
    elif kind == "bad_key":  # a map key that is not a string: msgpack-legal, rejected by the decoder
        msg[draw(st.sampled_from(keys))] = {draw(st.integers(0, 9)): "x"}
    return msg


RAW_FRAMES = st.one_of(
    st.binary(max_size=64).map(lambda b: [b]),
    st.lists(SCALARS, max_size=4).map(lambda v: [msgpack.packb(v, use_bin_type=True)]),  # not a map
    SCALARS.map(lambda v: [msgpack.packb(v, use_bin_type=True)]),
    st.sampled_from(
        [[b"\x91" * 5000 + b"\xc0"], [b"\x81\xa1a" * 3000 + b"\xc0"], [b""], [b"\xc1"], [b"\xd4\x01\x00"]]
    ),
)


@dataclass
class Draft:
    """A generated message before ids are assigned: a map to pack, or raw frames."""

    msg: dict[str, Any] | None = None
    frames: list[bytes] | None = None
    extra_frames: list[bytes] = field(default_factory=list)  # multi-frame messages

    def __repr__(self) -> str:
        body = repr(self.msg) if self.msg is not None else repr(self.frames)
        extra = f" +{len(self.extra_frames)} frames" if self.extra_frames else ""
        return f"Draft({body[:300]}{'...' if len(body) > 300 else ''}{extra})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def drafts(types: list[MsgType]) -> st.SearchStrategy[Draft]:
    typed = st.one_of([_mutated(_typed_message(t)) for t in types])
    return st.one_of(
        typed.map(lambda m: Draft(msg=m)),
        typed.map(lambda m: Draft(msg=m)),
        typed.map(lambda m: Draft(msg=m)),
        typed.map(lambda m: Draft(msg=m)),
        RAW_FRAMES.map(lambda f: Draft(frames=f)),
        st.tuples(typed, st.lists(st.binary(max_size=8), min_size=1, max_size=2)).map(
            lambda p: Draft(msg=p[0], extra_frames=p[1])
        ),
    )


ALL_TYPES: Final = list(MsgType)


# --- assembling a batch: ids, guards, the oracle ------------------------------------------------------------


@dataclass
class Sent:
    frames: list[bytes]
    t: str  # the message type as generated (or "raw"), for coverage counts
    key: str | int | None  # the id (client) or rid (worker) its reply must carry; None: anonymous
    expect: str  # "protocol_error", "answer", "stream", "none", "maybe"


def _expand(obj: Any) -> Any:
    if isinstance(obj, Deep):
        return obj.expand()
    raise TypeError(f"cannot pack {type(obj).__name__}")


def _pack(msg: dict[str, Any]) -> bytes | None:
    try:
        return msgpack.packb(msg, use_bin_type=True, default=_expand)
    except (OverflowError, ValueError, TypeError):
        return None


MSG_TYPE_VALUES: Final = frozenset(t.value for t in MsgType)


def type_name(msg: dict[str, Any]) -> str:
    t = msg.get("t")
    return t if isinstance(t, str) and t in MSG_TYPE_VALUES else "unknown_type"


class Assembler:
    """Turns drafts into frames with unique ids, keeps dangerous-but-valid requests out, and says
    what each message must be answered with (using the protocol module's own decode/validate only to
    know which id a reply can carry)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.n = 0
        self.next_rid = 10_000_000
        # run/op rids ever sent: never reused, so a late answer is unambiguous
        self.used_rids: set[int] = set()
        self.late_ok: set[Any] = set()  # rids whose answer was optional ("maybe") and may still arrive
        self.client_decoder = protocol.client_request_decoder()

    def _ids(self, msg: dict[str, Any], earlier: list[Any]) -> None:
        for k, v in list(msg.items()):
            if v is Ref.ID or (isinstance(v, str) and v == Ref.ID):
                self.n += 1
                msg[k] = f"{self.prefix}{self.n}"
            elif isinstance(v, str) and v == Ref.LONG_ID:
                self.n += 1
                msg[k] = f"{self.prefix}{self.n}-" + "x" * 200
            elif isinstance(v, str) and v == Ref.EARLIER:
                msg[k] = next((e for e in reversed(earlier) if isinstance(e, str)), "none-earlier")
            elif isinstance(v, int) and not isinstance(v, bool) and v == Ref.RID:
                self.next_rid += 1
                msg[k] = self.next_rid
            elif isinstance(v, int) and not isinstance(v, bool) and v == Ref.EARLIER_RID:
                msg[k] = next((e for e in reversed(earlier) if isinstance(e, int)), 1)

    def client_batch(self, batch: list[Draft], loaded: set[str]) -> list[Sent]:
        out: list[Sent] = []
        earlier: list[Any] = []
        used: set[str] = set()
        for d in batch:
            if d.msg is None:
                assert d.frames is not None
                out.append(Sent(d.frames, "raw", None, "protocol_error"))
                continue
            msg = dict(d.msg)
            self._ids(msg, earlier)
            if isinstance(msg.get("id"), str) and msg["id"] in used:
                self.n += 1
                msg["id"] = f"{self.prefix}{self.n}"  # two messages of one batch never share an id
            if isinstance(msg.get("id"), str):
                used.add(msg["id"])
            _guard_client(msg, loaded)
            frame = _pack(msg)
            if frame is None:
                continue
            t = type_name(msg)
            frames = [frame, *d.extra_frames]
            if d.extra_frames:
                out.append(Sent(frames, t, None, "protocol_error"))
                continue
            try:
                decoded = self.client_decoder.decode(frame)
            except WireError as err:
                out.append(Sent(frames, t, err.field("id", str), "protocol_error"))
                continue
            cid = decoded.id
            if isinstance(decoded, Infer):
                earlier.append(cid)
            out.append(Sent(frames, t, cid, "stream" if isinstance(decoded, Infer) else "answer"))
        return out

    def worker_batch(self, batch: list[Draft]) -> list[Sent]:
        """For a worker process: every frame is handled on its own (the worker reads frame by frame)."""
        out: list[Sent] = []
        earlier: list[Any] = []
        used = self.used_rids
        for d in batch:
            if d.msg is None:
                assert d.frames is not None
                out.extend(Sent([f], "raw", None, "none") for f in d.frames)
                continue
            msg = dict(d.msg)
            self._ids(msg, earlier)
            rid = msg.get("rid")
            if msg.get("t") in (MsgType.RUN, MsgType.OP) and isinstance(rid, int) and rid in used:
                self.next_rid += 1
                msg["rid"] = self.next_rid  # a run or op of one batch never shares a rid with another
            if isinstance(msg.get("rid"), int) and msg.get("t") in (MsgType.RUN, MsgType.OP):
                used.add(msg["rid"])
            frame = _pack(msg)
            if frame is None:
                continue
            t = type_name(msg)
            sent = _worker_expectation(frame, t)
            if sent is None:
                continue  # a valid shutdown or err would stop the worker: sent once, at the end
            if isinstance(sent.key, int) and sent.expect in ("answer", "stream"):
                earlier.append(sent.key)
            out.append(sent)
            out.extend(Sent([f], "raw", None, "none") for f in d.extra_frames)
        return out


def _guard_client(msg: dict[str, Any], loaded: set[str]) -> None:
    """Keep the fuzz from loading real models or unloading the one it talks to."""
    t = msg.get("t")
    model = msg.get("model")
    if t == MsgType.LOAD_MODEL and not (isinstance(model, str) and model in loaded):
        path = msg.get("path")
        if path is None or "path" not in msg or (isinstance(path, str) and _is_file(path)):
            msg["path"] = "/nonexistent/fuzz.gguf"
    if t == MsgType.UNLOAD_MODEL and isinstance(model, str) and model in loaded:
        msg["model"] = "nope"


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


WORKER_COMMANDS: Final = protocol.worker_command_decoder()
BROKER_TO_WORKER_TYPES: Final = frozenset(
    MsgType(c.__struct_config__.tag) for c in typing.get_args(WorkerCommand)
)


def _worker_expectation(frame: bytes, t: str) -> Sent | None:
    try:
        msg = WORKER_COMMANDS.decode(frame)
    except WireError as err:
        if err.raw is None:
            return Sent([frame], t, None, "none")
        # A run or op with a rid but a malformed body: answered with a typed error, or (today) dropped;
        # see test_a_worker_answers_a_malformed_run_or_op_that_has_a_rid_with_a_typed_error.
        rid = err.field("rid", int)
        if err.field("t", str) in (MsgType.RUN, MsgType.OP) and rid is not None:
            return Sent([frame], t, rid, "maybe")
        return Sent([frame], t, None, "none")
    if isinstance(msg, Shutdown | Error):
        return None
    if isinstance(msg, Run):
        return Sent([frame], t, msg.rid, "stream")
    if isinstance(msg, Op):
        return Sent([frame], t, msg.rid, "answer")
    return Sent([frame], t, None, "none")


# --- draining replies -------------------------------------------------------------------------------------


def drain(
    sock: zmq.Socket,
    sent: list[Sent],
    key_field: str,
    alive: Callable[[], bool],
    *,
    router: bool = False,
    late_ok: set[Any] | None = None,
) -> list[dict[str, Any]]:
    """Receive until every message that must be answered has its terminal reply; check each reply.
    ``alive`` says whether the peer process still runs: a dead peer fails the batch at once.
    ``late_ok`` holds keys of earlier batches whose (optional) answer may still come; this batch's
    optional keys that got no answer are added to it."""
    late_ok = late_ok if late_ok is not None else set()
    by_key: dict[Any, Sent] = {s.key: s for s in sent if s.key is not None and s.expect != "none"}
    assert len(by_key) == len([s for s in sent if s.key is not None and s.expect != "none"]), "duplicate keys"
    open_keys = {k for k, s in by_key.items() if s.expect != "maybe"}
    anonymous_due = sum(1 for s in sent if s.key is None and s.expect == "protocol_error")
    anonymous_got = 0
    finished: set[Any] = set()
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while open_keys or anonymous_got < anonymous_due:
        assert alive(), "the process under test died"
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0 or not sock.poll(min(left_ms, 500)):
            if left_ms > 0:
                continue
            missing = sorted(map(str, open_keys))[:5]
            raise AssertionError(
                f"no terminal reply for {len(open_keys)} messages (e.g. {missing}: "
                f"{[by_key[k].frames[0][:200] for k in list(open_keys)[:3] if by_key[k].frames]}); "
                f"anonymous {anonymous_got}/{anonymous_due}"
            )
        frames = sock.recv_multipart()
        if router:
            frames = frames[1:]
        assert len(frames) == 1, frames
        reply = msgpack.unpackb(frames[0], raw=False)
        replies.append(reply)
        t = reply.get("t")
        key = reply.get(key_field)
        if t in (MsgType.HEARTBEAT, MsgType.ADMITTED, MsgType.READY, MsgType.SPAN_END):
            continue
        if t == MsgType.TOKEN:  # a tick's steps, each [id or rid, text, token ids, kind, ...]
            for step in reply["steps"]:
                s = by_key.get(step[0])
                assert s is not None and step[0] not in finished, f"tokens for no open stream: {reply}"
                assert s.expect == "stream", f"tokens for a non-streaming {s.t}: {reply}"
            continue
        if t == MsgType.ERROR:
            assert reply.get("code") in KNOWN_CODES, reply
            assert isinstance(reply.get("message"), str) and reply["message"], reply
        if key is None:
            assert t == MsgType.ERROR and reply["code"] == ErrorCode.PROTOCOL_ERROR, reply
            anonymous_got += 1
            assert anonymous_got <= anonymous_due, f"more anonymous errors than anonymous messages: {reply}"
            continue
        s = by_key.get(key)
        if s is None and key in late_ok:
            assert t == MsgType.ERROR, reply
            late_ok.discard(key)
            continue
        assert s is not None, f"a reply to no message of ours: {str(reply)[:300]}"
        assert key not in finished, f"a second reply after the terminal one: {str(reply)[:300]}"
        assert t in TERMINAL, reply
        if s.expect == "protocol_error":
            assert t == MsgType.ERROR and reply["code"] == ErrorCode.PROTOCOL_ERROR, (
                reply,
                s.frames[0][:300],
            )
        if s.expect == "maybe":
            assert t == MsgType.ERROR, reply
        finished.add(key)
        open_keys.discard(key)
    late_ok.update(k for k, s in by_key.items() if s.expect == "maybe" and k not in finished)
    return replies


# --- (a) the broker's client socket -------------------------------------------------------------------------


class serving_broker:
    """A broker in a private runtime dir serving the stub as ``FUZZ_MODEL``; stopped and removed on exit."""

    def __enter__(self) -> BrokerProcess:
        self.rdir = short_tmpdir("erl-fz-")
        self.bp = start_broker(self.rdir, "--no-default-model")
        self.children: list[psutil.Process] = []
        try:
            with Client(self.bp.endpoint) as c:
                c.load_model(FUZZ_MODEL, backend="stub", n_ctx=STUB_N_CTX, n_seq_max=4, max_queue=4096)
            self.children = psutil.Process(self.bp.proc.pid).children(recursive=True)
        except BaseException:
            self.__exit__()
            raise
        return self.bp

    def __exit__(self, *exc: object) -> None:
        self.bp.stop()
        # A broker these tests crash leaves its children behind (the cache store does not die with its
        # parent): end the ones it had when we started it, by their own pids.
        for child in self.children:
            try:
                if child.is_running():
                    child.kill()
                    child.wait(10)
            except psutil.Error:
                pass
        remove_runtime(self.rdir)  # and its shm tier


@pytest.fixture(scope="module")
def fuzz_broker() -> Iterator[BrokerProcess]:
    """For the client-socket fuzz. The worker-socket fuzz gets brokers of its own: fake workers it
    registers would otherwise be sent this fuzz's requests (and never answer them)."""
    with serving_broker() as bp:
        yield bp


@dataclass
class Health:
    broker_pid: int
    worker_pid: int


def health(bp: BrokerProcess) -> Health:
    assert bp.proc.poll() is None, "the broker died"
    with Client(bp.endpoint, timeout_s=10.0) as c:
        broker_pid = c.ping()["pid"]
        r = c.complete(FUZZ_MODEL, "still serving", max_tokens=3)
        assert r.finish_reason == "length" and len(r.generated) == 3
        return Health(broker_pid, c.model_info(FUZZ_MODEL)["worker_pid"])


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.connect(endpoint)
    return s


def run_client_fuzz(bp: BrokerProcess, examples: int) -> Counter[str]:
    before = health(bp)
    seen: Counter[str] = Counter()
    ctx = zmq.Context()
    socks = [dealer(ctx, bp.endpoint) for _ in range(3)]
    asm = Assembler("fz-")
    turn = [0]
    try:

        @settings(max_examples=examples, **FUZZ_SETTINGS)
        @given(st.lists(drafts(ALL_TYPES), min_size=BATCH, max_size=BATCH))
        def batch(ds: list[Draft]) -> None:
            sent = asm.client_batch(ds, {FUZZ_MODEL})
            sock = socks[turn[0] % len(socks)]
            turn[0] += 1
            for s in sent:
                sock.send_multipart(s.frames)
                seen[s.t] += 1
            drain(sock, sent, "id", lambda: bp.proc.poll() is None)

        batch()
    finally:
        for s in socks:
            s.close()
        ctx.term()
    after = health(bp)
    assert after == before, "the broker or the fuzzed model's worker was restarted"
    return seen


def assert_every_type_covered(seen: Counter[str], types: list[MsgType]) -> None:
    missing = [t.value for t in types if seen[t.value] == 0]
    assert not missing, f"never generated: {missing}"


def test_generated_client_messages_of_every_type_each_get_one_typed_reply_and_nothing_dies(
    fuzz_broker: BrokerProcess,
):
    seen = run_client_fuzz(fuzz_broker, DEFAULT_EXAMPLES["client"])
    assert_every_type_covered(seen, ALL_TYPES)
    assert seen["raw"] > 0


@pytest.mark.slow
def test_over_100k_generated_messages_across_the_three_sockets(fuzz_broker: BrokerProcess):
    seen = run_client_fuzz(fuzz_broker, SLOW_EXAMPLES["client"])
    with serving_broker() as bp:
        seen += run_broker_worker_socket_fuzz(bp, SLOW_EXAMPLES["broker_workers"])
    with worker_under_test() as w:
        seen += run_worker_fuzz(w, SLOW_EXAMPLES["worker"])
    assert sum(seen.values()) >= 100_000, sum(seen.values())
    assert_every_type_covered(seen, ALL_TYPES)


# --- (b) the broker's worker socket -------------------------------------------------------------------------


@dataclass
class Sacrifice:
    """A process of our own whose pid a fake worker may claim: if the broker ever signals a pid it
    was told over the wire, this is what it hits."""

    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def sacrifice() -> Iterator[Sacrifice]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        yield Sacrifice(proc)
    finally:
        proc.kill()
        proc.wait()


def run_broker_worker_socket_fuzz(
    bp: BrokerProcess, examples: int, fake_pid: int | None = None
) -> Counter[str]:
    before = health(bp)
    seen: Counter[str] = Counter()
    ctx = zmq.Context()
    endpoint = ipc_endpoint(bp.runtime_dir, WORKER_SOCKET_NAME)
    fake = dealer(ctx, endpoint)
    asm = Assembler("fw-")
    pid = fake_pid if fake_pid is not None else os.getpid()
    try:

        @settings(max_examples=examples, **FUZZ_SETTINGS)
        @given(st.lists(drafts(ALL_TYPES), min_size=BATCH, max_size=BATCH))
        def batch(ds: list[Draft]) -> None:
            for d in ds:
                if d.msg is None:
                    assert d.frames is not None
                    fake.send_multipart(d.frames)
                    seen["raw"] += 1
                    continue
                msg = dict(d.msg)
                asm._ids(msg, [])
                if msg.get("t") == MsgType.READY and "pid" in msg:
                    msg["pid"] = pid  # never let the broker learn a pid that is not ours to lose
                frame = _pack(msg)
                if frame is not None:
                    fake.send_multipart([frame, *d.extra_frames])
                    seen[type_name(msg)] += 1
            # The broker answers a few of these (heartbeats, refused registrations): read them, then
            # prove it is still processing this socket in order by a round trip through the real worker.
            while fake.poll(0):
                fake.recv_multipart()
            with Client(bp.endpoint, timeout_s=30.0) as c:
                assert c.complete(FUZZ_MODEL, "between batches", max_tokens=2).finish_reason == "length"

        batch()
    finally:
        fake.close()
        ctx.term()
    after = health(bp)
    assert after == before, "the broker or the real worker was restarted"
    return seen


def test_generated_messages_on_the_broker_worker_socket_crash_nothing_and_real_workers_keep_serving(
    sacrifice: Sacrifice,
):
    with serving_broker() as bp:
        seen = run_broker_worker_socket_fuzz(bp, DEFAULT_EXAMPLES["broker_workers"], sacrifice.proc.pid)
        assert_every_type_covered(seen, ALL_TYPES)
    assert sacrifice.proc.poll() is None, "the broker signalled a pid a fake worker claimed"


# --- (c) a worker process, with us as its broker ------------------------------------------------------------


@dataclass
class WorkerUnderTest:
    proc: subprocess.Popen[bytes]
    router: zmq.Socket
    identity: bytes
    ready: dict[str, Any]
    late_ok: set[Any] = field(default_factory=set)  # rids whose optional answer may still arrive


class worker_under_test:
    """Bind a ROUTER of our own, start ``python -m erllama.worker.main`` against it on the stub backend,
    and wait for its ``ready``. On exit: shutdown (or kill), close, remove the temp dir."""

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = {"backend": "stub", "n_ctx": STUB_N_CTX, "n_seq_max": 4} | (options or {})
        self.rdir = short_tmpdir("erl-w-")
        self.ctx = zmq.Context()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WorkerUnderTest:
        import json

        endpoint = ipc_endpoint(self.rdir, "broker-workers.sock")
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.bind(endpoint)
        self.router = router
        cmd = [
            sys.executable,
            "-m",
            "erllama.worker.main",
            "--id",
            FUZZ_MODEL,
            "--options",
            json.dumps(self.options),
            "--broker",
            endpoint,
            "--runtime-dir",
            str(self.rdir),
            "--no-cache",
            "--log-level",
            "WARNING",
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            assert left > 0 and self.proc.poll() is None, "the worker did not report ready"
            if router.poll(left):
                identity, frame = router.recv_multipart()
                msg = msgpack.unpackb(frame, raw=False)
                if msg.get("t") == MsgType.READY:
                    return WorkerUnderTest(self.proc, router, identity, msg)

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    w_identity = f"w:{FUZZ_MODEL}:{self.proc.pid}".encode()
                    self.router.send_multipart([w_identity, raw_frame(MsgType.SHUTDOWN)])
                    self.proc.wait(timeout=10)
                except (zmq.ZMQError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self.router.close()
            self.ctx.term()
            shutil.rmtree(self.rdir, ignore_errors=True)


def send_worker(w: WorkerUnderTest, frames: list[bytes]) -> None:
    w.router.send_multipart([w.identity, *frames])


def drain_worker(
    w: WorkerUnderTest, sent: list[Sent], late_ok: set[Any] | None = None
) -> list[dict[str, Any]]:
    """Like ``drain``, but the worker's heartbeat thread shares our ROUTER: its beats are skipped."""
    proxy = _WorkerReplies(w)
    late = w.late_ok if late_ok is None else late_ok
    return drain(proxy, sent, "rid", lambda: w.proc.poll() is None, late_ok=late)  # type: ignore[arg-type]


class _WorkerReplies:
    """A socket-like view of the ROUTER that yields only the worker's main-socket messages."""

    def __init__(self, w: WorkerUnderTest):
        self.w = w
        self._held: list[list[bytes]] = []

    def poll(self, timeout_ms: int) -> bool:
        deadline = time.monotonic() + timeout_ms / 1000
        while not self._held:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0 or not self.w.router.poll(left):
                return False
            identity, *frames = self.w.router.recv_multipart()
            if identity == self.w.identity:
                self._held.append(frames)
        return True

    def recv_multipart(self) -> list[bytes]:
        assert self.poll(int(DRAIN_TIMEOUT_S * 1000))
        return self._held.pop(0)


def run_worker_fuzz(w: WorkerUnderTest, examples: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    asm = Assembler("")
    asm.late_ok = w.late_ok
    # The types a worker accepts, four times as often as the rest.
    types = sorted(BROKER_TO_WORKER_TYPES) * 4 + [t for t in ALL_TYPES if t not in BROKER_TO_WORKER_TYPES]

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(st.lists(drafts(types), min_size=BATCH, max_size=BATCH))
    def batch(ds: list[Draft]) -> None:
        sent = asm.worker_batch(ds)
        for s in sent:
            send_worker(w, s.frames)
            seen[s.t] += 1
        drain_worker(w, sent)
        assert w.proc.poll() is None, "the worker died"

    batch()
    assert w.proc.poll() is None
    return seen


def test_generated_broker_to_worker_messages_get_one_typed_result_per_run_and_op_and_the_worker_lives():
    with worker_under_test() as w:
        pid = w.proc.pid
        seen = run_worker_fuzz(w, DEFAULT_EXAMPLES["worker"])
        assert_every_type_covered(seen, sorted(BROKER_TO_WORKER_TYPES - {MsgType.SHUTDOWN, MsgType.ERROR}))
        # Still the same process, still serving, and a valid shutdown ends it cleanly.
        rid = -(2**62)  # one the fuzz never sends
        send_worker(w, [raw_frame(MsgType.OP, rid=rid, op=WorkerOp.TOKENIZE, args={"text": "ok"})])
        replies = drain_worker(w, [Sent([], "op", rid, "answer")])
        assert replies[-1]["t"] == MsgType.OK
        assert w.proc.pid == pid and w.proc.poll() is None
        send_worker(w, [raw_frame(MsgType.SHUTDOWN)])
        assert w.proc.wait(timeout=30) == 0


# --- focused: defects the generated fuzz runs into ----------------------------------------------------------


def test_a_load_model_path_the_os_cannot_stat_is_a_typed_error_and_the_broker_lives():
    """``Path.is_file()`` raises ENAMETOOLONG (an OSError, not False) for a component over 255 bytes, and
    ``Path.resolve()`` raises ValueError for an embedded NUL."""
    with serving_broker() as bp:
        _load_unstatable_paths(bp)


def _load_unstatable_paths(bp: BrokerProcess) -> None:
    before = health(bp)
    ctx = zmq.Context()
    sock = dealer(ctx, bp.endpoint)
    try:
        for i, path in enumerate(
            ["a" * 300, "/tmp/" + "b" * 5000, "/" + "c/" * 3000, "nul\x00byte.gguf", "/tmp/\x00"]
        ):
            sock.send(raw_frame(MsgType.LOAD_MODEL, id=f"long-{i}", model=f"long-{i}", path=path, options={}))
            assert sock.poll(10_000), "no reply: the broker died"
            reply = msgpack.unpackb(sock.recv(), raw=False)
            assert reply["t"] == MsgType.ERROR and reply["id"] == f"long-{i}", reply
            assert reply["code"] in ("load_failed", "invalid_params"), reply
    finally:
        sock.close()
        ctx.term()
    assert health(bp) == before


def test_cached_prefix_len_with_ids_past_32_bits_or_a_workers_odd_fingerprint_is_typed_and_the_broker_lives(
    sacrifice: Sacrifice,
):
    """Token ids are packed as u32 for the cache store; a fingerprint comes from a worker's ``ready``."""
    fingerprints: dict[str, Any] = {"odd-fp-str": "zz", "odd-fp-int": 5, "odd-fp-list": ["ab"]}
    with serving_broker() as bp:
        before = health(bp)
        ctx = zmq.Context()
        intruders = [_worker_socket(ctx, bp) for _ in fingerprints]  # one registration per peer
        try:
            for s, (model, fp) in zip(intruders, fingerprints.items()):
                s.send(
                    raw_frame(
                        MsgType.READY,
                        model=model,
                        pid=sacrifice.proc.pid,
                        slots=1,
                        info={"fingerprint": fp, "n_vocab": 300},
                    )
                )
                sync_worker_socket(s, bp)
            with Client(bp.endpoint, timeout_s=10.0) as c:
                for tokens in ([2**32], [1, 2**40], [2**64 - 1]):
                    with pytest.raises(ErllamaError) as exc:
                        c.cached_prefix_len(FUZZ_MODEL, tokens)
                    assert exc.value.code == "invalid_params", exc.value
                for model in fingerprints:
                    assert c.cached_prefix_len(model, [1, 2]) == 0
        finally:
            for s in intruders:
                s.close()
            ctx.term()
        assert health(bp) == before


def _worker_socket(ctx: zmq.Context, bp: BrokerProcess, linger_ms: int = 0) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, linger_ms)
    s.connect(ipc_endpoint(bp.runtime_dir, WORKER_SOCKET_NAME))
    return s


def sync_worker_socket(s: zmq.Socket, bp: BrokerProcess) -> None:
    """Wait until the broker has handled everything this peer sent: it answers a heartbeat from a peer
    that is not a registered worker with its instance id, and handles one peer's messages in order."""
    s.send(raw_frame(MsgType.HEARTBEAT, model="nobody", pid=1, progress=0, phase="idle", busy=False))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert bp.proc.poll() is None, "the broker died"
        if s.poll(200) and msgpack.unpackb(s.recv(), raw=False).get("t") == MsgType.BROKER_HEARTBEAT:
            return
    raise AssertionError("the broker did not answer a heartbeat")


@pytest.mark.parametrize("detail", [[1], "text", 7, True, {"model": ["x"], "pid": {}}])
def test_a_worker_error_with_an_odd_detail_from_an_unknown_peer_is_ignored_and_the_broker_lives(detail: Any):
    with serving_broker() as bp:
        before = health(bp)
        ctx = zmq.Context()
        s = _worker_socket(ctx, bp)
        try:
            s.send(raw_frame(MsgType.ERROR, rid=None, code="load_failed", message="x", detail=detail))
            s.send(
                raw_frame(
                    MsgType.ERROR,
                    rid=None,
                    code="load_failed",
                    message="x",
                    detail={"model": FUZZ_MODEL, "pid": detail},
                )
            )
            sync_worker_socket(s, bp)
        finally:
            s.close()
            ctx.term()
        assert health(bp) == before


def test_a_refused_registration_from_a_peer_that_already_left_does_not_crash_the_broker(sacrifice: Sacrifice):
    """The broker answers a ``ready`` for a model another worker serves with ``err``. If that peer has
    disconnected by then, the ROUTER_MANDATORY send raises EHOSTUNREACH, which must be caught. Whether
    the peer is gone first is a race: each round floods the broker with heartbeats and sends 50 such
    registrations from peers that close at once (before the fix it died in about one run of five)."""
    with serving_broker() as bp:
        before = health(bp)
        ctx = zmq.Context()
        busy = _worker_socket(ctx, bp)
        hb = raw_frame(MsgType.HEARTBEAT, model="nobody", pid=1, progress=0, phase="idle", busy=False)
        ready = raw_frame(MsgType.READY, model=FUZZ_MODEL, pid=sacrifice.proc.pid, slots=1, info={})
        try:
            for _ in range(5):
                leavers = [_worker_socket(ctx, bp, linger_ms=2000) for _ in range(50)]
                for _ in range(5000):
                    busy.send(hb)
                for s in leavers:
                    s.send(ready)
                for s in leavers:
                    s.close()
                deadline = time.monotonic() + 60
                answered = 0
                while answered < 5000:
                    assert bp.proc.poll() is None, "the broker died"
                    assert time.monotonic() < deadline, "the broker stopped answering heartbeats"
                    if busy.poll(200):
                        busy.recv()
                        answered += 1
        finally:
            busy.close()
            ctx.term()
        assert health(bp) == before


def test_a_registered_worker_cannot_inject_tokens_or_results_into_another_models_requests(
    sacrifice: Sacrifice,
):
    """An operator-started worker registers for its own model id. Messages it sends about request ids
    of another model's requests must not reach those requests' clients."""
    with serving_broker() as bp:
        ctx = zmq.Context()
        intruder = _worker_socket(ctx, bp)
        try:
            with Client(bp.endpoint, timeout_s=30.0) as c:
                prompt = "a victim stream"
                solo = c.complete(FUZZ_MODEL, prompt, max_tokens=40).generated
                intruder.send(
                    raw_frame(MsgType.READY, model="intruder", pid=sacrifice.proc.pid, slots=1, info={})
                )
                deadline = time.monotonic() + 30
                while "intruder" not in [m["id"] for m in c.list_models()]:
                    assert time.monotonic() < deadline, "the intruder did not register"
                    time.sleep(0.05)
                stream = c.infer(FUZZ_MODEL, prompt, max_tokens=40)
                events = iter(stream)
                got = [t for t in next(events).token_ids]
                for rid in range(1, 300):  # request ids are small integers: guessable
                    intruder.send(raw_frame(MsgType.TOKEN, steps=[[rid, "INJECTED", [1]]]))
                    intruder.send(raw_frame(MsgType.ERROR, rid=rid, code="internal", message="INJECTED"))
                    intruder.send(raw_frame(MsgType.DONE, rid=rid, result={"reply": "INJECTED"}))
                for ev in events:
                    assert "INJECTED" not in ev.text
                    got.extend(ev.token_ids)
                assert got == solo
                assert stream.result is not None and stream.result.reply != "INJECTED"
        finally:
            intruder.close()
            ctx.term()


@pytest.mark.parametrize("queue_ms", ["abc", [1], {"a": 1}, None, float("nan"), 2**63 - 1])
def test_a_run_with_a_strange_queue_ms_is_served_and_the_worker_lives(queue_ms: Any):
    with worker_under_test() as w:
        send_worker(
            w,
            [raw_frame(MsgType.RUN, rid=21, prompt="hi", params={"max_tokens": 2}, queue_ms=queue_ms)],
        )
        replies = drain_worker(w, [Sent([], "run", 21, "stream")])
        assert replies[-1]["t"] in (MsgType.DONE, MsgType.ERROR), replies[-1]
        assert w.proc.poll() is None, "the worker died"


def test_an_err_addressed_to_a_request_does_not_stop_the_worker():
    """Only a refused registration (``err`` with rid None) tells a worker to leave; an ``err`` with a
    request id is not a broker->worker message and must not end the process. A worker that is
    leaving ends what it holds with ``cancelled``: a run sent right after must complete instead."""
    with worker_under_test() as w:
        send_worker(w, [raw_frame(MsgType.ERROR, rid=5, code="internal", message="not for you")])
        send_worker(w, [raw_frame(MsgType.RUN, rid=31, prompt="still here", params={"max_tokens": 3})])
        replies = drain_worker(w, [Sent([], "run", 31, "stream")])
        assert replies[-1]["t"] == MsgType.DONE and replies[-1]["result"]["finish_reason"] == "length", (
            replies[-1]
        )
        send_worker(w, [raw_frame(MsgType.OP, rid=32, op=WorkerOp.TOKENIZE, args={"text": "x"})])
        assert drain_worker(w, [Sent([], "op", 32, "answer")])[-1]["t"] == MsgType.OK
        assert w.proc.poll() is None


def test_oversized_frames_are_dropped_on_the_broker_worker_socket_and_on_a_worker_and_both_keep_serving():
    """The client socket's limit is tested in test_bad_input.py; here the other two sockets."""
    big = b"\x00" * (MAX_WORKER_FRAME_BYTES + 1)
    with serving_broker() as bp:
        before = health(bp)
        ctx = zmq.Context()
        s = _worker_socket(ctx, bp)
        try:
            s.send(big)  # libzmq drops the connection; the next socket is a new peer
        finally:
            s.close(linger=5000)
        s = _worker_socket(ctx, bp)
        try:
            sync_worker_socket(s, bp)
        finally:
            s.close()
            ctx.term()
        assert health(bp) == before
    with worker_under_test() as w:
        send_worker(w, [big])
        # libzmq treats an oversized frame as a protocol error: the worker's DEALER drops that connection
        # and, being the receiving side, does not reconnect (see the report). The process must live on:
        # its heartbeat thread, on its own socket, keeps beating to us.
        heartbeat_identity = f"h:{FUZZ_MODEL}:{w.proc.pid}".encode()
        beats = 0
        deadline = time.monotonic() + 30
        while beats < 3:
            assert time.monotonic() < deadline, "no heartbeats after an oversized frame"
            assert w.proc.poll() is None, "the worker died"
            if w.router.poll(200) and w.router.recv_multipart()[0] == heartbeat_identity:
                beats += 1
        assert w.proc.poll() is None


# --- values that would make llama.cpp assert, on the real model ----------------------------------------------


@pytest.fixture
def real_pid(real_client: Client) -> Iterator[int]:
    """The real model's worker pid before the test; the test fails if it changed afterwards."""
    pid = real_client.model_info(REAL_MODEL_ID)["worker_pid"]
    yield pid
    assert real_client.model_info(REAL_MODEL_ID)["worker_pid"] == pid, "the real model's worker was restarted"


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": NAN},
        {"temperature": INF},
        {"temperature": -INF},
        {"temperature": -0.5},
        {"top_p": NAN},
        {"top_p": -0.1},
        {"top_p": INF},
        {"min_p": NAN},
        {"min_p": -0.1},
        {"min_p": -INF},
        {"repetition_penalty": NAN},
        {"repetition_penalty": -1.0},
        {"repetition_penalty": INF},
        {"top_k": -1},
        {"top_k": 2**40},
        {"seed": -1},
        {"seed": 2**32 - 1},
        {"seed": 2**64 - 1},
        {"seed": 1.5},
        {"max_tokens": 2**31},
        {"max_tokens": 1.5},
        {"max_tokens": True},
        {"max_tokens": None},
        {"temperature": [0.5]},
        {"top_p": None},
        {"stop": [""]},
        {"stop": ["x"] * 17},
        {"stop": 5},
        {"stop": [5]},
    ],
    ids=repr,
)
def test_nan_inf_negative_and_wrongly_typed_sampling_values_are_invalid_params_on_the_real_model(
    real_client: Client, real_pid: int, params: dict[str, Any]
):
    with pytest.raises(ErllamaError) as exc:
        real_client.complete(REAL_MODEL_ID, "Hello", **params)
    assert exc.value.code == "invalid_params", exc.value


def test_token_ids_at_and_past_the_vocabulary_end_are_invalid_params_and_the_last_id_is_served(
    real_client: Client, real_pid: int
):
    n_vocab = real_client.model_info(REAL_MODEL_ID)["model"]["n_vocab"]
    # (A bool id cannot be sent through the Client, which passes ids through operator.index; the raw-socket
    # test below sends one.)
    for prompt in ([n_vocab], [1, 2, n_vocab + 5, 3], [2**63 - 1], [2**64 - 1], [-(2**63)], [1, None]):
        with pytest.raises(ErllamaError) as exc:
            real_client.complete(REAL_MODEL_ID, prompt, max_tokens=2)
        assert exc.value.code == "invalid_params", (prompt, exc.value)
    r = real_client.complete(REAL_MODEL_ID, [n_vocab - 1], max_tokens=2)
    assert r.finish_reason in ("length", "stop")


def test_max_tokens_past_the_context_is_context_overflow_at_the_boundary(real_client: Client, real_pid: int):
    n_ctx = real_client.model_info(REAL_MODEL_ID)["n_ctx"]
    for max_tokens in (n_ctx + 1, 2 * n_ctx, protocol.MAX_TOKENS_LIMIT):
        with pytest.raises(ErllamaError) as exc:
            real_client.complete(REAL_MODEL_ID, "Hello", max_tokens=max_tokens)
        assert exc.value.code == "context_overflow", (max_tokens, exc.value)
    with pytest.raises(ErllamaError) as exc:
        real_client.complete(REAL_MODEL_ID, "Hello", max_tokens=protocol.MAX_TOKENS_LIMIT + 1)
    assert exc.value.code == "invalid_params"


SMALL_CTX_MODEL: Final = "smollm2-ctx64"
SMALL_CTX: Final = 64


@pytest.fixture(scope="module")
def small_ctx_model(real_broker: BrokerProcess) -> Iterator[str]:
    """The real model with a 64-token context beside the session's model, so filling the context costs a
    64-token prefill instead of 2,048."""
    with Client(real_broker.endpoint, timeout_s=120.0) as c:
        c.load_model(SMALL_CTX_MODEL, None, n_ctx=SMALL_CTX, n_seq_max=1)
        try:
            yield SMALL_CTX_MODEL
        finally:
            c.unload_model(SMALL_CTX_MODEL)


def test_a_token_prompt_exactly_the_context_is_context_overflow_and_one_less_fills_the_context_cleanly(
    real_client: Client, small_ctx_model: str
):
    info = real_client.model_info(small_ctx_model)
    n_ctx, pid = info["n_ctx"], info["worker_pid"]
    assert n_ctx == SMALL_CTX
    filler = real_client.tokenize(small_ctx_model, " the", add_special=False)[0]
    with pytest.raises(ErllamaError) as exc:
        real_client.complete(small_ctx_model, [filler] * n_ctx, max_tokens=1)
    assert exc.value.code == "context_overflow"
    with pytest.raises(ErllamaError) as exc:
        real_client.complete(small_ctx_model, "Hello", max_tokens=n_ctx + 1)
    assert exc.value.code == "context_overflow"
    # One free cell: the prompt fills the KV cache to the last cell, and generation must stop at the
    # end of the context instead of decoding past it (which llama.cpp would refuse or assert on).
    for prompt_len, max_tokens in ((n_ctx - 1, 8), (n_ctx - 4, n_ctx)):
        r = real_client.complete(small_ctx_model, [filler] * prompt_len, max_tokens=max_tokens)
        assert r.finish_reason in ("length", "stop"), r
        assert r.committed_tokens <= n_ctx and prompt_len + len(r.generated) <= n_ctx + 1, r
    assert real_client.model_info(small_ctx_model)["worker_pid"] == pid, "the worker was restarted"


def test_unknown_types_and_wrong_field_types_to_the_real_model_are_typed_errors(
    real_broker: BrokerProcess, real_client: Client, real_pid: int
):
    ctx = zmq.Context()
    sock = dealer(ctx, real_broker.endpoint)
    msgs = {
        "u1": {"t": "generate", "model": REAL_MODEL_ID, "prompt": "hi"},
        "u2": {"t": MsgType.RUN.value, "rid": 1, "prompt": "hi", "params": {}},
        "w1": {"t": MsgType.INFER.value, "model": REAL_MODEL_ID, "prompt": {"text": "hi"}},
        "w2": {"t": MsgType.INFER.value, "model": REAL_MODEL_ID, "prompt": "hi", "params": [1, 2]},
        "w3": {"t": MsgType.INFER.value, "model": REAL_MODEL_ID, "prompt": [[1, 2]]},
        "w6": {"t": MsgType.INFER.value, "model": REAL_MODEL_ID, "prompt": [True, 1]},
        "w4": {
            "t": MsgType.CALL.value,
            "model": REAL_MODEL_ID,
            "op": "detokenize",
            "args": {"tokens": "abc"},
        },
        "w5": {"t": MsgType.CALL.value, "model": REAL_MODEL_ID, "op": "tokenize", "args": {"text": 5}},
    }
    try:
        for mid, m in msgs.items():
            sock.send(msgpack.packb({"v": PROTOCOL_VERSION, "id": mid} | m, use_bin_type=True))
        got: dict[str, dict[str, Any]] = {}
        while len(got) < len(msgs):
            assert sock.poll(30_000), f"missing replies: {set(msgs) - set(got)}"
            r = msgpack.unpackb(sock.recv(), raw=False)
            got[r["id"]] = r
    finally:
        sock.close()
        ctx.term()
    for mid in ("u1", "u2", "w1", "w2"):
        assert got[mid]["t"] == "err" and got[mid]["code"] == "protocol_error", got[mid]
    for mid in ("w3", "w4", "w5", "w6"):
        assert got[mid]["t"] == "err" and got[mid]["code"] == "invalid_params", got[mid]


def test_a_broker_that_dies_leaves_no_worker_or_cache_store_behind():
    """Found while crashing brokers above: the workers die with their broker (PR_SET_PDEATHSIG), the
    cache store did not, and stayed bound to its endpoint with its RAM tier."""
    with serving_broker() as bp:
        children = psutil.Process(bp.proc.pid).children(recursive=True)
        names = sorted(" ".join(c.cmdline()[:2]) for c in children)
        assert any("worker" in n for n in names), names
        bp.proc.send_signal(signal.SIGKILL)
        bp.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left behind: {[' '.join(p.cmdline()[:2]) for p in alive]}"


def test_a_run_whose_rid_is_already_running_is_refused_and_the_first_still_completes():
    # 20 ms per decode keeps the first request running (30 tokens: >= 0.6 s) when the second arrives;
    # without it the stub can finish the first before the worker reads the second, which is then no duplicate.
    with worker_under_test({"stub_decode_ms": 20}) as w:
        first = raw_frame(MsgType.RUN, rid=41, prompt="the first", params={"max_tokens": 30})
        second = raw_frame(MsgType.RUN, rid=41, prompt="the second", params={"max_tokens": 3})
        send_worker(w, [first])
        send_worker(w, [second])
        proxy = _WorkerReplies(w)
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while not any(e["t"] == MsgType.DONE for e in events) and time.monotonic() < deadline:
            if proxy.poll(500):
                e = msgpack.unpackb(proxy.recv_multipart()[0], raw=False)
                if e.get("rid") == 41 and e["t"] in (MsgType.DONE, MsgType.ERROR):
                    events.append(e)
        errors = [e for e in events if e["t"] == MsgType.ERROR]
        done = [e for e in events if e["t"] == MsgType.DONE]
        assert len(errors) == 1 and errors[0]["code"] in KNOWN_CODES, events[-3:]
        assert len(done) == 1 and len(done[0]["result"]["generated"]) == 30, "the first request was lost"
        assert w.proc.poll() is None


def test_a_reply_larger_than_the_clients_frame_limit_is_a_typed_error_and_the_client_keeps_working(
    fuzz_broker: BrokerProcess,
):
    """A client's socket refuses frames over MAX_CLIENT_FRAME_BYTES, and libzmq then drops that
    connection for good (the receiving, connecting side does not reconnect after a protocol error). So
    the broker must not send one: the stub tokenizes one token per byte, and "é" * 7M (14 MB of text,
    under the request limit) tokenizes to 14M ids, ~28 MB of reply."""
    with Client(fuzz_broker.endpoint, timeout_s=60.0) as c:
        with pytest.raises(ErllamaError) as exc:
            c.tokenize(FUZZ_MODEL, "é" * 7_000_000)
        assert exc.value.code in ("invalid_params", "not_supported", "internal"), exc.value
        assert c.ping()  # the same client, still connected
        assert c.complete(FUZZ_MODEL, "after a huge reply", max_tokens=2).finish_reason == "length"


def test_a_worker_reply_larger_than_the_broker_accepts_is_a_typed_error_not_a_silent_timeout(
    real_broker: BrokerProcess, real_pid: int
):
    """Token 46778 of this vocabulary is a newline and 80 spaces: detokenizing a million of them is a
    3 MB request and an 81 MB reply, over MAX_WORKER_FRAME_BYTES. The broker's socket drops such a frame
    (the worker reconnects), so the worker must not send it: the call gets an error, and the broker does
    not keep waiting for a reply that cannot come."""
    long_token = 46778
    with Client(real_broker.endpoint, timeout_s=60.0) as c:
        assert len(c.detokenize(REAL_MODEL_ID, [long_token]).encode()) > 64
        with pytest.raises(ErllamaError) as exc:
            c.detokenize(REAL_MODEL_ID, [long_token] * 1_000_000)
        assert exc.value.code != "timeout", exc.value
        assert c.complete(REAL_MODEL_ID, "Hello", max_tokens=2).finish_reason == "length"


def test_a_worker_answers_a_malformed_run_or_op_that_has_a_rid_with_a_typed_error():
    """The broker is a worker's only peer, but a request id is a return address: a ``run`` or ``op``
    whose body is malformed must be answered (with ``err``), or the broker waits for it forever."""
    with worker_under_test() as w:
        bad = [
            raw_frame(MsgType.RUN, rid=11, prompt=7, params={}),
            raw_frame(MsgType.RUN, rid=12, prompt="hi"),  # no params
            raw_frame(MsgType.RUN, rid=13, prompt="hi", params=[]),
            raw_frame(MsgType.OP, rid=14, op=5, args={}),
            raw_frame(MsgType.OP, rid=15, op="tokenize"),  # no args
        ]
        sent = [Sent([f], "run", rid, "maybe") for f, rid in zip(bad, range(11, 16))]
        for s in sent:
            send_worker(w, s.frames)
            s.expect = "answer"
        replies = drain_worker(w, sent)
        for rid in range(11, 16):
            errs = [r for r in replies if r.get("rid") == rid]
            assert len(errs) == 1 and errs[0]["t"] == MsgType.ERROR and errs[0]["code"] in KNOWN_CODES, errs
        assert w.proc.poll() is None
