#!/usr/bin/env python3
"""An agent-shaped workload through ``/v1/messages``: erllama's gateway against llama.cpp's ``llama-server``.

``--agents`` agents in flight, each a conversation of ``--turns`` turns after a long system prompt with
tool definitions (``--system-chars``): every turn the agent sends the whole conversation, the model calls
a tool (``tool_choice`` ``any``, ``--gen`` tokens at most), and the agent appends that reply as it came
back and a ``tool_result`` of ~``--result-chars`` characters. Streamed; per turn, the mean time to the
first content event and the share of prompt tokens the server reports restored from its cache
(``cache_read_input_tokens``). The same workload, in the same run, goes to ``llama-server`` (built from
the vendored llama.cpp source by ``scripts/llama_batched_bench.py``) with as many slots as the worker has
sequences and its prompt cache on. Both load the default model; erllama in exact mode unless ``--inexact``.

    python scripts/bench_agent.py [--agents 4] [--turns 8] [--system-chars 8000] [--result-chars 1200]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx
from bench_warm import CORPUS_TEXT, MODEL_ID, lab, load
from llama_server import free_port, http_server, llama_server

log = logging.getLogger("bench_agent")

N_CTX: Final = 8192
N_SEQ: Final = 4
REQUEST_TIMEOUT_S: Final = 600.0
TOOLS: Final = [
    {
        "name": name,
        "description": f"{what} (a tool of the agent's toolbox)",
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string", "enum": ["src/a.py", "src/b.py", "README.md"]}},
            "required": ["path"],
        },
    }
    for name, what in (("read_file", "Read a file"), ("list_dir", "List a directory"), ("grep", "Search"))
]


@dataclass(frozen=True, slots=True)
class Sample:
    turn: int
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int


def text_of(agent: int, turn: int, chars: int) -> str:
    """``chars`` characters of the corpus (repeated), from a place of its own per agent and turn."""
    start = (agent * 7919 + turn * 104729) % len(CORPUS_TEXT)
    text = CORPUS_TEXT * (chars // len(CORPUS_TEXT) + 2)
    return f"[{agent}.{turn}] " + text[start : start + chars]


def one_turn(url: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """A streamed request: the content blocks, the time to the first content event, the final usage."""
    blocks: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    usage: dict[str, Any] = {}
    first = 0.0
    t0 = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=REQUEST_TIMEOUT_S) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            kind = ev.get("type")
            if kind == "message_start":
                usage.update(ev["message"].get("usage") or {})
            elif kind == "content_block_start":
                first = first or time.monotonic() - t0
                blocks.append(dict(ev["content_block"]))
            elif kind == "content_block_delta":
                d = ev["delta"]
                if d["type"] == "text_delta":
                    blocks[ev["index"]]["text"] += d["text"]
                elif d["type"] == "input_json_delta":
                    partial[ev["index"]] = partial.get(ev["index"], "") + d["partial_json"]
            elif kind == "message_delta":
                usage.update({k: v for k, v in (ev.get("usage") or {}).items() if v is not None})
            elif kind == "error":
                raise RuntimeError(ev["error"])
    for i, js in partial.items():
        blocks[i]["input"] = json.loads(js) if js else {}
    return blocks, first * 1000, usage


def agent(url: str, a: int, turns: int, system: str, result_chars: int, gen: int, out: list[Sample]) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"Task {a}: find the bug in src/a.py."}]
    for t in range(1, turns + 1):
        body = {
            "model": MODEL_ID,
            "system": system,
            "messages": messages,
            "tools": TOOLS,
            "tool_choice": {"type": "any"},
            "max_tokens": gen,
            "temperature": 0,
            "stream": True,
        }
        blocks, ttft, usage = one_turn(url, body)
        read = int(usage.get("cache_read_input_tokens") or 0)
        prompt = (
            int(usage.get("input_tokens") or 0) + read + int(usage.get("cache_creation_input_tokens") or 0)
        )
        out.append(Sample(t, ttft, prompt, read))
        uses = [b for b in blocks if b.get("type") == "tool_use"]
        messages.append({"role": "assistant", "content": blocks})
        results = [
            {"type": "tool_result", "tool_use_id": u["id"], "content": text_of(a, t, result_chars)}
            for u in uses
        ]
        messages.append({"role": "user", "content": results or text_of(a, t, result_chars)})


def run(url: str, agents: int, turns: int, system: str, result_chars: int, gen: int) -> list[Sample]:
    samples: list[Sample] = []
    threads = [
        threading.Thread(target=agent, args=(url, a, turns, system, result_chars, gen, samples))
        for a in range(agents)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return samples


def table(erl: list[Sample], ref: list[Sample], turns: int) -> None:
    print(
        "| turn | prompt tokens | erllama restored | erllama TTFT ms | llama-server restored | llama-server TTFT ms | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in range(1, turns + 1):
        e = [s for s in erl if s.turn == t]
        r = [s for s in ref if s.turn == t]
        if not e or not r:
            continue
        prompt = statistics.fmean(s.prompt_tokens for s in e)
        er = sum(s.cached_tokens for s in e) / max(sum(s.prompt_tokens for s in e), 1)
        rr = sum(s.cached_tokens for s in r) / max(sum(s.prompt_tokens for s in r), 1)
        et, rt = statistics.fmean(s.ttft_ms for s in e), statistics.fmean(s.ttft_ms for s in r)
        print(
            f"| {t} | {prompt:.0f} | {100 * er:.1f} % | {et:.0f} | {100 * rr:.1f} % | {rt:.0f} | {et / rt:.2f} |"
        )
    e_mean = statistics.fmean(s.ttft_ms for s in erl if s.turn > 1)
    r_mean = statistics.fmean(s.ttft_ms for s in ref if s.turn > 1)
    print(
        f"\nturns 2+: mean TTFT erllama {e_mean:.0f} ms, llama-server {r_mean:.0f} ms, ratio {e_mean / r_mean:.2f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--system-chars", type=int, default=8000)
    ap.add_argument("--result-chars", type=int, default=1200)
    ap.add_argument("--gen", type=int, default=48, help="max tokens per reply (one tool call)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--inexact", action="store_true", help="load erllama with exact=false (as llama-server runs)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    system = "You are a coding agent. " + text_of(0, 0, args.system_chars)
    with lab() as the_lab:
        broker = the_lab.start("agent")
        load(
            broker,
            n_ctx=N_CTX,
            n_seq_max=N_SEQ,
            n_threads=args.threads,
            exact=not args.inexact,
            tool_call_markers={"start": "<tool_call>", "end": "</tool_call>"},
        )
        port = free_port()
        replay_dir = the_lab.root / "replay"
        gateway = [
            sys.executable,
            "-m",
            "erllama.gateway.main",
            "--broker",
            broker.client.endpoint,
            "--port",
            str(port),
            "--replay-dir",
            str(replay_dir),
        ]
        with http_server(gateway, f"http://127.0.0.1:{port}", "/health") as url:
            erl = run(url, args.agents, args.turns, system, args.result_chars, args.gen)
    with llama_server(N_CTX, N_SEQ, args.threads, MODEL_ID) as url:
        ref = run(url, args.agents, args.turns, system, args.result_chars, args.gen)
    print(
        f"\n## agents: {args.agents} agents x {args.turns} turns through /v1/messages (streamed), a "
        f"{args.system_chars}-character system prompt + {len(TOOLS)} tools, a forced tool call of at most "
        f"{args.gen} tokens and a ~{args.result_chars}-character tool result per turn\n"
    )
    table(erl, ref, args.turns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
