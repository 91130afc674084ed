"""Bad input gets a typed error and nothing else fails: the broker and workers keep serving."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import zmq

from erllama import Client, ErllamaError
from erllama.protocol import MAX_CLIENT_FRAME_BYTES, PROTOCOL_VERSION
from tests.conftest import REAL_MODEL_ID, BrokerProcess


def raw_exchange(endpoint: str, frames: list[bytes], timeout_ms: int = 5000) -> dict | None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        if sock.poll(timeout_ms):
            return msgpack.unpackb(sock.recv(), raw=False)
        return None
    finally:
        sock.close()
        ctx.term()


@pytest.mark.parametrize(
    "frames",
    [
        [b"\xc1\xff garbage"],
        [msgpack.packb([1, 2, 3])],
        [msgpack.packb({"v": 99, "t": "ping", "id": "x"})],
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": "no_such_type", "id": "x"})],
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": "infer", "id": "x", "model": 5, "prompt": "hi"})],
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": "infer", "id": "x"})],
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": "ping", "id": "x"}), b"extra frame"],
        [msgpack.packb({"v": PROTOCOL_VERSION, "t": "ping", "id": "x" * 1000})],
    ],
)
def test_garbage_frames_get_protocol_error_and_the_broker_keeps_serving(
    broker: BrokerProcess, stub_client: Client, frames
):
    reply = raw_exchange(broker.endpoint, frames)
    assert reply is not None and reply["t"] == "err" and reply["code"] == "protocol_error"
    assert stub_client.complete("stub", "still alive", max_tokens=3).finish_reason == "length"


def test_an_oversized_frame_is_dropped_by_the_socket_and_the_broker_keeps_serving(
    broker: BrokerProcess, stub_client: Client
):
    assert raw_exchange(broker.endpoint, [b"\x00" * (MAX_CLIENT_FRAME_BYTES + 1)], timeout_ms=500) is None
    assert stub_client.complete("stub", "still alive", max_tokens=3).finish_reason == "length"


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"temperature": -1.0}, "invalid_params"),
        ({"temperature": "warm"}, "invalid_params"),
        ({"top_p": 2}, "invalid_params"),
        ({"max_tokens": -5}, "invalid_params"),
        ({"seed": "abc"}, "invalid_params"),
        ({"stop": "x" * 1000}, "invalid_params"),
        ({"bogus": 1}, "invalid_params"),
        ({"max_tokens": 100_000}, "context_overflow"),
    ],
)
def test_bad_parameters_are_typed_errors_on_the_real_model(real_client: Client, params, code):
    with pytest.raises(ErllamaError) as exc:
        real_client.complete(REAL_MODEL_ID, "Hello", **params)
    assert exc.value.code == code
    assert real_client.complete(REAL_MODEL_ID, "Hello", max_tokens=2).finish_reason == "length"


@pytest.mark.parametrize("prompt", [[], "", [-1], [10**7], [1.5]])
def test_bad_prompts_are_invalid_params_on_the_real_model(real_client: Client, prompt):
    with pytest.raises(ErllamaError) as exc:
        real_client.complete(REAL_MODEL_ID, prompt)
    assert exc.value.code == "invalid_params"


def test_a_prompt_longer_than_the_context_is_context_overflow(real_client: Client):
    n_ctx = real_client.model_info(REAL_MODEL_ID)["n_ctx"]
    with pytest.raises(ErllamaError) as exc:
        real_client.complete(REAL_MODEL_ID, "word " * (n_ctx + 10))
    assert exc.value.code == "context_overflow"
    assert exc.value.detail["n_ctx"] == n_ctx
    assert real_client.complete(REAL_MODEL_ID, "Hello", max_tokens=2).finish_reason == "length"


def test_unknown_model_is_model_not_found(real_client: Client):
    for call in (
        lambda: real_client.complete("nope", "x"),
        lambda: real_client.model_info("nope"),
        lambda: real_client.tokenize("nope", "x"),
        lambda: real_client.queue_depth("nope"),
    ):
        with pytest.raises(ErllamaError) as exc:
            call()
        assert exc.value.code == "model_not_found"


def test_tokenize_and_detokenize_round_trip_and_reject_bad_ids(real_client: Client):
    ids = real_client.tokenize(REAL_MODEL_ID, "Hello world", add_special=False)
    assert real_client.detokenize(REAL_MODEL_ID, ids) == "Hello world"
    with pytest.raises(ErllamaError) as exc:
        real_client.detokenize(REAL_MODEL_ID, [10**8])
    assert exc.value.code == "invalid_params"


def test_loading_a_missing_file_is_load_failed(client: Client):
    with pytest.raises(ErllamaError) as exc:
        client.load_model("m", "/nonexistent/model.gguf")
    assert exc.value.code == "load_failed"


def test_loading_a_non_gguf_file_is_malformed_gguf(client: Client, tmp_path: Path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ErllamaError) as exc:
        client.load_model("m", str(bad))
    assert exc.value.code == "malformed_gguf"
    assert "bad magic" in exc.value.message
    assert client.list_models() == []


def test_a_truncated_gguf_is_load_failed_with_llama_cpp_s_message(client: Client, tmp_path: Path):
    from erllama.models import default_model_path

    src = default_model_path().read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(src[: len(src) // 3])
    with pytest.raises(ErllamaError) as exc:
        client.load_model("m", str(bad))
    assert exc.value.code in ("load_failed", "malformed_gguf")
    assert exc.value.message


def test_gpu_layers_without_a_gpu_is_no_gpu(client: Client):
    with pytest.raises(ErllamaError) as exc:
        client.load_model("g", None, n_gpu_layers=10)
    assert exc.value.code == "no_gpu"
    assert client.list_models() == []


def test_bad_load_options_are_invalid_params_before_any_process_starts(client: Client):
    with pytest.raises(ErllamaError) as exc:
        client.load_model("x", None, n_ctx="huge")
    assert exc.value.code == "invalid_params"
    with pytest.raises(ErllamaError) as exc:
        client.load_model("../../etc", None)
    assert exc.value.code == "invalid_params"


def test_a_model_path_into_the_runtime_or_cache_directories_is_refused(broker: BrokerProcess, client: Client):
    from tests.conftest import cache_dirs

    disk, _ = cache_dirs(broker.runtime_dir)
    for target in (
        broker.runtime_dir / "broker.lock",
        disk / ".." / "kv" / "some-row.kvr",
        broker.runtime_dir / "x" / ".." / "broker.sock",
    ):
        with pytest.raises(ErllamaError) as exc:
            client.load_model("sneaky", str(target))
        assert exc.value.code == "invalid_params"
