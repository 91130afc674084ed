#!/usr/bin/env python3
"""Several machines: what cache-aware routing and the shared tier save on a multi-turn workload.

One broker and ``--hosts`` ``erllama-host`` processes (3 by default), each its own process group on its
own loopback address (127.0.0.2, .3, ...) with its own runtime, shm and disk directories, joined over
CURVE tcp (tests/host/cluster.py), run one replica each of one model with ``--seqs`` sequences. A
workload of many more conversations than sequences (24 x 4 turns by default) runs against it: every
conversation is a thread of its own, all start at once, and each turn resends a long shared system
prompt, the conversation's own opening, every earlier turn and reply, and ``--new-tokens`` new ones (as
token ids), generating ``--gen``. Configurations:

- ``single host``: one host, one replica with as many sequences as all the hosts together: the most
  a cache can restore when every conversation's rows are on the one machine that serves it;
- ``cache_aware``, ``least_loaded`` and ``round_robin`` routing, each with the hosts' cache stores on
  their own (``shared off``) and with a shared tier on a real ``redis-server`` (``shared on``).

Printed: the share of prompt tokens restored from any cache (``cache_delta["read"]``) and the mean
and p90 time to first token (client-measured, as in scripts/bench_warm.py: request sent -> first token
event; it includes queueing) over turns 2+, and the issue's two goals: ``cache_aware`` mean TTFT /
``round_robin``'s <= 0.5, and ``cache_aware`` restored / single host's >= 0.95.

The model is the stub backend with a prefill cost per token (``stub_prefill_us_per_token``) and a
decode step (``stub_decode_ms``), both calibrated first from the real default model (SmolLM2) on one
host: prefill tokens/s of a ~1,000-token prompt and one decode step, so that 3 hosts fit on 2 cores.
``--no-calibrate`` uses ``--prefill-us`` and ``--decode-ms``. ``--real`` runs the real model instead,
smaller (2 hosts, 6 conversations x 3 turns, short prompts), each replica with its share of the cores
(``n_threads``) and ``OMP_WAIT_POLICY=PASSIVE``.

The model is loaded once with a replica per host (``load_model(..., hosts=[...], routing=...)``) and
the broker routes each request.

Each configuration's prompts start with a text of their own, so rows one left behind in a host's
store never match another's: one cluster serves all the configurations of a tier setting.

    flock /tmp/erllama-heavy.lock python scripts/bench_cluster.py [--no-calibrate] [--real]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_warm import Corpus, Sample, ctx_for, mean, p90, run

from erllama import Client, ErllamaError
from tests.host.cluster import Cluster, cluster
from tests.redis_support import RedisServer

log = logging.getLogger("bench_cluster")

MODEL_ID: Final = "cluster-bench"
CALIBRATION_MODEL_ID: Final = "calibrate"
ROUTINGS: Final = ("cache_aware", "least_loaded", "round_robin")
CLIENT_TIMEOUT_S: Final = 120.0
CALIBRATION_PROMPT_TOKENS: Final = 1000
CALIBRATION_DECODE_TOKENS: Final = 17
CALIBRATION_ROUNDS: Final = 2
DEFAULT_PREFILL_US_PER_TOKEN: Final = 4500  # the default model on this 2-core VM, exact mode (README)
DEFAULT_DECODE_MS: Final = 10
QUIET: Final = ("--log-level", "WARNING")  # the broker's and hosts' logs: only what goes wrong


@dataclass(frozen=True, slots=True)
class Workload:
    convs: int
    turns: int
    system_tokens: int
    conv_tokens: int
    new_tokens: int
    gen: int

    def n_ctx(self) -> int:
        longest = self.system_tokens + self.conv_tokens + (self.turns - 1) * (self.gen + self.new_tokens)
        return ctx_for(longest + self.gen)


@dataclass(frozen=True, slots=True)
class Setup:
    label: str
    hosts: int
    seqs: int  # per replica
    routing: str | None  # None: one replica, nothing to route
    shared: bool


@dataclass(slots=True)
class Outcome:
    setup: Setup
    samples: list[tuple[int, Sample]]  # (turn, sample)
    wall_s: float
    routed: list[int]  # requests the broker sent to each replica

    def later(self) -> list[Sample]:
        return [s for t, s in self.samples if t >= 2]

    def restored(self) -> float:
        later = self.later()
        return sum(s.read for s in later) / max(1, sum(s.prompt_tokens for s in later))

    def from_shared(self) -> float:
        """The share of prompt tokens (turns 2+) restored from rows fetched from the shared tier."""
        later = self.later()
        read = sum(s.read for s in later if s.tier == "shared")
        return read / max(1, sum(s.prompt_tokens for s in later))

    def mean_ttft(self) -> float:
        return mean([s.ttft_ms for s in self.later()])


@dataclass(slots=True)
class Hosts:
    """A broker and its hosts for every configuration of one tier setting."""

    cl: Cluster
    client: Client
    names: list[str]
    runs: itertools.count[int] = field(default_factory=itertools.count)


def start_hosts(cl: Cluster, n: int, shared_url: str | None) -> Hosts:
    names = [f"h{i + 1}" for i in range(n)]
    extra = ("--shared-url", shared_url) if shared_url else ()
    for i, name in enumerate(names):
        cl.start_host(name, f"127.0.0.{i + 2}", *QUIET, *extra)
    return Hosts(cl, cl.client(timeout_s=CLIENT_TIMEOUT_S), names)


def deploy(hosts: Hosts, setup: Setup, options: dict[str, Any]) -> None:
    """One replica of the model on each of the setup's hosts, routed by the broker."""
    c, names = hosts.client, hosts.names[: setup.hosts]
    opts = options | {"n_seq_max": setup.seqs}
    if options.get("backend") != "stub":  # the hosts share this machine's cores: each gets its part
        opts["n_threads"] = max(1, (os.cpu_count() or 1) // setup.hosts)
    if setup.routing is None:
        c.load_model(MODEL_ID, None, host=names[0], **opts)
        return
    c.load_model(MODEL_ID, None, hosts=names, routing=setup.routing, **opts)
    info = c.model_info(MODEL_ID)
    replicas = [(r["host"], r["state"], r["slots"]) for r in info.get("replicas", [])]
    log.info("%s: replicas (host, state, slots) %s, routing %s", setup.label, replicas, info.get("routing"))


def run_setup(hosts: Hosts, setup: Setup, work: Workload, options: dict[str, Any]) -> Outcome:
    c = hosts.client
    deploy(hosts, setup, options)
    corpus = Corpus(c, MODEL_ID)
    salt = next(hosts.runs)  # a lead of its own: no row of an earlier configuration matches
    system = corpus.prompt(
        f"Run {salt}. System: you answer questions about the harbour. ", work.system_tokens
    )
    openings = [
        system + corpus.more(f"\nConversation {k + 1}. User: ", work.conv_tokens, 131 * k + 17)
        for k in range(work.convs)
    ]
    samples: list[tuple[int, Sample]] = []
    failures: list[BaseException] = []
    start = threading.Barrier(work.convs)

    def conversation(k: int) -> None:
        prompt = openings[k]
        try:
            start.wait()
            for t in range(1, work.turns + 1):
                s = run(c, prompt, work.gen, model_id=MODEL_ID)
                samples.append((t, s))  # list.append is atomic
                more = corpus.more(f"\nUser (turn {t + 1}): ", work.new_tokens, 131 * k + 389 * t)
                prompt = prompt + s.generated + more
        except (ErllamaError, RuntimeError, AssertionError, threading.BrokenBarrierError) as exc:
            start.abort()
            failures.append(exc)

    threads = [threading.Thread(target=conversation, args=(k,), daemon=True) for k in range(work.convs)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall_s = time.monotonic() - t0
    routed = [int(r.get("routed", 0)) for r in c.model_info(MODEL_ID).get("replicas", [])]
    c.unload_model(MODEL_ID)
    if failures:
        raise RuntimeError(f"{len(failures)} conversations failed in {setup.label}") from failures[0]
    out = Outcome(setup, samples, wall_s, routed)
    log.info(
        "%s: restored %.1f%%, mean TTFT %.0f ms, %.1f s",
        setup.label,
        100 * out.restored(),
        out.mean_ttft(),
        wall_s,
    )
    return out


def calibrate() -> tuple[int, int]:
    """The real default model's prefill cost per token (µs) on a ~1,000-token prompt and one decode
    step (ms, minus one token's prefill cost, which the stub adds per batch token), on one host."""
    with cluster(("h1",), *QUIET) as cl:
        hosts = start_hosts(cl, 1, None)
        c = hosts.client
        c.load_model(CALIBRATION_MODEL_ID, None, host="h1", n_ctx=2048, n_seq_max=1, cache=False)
        c.complete(CALIBRATION_MODEL_ID, "Hello there.", max_tokens=2)  # faults the weights in
        corpus = Corpus(c, CALIBRATION_MODEL_ID)
        rates, steps = [], []
        for i in range(CALIBRATION_ROUNDS):
            prompt = corpus.prompt(f"Calibration {i}. ", CALIBRATION_PROMPT_TOKENS, offset=97 * i)
            r = c.complete(
                CALIBRATION_MODEL_ID, prompt, max_tokens=CALIBRATION_DECODE_TOKENS, temperature=0.0
            )
            rates.append(r.stats.prompt_tokens / (r.stats.ttft_ms / 1000.0))
            steps.append(r.stats.generation_ms / max(1, len(r.generated) - 1))
        c.unload_model(CALIBRATION_MODEL_ID)  # before the host goes: a clean stop, not a lost host
    prefill_tok_s, step_ms = max(rates), min(steps)
    us_per_token = round(1e6 / prefill_tok_s)
    decode_ms = max(0, round(step_ms - us_per_token / 1000.0))
    print(
        f"calibration (real model, one host): prefill {prefill_tok_s:.0f} tok/s on a "
        f"{CALIBRATION_PROMPT_TOKENS}-token prompt, one decode step {step_ms:.1f} ms -> "
        f"stub_prefill_us_per_token={us_per_token}, stub_decode_ms={decode_ms}"
    )
    return us_per_token, decode_ms


def setups(args: argparse.Namespace) -> dict[bool, list[Setup]]:
    """The configurations, by whether the hosts have the shared tier."""
    by_tier: dict[bool, list[Setup]] = {}
    for shared in (t == "on" for t in args.tiers):
        tier = "shared on" if shared else "shared off"
        by_tier[shared] = [Setup(f"{r}, {tier}", args.hosts, args.seqs, r, shared) for r in args.routings]
    total = args.hosts * args.seqs
    by_tier.setdefault(False, []).insert(0, Setup(f"single host, {total} seqs", 1, total, None, False))
    return dict(sorted(by_tier.items()))  # the single host first


def table(outcomes: list[Outcome], work: Workload) -> None:
    print(
        f"\n{work.convs} conversations x {work.turns} turns; first prompt {work.system_tokens} shared + "
        f"{work.conv_tokens} own tokens, then +{work.gen} generated +{work.new_tokens} new per turn. "
        "TTFT: client, request sent -> first token event (includes queueing); turns 2+.\n"
    )
    print(
        "| configuration | restored | of which shared tier | mean TTFT ms | p90 TTFT ms "
        "| turn 1 mean TTFT ms | wall s | requests per replica |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for o in outcomes:
        first = mean([s.ttft_ms for t, s in o.samples if t == 1])
        ttfts = [s.ttft_ms for s in o.later()]
        print(
            f"| {o.setup.label} | {100 * o.restored():.1f}% | {100 * o.from_shared():.1f}% "
            f"| {mean(ttfts):,.0f} | {p90(ttfts):,.0f} "
            f"| {first:,.0f} | {o.wall_s:.1f} | {'/'.join(map(str, o.routed)) or '-'} |"
        )
    by_label = {o.setup.label: o for o in outcomes}
    single = next(o for o in outcomes if o.setup.routing is None)
    for tier in ("shared off", "shared on"):
        aware, rr = by_label.get(f"cache_aware, {tier}"), by_label.get(f"round_robin, {tier}")
        if aware is None:
            continue
        if rr is not None:
            ratio = aware.mean_ttft() / rr.mean_ttft()
            verdict = "met" if ratio <= 0.5 else "MISSED"
            print(f"\n{tier}: cache_aware / round_robin mean TTFT **{ratio:.2f}** (goal <= 0.5: {verdict})")
        share = aware.restored() / max(single.restored(), 1e-9)
        verdict = "met" if share >= 0.95 else "MISSED"
        print(f"{tier}: cache_aware restored / single host's **{share:.2f}** (goal >= 0.95: {verdict})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="the real default model, a smaller run")
    ap.add_argument("--no-calibrate", action="store_true", help="the stub's costs from the flags below")
    ap.add_argument("--prefill-us", type=int, default=DEFAULT_PREFILL_US_PER_TOKEN)
    ap.add_argument("--decode-ms", type=int, default=DEFAULT_DECODE_MS)
    ap.add_argument("--hosts", type=int)
    ap.add_argument("--seqs", type=int, default=2, help="sequences per replica")
    ap.add_argument("--convs", type=int)
    ap.add_argument("--turns", type=int)
    ap.add_argument("--system-tokens", type=int)
    ap.add_argument("--conv-tokens", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--gen", type=int)
    ap.add_argument("--routings", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    ap.add_argument("--tiers", nargs="+", choices=("off", "on"), default=["off", "on"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # --real: 2 hosts, 6 x 3 turns, short prompts; else 3 hosts, 24 x 4 turns, a ~1,000-token system prompt
    small = {
        "hosts": 2,
        "convs": 6,
        "turns": 3,
        "system_tokens": 300,
        "conv_tokens": 50,
        "new_tokens": 50,
        "gen": 16,
    }
    large = {
        "hosts": 3,
        "convs": 24,
        "turns": 4,
        "system_tokens": 1000,
        "conv_tokens": 100,
        "new_tokens": 100,
        "gen": 32,
    }
    for key, value in (small if args.real else large).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    work = Workload(args.convs, args.turns, args.system_tokens, args.conv_tokens, args.new_tokens, args.gen)
    if args.real:
        options: dict[str, Any] = {"n_ctx": work.n_ctx()}
        # several llama.cpp processes on a few cores: OpenMP's spinning barriers stall each other's
        # steps for seconds (see scripts/bench_warm.py --omp-passive); the workers inherit this
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    else:
        us, ms = (args.prefill_us, args.decode_ms) if args.no_calibrate else calibrate()
        options = {
            "backend": "stub",
            "n_ctx": work.n_ctx(),
            "stub_prefill_us_per_token": us,
            "stub_decode_ms": ms,
        }
        print(f"stub model: stub_prefill_us_per_token={us}, stub_decode_ms={ms}")
    outcomes: list[Outcome] = []
    names = tuple(f"h{i + 1}" for i in range(args.hosts))
    with tempfile.TemporaryDirectory(prefix="erl-bc-redis-") as redis_dir:
        redis = RedisServer(Path(redis_dir)).start() if "on" in args.tiers else None
        try:
            for shared, group in setups(args).items():
                url = redis.url if shared and redis else None
                # the broker's routing counts shared-tier rows only when it knows the tier too
                with cluster(names, *QUIET, *(("--shared-url", url) if url else ())) as cl:
                    hosts = start_hosts(cl, args.hosts, url)
                    outcomes += [run_setup(hosts, s, work, options) for s in group]
        finally:
            if redis is not None:
                redis.kill()
    table(outcomes, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
