#!/usr/bin/env python3
"""What the broker does for every token, measured two ways side by side in one run:

- typed (what erllama does): decode the worker's ``tok`` with the worker socket's msgspec decoder into a
  ``Token``, build the client's ``StreamToken``, encode it;
- dict (the dict protocol it replaced, re-created here as the reference): ``msgpack.unpackb`` into a map,
  check the version, the type and every field against a schema table, build the client's map, ``packb``.

Prints per-token microseconds (median of --rounds alternating rounds) and the ratio typed/dict.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import msgpack

from erllama import protocol
from erllama.protocol import StreamToken, Token, encode

SCHEMA = {"rid": (int,), "text": (str,), "token_ids": (list,)}  # the dict protocol's check of a token


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
        "id": "c0ffee" * 5,
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
    assert isinstance(msg, Token)
    event = StreamToken(
        id="c0ffee" * 5, text=msg.text, token_ids=msg.token_ids, kind=msg.kind, ts_ns=msg.ts_ns
    )
    return encode(event)


def per_token_us(fn: Any, frames: list[bytes]) -> float:
    t0 = time.perf_counter()
    for frame in frames:
        fn(frame)
    return (time.perf_counter() - t0) / len(frames) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000, help="token events per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    frames = [
        encode(Token(rid=i % 64, text=" word", token_ids=[1000 + i % 5000], ts_ns=time.monotonic_ns()))
        for i in range(args.tokens)
    ]
    decoder = protocol.worker_message_decoder()
    assert msgpack.unpackb(dict_relay(frames[0])) == msgpack.unpackb(typed_relay(decoder, frames[0]))
    typed, plain = [], []
    for _ in range(args.rounds):
        plain.append(per_token_us(dict_relay, frames))
        typed.append(per_token_us(lambda f: typed_relay(decoder, f), frames))
    t, d = statistics.median(typed), statistics.median(plain)
    print("| relay of one token | µs per token |")
    print("| --- | --- |")
    print(f"| dict + schema check (msgpack) | {d:.2f} |")
    print(f"| typed (msgspec) | {t:.2f} |")
    print(f"| **ratio typed/dict** | **{t / d:.2f}** |")


if __name__ == "__main__":
    main()
