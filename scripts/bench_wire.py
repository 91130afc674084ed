#!/usr/bin/env python3
"""What the broker does for every token, measured side by side in one run:

- dict (the dict protocol the typed wire replaced, re-created here as the reference): one token per
  message, ``msgpack.unpackb`` into a map, check the version, the type and every field against a schema
  table, build the client's map, ``packb``;
- typed, one step per message (a tick of a single stream): decode the worker's ``Tokens`` with the worker
  socket's msgspec decoder, build the client's ``StreamTokens``, encode it;
- typed, a tick of N streams of one client in one message (how the worker and broker send them).

Prints per-token microseconds (median of --rounds alternating rounds), the ratio typed/dict and the
ratio of an 8-stream tick to a one-stream tick.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import msgpack

from erllama import protocol
from erllama.protocol import StreamStep, StreamTokens, Tokens, TokenStep, encode

SCHEMA = {"rid": (int,), "text": (str,), "token_ids": (list,)}  # the dict protocol's check of a token
CLIENT_ID = "c0ffee" * 5
TICK_STREAMS = (1, 8, 16)


def dict_relay(frame: bytes) -> bytes:
    msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    if (
        not isinstance(msg, dict)
        or msg.get("v") != protocol.PROTOCOL_VERSION
        or not isinstance(msg.get("t"), str)
    ):
        raise ValueError("bad message")
    for name, types in SCHEMA.items():
        value = msg[name]
        if not isinstance(value, types) or isinstance(value, bool):
            raise TypeError(name)
    out = {
        "id": CLIENT_ID,
        "text": msg["text"],
        "token_ids": msg["token_ids"],
        "kind": msg.get("kind", "text"),
        "ts_ns": msg.get("ts_ns"),
        "v": protocol.PROTOCOL_VERSION,
        "t": "tok",
    }
    return msgpack.packb(out, use_bin_type=True)


def typed_relay(decoder: protocol.Decoder[Any], frame: bytes) -> bytes:
    msg = decoder.decode(frame)
    assert isinstance(msg, Tokens)
    steps = [StreamStep(CLIENT_ID, s.text, s.token_ids, s.kind, msg.ts_ns) for s in msg.steps]
    return encode(StreamTokens(steps=steps))


def per_token_us(fn: Any, frames: list[bytes], tokens_per_frame: int) -> float:
    t0 = time.perf_counter()
    for frame in frames:
        fn(frame)
    return (time.perf_counter() - t0) / (len(frames) * tokens_per_frame) * 1e6


def dict_frames(n: int) -> list[bytes]:
    return [
        msgpack.packb(
            {
                "t": "tok",
                "v": protocol.PROTOCOL_VERSION,
                "rid": i % 64,
                "text": " word",
                "token_ids": [1000 + i % 5000],
                "ts_ns": time.monotonic_ns(),
            }
        )
        for i in range(n)
    ]


def tick_frames(n: int, streams: int) -> list[bytes]:
    return [
        encode(
            Tokens(
                steps=[
                    TokenStep(rid=j, text=" word", token_ids=[1000 + (i + j) % 5000]) for j in range(streams)
                ],
                ts_ns=time.monotonic_ns(),
            )
        )
        for i in range(n // streams)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=160_000, help="token events per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    decoder = protocol.worker_message_decoder()
    plain = dict_frames(args.tokens)
    ticks = {n: tick_frames(args.tokens, n) for n in TICK_STREAMS}
    times: dict[str, list[float]] = {"dict": []} | {f"typed {n}": [] for n in TICK_STREAMS}
    for _ in range(args.rounds):
        times["dict"].append(per_token_us(dict_relay, plain, 1))
        for n in TICK_STREAMS:
            times[f"typed {n}"].append(per_token_us(lambda f: typed_relay(decoder, f), ticks[n], n))
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| relay of one token | µs per token |")
    print("| --- | --- |")
    print(f"| dict + schema check (msgpack), one token per message | {med['dict']:.2f} |")
    for n in TICK_STREAMS:
        print(f"| typed (msgspec), a tick of {n} stream(s) per message | {med[f'typed {n}']:.2f} |")
    print(f"| **ratio typed/dict (one stream)** | **{med['typed 1'] / med['dict']:.2f}** |")
    print(f"| **ratio 8-stream tick / one-stream tick** | **{med['typed 8'] / med['typed 1']:.2f}** |")


if __name__ == "__main__":
    main()
