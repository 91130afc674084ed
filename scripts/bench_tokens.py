#!/usr/bin/env python3
"""CPU time the broker and the client spend per streamed token, by how many streams share a tick.

A private broker serves the stub backend (no model: each decode sleeps ``--decode-ms``, standing in for
llama.cpp's compute, so what is measured is the broker's and the client's own work). N streams of
``--tokens`` tokens each run at once, then the broker process's CPU time (psutil) and this process's
(``time.process_time``: the client's I/O thread and the threads reading the streams) are divided by the
tokens streamed. The worker sends one message per tick and the broker one per client per tick, so:

- 1 stream: one message per token, what every token cost before ticks were coalesced;
- N streams from one client (as the HTTP gateway's): one message per tick for all N;
- N streams from N clients: the broker still sends N messages per tick, one to each.

Prints a table (median of --rounds) and the ratios of 8 streams of one client to one stream and to 8
streams of 8 clients.

    python scripts/bench_tokens.py [--tokens 400] [--rounds 3] [--decode-ms 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

import psutil
from bench_batching import start_broker, stop_broker, wait_for_broker

from erllama import Client
from erllama.transport import CLIENT_SOCKET_NAME, ipc_endpoint

MODEL_ID: Final = "stub"
STREAMS: Final = (1, 4, 8, 16)
REQUEST_TIMEOUT_S: Final = 120.0


def run_streams(clients: list[Client], n_streams: int, tokens: int) -> int:
    """Start ``n_streams`` streams spread over ``clients`` at once; the tokens they streamed."""
    counts = [0] * n_streams
    start = threading.Barrier(n_streams)

    def one(i: int) -> None:
        start.wait()
        stream = clients[i % len(clients)].infer(
            MODEL_ID, f"stream {i} says", max_tokens=tokens, temperature=0.0
        )
        for event in stream:
            counts[i] += len(event.token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def cpu_per_token_us(
    broker: psutil.Process, clients: list[Client], n: int, tokens: int
) -> tuple[float, float]:
    """(broker, client) CPU microseconds per token over one run."""
    b0, c0 = broker.cpu_times(), time.process_time()
    streamed = run_streams(clients, n, tokens)
    b1, c1 = broker.cpu_times(), time.process_time()
    broker_s = (b1.user - b0.user) + (b1.system - b0.system)
    return broker_s / streamed * 1e6, (c1 - c0) / streamed * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=400, help="tokens per stream")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-ms", type=int, default=2, help="the stub's time per decode step")
    args = ap.parse_args()

    rdir = Path(tempfile.mkdtemp(prefix="erl-bench-", dir="/tmp"))
    proc = start_broker(rdir, with_cache=False)
    endpoint = ipc_endpoint(rdir, CLIENT_SOCKET_NAME)
    clients = [Client(endpoint, timeout_s=REQUEST_TIMEOUT_S) for _ in range(max(STREAMS))]
    try:
        wait_for_broker(clients[0], proc)
        clients[0].load_model(
            MODEL_ID,
            None,
            backend="stub",
            n_ctx=args.tokens + 64,
            n_seq_max=max(STREAMS),
            stub_decode_ms=args.decode_ms,
        )
        broker = psutil.Process(proc.pid)
        cases = [(n, 1) for n in STREAMS] + [(n, n) for n in STREAMS if n > 1]
        run_streams(clients[:1], max(STREAMS), 16)  # warm every path once
        got: dict[tuple[int, int], list[tuple[float, float]]] = {case: [] for case in cases}
        for _ in range(args.rounds):
            for n, n_clients in cases:
                got[(n, n_clients)].append(cpu_per_token_us(broker, clients[:n_clients], n, args.tokens))
        med = {
            case: (statistics.median(b for b, _ in v), statistics.median(c for _, c in v))
            for case, v in got.items()
        }
        print(
            f"CPU per streamed token, {args.tokens} tokens per stream, stub decode {args.decode_ms} ms, "
            f"median of {args.rounds} rounds"
        )
        print("| streams | clients | broker µs/token | client µs/token |")
        print("| --- | --- | --- | --- |")
        for n, n_clients in cases:
            b, c = med[(n, n_clients)]
            print(f"| {n} | {n_clients} | {b:.0f} | {c:.0f} |")
        b1, c1 = med[(1, 1)]
        b8, c8 = med[(8, 1)]
        b8n, c8n = med[(8, 8)]
        print(f"| **ratio 8 streams of one client / 1 stream** | | **{b8 / b1:.2f}** | **{c8 / c1:.2f}** |")
        print(
            f"| **ratio 8 streams of one client / of 8 clients** | | **{b8 / b8n:.2f}** | **{c8 / c8n:.2f}** |"
        )
    finally:
        for c in clients:
            c.close()
        stop_broker(proc)
        shutil.rmtree(rdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
