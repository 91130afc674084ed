"""Generation through client -> broker -> worker process on the real default model."""

from __future__ import annotations

import threading

import pytest

from erllama import Client, ErllamaError
from tests.conftest import REAL_MODEL_ID, BrokerProcess, error_when_closed_mid_stream
from tests.reference import assert_identical

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
    "Q: What is 12 times 7?\nA:",
    "The quick brown fox",
]
N_TOKENS = 32


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_llama_cpp_python_token_for_token(real_client: Client, reference, prompt):
    tokens = reference.tokenize(prompt)
    ref, _ = reference.greedy(tokens, N_TOKENS)
    r = real_client.complete(REAL_MODEL_ID, prompt, max_tokens=N_TOKENS, temperature=0)
    assert r.context_tokens[: len(tokens)] == tokens  # the worker tokenized the text the same way
    assert_identical(r.generated, ref, prompt)
    assert r.reply == reference.llm.detokenize(r.generated).decode("utf-8", errors="replace")


def test_same_seed_and_temperature_give_the_same_text_and_other_seeds_differ(real_client: Client):
    prompt = "Write a short poem about the sea."
    a = real_client.complete(REAL_MODEL_ID, prompt, max_tokens=24, temperature=0.9, seed=1234)
    b = real_client.complete(REAL_MODEL_ID, prompt, max_tokens=24, temperature=0.9, seed=1234)
    others = {
        real_client.complete(REAL_MODEL_ID, prompt, max_tokens=24, temperature=0.9, seed=s).reply
        for s in (1, 2, 3)
    }
    assert a.reply == b.reply
    assert len(others | {a.reply}) > 1


def test_max_tokens_ends_with_length(real_client: Client):
    r = real_client.complete(REAL_MODEL_ID, "Count: one, two, three,", max_tokens=5)
    assert r.finish_reason == "length" and len(r.generated) == 5


def test_stop_string_spanning_two_tokens_is_cut_exactly(real_client: Client):
    prompt = "Once upon a time, in a small village,"
    full = real_client.complete(REAL_MODEL_ID, prompt, max_tokens=32)
    pieces = [real_client.detokenize(REAL_MODEL_ID, [t]) for t in full.generated]
    # a stop made of the end of one token and the start of the next
    k = next(
        i for i in range(2, len(pieces)) if len(pieces[i - 1].strip()) >= 2 and len(pieces[i].strip()) >= 2
    )
    stop = pieces[k - 1][-2:] + pieces[k][:2]
    expected = full.reply[: full.reply.find(stop)]
    r = real_client.complete(REAL_MODEL_ID, prompt, max_tokens=32, stop=[stop])
    assert r.finish_reason == "stop" and r.stop_sequence == stop
    assert r.reply == expected
    streamed = "".join(ev.text for ev in real_client.infer(REAL_MODEL_ID, prompt, max_tokens=32, stop=[stop]))
    assert streamed == expected


def test_streamed_text_is_the_reply_and_valid_utf8(real_client: Client):
    stream = real_client.infer(REAL_MODEL_ID, "Write the word café three times:", max_tokens=20)
    events = list(stream)
    assert "".join(e.text for e in events) == stream.result.reply
    assert [t for e in events for t in e.token_ids] == stream.result.generated
    assert stream.stats.completion_tokens == 20 and stream.stats.ttft_ms > 0


def test_cancel_mid_stream_ends_cancelled_and_the_worker_serves_the_next(real_client: Client):
    stream = real_client.infer(REAL_MODEL_ID, "1, 2, 3, 4, 5, 6,", max_tokens=400)  # it keeps counting
    for i, _ in enumerate(stream):
        if i == 3:
            stream.cancel()
    assert stream.result.finish_reason == "cancelled"
    assert 4 <= len(stream.result.generated) < 400
    r = real_client.complete(REAL_MODEL_ID, "The capital of France is", max_tokens=3)
    assert r.finish_reason == "length"


def test_closing_a_client_fails_its_stream_in_flight_with_client_closed_and_the_model_serves_on(
    real_broker: BrokerProcess, real_client: Client
):
    c = Client(real_broker.endpoint, timeout_s=60.0)
    stream = c.infer(REAL_MODEL_ID, "1, 2, 3, 4, 5, 6,", max_tokens=400, timeout_s=600.0)  # it keeps counting
    assert error_when_closed_mid_stream(c, stream).code == "client_closed"
    # The broker cancels the orphaned request when it cannot deliver to the closed client.
    assert (
        real_client.complete(REAL_MODEL_ID, "The capital of France is", max_tokens=3).finish_reason
        == "length"
    )


def test_two_clients_stream_from_two_models_at_once(real_broker: BrokerProcess):
    loader = real_broker.client(timeout_s=60)
    loader.load_model("second", None, n_ctx=1024, n_seq_max=1)
    try:
        solo = {
            m: loader.complete(m, p, max_tokens=16)
            for m, p in ((REAL_MODEL_ID, "Paris is"), ("second", "Rome is"))
        }
        got: dict[str, list[int]] = {}

        def run(model: str, prompt: str) -> None:
            with Client(real_broker.endpoint) as c:
                got[model] = [t for ev in c.infer(model, prompt, max_tokens=16) for t in ev.token_ids]

        threads = [
            threading.Thread(target=run, args=a) for a in ((REAL_MODEL_ID, "Paris is"), ("second", "Rome is"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got[REAL_MODEL_ID] == solo[REAL_MODEL_ID].generated
        assert got["second"] == solo["second"].generated
    finally:
        loader.unload_model("second")


def test_full_queue_answers_overloaded(real_broker: BrokerProcess):
    c = real_broker.client(timeout_s=60)
    c.load_model("tiny-queue", None, n_ctx=512, n_seq_max=1, max_queue=1)
    try:
        running = c.infer("tiny-queue", "1, 2, 3, 4, 5, 6,", max_tokens=400)
        next(iter(running))  # it holds the only sequence
        queued = c.infer("tiny-queue", "Hello", max_tokens=2)  # waits in the queue
        with pytest.raises(ErllamaError) as exc:
            c.complete("tiny-queue", "Hello", max_tokens=2)
        assert exc.value.code == "overloaded"
        assert c.model_info("tiny-queue")["pending_len"] == 1
        running.cancel()
        assert running.collect().finish_reason == "cancelled"
        assert queued.collect().finish_reason == "length"
    finally:
        c.unload_model("tiny-queue")
