"""Load: many concurrent streams through one broker, none lost, duplicated or cross-wired.

500 concurrent streams on the stub backend, one per ``Client`` (500 clients: 500 ZeroMQ contexts,
~1,500 threads and ~4,500 file descriptors in this process, well inside ``ulimit -n`` 20,000 on
the CI machine), each checked token for token against the same prompt run alone; the broker's
memory across two such waves; a slow consumer and a client that never reads beside fast streams;
and 50 concurrent streams on the real model, each checked against its own solo greedy run.
Nothing here asserts on elapsed time: waits have generous limits only so a hang fails instead of
blocking the suite.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import psutil
import pytest
import zmq

from erllama import Client
from erllama.protocol import MsgType
from tests.conftest import REAL_MODEL_ID, BrokerProcess, remove_runtime, short_tmpdir, start_broker

LOAD_MODEL: Final = "load"  # serves the concurrent streams
SOLO_MODEL: Final = "solo"  # one sequence: every run on it is a run alone
N_STREAMS: Final = 500
N_REAL_STREAMS: Final = 50
REAL_MAX_TOKENS: Final = 8
STREAM_TIMEOUT_S: Final = 300.0
# A second identical wave must not keep growing the broker.
RSS_WAVE_GROWTH_LIMIT_BYTES: Final = 16 * 1024 * 1024
RSS_TOTAL_GROWTH_LIMIT_BYTES: Final = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def load_broker() -> Iterator[BrokerProcess]:
    rdir = short_tmpdir("erl-l-")
    bp = start_broker(rdir, "--no-default-model")
    try:
        with Client(bp.endpoint, timeout_s=60.0) as c:
            # stub_decode_ms keeps the wave in flight long enough that it is concurrent in fact; the stub's
            # output depends only on the prompt (and the seed), so both models give the same tokens.
            c.load_model(
                LOAD_MODEL, backend="stub", n_ctx=256, n_seq_max=16, max_queue=4 * N_STREAMS, stub_decode_ms=5
            )
            c.load_model(SOLO_MODEL, backend="stub", n_ctx=256, n_seq_max=1, max_queue=4 * N_STREAMS)
        yield bp
    finally:
        bp.stop()
        remove_runtime(rdir)  # and its shm tier


def prompt_of(i: int) -> str:
    return f"stream {i:03d} asks: what comes after {i * 7919 % 1000}?"


def max_tokens_of(i: int) -> int:
    return 6 + i % 19  # different lengths, so a truncated or merged stream cannot pass


def solo_runs(c: Client, n: int) -> list[list[int]]:
    """Every prompt run alone (a one-sequence model, one request at a time)."""
    return [c.complete(SOLO_MODEL, prompt_of(i), max_tokens=max_tokens_of(i)).generated for i in range(n)]


@dataclass
class StreamOutcome:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    generated: list[int]


def consume(index: int, stream: Any) -> StreamOutcome:
    ids: list[int] = []
    for ev in stream:
        ids.extend(ev.token_ids)
    assert stream.result is not None
    return StreamOutcome(index, ids, stream.text, stream.result.finish_reason, list(stream.result.generated))


def broker_rss(bp: BrokerProcess) -> int:
    return psutil.Process(bp.proc.pid).memory_info().rss


def run_wave(bp: BrokerProcess, clients: list[Client], peak: list[int]) -> list[StreamOutcome]:
    """One stream per client, all started before any is read, then read on a thread pool. A probe
    samples the model's queue depth meanwhile (``peak`` gets the largest), to show the wave was in the
    broker at once."""
    streams = [
        c.infer(LOAD_MODEL, prompt_of(i), max_tokens=max_tokens_of(i), timeout_s=STREAM_TIMEOUT_S)
        for i, c in enumerate(clients)
    ]
    done = threading.Event()
    depths: list[int] = []

    def sample() -> None:
        with Client(bp.endpoint) as probe:
            while not done.is_set():
                depths.append(probe.queue_depth(LOAD_MODEL))
                done.wait(0.01)

    sampler = threading.Thread(target=sample, name="queue-depth-probe")
    sampler.start()
    try:
        with ThreadPoolExecutor(max_workers=64) as pool:
            return list(pool.map(lambda p: consume(*p), enumerate(streams)))
    finally:
        done.set()
        sampler.join()
        peak.append(max(depths, default=0))


def test_500_concurrent_streams_each_get_exactly_their_own_tokens_and_broker_memory_stays_bounded(
    load_broker: BrokerProcess,
):
    with Client(load_broker.endpoint, timeout_s=120.0) as admin:
        expected = solo_runs(admin, N_STREAMS)
        assert len({tuple(e) for e in expected}) > N_STREAMS * 0.9, (
            "prompts must give distinguishable streams"
        )
        clients = [Client(load_broker.endpoint, timeout_s=120.0) for _ in range(N_STREAMS)]
        try:
            rss_before = broker_rss(load_broker)
            peaks: list[int] = []
            waves = []
            rss_after_wave = []
            for _ in range(2):
                waves.append(run_wave(load_broker, clients, peaks))
                assert admin.queue_depth() == 0
                rss_after_wave.append(broker_rss(load_broker))
        finally:
            for c in clients:
                c.close()
        for outcomes in waves:
            assert len(outcomes) == N_STREAMS
            for o in outcomes:
                want = expected[o.index]
                assert o.token_ids == want, f"stream {o.index}: got {o.token_ids}, alone it gives {want}"
                assert o.generated == want and o.finish_reason == "length"
        # Most of the wave was in the broker at once (16 running, the rest queued).
        assert max(peaks) >= N_STREAMS // 2, peaks
        info = admin.model_info(LOAD_MODEL)
        assert info["queue_depth"] == 0 and info["running"] == 0 and info["pending_len"] == 0
        growth_second_wave = rss_after_wave[1] - rss_after_wave[0]
        growth_total = rss_after_wave[1] - rss_before
        assert growth_second_wave < RSS_WAVE_GROWTH_LIMIT_BYTES, (
            f"broker RSS grew {growth_second_wave >> 20} MiB on the second wave"
        )
        assert growth_total < RSS_TOTAL_GROWTH_LIMIT_BYTES, (
            f"broker RSS grew {growth_total >> 20} MiB over two waves"
        )


def test_a_slow_consumer_and_a_client_that_never_reads_do_not_stall_other_streams(load_broker: BrokerProcess):
    """The slow consumer reads one event, then waits on a gate we open only after every other stream
    has finished; the silent client sends requests and does not read its socket until then."""
    n_others = 100
    slow_prompt, slow_tokens = "the slow consumer's long story", 200
    silent_prompts = [f"a client that never reads, request {i}" for i in range(5)]
    with Client(load_broker.endpoint, timeout_s=120.0) as admin:
        slow_expected = admin.complete(SOLO_MODEL, slow_prompt, max_tokens=slow_tokens).generated
        silent_expected = [
            admin.complete(SOLO_MODEL, p, max_tokens=slow_tokens).generated for p in silent_prompts
        ]
        others_expected = solo_runs(admin, n_others)

        gate = threading.Event()
        slow_seen: list[int] = []
        slow_client = Client(load_broker.endpoint, timeout_s=120.0)
        ctx = zmq.Context()
        silent = ctx.socket(zmq.DEALER)
        silent.setsockopt(zmq.LINGER, 0)
        silent.connect(load_broker.endpoint)
        others = [Client(load_broker.endpoint, timeout_s=120.0) for _ in range(10)]
        try:
            slow_stream = slow_client.infer(
                LOAD_MODEL, slow_prompt, max_tokens=slow_tokens, timeout_s=STREAM_TIMEOUT_S
            )

            def slow_consumer() -> None:
                for ev in slow_stream:
                    slow_seen.extend(ev.token_ids)
                    gate.wait(STREAM_TIMEOUT_S)

            reader = threading.Thread(target=slow_consumer, name="slow-consumer")
            reader.start()
            for i, p in enumerate(silent_prompts):
                silent.send(
                    msgpack.packb(
                        {
                            "v": 1,
                            "t": "infer",
                            "id": f"silent-{i}",
                            "model": LOAD_MODEL,
                            "prompt": p,
                            "params": {"max_tokens": slow_tokens},
                        }
                    )
                )
            streams = [
                others[i % len(others)].infer(
                    LOAD_MODEL, prompt_of(i), max_tokens=max_tokens_of(i), timeout_s=STREAM_TIMEOUT_S
                )
                for i in range(n_others)
            ]
            with ThreadPoolExecutor(max_workers=16) as pool:
                outcomes = list(pool.map(lambda p: consume(*p), enumerate(streams)))
            # Every other stream is complete and correct while the slow one is still being consumed.
            assert not gate.is_set() and slow_stream.result is None and len(slow_seen) >= 1
            for o in outcomes:
                assert o.token_ids == others_expected[o.index] and o.finish_reason == "length"
            gate.set()
            reader.join(STREAM_TIMEOUT_S)
            assert not reader.is_alive()
            assert slow_stream.result is not None and slow_stream.result.finish_reason == "length"
            assert slow_seen == slow_expected
            # The silent client's replies were queued for it, complete and in order.
            got: dict[str, list[int]] = {f"silent-{i}": [] for i in range(len(silent_prompts))}
            done: set[str] = set()
            while len(done) < len(silent_prompts):
                assert silent.poll(int(STREAM_TIMEOUT_S * 1000)), f"silent client missing {set(got) - done}"
                msg = msgpack.unpackb(silent.recv(), raw=False)
                if msg["t"] == MsgType.TOKEN:
                    for request_id, _, token_ids, *_ in msg["steps"]:
                        assert request_id not in done, msg
                        got[request_id].extend(token_ids)
                else:
                    assert msg["id"] not in done, msg
                    assert msg["t"] == MsgType.DONE, msg
                    assert msg["result"]["finish_reason"] == "length", msg
                    done.add(msg["id"])
            assert [got[f"silent-{i}"] for i in range(len(silent_prompts))] == silent_expected
        finally:
            gate.set()
            silent.close()
            ctx.term()
            slow_client.close()
            for c in others:
                c.close()
        assert admin.queue_depth() == 0


# --- the real model ---------------------------------------------------------------------------------------------


def real_prompts(c: Client) -> list[list[int]]:
    subjects = [
        "the sea",
        "a robot",
        "winter",
        "a library",
        "the moon",
        "bread",
        "a train",
        "music",
        "a garden",
        "chess",
    ]
    forms = [
        "Write one sentence about {}.",
        "Q: What do you know about {}?\nA:",
        "A short poem about {}:",
        "{} is",
        "Describe {} in three words:",
    ]
    texts = [f.format(s) for s in subjects for f in forms][:N_REAL_STREAMS]
    return [c.tokenize(REAL_MODEL_ID, t) for t in texts]


def test_50_concurrent_streams_on_the_real_model_each_match_their_own_solo_greedy_run(
    real_client: Client, real_broker: BrokerProcess
):
    pid = real_client.model_info(REAL_MODEL_ID)["worker_pid"]
    prompts = real_prompts(real_client)
    assert len(prompts) == N_REAL_STREAMS
    solo = [
        real_client.complete(REAL_MODEL_ID, p, max_tokens=REAL_MAX_TOKENS, temperature=0).generated
        for p in prompts
    ]
    clients = [Client(real_broker.endpoint, timeout_s=120.0) for _ in range(10)]
    try:
        streams = [
            clients[i % len(clients)].infer(
                REAL_MODEL_ID, p, max_tokens=REAL_MAX_TOKENS, temperature=0, timeout_s=STREAM_TIMEOUT_S
            )
            for i, p in enumerate(prompts)
        ]
        with ThreadPoolExecutor(max_workers=10) as pool:
            outcomes = list(pool.map(lambda p: consume(*p), enumerate(streams)))
    finally:
        for c in clients:
            c.close()
    assert len(outcomes) == N_REAL_STREAMS
    for o in outcomes:
        assert o.token_ids == o.generated, f"stream {o.index}: streamed tokens differ from its own result"
        # exact mode: batched beside 49 others, a stream decodes exactly what it decodes alone
        assert o.token_ids == solo[o.index], f"stream {o.index}: batched output differs from its solo run"
    assert real_client.model_info(REAL_MODEL_ID)["worker_pid"] == pid
    assert real_client.queue_depth(REAL_MODEL_ID) == 0
