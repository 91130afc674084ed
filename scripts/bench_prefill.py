#!/usr/bin/env python3
"""Cold time to first token, erllama against llama.cpp's own ``llama-server``, and a wave of prompts
under each prefill policy.

Two tables from one run:

- ``cold``: prompts of 512, 2,048 and 4,096 tokens that no cache holds, one at a time, in alternating
  rounds: erllama with its default load options (exact mode) through the ``Client``, the same model
  loaded beside it with ``exact=false`` (llama.cpp's own kernels), and ``llama-server`` (built from the
  vendored llama.cpp source) with its defaults through ``/completion`` (``cache_prompt`` off), all with
  the same model, context and threads. Client-side time from sending the request to the first streamed
  token; median of ``--rounds``; the ratio llama-server / erllama (goal >= 1.0: erllama's first token no
  later), and the same for ``exact=false``: what is left once the exact mode's kernels are out.
- ``wave``: four requests of ~150 new tokens each sent at once, for each ``prefill_policy``: mean and
  last time to first token (client side). ``fair`` is the equal-slices policy erllama had before.

    python scripts/bench_prefill.py [--rounds 3] [--sizes 512 2048 4096] [--threads N] [--only cold wave]
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
from typing import Final

import httpx
from bench_warm import MODEL_ID, Corpus, lab, load
from llama_server import llama_server

from erllama import Client

log = logging.getLogger("bench_prefill")

N_CTX: Final = 4608  # holds the 4,096-token prompt and its answer
N_SEQ: Final = 4  # erllama's default; llama-server gets as many slots
WAVE_REQUESTS: Final = 4
WAVE_TOKENS: Final = 150
FAST_MODEL_ID: Final = "fast"  # the same model loaded with exact=false, beside the default one


def erllama_ttft_ms(c: Client, prompt: list[int], model: str = MODEL_ID) -> float:
    t0 = time.perf_counter()
    stream = c.infer(model, prompt, max_tokens=1, temperature=0.0)
    next(iter(stream))
    ttft = (time.perf_counter() - t0) * 1000.0
    stream.collect()
    return ttft


def llama_server_ttft_ms(url: str, prompt: list[int]) -> float:
    body = {"prompt": prompt, "n_predict": 1, "stream": True, "cache_prompt": False, "temperature": 0.0}
    t0 = time.perf_counter()
    ttft = None
    with httpx.stream("POST", url + "/completion", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():  # read to the end: the next request must find the slot free
            if ttft is None and line.startswith("data: ") and json.loads(line[6:]).get("content") is not None:
                ttft = (time.perf_counter() - t0) * 1000.0
    if ttft is None:
        raise RuntimeError("llama-server sent no token")
    return ttft


def cold_table(c: Client, corpus: Corpus, sizes: list[int], rounds: int, threads: int) -> None:
    """Alternating rounds of erllama (exact mode, the default), erllama loaded with ``exact=false``
    (llama.cpp's own kernels: what the exact mode costs, measured beside it) and llama-server."""
    c.load_model(
        FAST_MODEL_ID, None, n_ctx=N_CTX, n_seq_max=N_SEQ, n_threads=threads, cache=False, exact=False
    )
    c.complete(FAST_MODEL_ID, "Hello", max_tokens=1)
    sides = ("exact", "fast", "llama-server")
    times: dict[str, dict[int, list[float]]] = {side: {n: [] for n in sizes} for side in sides}
    with llama_server(N_CTX, N_SEQ, threads, MODEL_ID) as url:
        for rnd in range(rounds):
            for n in sizes:
                for side in sides if rnd % 2 == 0 else tuple(reversed(sides)):
                    prompt = corpus.prompt(f"Cold round {rnd} of {n}, {side}.", n, offset=rnd * 131 + n)
                    if side == "llama-server":
                        ms = llama_server_ttft_ms(url, prompt)
                    else:
                        ms = erllama_ttft_ms(c, prompt, MODEL_ID if side == "exact" else FAST_MODEL_ID)
                    times[side][n].append(ms)
    c.unload_model(FAST_MODEL_ID)
    print(
        f"\n## cold: time to first token of a prompt no cache holds, median of {rounds} alternating rounds\n"
    )
    print(
        "| prompt tokens | erllama ms | erllama `exact=false` ms | llama-server ms "
        "| llama-server / erllama (goal >= 1.0) | llama-server / erllama `exact=false` |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        e, f, r = (statistics.median(times[side][n]) for side in sides)
        print(f"| {n:,} | {e:.0f} | {f:.0f} | {r:.0f} | **{r / e:.2f}** | {r / f:.2f} |")


def wave_ttfts(c: Client, corpus: Corpus, model: str, lead: str) -> list[float]:
    prompts = [
        corpus.prompt(f"{lead} request {i}.", WAVE_TOKENS, offset=977 * i) for i in range(WAVE_REQUESTS)
    ]
    ttfts = [0.0] * len(prompts)
    start = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        with Client(c.endpoint, timeout_s=600) as own:
            start.wait()
            t0 = time.perf_counter()
            stream = own.infer(model, prompts[i], max_tokens=1, temperature=0.0)
            next(iter(stream))
            ttfts[i] = (time.perf_counter() - t0) * 1000.0
            stream.collect()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ttfts


def wave_table(c: Client, corpus: Corpus, rounds: int, threads: int) -> None:
    policies = ("oldest", "shortest", "fair")
    for policy in policies:
        c.load_model(
            policy, None, n_ctx=N_CTX, n_seq_max=N_SEQ, n_threads=threads, cache=False, prefill_policy=policy
        )
        c.complete(policy, "Hello", max_tokens=1)
    means: dict[str, list[float]] = {p: [] for p in policies}
    lasts: dict[str, list[float]] = {p: [] for p in policies}
    for rnd in range(rounds):
        for policy in policies if rnd % 2 == 0 else reversed(policies):
            ttfts = wave_ttfts(c, corpus, policy, f"Wave {rnd} {policy}")
            means[policy].append(statistics.fmean(ttfts))
            lasts[policy].append(max(ttfts))
    for policy in policies:
        c.unload_model(policy)
    print(
        f"\n## wave: {WAVE_REQUESTS} requests of {WAVE_TOKENS} tokens sent at once, time to first token, "
        f"median of {rounds} rounds\n"
    )
    print("| prefill_policy | mean ms | last ms | mean vs fair |")
    print("| --- | --- | --- | --- |")
    fair = statistics.median(means["fair"])
    for policy in policies:
        m, last = statistics.median(means[policy]), statistics.median(lasts[policy])
        print(f"| {policy} | {m:.0f} | {last:.0f} | **{m / fair:.2f}** |")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="+", choices=("cold", "wave"), default=["cold", "wave"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    with lab() as the_lab:
        broker = the_lab.start("prefill")
        load(broker, n_ctx=N_CTX, n_seq_max=N_SEQ, n_threads=args.threads)
        corpus = Corpus(broker.client)
        print(f"bench_prefill: {os.cpu_count()} cores, {args.threads} threads, default model")
        if "cold" in args.only:
            cold_table(broker.client, corpus, args.sizes, args.rounds, args.threads)
        if "wave" in args.only:
            wave_table(broker.client, corpus, args.rounds, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
