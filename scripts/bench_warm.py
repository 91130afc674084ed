#!/usr/bin/env python3
"""Warm-restore benchmarks: what the KV cache saves on time to first token (TTFT).

Three tables, each against a real ``erllama-broker`` (default model) on private temp directories
(runtime dir under /tmp, disk tier under it, shm tier under /dev/shm), all removed at the end:

- ``coldwarm``: prompts of 512, 2,048 and 4,096 tokens, each cold and then restored from a row in
  the RAM tier, the shm tier, the disk tier (page cache warm), and the disk tier after every process
  was restarted and the page cache dropped. One broker per tier, its budgets forcing where rows land
  (RAM: ``--cache-shm 0``; shm: ``--cache-ram 0``; disk: both 0); the ``tier`` column is the result's
  ``cache_tier`` (where the restored row came from) and a mismatch is flagged ``!``.
  Goal at 2,048 tokens: RAM and shm hits <= 1/100 of cold, disk after restart <= 1/30.
- ``shared``: 8 agents, a 2,000-token common prefix plus their own 100-token suffix, issued at once
  (8 threads) to a model with 4 sequences: with the cache off and prefix sharing between running
  requests off (``share_prefix=false``: every agent prefills everything), with the cache off and
  sharing on (``sharing only``), with the cache on and the prefix never seen before (``cold
  prefix``), and with the prefix primed by an earlier ``prefill_only`` (``primed``).
- ``exactcost``: what bit-identical output costs. The default load options (``exact``: flash
  attention on, a q8_0 KV cache and the dot-product kernel for K-quant weights, whose result for a
  token does not depend on how it is batched) against the fastest non-identical ones (``exact=false``:
  llama.cpp's defaults, flash attention auto, an f16 KV cache), both loaded in one broker without the cache and measured
  in alternating rounds: cold prefill tokens/s of 512, 2,048 and 4,096-token prompts (prompt tokens /
  server-side time to first token) and decode tokens/s of 128 greedy tokens after each.
- ``multiturn``: 12 conversations x 6 turns. Each round issues turn t of every conversation at once
  (12 requests for 4 sequences, no ``session_id``: rows must come from the cache store), each turn
  resending the whole conversation (previous prompt + generated tokens, as token ids: exact, where a
  client re-tokenizing text may differ at the seams) plus ~150 new tokens, generating 32. Against
  the same run on a ``--no-cache`` broker and on llama.cpp's ``llama-server --parallel 4`` (its prompt
  cache on). Goals: from turn 2 on >= 90 % of prompt tokens from the cache and mean TTFT <= 1/5 of
  cache-off and of llama-server's. Also printed: the floor (only each turn's new tokens prefilled, oldest
  first, at erllama's measured prefill speed after a restored conversation) and the distance from it.

TTFT is measured by the client: from just before ``infer()`` sends the request to the arrival of the
first token event (``TokenEvent.received_ns``, same monotonic clock); it includes queueing in the
broker. ``srv ms`` is the result's ``stats.ttft_ms`` (broker receipt to first sampled token).
"read" is ``cache_delta["read"]``: prompt tokens whose KV came from the cache (an exact hit on a row of
exactly the prompt reads all of it; on a longer row all but the last prompt token, decoded again).

    python scripts/bench_warm.py [--only coldwarm shared multiturn] [--quick] [--omp-passive] [--threads N]
                                 [--mt-first-tokens N] [--mt-seqs N] [--sh-seqs N]

On a machine shared with other llama.cpp processes, ``--omp-passive`` keeps the numbers meaningful:
with OpenMP's default spinning barriers, two busy llama.cpp processes on 2 cores stall each other's
decode steps for seconds (measured: 1-token decode 30 ms -> 0.4-6 s), which swamps both cold and warm.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import psutil
from llama_server import llama_server

from erllama import Client, ErllamaError
from erllama.cachestore.client import CacheClient
from erllama.transport import CACHESTORE_SOCKET_NAME, CLIENT_SOCKET_NAME, ipc_endpoint

log = logging.getLogger("bench_warm")

MODEL_ID: Final = "warm-bench"
BROKER_START_TIMEOUT_S: Final = 60.0
BROKER_STOP_TIMEOUT_S: Final = 90.0  # a RAM-tier store spills its rows to disk on SIGTERM (<= 10 s)
REQUEST_EVENT_TIMEOUT_S: Final = 900.0  # queued behind a cache-off round of long prefills
SAVE_LAND_TIMEOUT_S: Final = 120.0
SAVE_POLL_S: Final = 0.05
SETTLE_S: Final = 0.3  # after a warm run, let its (already present) finish save pass before the next
TIER_BUDGET: Final = "8G"  # room for every row a table makes; the other hot tiers are set to 0
DROP_CACHES_PATH: Final = Path("/proc/sys/vm/drop_caches")
WARMUP_PROMPT: Final = "Hello there."  # shorter than cache_min_tokens: faults the weights in, caches nothing
CTX_MARGIN_TOKENS: Final = 64
CTX_ROUND_TOKENS: Final = 256
DECODE_PROBE_TOKENS: Final = 8  # a warm run this long shows the decode step at that context length

CORPUS_TEXT: Final = (
    "The harbour town woke slowly in the grey light of an autumn morning. Fishermen carried their nets "
    "down to the quay, arguing about the weather and the price of mackerel, while the baker on Mill "
    "Street pulled the first loaves from an oven that had been burning since four. Children ran along the "
    "sea wall on their way to school, counting the gulls that sat in rows on the chimney pots. At the "
    "end of the pier an old woman painted the lighthouse in watercolours, as she had done every day for "
    "thirty years, never once painting it the same way twice. In the library the clerk unlocked the "
    "doors, opened the windows to let out the smell of damp paper, and set out the newspapers that had "
    "come in on the night train. A merchant ship from the south was expected before noon, bringing "
    "oranges, copper wire, bolts of cotton and a crate of books for the school. By mid-morning the wind "
    "had turned, the clouds broke apart, and the whole bay shone like hammered tin. The harbour master "
    "checked his tide tables twice, because the ship was heavy and the channel was narrow, and he had "
    "not forgotten the winter when a schooner ran aground on the sandbar and stayed there until spring. "
)
CORPUS_REPEAT: Final = 24  # ~7,000 tokens: every slice below wraps around it at most a few times


# --- sizes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sizes:
    cw_prompts: tuple[int, ...] = (512, 2048, 4096)
    cw_reps: int = 5  # warm runs per (size, tier); the median is shown
    cw_restarts: int = 3  # full restarts for "disk after restart"; the median is shown
    cw_max_tokens: int = 1
    ec_prompts: tuple[int, ...] = (512, 2048, 4096)
    ec_rounds: int = 3
    ec_decode: int = 128
    goal_size: int = 2048
    sh_agents: int = 8
    sh_prefix: int = 2000
    sh_suffix: int = 100
    sh_max_tokens: int = 16
    sh_seqs: int = 4
    mt_convs: int = 12
    mt_turns: int = 6
    mt_first: int = 150  # tokens of the first turn's prompt
    mt_new: int = 150  # new tokens each later turn appends
    mt_gen: int = 32
    mt_seqs: int = 4


QUICK = Sizes(
    cw_prompts=(256, 512),
    ec_prompts=(256,),
    ec_rounds=1,
    ec_decode=16,
    cw_reps=2,
    cw_restarts=1,
    goal_size=512,
    sh_agents=4,
    sh_prefix=400,
    sh_suffix=50,
    sh_seqs=2,
    mt_convs=4,
    mt_turns=3,
    mt_first=80,
    mt_new=80,
    mt_gen=16,
    mt_seqs=2,
)


def ctx_for(tokens: int) -> int:
    """An n_ctx (per sequence) that holds ``tokens``, rounded up."""
    return math.ceil((tokens + CTX_MARGIN_TOKENS) / CTX_ROUND_TOKENS) * CTX_ROUND_TOKENS


# --- processes -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Broker:
    """An ``erllama-broker`` subprocess (with its workers and cache store) on given directories."""

    proc: subprocess.Popen[bytes]
    runtime_dir: Path
    client: Client
    descendants: set[int] = field(default_factory=set)
    load_options: dict[str, Any] = field(default_factory=dict)  # added to every load_model of this run

    def note_children(self) -> None:
        try:
            self.descendants |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> None:
        """SIGTERM the broker (it stops its workers and the store), then make sure every process it
        started is gone: anything left is killed by pid."""
        self.note_children()
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=BROKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("broker %d ignored SIGTERM; killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        for pid in self.descendants:
            try:
                p = psutil.Process(pid)
                p.wait(timeout=10)
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                log.warning("process %d outlived its broker; killing it", pid)
                p.kill()


@dataclass(slots=True)
class Lab:
    """Every temp dir and broker of this run, cleaned up by ``close`` whatever happened."""

    root: Path
    shm_dirs: list[Path] = field(default_factory=list)
    brokers: list[Broker] = field(default_factory=list)
    load_options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # for the brokers and the workers they spawn

    def dirs(self, name: str) -> tuple[Path, Path, Path]:
        """(runtime, disk tier, shm tier) directories for one cache configuration."""
        runtime = self.root / name
        runtime.mkdir(mode=0o700, exist_ok=True)
        shm = Path("/dev/shm") / f"{self.root.name}-{name}"
        if shm not in self.shm_dirs:
            self.shm_dirs.append(shm)
        return runtime, runtime / "kv", shm

    def start(self, name: str, *flags: str) -> Broker:
        runtime, disk, shm = self.dirs(name)
        cmd = [
            sys.executable,
            "-m",
            "erllama.broker.main",
            "--no-default-model",
            "--runtime-dir",
            str(runtime),
            "--cache-dir",
            str(disk),
            "--shm-dir",
            str(shm),
            *flags,
        ]
        env = os.environ | {"ERLLAMA_LOG_LEVEL": os.environ.get("ERLLAMA_LOG_LEVEL", "WARNING")} | self.env
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        endpoint = ipc_endpoint(runtime, CLIENT_SOCKET_NAME)
        client = Client(endpoint, timeout_s=1.0)
        broker = Broker(proc, runtime, client, load_options=self.load_options)
        self.brokers.append(broker)
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except ErllamaError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"broker {name} did not start (exit {proc.poll()})") from None
        client.timeout_s = 60.0
        log.info("broker %s up (pid %d): %s", name, proc.pid, " ".join(flags) or "default cache")
        return broker

    def stop(self, broker: Broker) -> None:
        broker.stop()
        self.brokers.remove(broker)

    def close(self) -> None:
        for broker in list(self.brokers):
            try:
                self.stop(broker)
            except Exception:  # cleanup must go on whatever one broker did
                log.exception("stopping a broker failed")
        for shm in self.shm_dirs:
            shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def lab() -> Iterator[Lab]:
    root = Path(tempfile.mkdtemp(prefix="erl-bw-", dir="/tmp"))  # ipc paths must stay short
    the_lab = Lab(root)
    try:
        yield the_lab
    finally:
        the_lab.close()


def load(broker: Broker, **options: Any) -> None:
    broker.client.load_model(MODEL_ID, None, **(options | broker.load_options))
    broker.note_children()
    broker.client.complete(MODEL_ID, WARMUP_PROMPT, max_tokens=2)


def drop_page_cache() -> bool:
    """Write dirty pages and drop the clean page cache (root only). Pages mapped by a running process
    (the model's weights) stay; the store's row files go."""
    os.sync()
    try:
        DROP_CACHES_PATH.write_text("1\n")
        return True
    except OSError:
        return False


# --- prompts and measurements --------------------------------------------------------------------------


class Corpus:
    """Token ids of an English text repeated, sliced to exact lengths behind distinct leading texts."""

    def __init__(self, c: Client, model_id: str = MODEL_ID):
        self.c = c
        self.model_id = model_id
        self.tokens = c.tokenize(model_id, CORPUS_TEXT * CORPUS_REPEAT, add_special=False)

    def take(self, offset: int, n: int) -> list[int]:
        size = len(self.tokens)
        return [self.tokens[(offset + i) % size] for i in range(n)]

    def prompt(self, lead: str, n: int, offset: int = 0) -> list[int]:
        """Exactly ``n`` tokens: BOS + ``lead`` + corpus text. A distinct lead keeps prompts from
        sharing more than a couple of tokens, far below ``cache_min_tokens``."""
        head = self.c.tokenize(self.model_id, lead)
        return head + self.take(offset, n - len(head))

    def more(self, lead: str, n: int, offset: int) -> list[int]:
        """Exactly ``n`` tokens to append to a conversation (no BOS)."""
        head = self.c.tokenize(self.model_id, lead, add_special=False)
        return head + self.take(offset, n - len(head))


@dataclass(slots=True)
class Sample:
    ttft_ms: float  # client: request sent -> first token event received
    srv_ms: float  # stats.ttft_ms
    kind: str
    tier: str | None
    read: int
    prompt_tokens: int
    generated: list[int]
    lookup_ms: float = 0.0  # stats.cache_lookup_ms: the store round trip and mapping the row
    copy_ms: float = 0.0  # stats.state_copy_ms: the restored row's state copied into llama.cpp


def run(
    c: Client,
    prompt: list[int],
    max_tokens: int,
    start: threading.Barrier | None = None,
    model_id: str = MODEL_ID,
) -> Sample:
    if start is not None:
        start.wait()
    t0 = time.monotonic_ns()
    stream = c.infer(
        model_id, prompt, max_tokens=max_tokens, temperature=0.0, timeout_s=REQUEST_EVENT_TIMEOUT_S
    )
    first_ns = 0
    for ev in stream:
        if not first_ns:
            first_ns = ev.received_ns
    r = stream.result
    assert r is not None
    first_ns = first_ns or time.monotonic_ns()  # end of generation as the first token: no event
    return Sample(
        (first_ns - t0) / 1e6,
        r.stats.ttft_ms,
        r.cache_hit_kind or "?",
        r.cache_tier,
        int(r.cache_delta.get("read", 0)),
        r.stats.prompt_tokens,
        r.generated,
        r.stats.cache_lookup_ms,
        r.stats.state_copy_ms,
    )


Runner = Callable[[list[int], int, threading.Barrier], Sample]


def llama_server_run(url: str, prompt: list[int], max_tokens: int, start: threading.Barrier) -> Sample:
    """One greedy completion streamed from ``llama-server`` (its prompt cache on, as by default)."""
    body = {
        "prompt": prompt,
        "n_predict": max_tokens,
        "stream": True,
        "cache_prompt": True,
        "temperature": 0.0,
        "return_tokens": True,
    }
    start.wait()
    t0 = time.monotonic_ns()
    first_ns = 0
    generated: list[int] = []
    timings: dict[str, Any] = {}
    with httpx.stream("POST", url + "/completion", json=body, timeout=REQUEST_EVENT_TIMEOUT_S) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("tokens"):
                first_ns = first_ns or time.monotonic_ns()
                generated += chunk["tokens"]
            timings = chunk.get("timings", timings)
    cached = int(timings.get("cache_n", 0))
    return Sample(
        ((first_ns or time.monotonic_ns()) - t0) / 1e6,
        float(timings.get("prompt_ms", 0.0)),
        "llama-server",
        None,
        cached,
        cached + int(timings.get("prompt_n", 0)),
        generated,
    )


def run_together(c: Client | Runner, prompts: Sequence[list[int]], max_tokens: int) -> list[Sample]:
    """Issue every prompt at once (one thread each, released by a barrier), to erllama through ``c`` or
    to another server through a runner."""
    start = threading.Barrier(len(prompts))
    results: list[Sample | Exception | None] = [None] * len(prompts)
    runner: Runner = c if callable(c) else (lambda prompt, n, barrier: run(c, prompt, n, barrier))

    def one(i: int) -> None:
        try:
            results[i] = runner(prompts[i], max_tokens, start)
        except (
            ErllamaError,
            httpx.HTTPError,
            threading.BrokenBarrierError,
            RuntimeError,
            AssertionError,
        ) as exc:  # re-raised below
            start.abort()
            results[i] = exc

    # daemon threads: an interrupted run must not wait for streams that only end once the brokers stop
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(prompts)} concurrent requests failed: {failed[0]!r}"
        ) from failed[0]
    return [r for r in results if isinstance(r, Sample)]


def wait_cached(c: Client, prompt: list[int], at_least: int) -> int:
    deadline = time.monotonic() + SAVE_LAND_TIMEOUT_S
    while (n := c.cached_prefix_len(MODEL_ID, prompt)) < at_least:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the save never landed: {n} of {at_least} tokens cached")
        time.sleep(SAVE_POLL_S)
    return n


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)] if s else float("nan")


def frac(ratio: float) -> str:
    """A ratio as ``1/N`` when it is small, else as a decimal."""
    return f"1/{1 / ratio:.0f}" if 0 < ratio <= 0.2 else f"{ratio:.2f}"


# --- table 1: cold vs warm -----------------------------------------------------------------------------

TIER_FLAGS: Final = {
    "ram": ("--cache-ram", TIER_BUDGET, "--cache-shm", "0", "--cache-disk", TIER_BUDGET),
    "shm": ("--cache-ram", "0", "--cache-shm", TIER_BUDGET, "--cache-disk", TIER_BUDGET),
    "disk": ("--cache-ram", "0", "--cache-shm", "0", "--cache-disk", TIER_BUDGET),
}


def decode_gaps(c: Client, prompt: list[int]) -> list[float]:
    """Client-side gaps (ms) between the token events of a warm run of ``DECODE_PROBE_TOKENS``."""
    stream = c.infer(
        MODEL_ID, prompt, max_tokens=DECODE_PROBE_TOKENS, temperature=0.0, timeout_s=REQUEST_EVENT_TIMEOUT_S
    )
    ts = [ev.received_ns for ev in stream]
    return [(b - a) / 1e6 for a, b in itertools.pairwise(ts)]


def store_counters(broker: Broker) -> dict[str, int]:
    with CacheClient(ipc_endpoint(broker.runtime_dir, CACHESTORE_SOCKET_NAME), timeout_s=5.0) as cs:
        return dict(cs.stats()["counters"])


def coldwarm(the_lab: Lab, sz: Sizes) -> None:
    options: dict[str, Any] = {"n_ctx": ctx_for(max(sz.cw_prompts) + DECODE_PROBE_TOKENS), "n_seq_max": 1}
    cold: dict[int, list[Sample]] = {n: [] for n in sz.cw_prompts}
    warm: dict[tuple[int, str], list[Sample]] = {}
    gaps: dict[int, list[float]] = {}
    store: dict[str, dict[str, int]] = {}
    disk_prompts: dict[int, list[int]] = {}
    for tier, flags in TIER_FLAGS.items():
        broker = the_lab.start(f"cw-{tier}", *flags)
        load(broker, **options)
        c = broker.client
        corpus = Corpus(c)
        for n in sz.cw_prompts:
            prompt = corpus.prompt(f"Log of the {tier} tier, volume {n}. ", n)
            s = run(c, prompt, sz.cw_max_tokens)
            log.info("%5d tokens cold (%s broker): %.0f ms", n, tier, s.ttft_ms)
            cold[n].append(s)
            wait_cached(c, prompt, n)
            warm[(n, tier)] = []
            for _ in range(sz.cw_reps):
                time.sleep(SETTLE_S)
                warm[(n, tier)].append(run(c, prompt, sz.cw_max_tokens))
            log.info("%5d tokens %s hit: %s ms", n, tier, [round(w.ttft_ms, 1) for w in warm[(n, tier)]])
            if tier == "ram":
                time.sleep(SETTLE_S)
                gaps[n] = decode_gaps(c, prompt)
            if tier == "disk":
                disk_prompts[n] = prompt
        store[tier] = store_counters(broker)
        the_lab.stop(broker)
        if tier != "disk":
            continue
        restarted: dict[int, list[Sample]] = {n: [] for n in sz.cw_prompts}
        dropped = True
        for i in range(sz.cw_restarts):
            broker = the_lab.start("cw-disk", *flags)  # same directories: the rows are on disk
            load(broker, **options)
            for n in sz.cw_prompts:
                dropped = drop_page_cache() and dropped
                s = run(broker.client, disk_prompts[n], sz.cw_max_tokens)
                restarted[n].append(s)
                log.info("%5d tokens disk hit after restart %d: %.0f ms", n, i + 1, s.ttft_ms)
            store[f"restart {i + 1}"] = store_counters(broker)
            the_lab.stop(broker)
        for n in sz.cw_prompts:
            warm[(n, "restart")] = restarted[n]

    print()
    print(
        "Cold vs warm TTFT, ms. p50/min: client (request sent -> first token event); srv: stats.ttft_ms p50."
    )
    print(
        f"Cold: {len(TIER_FLAGS)} runs (one per broker); hits: {sz.cw_reps} runs each; after restart: "
        f"{sz.cw_restarts} restarts. max_tokens={sz.cw_max_tokens}, n_seq_max=1. Ratios: p50/p50 cold and "
        "min/min cold (min: least disturbed by other load)."
    )
    print(
        f"Page cache before each post-restart run: {'dropped' if dropped else 'WARM (drop_caches not allowed)'}."
    )
    head = (
        f"{'prompt':>6}  {'case':<19}{'kind':<7}{'tier':<6}{'read':>5}{'p50':>9}{'min':>9}{'srv':>9}"
        f"{'p50/cold':>9}{'min/cold':>9}  goal (p50, min)"
    )
    print(head)
    print("-" * len(head))
    cases = (
        ("ram", "RAM hit", "ram", 1 / 100),
        ("shm", "shm hit", "shm", 1 / 100),
        ("disk", "disk hit", "disk", None),
        ("restart", "disk after restart", "disk", 1 / 30),
    )
    for n in sz.cw_prompts:
        cold_p50 = statistics.median(s.ttft_ms for s in cold[n])
        cold_min = min(s.ttft_ms for s in cold[n])
        kinds = "/".join(sorted({s.kind for s in cold[n]}))
        print(
            f"{n:>6}  {'cold':<19}{kinds:<7}{'-':<6}{0:>5}{cold_p50:>9.0f}{cold_min:>9.0f}"
            f"{statistics.median(s.srv_ms for s in cold[n]):>9.0f}{'1':>9}{'1':>9}"
        )
        for key, label, want_tier, goal in cases:
            ss = warm[(n, key)]
            p50 = statistics.median(s.ttft_ms for s in ss)
            best = min(s.ttft_ms for s in ss)
            tiers = sorted({s.tier or "-" for s in ss})
            flag = "" if tiers == [want_tier] else "!"
            kind = "/".join(sorted({s.kind for s in ss}))
            verdict = ""
            if goal is not None and n == sz.goal_size:
                verdict = (
                    f"<= 1/{1 / goal:.0f}: {'met' if p50 / cold_p50 <= goal else 'MISSED'}, "
                    f"{'met' if best / cold_min <= goal else 'MISSED'}"
                )
            print(
                f"{'':>6}  {label:<19}{kind:<7}{'/'.join(tiers) + flag:<6}{min(s.read for s in ss):>5}{p50:>9.1f}"
                f"{best:>9.1f}{statistics.median(s.srv_ms for s in ss):>9.1f}{frac(p50 / cold_p50):>9}"
                f"{frac(best / cold_min):>9}  {verdict}"
            )
    print(
        "Where a warm hit's time goes (RAM broker, warm run of "
        f"{DECODE_PROBE_TOKENS} tokens): client gaps between token events, ms"
    )
    for n in sz.cw_prompts:
        g = gaps[n]
        print(
            f"  {n:>5} tokens: 1st gap {g[0] if g else float('nan'):7.1f}, median of the rest "
            f"{statistics.median(g[1:]) if len(g) > 1 else float('nan'):6.1f} (one decode step: a hit re-decodes "
            "the last prompt token, so srv >= one step; the 1st gap also holds any save made after token 1)"
        )
    print(
        "An exact hit against its own state copy (p50 ms): client TTFT, the store lookup and row mapping, the "
        "state copy into llama.cpp, one decode step (median gap above). Goal: TTFT <= 2 x copy + one step."
    )
    print(f"{'prompt':>6}  {'case':<19}{'ttft':>8}{'lookup':>8}{'copy':>8}{'step':>8}{'ttft/goal':>10}")
    for n in sz.cw_prompts:
        step = statistics.median(gaps[n][1:]) if len(gaps[n]) > 1 else float("nan")
        for key, label, _, _ in cases:
            ss = warm[(n, key)]
            ttft = statistics.median(s.ttft_ms for s in ss)
            copy = statistics.median(s.copy_ms for s in ss)
            lookup = statistics.median(s.lookup_ms for s in ss)
            print(
                f"{n:>6}  {label:<19}{ttft:>8.1f}{lookup:>8.1f}{copy:>8.1f}{step:>8.1f}"
                f"{ttft / (2 * copy + step):>10.2f}"
            )
    for name, k in store.items():
        print(
            f"  store {name:<10} lookups {k['lookups']:>3} mean {k['lookup_ns'] / max(1, k['lookups']) / 1e3:7.1f} us,"
            f" loads {k['loads']:>3} mean grant {k['load_ns'] / max(1, k['loads']) / 1e3:8.1f} us,"
            f" already_present {k['already_present']:>3}, saves cold/continued/finish "
            f"{k['saves_cold']}/{k['saves_continued']}/{k['saves_finish']}"
        )


# --- table 2: shared prefix ----------------------------------------------------------------------------


def shared(the_lab: Lab, sz: Sizes) -> None:
    n = sz.sh_prefix + sz.sh_suffix
    options: dict[str, Any] = {"n_ctx": ctx_for(n + sz.sh_max_tokens), "n_seq_max": sz.sh_seqs}

    def agents(corpus: Corpus, tag: str) -> tuple[list[int], list[list[int]]]:
        prefix = corpus.prompt(f"Briefing for the {tag} team of agents. ", sz.sh_prefix)
        return prefix, [
            prefix + corpus.more(f"\nAgent {i + 1}: ", sz.sh_suffix, 997 * (i + 1))
            for i in range(sz.sh_agents)
        ]

    runs: dict[str, list[Sample]] = {}
    for name, share_prefix in (("cache off", False), ("sharing only", True)):
        broker = the_lab.start(f"sh-off-{int(share_prefix)}", "--no-cache")
        load(broker, **options, share_prefix=share_prefix)
        _, prompts = agents(Corpus(broker.client), name.split()[0])
        log.info("shared prefix, %s: %d agents at once", name, sz.sh_agents)
        runs[name] = run_together(broker.client, prompts, sz.sh_max_tokens)
        the_lab.stop(broker)

    broker = the_lab.start("sh-on")
    load(broker, **options)
    c = broker.client
    corpus = Corpus(c)
    _, prompts = agents(corpus, "cold")
    log.info("shared prefix, cache on, prefix never seen: %d agents at once", sz.sh_agents)
    runs["cold prefix"] = run_together(c, prompts, sz.sh_max_tokens)
    prefix, prompts = agents(corpus, "primed")
    c.prefill_only(MODEL_ID, prefix)
    wait_cached(c, prompts[0], sz.sh_prefix)
    log.info("shared prefix, cache on, prefix primed: %d agents at once", sz.sh_agents)
    runs["primed"] = run_together(c, prompts, sz.sh_max_tokens)
    the_lab.stop(broker)

    print()
    print(
        f"Shared prefix: {sz.sh_agents} agents issued at once, {sz.sh_prefix}-token common prefix + "
        f"{sz.sh_suffix}-token own suffix, max_tokens={sz.sh_max_tokens}, n_seq_max={sz.sh_seqs}."
    )
    print(
        "TTFT ms (client: sent -> first token, includes queueing for a sequence); read = tokens from the cache "
        "or copied from a running agent."
    )
    names = list(runs)
    head = f"{'agent':>5}" + "".join(f"{name + ' ms':>16}{'read':>6}" for name in names)
    print(head)
    print("-" * len(head))
    for i in range(sz.sh_agents):
        print(f"{i + 1:>5}" + "".join(f"{runs[k][i].ttft_ms:>16.0f}{runs[k][i].read:>6}" for k in names))
    print("-" * len(head))
    base = mean([s.ttft_ms for s in runs["cache off"]])
    print(f"{'mean':>5}" + "".join(f"{mean([s.ttft_ms for s in runs[k]]):>16.0f}{'':>6}" for k in names))
    print(f"{'p90':>5}" + "".join(f"{p90([s.ttft_ms for s in runs[k]]):>16.0f}{'':>6}" for k in names))
    for k in names:
        ss = runs[k]
        share = sum(s.read for s in ss) / sum(s.prompt_tokens for s in ss)
        m = mean([s.ttft_ms for s in ss])
        print(
            f"  {k:<12} prompt tokens not prefilled {share:6.1%}   mean TTFT vs cache off {frac(m / base):>6}"
            f"   hit kinds {sorted({s.kind for s in ss})}"
        )


# --- table 3: multi-turn -------------------------------------------------------------------------------


@dataclass(slots=True)
class Turn:
    samples: list[Sample]
    new_tokens: list[int]  # tokens each conversation appended this turn (the whole prompt at turn 1)


@dataclass(slots=True)
class Conversations:
    """One server's copy of the multi-turn workload, advanced one round (turn) at a time."""

    serve: Client | Runner  # an erllama broker's client, or a runner for llama-server
    corpus: Corpus
    prompts: list[list[int]]
    new: list[int]  # tokens each conversation appended for the coming turn
    turns: list[Turn] = field(default_factory=list)


def exactcost(the_lab: Lab, sz: Sizes) -> None:
    """Cold prefill and decode speed, exact kernels (the default) against the fast ones."""
    broker = the_lab.start("exactcost", "--no-cache")
    modes = {"exact": {}, "fast": {"exact": False}}
    n_ctx = ctx_for(max(sz.ec_prompts) + sz.ec_decode)
    for name, opts in modes.items():
        broker.client.load_model(
            name, None, n_ctx=n_ctx, n_seq_max=1, cache=False, **opts | broker.load_options
        )
        broker.client.complete(name, WARMUP_PROMPT, max_tokens=2)
    broker.note_children()
    corpus = Corpus(broker.client, "exact")
    prefill: dict[tuple[str, int], list[float]] = {}
    decode: dict[tuple[str, int], list[float]] = {}
    for rnd in range(sz.ec_rounds):
        for size in sz.ec_prompts:
            prompt = corpus.prompt(f"Round {rnd} of {size}.", size, offset=rnd * 97)
            for name in modes if rnd % 2 == 0 else reversed(list(modes)):
                r = broker.client.complete(name, prompt, max_tokens=sz.ec_decode, temperature=0.0)
                prefill.setdefault((name, size), []).append(size / (r.stats.ttft_ms / 1000.0))
                decode.setdefault((name, size), []).append(
                    len(r.generated) / (r.stats.generation_ms / 1000.0)
                )
    print(
        f"\n## exactcost: bit-identical (exact) vs fast kernels, medians of {sz.ec_rounds} alternating rounds\n"
    )
    print(
        "| prompt | prefill exact tok/s | prefill fast tok/s | exact/fast | decode exact tok/s | decode fast tok/s | exact/fast |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in sz.ec_prompts:
        pe, pf = statistics.median(prefill[("exact", size)]), statistics.median(prefill[("fast", size)])
        de, df = statistics.median(decode[("exact", size)]), statistics.median(decode[("fast", size)])
        print(
            f"| {size:,} | {pe:.1f} | {pf:.1f} | **{pe / pf:.2f}** | {de:.1f} | {df:.1f} | **{de / df:.2f}** |"
        )
    the_lab.stop(broker)


def mt_context(sz: Sizes) -> int:
    return ctx_for(sz.mt_first + (sz.mt_turns - 1) * (sz.mt_gen + sz.mt_new) + sz.mt_gen)


def start_conversations(serve: Client | Runner, corpus: Corpus, sz: Sizes) -> Conversations:
    # the same leads in every run: each server sees the same prompts (their caches are separate)
    prompts = [
        corpus.prompt(f"Conversation {k + 1}. User: ", sz.mt_first, offset=131 * k)
        for k in range(sz.mt_convs)
    ]
    return Conversations(serve, corpus, prompts, [len(p) for p in prompts])


def next_turn(conv: Conversations, sz: Sizes, label: str) -> None:
    """Issue the coming turn of every conversation at once, then append its reply and new user text."""
    t = len(conv.turns) + 1
    samples = run_together(conv.serve, conv.prompts, sz.mt_gen)
    conv.turns.append(Turn(samples, conv.new))
    log.info(
        "multi-turn %s turn %d: mean TTFT %.0f ms, read %d of %d prompt tokens",
        label,
        t,
        mean([s.ttft_ms for s in samples]),
        sum(s.read for s in samples),
        sum(s.prompt_tokens for s in samples),
    )
    more = [
        conv.corpus.more(f"\nUser (turn {t + 1}): ", sz.mt_new, 131 * k + 389 * t) for k in range(sz.mt_convs)
    ]
    conv.prompts = [p + s.generated + m for p, s, m in zip(conv.prompts, samples, more, strict=True)]
    conv.new = [len(m) for m in more]


def prefill_speed(c: Client, conv: Conversations, n_seq: int) -> float:
    """Tokens/s of prefilling new tokens after restored conversations, as a tick batches them: ``n_seq``
    conversations' next turns (last prompt, reply, new tokens) sent at once to an otherwise idle worker;
    their unrestored tokens over the server-side time until the last of them has its first token."""
    samples = run_together(c, conv.prompts[:n_seq], 1)
    return sum(s.prompt_tokens - s.read for s in samples) / max(s.srv_ms for s in samples) * 1000.0


def oldest_first_floor_ms(new_tokens: list[int], tokens_per_s: float) -> float:
    """Mean time to first token if only ``new_tokens`` had to be prefilled, one request after another."""
    done = list(itertools.accumulate(new_tokens))
    return mean([n / tokens_per_s * 1000.0 for n in done])


def multiturn(the_lab: Lab, sz: Sizes) -> None:
    log.info(
        "multi-turn: %d conversations x %d turns; erllama cache off, on and llama-server, rounds alternating",
        sz.mt_convs,
        sz.mt_turns,
    )
    brokers = {"off": the_lab.start("mt-off", "--no-cache"), "on": the_lab.start("mt-on")}
    for broker in brokers.values():
        load(broker, n_ctx=mt_context(sz), n_seq_max=sz.mt_seqs)
    corpus = Corpus(brokers["on"].client)
    threads = int(the_lab.load_options.get("n_threads") or os.cpu_count() or 1)
    with llama_server(mt_context(sz), sz.mt_seqs, threads, MODEL_ID) as url:
        runs = {
            "off": start_conversations(brokers["off"].client, corpus, sz),
            "on": start_conversations(brokers["on"].client, corpus, sz),
            "llama-server": start_conversations(functools.partial(llama_server_run, url), corpus, sz),
        }
        for _ in range(sz.mt_turns):  # alternate so that the machine's load drifts over all alike
            for label, conv in runs.items():
                next_turn(conv, sz, label)
    speed = prefill_speed(brokers["on"].client, runs["on"], sz.mt_seqs)
    for broker in brokers.values():
        the_lab.stop(broker)
    off, on, ls = runs["off"].turns, runs["on"].turns, runs["llama-server"].turns

    print()
    print(
        f"Multi-turn: {sz.mt_convs} conversations x {sz.mt_turns} turns, each round issuing turn t of every "
        f"conversation at once to n_seq_max={sz.mt_seqs} (llama-server: --parallel {sz.mt_seqs}, its prompt "
        f"cache on); first turn {sz.mt_first} tokens, then +{sz.mt_new} new tokens per turn, {sz.mt_gen} "
        "generated; no session_id. Rounds alternate: erllama cache off, cache on, llama-server."
    )
    print(
        "TTFT ms (client: sent -> first token, includes queueing). 'from cache' = sum read / sum prompt tokens;"
    )
    print("'ceiling' = share of the prompt that existed before this turn (new tokens must be prefilled);")
    print(
        f"'floor' = mean TTFT if only each turn's new tokens were prefilled, oldest first, at {speed:.0f} tok/s "
        "(erllama's batched prefill of new tokens after restored conversations, measured on an idle worker)."
    )
    head = (
        f"{'turn':>4}{'prompt':>8}{'off mean':>10}{'on mean':>9}{'on p90':>8}{'on/off':>8}{'l-s mean':>10}"
        f"{'on/l-s':>8}{'floor':>8}{'from cache':>12}{'ceiling':>9}{'l-s cache':>11}"
    )
    print(head)
    print("-" * len(head))
    later: dict[str, list[float]] = {"off": [], "on": [], "ls": [], "floor": []}
    later_read = later_prompt = later_reusable = 0
    for t, (a, b, c) in enumerate(zip(off, on, ls, strict=True), start=1):
        prompt = sum(s.prompt_tokens for s in b.samples)
        read = sum(s.read for s in b.samples)
        reusable = prompt - sum(b.new_tokens)
        m_off, m_on, m_ls = (mean([s.ttft_ms for s in x.samples]) for x in (a, b, c))
        floor = oldest_first_floor_ms(b.new_tokens, speed)
        ls_read = sum(s.read for s in c.samples) / max(1, sum(s.prompt_tokens for s in c.samples))
        print(
            f"{t:>4}{prompt / len(b.samples):>8.0f}{m_off:>10.0f}{m_on:>9.0f}{p90([s.ttft_ms for s in b.samples]):>8.0f}"
            f"{frac(m_on / m_off):>8}{m_ls:>10.0f}{m_on / m_ls:>8.2f}{floor:>8.0f}{read / prompt:>12.1%}"
            f"{reusable / prompt:>9.1%}{ls_read:>11.1%}"
        )
        if t >= 2:
            later["off"] += [s.ttft_ms for s in a.samples]
            later["on"] += [s.ttft_ms for s in b.samples]
            later["ls"] += [s.ttft_ms for s in c.samples]
            later["floor"].append(floor)
            later_read, later_prompt, later_reusable = (
                later_read + read,
                later_prompt + prompt,
                later_reusable + reusable,
            )
    if later["on"]:
        print("-" * len(head))
        ratio = mean(later["on"]) / mean(later["off"])
        vs_ls = mean(later["on"]) / mean(later["ls"])
        share = later_read / later_prompt
        print(
            f"turns 2-{sz.mt_turns}: mean TTFT on/off {frac(ratio)} (goal <= 1/5: {'met' if ratio <= 0.2 else 'MISSED'}); "
            f"on/llama-server {vs_ls:.2f} (goal <= 0.2: {'met' if vs_ls <= 0.2 else 'MISSED'}); "
            f"on/floor {mean(later['on']) / mean(later['floor']):.2f}"
        )
        print(
            f"prompt tokens from cache {share:.1%} (goal >= 90%: {'met' if share >= 0.9 else 'MISSED'}; "
            f"ceiling {later_reusable / later_prompt:.1%}); of reusable {later_read / later_reusable:.1%}"
        )
    kinds = sorted({s.kind for turn in on[1:] for s in turn.samples})
    print(f"cache-on hit kinds from turn 2: {kinds}")


# --- main ----------------------------------------------------------------------------------------------

TABLES: Final[dict[str, Callable[[Lab, Sizes], None]]] = {
    "coldwarm": coldwarm,
    "exactcost": exactcost,
    "shared": shared,
    "multiturn": multiturn,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(TABLES), default=list(TABLES), help="tables to run")
    ap.add_argument("--quick", action="store_true", help="small sizes, for iterating on the script")
    ap.add_argument(
        "--cw-prompts", type=int, nargs="+", help="coldwarm: prompt sizes (default 512 2048 4096)"
    )
    ap.add_argument("--mt-first-tokens", type=int, help="multi-turn: tokens of the first turn (default 150)")
    ap.add_argument("--mt-seqs", type=int, help="multi-turn: n_seq_max (default 4)")
    ap.add_argument("--sh-seqs", type=int, help="shared prefix: n_seq_max (default 4)")
    ap.add_argument(
        "--omp-passive",
        action="store_true",
        help="run workers with OMP_WAIT_POLICY=PASSIVE: llama.cpp's OpenMP threads sleep at barriers "
        "instead of spinning, which keeps decode steady when other processes compete for the cores",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="worker n_threads (default 0: one per core; 1 is steadier on a machine shared with other "
        "llama.cpp processes, whose spinning threads otherwise stall each decode for seconds)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per llama-server request otherwise
    sz = QUICK if args.quick else Sizes()
    sz = dataclasses.replace(
        sz,
        mt_first=args.mt_first_tokens or sz.mt_first,
        mt_seqs=args.mt_seqs or sz.mt_seqs,
        sh_seqs=args.sh_seqs or sz.sh_seqs,
        cw_prompts=tuple(args.cw_prompts) if args.cw_prompts else sz.cw_prompts,
    )

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the cleanup below

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    with lab() as the_lab:
        if args.threads:
            the_lab.load_options["n_threads"] = args.threads
        if args.omp_passive:
            the_lab.env["OMP_WAIT_POLICY"] = "PASSIVE"
        print(
            f"bench_warm: tables {' '.join(args.only)}{' (quick)' if args.quick else ''}, worker n_threads "
            f"{args.threads or 'default (one per core)'}, {os.cpu_count()} cores, OMP_WAIT_POLICY "
            f"{the_lab.env.get('OMP_WAIT_POLICY', 'default (spinning)')}"
        )
        for name in args.only:
            TABLES[name](the_lab, sz)
            print(
                "load average (1, 5, 15 min) at the end of this table: {:.1f} {:.1f} {:.1f} on {} cores".format(
                    *os.getloadavg(), os.cpu_count()
                )
            )
            sys.stdout.flush()
    log.info("done in %.0f s", time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
