#!/usr/bin/env python3
"""Batched decode: erllama (client -> broker -> worker) against a minimal direct llama.cpp loop.

For 1, 2, 4 and 8 concurrent streams of 128 greedy tokens each, measures the aggregate decode
tokens/s and the per-stream time to first token (TTFT) of

- **ours**: a private broker subprocess with the embedded default model loaded with
  ``n_seq_max=8``; N threads of this process start one ``Client.infer`` stream each at the same
  moment (behind a barrier) on a shared, thread-safe ``Client``;
- **direct**: in this process, llama-cpp-python's low-level API with the worker's context
  settings, copied from the load options the worker reports (``n_ctx * n_seq_max`` cells,
  ``kv_unified`` as the worker has it, flash attention auto, the same n_batch and n_ubatch, one
  thread per core, ``use_extra_bufts`` off): the N prompts prefilled together in
  one ``llama_decode`` (the prompts are far below the worker's ``prefill_chunk_size`` and
  ``n_batch``, so this is what the worker's chunking does when all N arrive within one tick),
  then one ``llama_decode`` per step with one row per live sequence, and a greedy
  ``llama_sampler`` chain per sequence. No broker, no scheduler, no detokenization.

Both paths decode the same token-id prompts (tokenized once, here) for the same number of
tokens. Counting prompts with different starting numbers keep the model from ending early; a
stream that ends before its token count is reported. Rounds alternate ours/direct at each
concurrency level and never overlap (the worker idles in ``poll`` between requests). Printed:
medians over rounds of each figure; the ratio ours / direct (goal >= 0.9) as the median of the
per-round ratios (each pair ran back to back); and the 8-stream / 1-stream scaling of the median
aggregate tok/s (goal >= 1.8; llama.cpp's ``llama-batched-bench`` reaches 1.93 on the project
machine).

Definitions (all times CLOCK_MONOTONIC in this process):

- aggregate tok/s (the table) = tokens that arrived after every stream had its first token,
  divided by the time from that moment to the last token of all streams: the steady state in
  which all N sequences decode together. For one stream this is (tokens - 1) / (last - first
  token), the figure of ``scripts/bench_stream.py``. Why not "from the first token of any
  stream": ours' requests reach the worker a few hundred microseconds apart, so the first one
  is often prefilled alone and the others one tick later, and that window would then hold a
  prefill tick of N-1 prompts for ours but none for direct (which prefills all N before its
  first token). The admission cost is what TTFT shows, and "end to end" below.
- end to end tok/s = every generated token / (first request sent -> last token of all).
- Ours takes token times as the client's I/O thread receives each event; direct, when the tick
  that sampled the token ends.
- TTFT = request start -> first token of that stream. Ours starts just before ``Client.infer``
  sends the request; direct starts just before the prefill batch is filled (the same instant
  for all N streams). Per round the mean and max over streams; the table shows medians over
  rounds.
- same greedy = streams whose ours and direct tokens are identical, over all rounds. llama.cpp
  is not bit-identical across batch shapes, so a near tie may flip a token now and then.

Ours runs without the KV cache unless ``--cache`` is given (see ``start_broker``).

On a shared machine one other busy process halves llama.cpp's speed on 2 cores, and its spinning
threads can stall a decode for seconds. So each pair waits until processes outside this
benchmark's tree use < 10% of the CPUs (at most 60 s), measures their share during both rounds
from /proc, and is repeated (up to ``--attempts``) when they used more; after ``--budget-s`` it
stops waiting and repeating. The output says how many pairs ran clean.

    python scripts/bench_batching.py [--streams 1,2,4,8] [--tokens 128] [--rounds 3] [--n-ctx 1024] [--kv-unified] [--cache]
                                     [--llama-batched-bench PATH]

With ``--llama-batched-bench PATH`` (built by ``python scripts/llama_batched_bench.py build``), each
round also runs llama.cpp's own batched benchmark on the same model and context settings, and the
output adds its decode speed per level and its scaling: what llama.cpp itself reaches on this
machine during the same minutes.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import llama_cpp as L
from llama_batched_bench import run_once as run_llama_batched_bench

from erllama import Client, ErllamaError
from erllama.models import default_model_path
from erllama.options import LoadOptions, parse_load_options
from erllama.transport import CLIENT_SOCKET_NAME, ipc_endpoint
from erllama.worker.llama_backend import context_params, head_dims

log = logging.getLogger("bench_batching")

MODEL_ID: Final = "bench"
N_SEQ_MAX: Final = 8  # the most concurrent streams measured; both paths size their context for it
PROMPT_NUMBERS: Final = 8  # "s, s+1, ..., s+7," per prompt
PROMPT_START_STEP: Final = 100  # stream i counts from 1 + i * step
BROKER_START_TIMEOUT_S: Final = 30.0
BROKER_STOP_TIMEOUT_S: Final = 30.0
CLIENT_TIMEOUT_S: Final = 10.0
STREAM_EVENT_TIMEOUT_S: Final = 120.0
WARMUP_TOKENS: Final = 16
CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")
FOREIGN_CPU_LIMIT: Final = 0.10  # a pair of rounds counts when other processes used less of the CPUs
QUIET_PROBE_S: Final = 1.0
QUIET_WAIT_MAX_S: Final = 60.0
NS_PER_S: Final = 1e9
NS_PER_MS: Final = 1e6
GOAL_RATIO: Final = 0.9
GOAL_SCALING: Final = 1.8
_GGML_LOG_WARN: Final = 3
_GGML_LOG_CONT: Final = 5


@dataclass(slots=True)
class StreamRun:
    """One stream of one round: when it started, its tokens and when each arrived (monotonic ns)."""

    start_ns: int = 0
    tokens: list[int] = field(default_factory=list)
    token_ns: list[int] = field(default_factory=list)
    finish_reason: str = ""


@dataclass(slots=True)
class RoundResult:
    tokens_per_s: float  # steady-state aggregate decode
    burst_tokens_per_s: float  # every token, first request sent -> last token
    ttft_mean_ms: float
    ttft_max_ms: float
    streams: list[StreamRun]


def summarize(streams: Sequence[StreamRun]) -> RoundResult:
    """Aggregate decode tok/s and TTFT of one round (definitions in the module docstring)."""
    timed = [s for s in streams if s.token_ns]
    if not timed:
        return RoundResult(float("nan"), float("nan"), float("nan"), float("nan"), list(streams))
    all_started_ns = max(s.token_ns[0] for s in timed)
    end_ns = max(s.token_ns[-1] for s in timed)
    counted = sum(1 for s in timed for t in s.token_ns if t > all_started_ns)
    tps = counted * NS_PER_S / (end_ns - all_started_ns) if end_ns > all_started_ns else float("nan")
    burst = sum(len(s.token_ns) for s in timed) * NS_PER_S / (end_ns - min(s.start_ns for s in streams))
    ttfts = [(s.token_ns[0] - s.start_ns) / NS_PER_MS for s in timed]
    return RoundResult(tps, burst, statistics.fmean(ttfts), max(ttfts), list(streams))


# --- direct: llama.cpp in this process ------------------------------------------------------------------------

_llama_log = logging.getLogger("llama.cpp")
_llama_level = logging.INFO


@L.llama_log_callback
def _llama_log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Keep llama.cpp's chatty INFO output out of the table; warnings and errors go to logging."""
    global _llama_level
    if level != _GGML_LOG_CONT:
        _llama_level = logging.WARNING if level >= _GGML_LOG_WARN else logging.DEBUG
    line = text.decode("utf-8", errors="replace").rstrip("\n")
    if line:
        _llama_log.log(_llama_level, "%s", line)


