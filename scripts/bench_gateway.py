#!/usr/bin/env python3
"""The HTTP gateway's cost, and the cache through HTTP against llama.cpp's own ``llama-server``.

Two tables from one run, on a private broker (default model) with an ``erllama-gateway`` in front:

- ``stream``: one greedy stream of ``--tokens`` tokens through ``/v1/completions`` (SSE, read with
  httpx) against the same request through the ``Client`` library, in alternating rounds: decode
  tokens/s of each (first to last token arrival) and their ratio (goal >= 0.95); and the time from the
  worker sending a token to its arrival, p50/p99, for each: the difference is what the gateway adds
  (the gateway sends the worker's send time as an SSE comment when asked with ``X-Erllama-Timing``).
- ``multiturn``: ``--convs`` conversations of ``--turns`` turns through ``/v1/chat/completions``, each
  turn resending the whole conversation (the replies as the server returned them) plus ~150 tokens of
  new user text and generating 32 greedy tokens, one request at a time, after a ~1,300-token system prompt
  (an agent's instructions; ``--system-chars``); the same workload sent to
  ``llama-server`` (built from the vendored llama.cpp source, ``scripts/llama_batched_bench.py``) with
  as many slots as the worker has sequences, its prompt cache on. Mean time to first token (client
  side, to the first streamed content) of turns 2+ for each, their ratio, and erllama's share of prompt
  tokens restored from the cache (``cached_tokens``).

    python scripts/bench_gateway.py [--tokens 256] [--rounds 3] [--convs 4] [--turns 6] [--system-chars 6000]
                                    [--only stream multiturn] [--inexact]

erllama runs in exact mode by default (a q8_0 KV cache and flash attention's one-query kernel:
bit-identical warm and cold output); ``--inexact`` loads it with ``exact=false`` (llama-server's f16 KV
cache and kernels) to compare like with like.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
from bench_warm import CORPUS_TEXT, MODEL_ID, lab, load
from llama_server import free_port, http_server, llama_server

from erllama import Client

log = logging.getLogger("bench_gateway")

COUNTING_PROMPT: Final = "1, 2, 3, 4, 5, 6, 7, 8,"  # the model keeps counting: no early end
N_CTX: Final = 4096
N_SEQ: Final = 4
NEW_TEXT_CHARS: Final = 600  # ~150 tokens of new user text per turn
GEN_TOKENS: Final = 32


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


# --- table 1: one stream ------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamRun:
    tok_s: float
    latencies_ms: list[float]  # worker send -> arrival, per token


def via_client(c: Client, tokens: int) -> StreamRun:
    stream = c.infer(MODEL_ID, COUNTING_PROMPT, max_tokens=tokens, temperature=0)
    events = [ev for ev in stream if ev.token_ids]
    span_s = (events[-1].received_ns - events[0].received_ns) / 1e9
    lat = [ev.latency_ms for ev in events if ev.latency_ms is not None]
    return StreamRun((len(events) - 1) / span_s, lat)


def via_http(url: str, tokens: int) -> StreamRun:
    body = {
        "model": MODEL_ID,
        "prompt": COUNTING_PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    arrivals: list[int] = []
    lat: list[float] = []
    sent_ns: int | None = None
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers={"X-Erllama-Timing": "1"}, timeout=300
    ) as r:
        for line in r.iter_lines():
            now = time.monotonic_ns()
            if line.startswith(": sent_ns="):
                value = line.removeprefix(": sent_ns=")
                sent_ns = int(value) if value.isdigit() else None
            elif line.startswith("data: {"):
                if json.loads(line[6:])["choices"][0]["text"]:
                    arrivals.append(now)
                    if sent_ns is not None:
                        lat.append((now - sent_ns) / 1e6)
                sent_ns = None
    return StreamRun((len(arrivals) - 1) / ((arrivals[-1] - arrivals[0]) / 1e9), lat)


def stream_table(c: Client, url: str, tokens: int, rounds: int) -> None:
    via_http(url, 16)  # warm both paths
    via_client(c, 16)
    lib: list[StreamRun] = []
    http: list[StreamRun] = []
    for _ in range(rounds):
        lib.append(via_client(c, tokens))
        http.append(via_http(url, tokens))
    print(f"\n## stream: one greedy stream of {tokens} tokens, {rounds} alternating rounds\n")
    print("| path | tokens/s (median) | send->arrival p50 ms | p99 ms |")
    print("|---|---|---|---|")
    rows = {"Client library": lib, "HTTP /v1/completions": http}
    for name, runs in rows.items():
        lat = [x for r in runs for x in r.latencies_ms]
        print(
            f"| {name} | {statistics.median(r.tok_s for r in runs):.1f} | {pct(lat, 0.5):.2f} | {pct(lat, 0.99):.2f} |"
        )
    ratio = statistics.median(h.tok_s / c_.tok_s for h, c_ in zip(http, lib, strict=True))
    lat_lib = [x for r in lib for x in r.latencies_ms]
    lat_http = [x for r in http for x in r.latencies_ms]
    print(f"\nHTTP / Client tokens/s: {ratio:.2f} (goal >= 0.95)")
    print(
        f"gateway adds per token: p50 {pct(lat_http, 0.5) - pct(lat_lib, 0.5):.2f} ms, "
        f"p99 {pct(lat_http, 0.99) - pct(lat_lib, 0.99):.2f} ms"
    )


# --- table 2: multi-turn chat ---------------------------------------------------------------------------


@dataclass(slots=True)
class TurnSample:
    turn: int
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int | None
    ceiling: int  # prompt tokens that existed before the turn: previous prompt + reply, but its last token


@dataclass(slots=True)
class Workload:
    samples: list[TurnSample] = field(default_factory=list)


def user_text(conv: int, turn: int) -> str:
    words = CORPUS_TEXT.split()
    start = (conv * 997 + turn * 131) % len(words)
    text = " ".join((words * 2)[start : start + 400])
    return f"Conversation {conv}, turn {turn}: {text[:NEW_TEXT_CHARS]}"


def chat_turn(url: str, model: str, messages: list[dict[str, str]]) -> tuple[str, float, dict[str, Any]]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": GEN_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                text = choice.get("delta", {}).get("content")
                if text:
                    first = first or time.monotonic()
                    parts.append(text)
    return "".join(parts), ((first or time.monotonic()) - t0) * 1000.0, usage


def system_prompt(chars: int) -> str:
    """A long shared system prompt (an agent's instructions): the corpus text cut to ``chars``."""
    return ("You are a careful reader of the following story. " + CORPUS_TEXT * 8)[:chars]


def run_conversations(url: str, model: str, convs: int, turns: int, system_chars: int) -> Workload:
    w = Workload()
    chats: list[list[dict[str, str]]] = [
        [{"role": "system", "content": f"Reader {i}. " + system_prompt(system_chars)}] for i in range(convs)
    ]
    before = [0] * convs
    for turn in range(1, turns + 1):
        for i, messages in enumerate(chats):
            messages.append({"role": "user", "content": user_text(i, turn)})
            reply, ttft_ms, usage = chat_turn(url, model, messages)
            messages.append({"role": "assistant", "content": reply})
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            prompt = int(usage.get("prompt_tokens", 0))
            w.samples.append(TurnSample(turn, ttft_ms, prompt, cached, before[i]))
            before[i] = prompt + int(usage.get("completion_tokens", 0)) - 1
    return w


def multiturn_table(erl_url: str, convs: int, turns: int, threads: int, system_chars: int) -> None:
    erl = run_conversations(erl_url, MODEL_ID, convs, turns, system_chars)
    with llama_server(N_CTX, N_SEQ, threads, MODEL_ID) as url:
        ref = run_conversations(url, MODEL_ID, convs, turns, system_chars)
    print(
        f"\n## multiturn: {convs} conversations x {turns} turns through /v1/chat/completions, one request at a "
        f"time; a {system_chars}-character system prompt, ~150 new tokens per turn, {GEN_TOKENS} generated\n"
    )
    print(
        "| turn | prompt tokens | erllama TTFT ms | llama-server TTFT ms | ratio | erllama cached | ceiling |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in range(1, turns + 1):
        e = [s for s in erl.samples if s.turn == t]
        r = [s for s in ref.samples if s.turn == t]
        et, rt = statistics.fmean(s.ttft_ms for s in e), statistics.fmean(s.ttft_ms for s in r)
        prompt = sum(s.prompt_tokens for s in e)
        cached = sum(s.cached_tokens or 0 for s in e) / max(prompt, 1)
        ceiling = sum(s.ceiling for s in e) / max(prompt, 1)
        print(
            f"| {t} | {prompt / len(e):.0f} | {et:.1f} | {rt:.1f} | {et / rt:.2f} | {100 * cached:.1f} % "
            f"| {100 * ceiling:.1f} % |"
        )
    later_e = [s for s in erl.samples if s.turn > 1]
    later_r = [s for s in ref.samples if s.turn > 1]
    e_mean = statistics.fmean(s.ttft_ms for s in later_e)
    r_mean = statistics.fmean(s.ttft_ms for s in later_r)
    cached = sum(s.cached_tokens or 0 for s in later_e) / sum(s.prompt_tokens for s in later_e)
    print(
        f"\nturns 2+: erllama {e_mean:.1f} ms, llama-server {r_mean:.1f} ms, ratio {e_mean / r_mean:.2f}; "
        f"erllama restored {100 * cached:.1f} % of their prompt tokens"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--convs", type=int, default=4)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument(
        "--inexact",
        action="store_true",
        help="load with exact=false (llama.cpp's default micro-batches, as llama-server runs) instead of exact mode",
    )
    ap.add_argument("--system-chars", type=int, default=6000, help="system prompt length (~1,300 tokens)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="+", choices=("stream", "multiturn"), default=["stream", "multiturn"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    with lab() as the_lab:
        broker = the_lab.start("gw")
        load(broker, n_ctx=N_CTX, n_seq_max=N_SEQ, n_threads=args.threads, exact=not args.inexact)
        port = free_port()
        gateway = [
            sys.executable,
            "-m",
            "erllama.gateway.main",
            "--broker",
            broker.client.endpoint,
            "--port",
            str(port),
        ]
        with http_server(gateway, f"http://127.0.0.1:{port}", "/health") as url:
            if "stream" in args.only:
                stream_table(broker.client, url, args.tokens, args.rounds)
            if "multiturn" in args.only:
                multiturn_table(url, args.convs, args.turns, args.threads, args.system_chars)
    return 0


if __name__ == "__main__":
    sys.exit(main())
