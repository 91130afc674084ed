"""The worker's socket emitter sends a tick's tokens as one message, and never lets a request's later
events overtake its tokens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from erllama import protocol
from erllama.protocol import CompletionResult, Done, FinishReason, SpanEnd, Tokens
from erllama.worker.service import SocketEmitter


@pytest.fixture
def pair() -> Iterator[tuple[SocketEmitter, zmq.Socket]]:
    ctx = zmq.Context()
    out, back = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    out.bind("inproc://emitter")
    back.connect("inproc://emitter")
    try:
        yield SocketEmitter(out), back
    finally:
        out.close(linger=0)
        back.close(linger=0)
        ctx.term()


def received(sock: zmq.Socket) -> list[protocol.WorkerMessage]:
    decoder = protocol.worker_message_decoder()
    got = []
    while sock.poll(100):
        got.append(decoder.decode(sock.recv()))
    return got


def test_a_ticks_tokens_for_several_requests_leave_as_one_message_on_flush(pair):
    emitter, back = pair
    emitter.token(1, "a", [10])
    emitter.token(2, "b", [20])
    assert received(back) == []  # held until the tick ends
    emitter.flush()
    emitter.flush()  # nothing held: nothing sent
    (msg,) = received(back)
    assert isinstance(msg, Tokens) and msg.ts_ns is not None
    assert [(s.rid, s.text, s.token_ids) for s in msg.steps] == [(1, "a", [10]), (2, "b", [20])]


def test_any_other_message_sends_the_held_tokens_first(pair):
    emitter, back = pair
    emitter.token(1, "a", [10])
    emitter.span_end(1, "tool_call_end", "{}", b"")
    emitter.token(1, "b", [11])
    emitter.done(1, CompletionResult(reply="ab", generated=[10, 11], finish_reason=FinishReason.STOP))
    kinds = [type(m) for m in received(back)]
    assert kinds == [Tokens, SpanEnd, Tokens, Done]