class DirectLoop:
    """The minimal batched decode loop: one context, one llama_batch, llama_decode per step."""

    def __init__(self, path: Path, opts: LoadOptions):
        L.llama_log_set(_llama_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        # Off unless the worker has it on: the AMX repacked-weight path segfaults on the project machine.
        mp.use_extra_bufts = opts.use_extra_bufts
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        kv_types = opts.kv_types(*head_dims(self.model))
        self.ctx = L.llama_init_from_model(
            self.model, context_params(opts, kv_types)
        )  # the worker's settings
        if not self.ctx:
            L.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.mem = L.llama_get_memory(self.ctx)
        self.n_batch = L.llama_n_batch(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        """The worker's tokenization of a text prompt: with BOS, special tokens not parsed."""
        data = text.encode()
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, True, False)
        if n < 0:
            raise RuntimeError(f"tokenize needs {-n} tokens")
        return list(buf[:n])

    def _decode(self, rows: Sequence[tuple[int, Sequence[int], int]]) -> list[int]:
        """Decode rows of (seq_id, tokens, first position) in one call; logits at each row's last token."""
        b = self.batch
        k = 0
        out: list[int] = []
        for seq_id, tokens, pos in rows:
            for i, tok in enumerate(tokens):
                b.token[k] = tok
                b.pos[k] = pos + i
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = seq_id
                b.logits[k] = 0
                k += 1
            b.logits[k - 1] = 1
            out.append(k - 1)
        b.n_tokens = k
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return out

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[StreamRun]:
        """Greedy-decode every prompt as its own sequence, all sequences batched together."""
        L.llama_memory_clear(self.mem, True)
        samplers = []
        for _ in prompts:
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            samplers.append(chain)
        try:
            streams = [StreamRun() for _ in prompts]
            start_ns = time.monotonic_ns()
            for s in streams:
                s.start_ns = start_ns
            n_past = [len(p) for p in prompts]
            live = list(range(len(prompts)))
            rows: list[tuple[int, Sequence[int], int]] = [(i, prompts[i], 0) for i in live]
            while live:
                indices = self._decode(rows)
                still: list[int] = []
                for seq, idx in zip(live, indices):
                    tok = int(L.llama_sampler_sample(samplers[seq], self.ctx, idx))
                    if L.llama_vocab_is_eog(self.vocab, tok):
                        streams[seq].finish_reason = "stop"
                        continue
                    streams[seq].tokens.append(tok)
                    if len(streams[seq].tokens) < max_tokens:
                        still.append(seq)
                    else:
                        streams[seq].finish_reason = "length"
                now_ns = time.monotonic_ns()
                for seq in live:
                    s = streams[seq]
                    s.token_ns.extend([now_ns] * (len(s.tokens) - len(s.token_ns)))
                live = still
                rows = [
                    (seq, streams[seq].tokens[-1:], n_past[seq] + len(streams[seq].tokens) - 1)
                    for seq in live
                ]
            return streams
        finally:
            for chain in samplers:
                L.llama_sampler_free(chain)

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


# --- ours: client -> broker -> worker ----------------------------------------------------------------------------


def ours_run(client: Client, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[StreamRun]:
    """N threads start one stream each behind a barrier and record when each token arrives."""
    streams = [StreamRun() for _ in prompts]
    errors: list[ErllamaError] = []
    barrier = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        s = streams[i]
        try:
            barrier.wait()
            s.start_ns = time.monotonic_ns()
            stream = client.infer(
                MODEL_ID,
                list(prompts[i]),
                timeout_s=STREAM_EVENT_TIMEOUT_S,
                max_tokens=max_tokens,
                temperature=0.0,
            )
            for ev in stream:
                s.tokens.extend(ev.token_ids)
                s.token_ns.extend([ev.received_ns] * len(ev.token_ids))
            s.finish_reason = stream.result.finish_reason if stream.result else "no result"
        except ErllamaError as exc:  # re-raised in the main thread below
            errors.append(exc)

    # Daemon threads: after an interrupt, a stream still waiting for its broker must not keep the process alive.
    threads = [
        threading.Thread(target=one, args=(i,), name=f"stream-{i}", daemon=True) for i in range(len(prompts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return streams


def start_broker(rdir: Path, with_cache: bool) -> subprocess.Popen[bytes]:
    """A private broker in ``rdir``. Without the KV cache by default: the direct loop has none, and
    the same prompts repeat every round, so cache hits would shorten ours' prefill. With it, every
    tier lives in ``rdir`` so the benchmark never touches the user's cache."""
    env = os.environ | {"ERLLAMA_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "erllama.broker.main", "--no-default-model", "--runtime-dir", str(rdir)]
    if with_cache:
        cmd += ["--cache-dir", str(rdir / "kv-disk"), "--shm-dir", str(rdir / "kv-shm")]
    else:
        cmd.append("--no-cache")
    return subprocess.Popen(cmd, env=env)


def wait_for_broker(client: Client, broker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while True:
        if broker.poll() is not None:
            raise RuntimeError(f"the broker exited with status {broker.returncode}")
        try:
            client.ping()
            return
        except ErllamaError:
            if time.monotonic() > deadline:
                raise


def stop_broker(broker: subprocess.Popen[bytes]) -> None:
    if broker.poll() is not None:
        return
    broker.send_signal(signal.SIGTERM)
    try:
        broker.wait(timeout=BROKER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("broker pid %d ignored SIGTERM for %.0f s; killing it", broker.pid, BROKER_STOP_TIMEOUT_S)
        broker.kill()
        broker.wait()


# --- other processes' CPU use ----------------------------------------------------------------------------------


def _busy_ticks_all() -> int:
    """Busy CPU time of the whole machine, in clock ticks (/proc/stat: user nice system . . irq softirq steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))


def _busy_ticks_tree(root_pid: int) -> int:
    """utime + stime of ``root_pid`` and all its descendants (here: this process, the broker, the worker)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # the process ended meanwhile
            continue
        rest = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        pid = int(entry.name)
        children.setdefault(int(rest[1]), []).append(pid)
        ticks[pid] = int(rest[11]) + int(rest[12])
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class ForeignCpu:
    """The share of the machine's CPUs that processes outside this benchmark's tree used over an
    interval. On a shared 2-core machine one other busy process halves llama.cpp's speed, and its
    spinning threads can stall a decode for seconds; such a pair of rounds is not evidence."""

    def __init__(self) -> None:
        self.t0_s = time.monotonic()
        self.all0 = _busy_ticks_all()
        self.own0 = _busy_ticks_tree(os.getpid())

    def share(self) -> float:
        wall_s = time.monotonic() - self.t0_s
        foreign = (_busy_ticks_all() - self.all0) - (_busy_ticks_tree(os.getpid()) - self.own0)
        return max(0.0, foreign / CLOCK_TICKS_PER_S / (wall_s * (os.cpu_count() or 1)))


def wait_for_quiet(limit: float, budget_end_s: float) -> float:
    """Wait (at most QUIET_WAIT_MAX_S, never past ``budget_end_s``) until other processes use less
    than ``limit`` of the CPUs."""
    deadline = min(time.monotonic() + QUIET_WAIT_MAX_S, budget_end_s)
    while True:
        meter = ForeignCpu()
        time.sleep(QUIET_PROBE_S)
        share = meter.share()
        if share < limit or time.monotonic() > deadline:
            return share
        log.info("other processes use %.0f%% of the CPUs; waiting", 100 * share)


# --- the comparison ------------------------------------------------------------------------------------------


def counting_prompt(stream_index: int) -> str:
    start = 1 + stream_index * PROMPT_START_STEP
    return ", ".join(str(n) for n in range(start, start + PROMPT_NUMBERS)) + ","


def check_lengths(path: str, n: int, streams: Sequence[StreamRun], max_tokens: int) -> None:
    for i, s in enumerate(streams):
        if len(s.tokens) != max_tokens:
            log.warning(
                "%s, %d streams: stream %d produced %d of %d tokens (finish %s)",
                path,
                n,
                i,
                len(s.tokens),
                max_tokens,
                s.finish_reason,
            )


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(ours: Sequence[RoundResult], direct: Sequence[RoundResult], burst: bool = False) -> float:
    """Median over rounds of ours / direct within a round: the two ran back to back, so machine
    load drifting between rounds cancels out of each pair."""
    if burst:
        return med([o.burst_tokens_per_s / d.burst_tokens_per_s for o, d in zip(ours, direct)])
    return med([o.tokens_per_s / d.tokens_per_s for o, d in zip(ours, direct)])


def print_table(
    levels: Sequence[int],
    ours: dict[int, list[RoundResult]],
    direct: dict[int, list[RoundResult]],
    same: dict[int, tuple[int, int]],
    args: argparse.Namespace,
) -> None:
    print(
        f"batched decode, {args.tokens} greedy tokens per stream, median of {args.rounds} alternating rounds"
    )
    head = (
        f"{'streams':>7} | {'ours tok/s':>10} | {'direct tok/s':>12} | {'ratio':>5} | "
        f"{'ours TTFT mean/max ms':>21} | {'direct TTFT mean/max ms':>23} | {'same greedy':>11}"
    )
    print(head)
    print("-" * len(head))
    ratios = {n: paired_ratio(ours[n], direct[n]) for n in levels}
    for n in levels:
        o, d = ours[n], direct[n]
        ot, dt = med([r.tokens_per_s for r in o]), med([r.tokens_per_s for r in d])
        ottft = f"{med([r.ttft_mean_ms for r in o]):.0f} / {med([r.ttft_max_ms for r in o]):.0f}"
        dttft = f"{med([r.ttft_mean_ms for r in d]):.0f} / {med([r.ttft_max_ms for r in d]):.0f}"
        k, total = same[n]
        print(
            f"{n:>7} | {ot:>10.1f} | {dt:>12.1f} | {ratios[n]:>5.3f} | {ottft:>21} | {dttft:>23} | "
            f"{f'{k}/{total}':>11}"
        )
    lo, hi = min(levels), max(levels)
    if lo != hi:
        so = med([r.tokens_per_s for r in ours[hi]]) / med([r.tokens_per_s for r in ours[lo]])
        sd = med([r.tokens_per_s for r in direct[hi]]) / med([r.tokens_per_s for r in direct[lo]])
        print(
            f"scaling {hi} streams / {lo} stream, aggregate tok/s (goal >= {GOAL_SCALING}): "
            f"ours {so:.2f}x, direct {sd:.2f}x"
        )
    worst = min(ratios, key=lambda n: ratios[n])
    print(f"lowest ratio ours / direct (goal >= {GOAL_RATIO}): {ratios[worst]:.3f} at {worst} streams")
    burst = "  ".join(
        f"{n}: {med([r.burst_tokens_per_s for r in ours[n]]):.1f} / {med([r.burst_tokens_per_s for r in direct[n]]):.1f}"
        f" = {paired_ratio(ours[n], direct[n], burst=True):.3f}"
        for n in levels
    )
    print(f"end to end (all tokens / first request sent -> last token), ours / direct tok/s: {burst}")


def print_reference(levels: Sequence[int], reference: Sequence[dict[int, float]]) -> None:
    """llama.cpp's own tool on the same model and context settings, in the same rounds: the most
    batching can give on this machine right now."""
    speeds = "  ".join(f"{n}: {med([r[n] for r in reference]):.1f}" for n in levels)
    print(f"llama-batched-bench decode S_TG tok/s (median of {len(reference)} runs, one per round): {speeds}")
    lo, hi = min(levels), max(levels)
    if lo != hi:
        print(
            f"llama-batched-bench scaling {hi} / {lo}: "
            f"{med([r[hi] for r in reference]) / med([r[lo] for r in reference]):.2f}x "
            f"(per run: {', '.join(f'{r[hi] / r[lo]:.2f}' for r in reference)})"
        )


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """`timeout` or a kill still runs the clean-up in ``main``; a second SIGTERM must not cut it short
    (it is bounded: the broker gets BROKER_STOP_TIMEOUT_S, then SIGKILL)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--streams", default="1,2,4,8", help=f"concurrency levels, each <= {N_SEQ_MAX}")
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens per stream")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=900.0,
        help="after this long, no more waiting for quiet nor repeating pairs",
    )
    ap.add_argument(
        "--attempts",
        type=int,
        default=4,
        help="runs of a pair disturbed by other processes before one is kept",
    )
    ap.add_argument(
        "--n-ctx", type=int, default=1024, help="context tokens per sequence (the n_ctx load option)"
    )
    ap.add_argument(
        "--kv-unified", action="store_true", help="load with kv_unified (default: the worker's default)"
    )
    ap.add_argument(
        "--cache", action="store_true", help="run ours with the KV cache (a cache store in the temp dir)"
    )
    ap.add_argument(
        "--llama-batched-bench",
        type=Path,
        metavar="PATH",
        help="also run llama.cpp's llama-batched-bench once per round (scripts/llama_batched_bench.py build)",
    )
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    levels = [int(x) for x in args.streams.split(",")]
    if not levels or any(not 1 <= n <= N_SEQ_MAX for n in levels):
        ap.error(f"--streams takes levels between 1 and {N_SEQ_MAX}")

    load_before = os.getloadavg()[0]
    rdir = Path(tempfile.mkdtemp(prefix="erl-bench-", dir="/tmp"))
    broker = start_broker(rdir, args.cache)
    direct: DirectLoop | None = None
    client: Client | None = None
    try:
        client = Client(ipc_endpoint(rdir, CLIENT_SOCKET_NAME), timeout_s=CLIENT_TIMEOUT_S)
        wait_for_broker(client, broker)
        load = {"n_ctx": args.n_ctx, "n_seq_max": N_SEQ_MAX} | (
            {"kv_unified": True} if args.kv_unified else {}
        )
        info = client.load_model(MODEL_ID, None, **load)
        # The direct loop copies the options the worker reports, defaults included.
        opts = parse_load_options(info["options"])
        log.info("model loaded in the worker; loading it in this process")
        direct = DirectLoop(default_model_path(), opts)
        log.info(
            "both contexts: n_ctx %d x %d sequences, n_batch %d, n_ubatch %d, %d threads, flash_attn %s, "
            "kv_unified %s",
            opts.n_ctx,
            opts.n_seq_max,
            opts.n_batch,
            opts.n_ubatch,
            opts.threads,
            opts.flash_attn,
            opts.kv_unified,
        )
        prompts = [direct.tokenize(counting_prompt(i)) for i in range(max(levels))]
        log.info("prompts of %s tokens", [len(p) for p in prompts])

        ours_run(client, prompts, WARMUP_TOKENS)  # warm both paths (allocations, page cache) once
        direct.run(prompts, WARMUP_TOKENS)
        ours: dict[int, list[RoundResult]] = {n: [] for n in levels}
        theirs: dict[int, list[RoundResult]] = {n: [] for n in levels}
        same: dict[int, tuple[int, int]] = {n: (0, 0) for n in levels}
        clean: dict[int, int] = {n: 0 for n in levels}
        reference: list[dict[int, float]] = []  # llama-batched-bench's S_TG per level, one dict per round
        reference_npp = round(statistics.median(len(p) for p in prompts[: max(levels)]))  # its prompt length
        budget_end_s = time.monotonic() + args.budget_s
        for r in range(args.rounds):
            for n in levels:
                for attempt in range(1, args.attempts + 1):
                    wait_for_quiet(FOREIGN_CPU_LIMIT, budget_end_s)
                    meter = ForeignCpu()
                    o_streams = ours_run(client, prompts[:n], args.tokens)
                    foreign_ours = meter.share()
                    meter = ForeignCpu()
                    d_streams = direct.run(prompts[:n], args.tokens)
                    foreign_direct = meter.share()
                    if max(foreign_ours, foreign_direct) < FOREIGN_CPU_LIMIT:
                        clean[n] += 1
                        break
                    last = attempt == args.attempts or time.monotonic() > budget_end_s
                    log.info(
                        "round %d, %d streams, attempt %d: other processes used %.0f%% / %.0f%% of the CPUs "
                        "during ours / direct%s",
                        r + 1,
                        n,
                        attempt,
                        100 * foreign_ours,
                        100 * foreign_direct,
                        "; keeping it anyway" if last else "; again",
                    )
                    if last:
                        break
                check_lengths("ours", n, o_streams, args.tokens)
                check_lengths("direct", n, d_streams, args.tokens)
                o, d = summarize(o_streams), summarize(d_streams)
                ours[n].append(o)
                theirs[n].append(d)
                k, total = same[n]
                same[n] = (k + sum(a.tokens == b.tokens for a, b in zip(o_streams, d_streams)), total + n)
                log.info(
                    "round %d, %d streams: ours %.1f tok/s (end to end %.1f, TTFT mean %.0f ms), "
                    "direct %.1f tok/s (end to end %.1f, TTFT %.0f ms)",
                    r + 1,
                    n,
                    o.tokens_per_s,
                    o.burst_tokens_per_s,
                    o.ttft_mean_ms,
                    d.tokens_per_s,
                    d.burst_tokens_per_s,
                    d.ttft_mean_ms,
                )
            if args.llama_batched_bench:
                wait_for_quiet(FOREIGN_CPU_LIMIT, budget_end_s)
                reference.append(
                    run_llama_batched_bench(
                        args.llama_batched_bench, opts, levels, reference_npp, args.tokens
                    )
                )
                log.info("round %d, llama-batched-bench S_TG: %s", r + 1, reference[-1])
        print_table(levels, ours, theirs, same, args)
        if reference:
            print_reference(levels, reference)
        print(
            f"pairs run while other processes used < {100 * FOREIGN_CPU_LIMIT:.0f}% of the CPUs: "
            + ", ".join(f"{n} streams {clean[n]}/{args.rounds}" for n in levels)
        )
        print(
            f"1-minute load average on {os.cpu_count()} CPUs: {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after (this benchmark alone adds about 2)"
        )
    finally:
        if client is not None:
            client.close()
        stop_broker(broker)
        if direct is not None:
            direct.close()
        shutil.rmtree(rdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
