"""The wire: every message survives a round trip as itself, each socket's decoder accepts exactly its own
types, and everything else is a typed protocol_error that still names the sender's id when it had one."""

from __future__ import annotations

import typing

import msgpack
import msgspec
import pytest

from erllama import protocol
from erllama.client.wire import ReplyDecoder
from erllama.protocol import (
    PROTOCOL_VERSION,
    CacheRequest,
    ClientEvent,
    ClientRequest,
    ErrorCode,
    HostCommand,
    HostMessage,
    Infer,
    Ping,
    Run,
    SamplingParams,
    StreamStep,
    StreamTokens,
    Tokens,
    TokenStep,
    WireError,
    WorkerCommand,
    WorkerMessage,
    encode,
)
from tests.wire_support import raw_frame

DECODERS = {
    ClientRequest: protocol.client_request_decoder,
    ClientEvent: protocol.client_event_decoder,
    WorkerMessage: protocol.worker_message_decoder,
    WorkerCommand: protocol.worker_command_decoder,
    CacheRequest: protocol.cache_request_decoder,
    HostMessage: protocol.host_message_decoder,
    HostCommand: protocol.host_command_decoder,
}


def example(cls: type[msgspec.Struct]) -> typing.Any:
    """A message of ``cls`` with every required field set to a value of its type."""
    samples: dict[type, typing.Any] = {
        msgspec.inspect.StrType: "x",
        msgspec.inspect.IntType: 7,
        msgspec.inspect.BoolType: True,
        msgspec.inspect.BytesType: b"\x01\x02",
        msgspec.inspect.FloatType: 1.5,
        msgspec.inspect.DictType: {},
        msgspec.inspect.ListType: [],
        msgspec.inspect.AnyType: None,
    }
    fields: dict[str, typing.Any] = {}
    for f in msgspec.inspect.type_info(cls).fields:  # type: ignore[union-attr]
        if not f.required:
            continue
        t = f.type
        if isinstance(t, msgspec.inspect.UnionType):
            t = next(m for m in t.types if not isinstance(m, msgspec.inspect.NoneType))
        if isinstance(t, msgspec.inspect.EnumType):
            fields[f.name] = next(iter(t.cls))
        elif isinstance(t, msgspec.inspect.StructType):
            fields[f.name] = example(t.cls)  # a nested struct (a host's resources), built the same way
        else:
            fields[f.name] = samples[type(t)]
    return cls(**fields)


@pytest.mark.parametrize("union", list(DECODERS), ids=lambda u: DECODERS[u].__name__)
def test_every_message_decodes_to_itself_on_its_socket(union: typing.Any) -> None:
    decoder = DECODERS[union]()
    for cls in typing.get_args(union):
        msg = example(cls)
        assert decoder.decode(encode(msg)) == msg


def test_a_message_is_a_msgpack_map_with_v_and_t() -> None:
    raw = msgpack.unpackb(encode(Ping(id="abc")))
    assert raw == {"v": PROTOCOL_VERSION, "t": "ping", "id": "abc"}


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\xc1 garbage", "undecodable frame"),
        (msgpack.packb([1, 2]), "a message must be a msgpack map"),
        (msgpack.packb({"t": "ping", "id": "x"}), "unsupported protocol version None"),
        (msgpack.packb({"v": 2, "t": "ping", "id": "x"}), "unsupported protocol version 2"),
        (msgpack.packb({"v": PROTOCOL_VERSION, "id": "x"}), "a message needs a str 't'"),
        (raw_frame("no_such_type", id="x"), "unknown message type 'no_such_type'"),
        (raw_frame("run", rid=1, prompt="hi", params={}), "message type 'run' is not accepted here"),
        (raw_frame("infer", id="x", model=5, prompt="hi"), "infer: "),
        (raw_frame("ping", id="x" * 200), "ping: "),
        (msgpack.packb({"v": 1, "t": "ping", "id": msgpack.ExtType(1, b"x")}), "undecodable frame"),
    ],
)
def test_anything_else_is_a_typed_protocol_error(frame: bytes, message: str) -> None:
    with pytest.raises(WireError) as exc:
        protocol.client_request_decoder().decode(frame)
    assert exc.value.code == ErrorCode.PROTOCOL_ERROR and exc.value.message.startswith(message)


def test_a_refused_message_still_names_its_sender_s_id_when_it_had_one() -> None:
    with pytest.raises(WireError) as exc:
        protocol.client_request_decoder().decode(raw_frame("infer", id="mine", model=5, prompt="hi"))
    assert exc.value.field("id", str) == "mine"
    with pytest.raises(WireError) as exc:
        protocol.worker_command_decoder().decode(raw_frame("run", rid=True, prompt="hi", params={}))
    assert exc.value.field("rid", int) is None  # a bool is never an id


def test_unknown_fields_are_ignored() -> None:
    decoded = protocol.client_request_decoder().decode(raw_frame("ping", id="x", added_later=[1, 2]))
    assert decoded == Ping(id="x")


def test_a_run_checks_the_sampling_constraints_as_it_decodes() -> None:
    decoder = protocol.worker_command_decoder()
    ok = decoder.decode(raw_frame("run", rid=1, prompt=[1, 2], params={"temperature": 0.5, "stop": ["x"]}))
    assert isinstance(ok, Run) and ok.params == SamplingParams(temperature=0.5, stop=("x",))
    for params in (
        {"temperature": -1.0},
        {"top_p": float("nan")},
        {"seed": "x"},
        {"bogus": 1},
        {"stop": [""]},
    ):
        with pytest.raises(WireError):
            decoder.decode(raw_frame("run", rid=1, prompt="hi", params=params))


def test_infer_parameters_travel_untyped_to_be_refused_as_invalid_params_by_the_broker() -> None:
    msg = protocol.client_request_decoder().decode(
        raw_frame("infer", id="x", model="m", prompt=[1.5], params={"a": 1})
    )
    assert isinstance(msg, Infer) and msg.params == {"a": 1} and msg.prompt == [1.5]


def test_a_token_relay_keeps_the_fields_a_client_reads() -> None:
    steps = [
        TokenStep(rid=3, text="hé", token_ids=[9]),
        TokenStep(rid=4, text="", token_ids=[7, 8], kind="thinking"),
    ]
    toks = protocol.worker_message_decoder().decode(encode(Tokens(steps=steps, ts_ns=5)))
    assert isinstance(toks, Tokens) and toks.ts_ns == 5
    assert [(s.rid, s.text, s.token_ids, s.kind) for s in toks.steps] == [
        (3, "hé", [9], "text"),
        (4, "", [7, 8], "thinking"),
    ]


def test_a_clients_tick_of_tokens_splits_into_one_event_per_request() -> None:
    steps = [StreamStep("a", "x", [1], "text", 5), StreamStep("b", "y", [2], "text", 5)]
    events = ReplyDecoder().decode(encode(StreamTokens(steps=steps)))
    assert [(e.id, e.text, e.token_ids) for e in events] == [("a", "x", [1]), ("b", "y", [2])]
    assert all(isinstance(e, StreamStep) and e.ts_ns == 5 for e in events)
