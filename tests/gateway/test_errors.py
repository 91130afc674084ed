"""Every error the gateway answers, seen through the ``openai`` SDK's own exception classes (and plain
HTTP where the SDK hides the detail under test): status, OpenAI error body, ``Retry-After``."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from typing import Any

import httpx
import openai
import pytest

from erllama import Client
from tests.conftest import REAL_MODEL_ID, BrokerProcess, wait_for
from tests.gateway.conftest import MAX_BODY_BYTES, SPARE_MODEL, GatewayProcess, auth, start_gateway

MODEL = REAL_MODEL_ID
HELLO = [{"role": "user", "content": "Hello"}]
COUNTING = "1, 2, 3, 4, 5, 6,"  # the model keeps counting


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_an_unknown_request_field_is_a_400_naming_it(oai: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, extra_body={"frobnicate": 1})
    err = error_of(exc.value)
    assert err["type"] == "invalid_request_error" and err["param"] == "frobnicate"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_tokens": "many"}, "max_tokens"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(oai: openai.OpenAI, kwargs: dict[str, Any], param: str):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(model=MODEL, messages=HELLO, **kwargs)
    assert error_of(exc.value)["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_the_context_is_a_400_context_length_exceeded(oai: openai.OpenAI, stream: bool):
    # streamed too: the status waits for the request's first event, so an early refusal is still a status
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=SPARE_MODEL, prompt="hello " * 600, max_tokens=2, stream=stream)
    assert error_of(exc.value)["code"] == "context_length_exceeded"


def test_an_unknown_model_is_a_404(oai: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as exc:
        oai.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=2)
    assert error_of(exc.value)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_an_unknown_path_is_a_404_error_object(gateway: GatewayProcess):
    r = httpx.get(f"{gateway.url}/v1/nothing-here", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_missing_or_wrong_api_key_is_a_401(gateway: GatewayProcess):
    bad = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert error_of(exc.value)["code"] == "invalid_api_key"
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 401
    assert httpx.get(f"{gateway.url}/health").status_code == 200  # probes need no key


def test_a_body_over_the_limit_is_a_413(gateway: GatewayProcess):
    body = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY_BYTES + 1)})
    r = httpx.post(f"{gateway.url}/v1/completions", content=body, headers=auth())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_a_full_queue_is_a_429_with_retry_after(oai: openai.OpenAI, erl: Client):
    running = erl.infer(SPARE_MODEL, COUNTING, max_tokens=400)
    next(iter(running))  # it holds the spare model's only sequence
    queued = erl.infer(SPARE_MODEL, "Hello", max_tokens=2)  # and this one its queue
    try:
        # Two sockets race to the broker: the HTTP request must not overtake the queued one.
        wait_for(lambda: erl.pending_len(SPARE_MODEL) == 1, what="the spare model's queue to fill")
        with pytest.raises(openai.RateLimitError) as exc:
            oai.completions.create(model=SPARE_MODEL, prompt="Hello", max_tokens=2)
        assert exc.value.response.headers["retry-after"] == "1"
        assert error_of(exc.value)["code"] == "overloaded"
    finally:
        running.cancel()
        running.collect()
        queued.collect()


def _spare_worker_dies_mid_request(erl: Client, started: threading.Event) -> None:
    started.wait(timeout=120)
    before = erl.model_info(SPARE_MODEL)
    pid = before["worker_pid"]
    wait_for(
        lambda: erl.model_info(SPARE_MODEL)["tokens_generated"] > before["tokens_generated"], what="tokens"
    )
    os.kill(pid, signal.SIGKILL)


def test_a_worker_crash_mid_stream_is_an_error_event_then_done(oai: openai.OpenAI, erl: Client):
    stream = oai.completions.create(
        model=SPARE_MODEL, prompt=COUNTING, max_tokens=400, stream=True, temperature=0
    )  # greedy, it counts on to its 400 tokens; sampled, it may end at once
    started = threading.Event()
    killer = threading.Thread(target=_spare_worker_dies_mid_request, args=(erl, started))
    killer.start()
    with pytest.raises(openai.APIError) as exc:
        for _ in stream:
            started.set()
    killer.join()
    assert exc.value.body["code"] == "worker_crashed"  # type: ignore[index]
    wait_for(lambda: erl.model_info(SPARE_MODEL)["state"] == "ready", 120, "the spare model's restart")


def test_a_worker_crash_before_the_reply_is_a_503_with_retry_after(gateway: GatewayProcess, erl: Client):
    started = threading.Event()
    started.set()
    killer = threading.Thread(target=_spare_worker_dies_mid_request, args=(erl, started))
    killer.start()
    r = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": SPARE_MODEL, "prompt": COUNTING, "max_tokens": 400, "temperature": 0},
        headers=auth(),
        timeout=120,
    )
    killer.join()
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "worker_crashed"
    wait_for(lambda: erl.model_info(SPARE_MODEL)["state"] == "ready", 120, "the spare model's restart")


def test_a_client_that_leaves_a_stream_cancels_its_request(gateway: GatewayProcess, erl: Client):
    body = {"model": MODEL, "prompt": COUNTING, "max_tokens": 1000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, headers=auth(), timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
        assert erl.model_info(MODEL)["running"] == 1
    wait_for(lambda: erl.model_info(MODEL)["running"] == 0, what="the request to be cancelled")


def test_a_client_that_leaves_before_a_plain_reply_cancels_its_request(gateway: GatewayProcess, erl: Client):
    body = json.dumps({"model": MODEL, "prompt": COUNTING, "max_tokens": 1000, "temperature": 0}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth()['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head.encode() + body)
        wait_for(lambda: erl.model_info(MODEL)["running"] == 1, what="the request to run")
    wait_for(lambda: erl.model_info(MODEL)["running"] == 0, what="the request to be cancelled")


def test_health_is_503_while_the_broker_does_not_answer(gw_broker: BrokerProcess, gateway: GatewayProcess):
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok"}
    orphan = start_gateway("ipc:///tmp/erllama-no-broker-here.sock")
    try:
        assert httpx.get(f"{orphan.url}/health", timeout=30).status_code == 503
    finally:
        orphan.stop()
