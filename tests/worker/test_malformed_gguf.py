"""Malformed model files and native crashes cost one model, never the broker or the other models.

Every file of ``tests/gguf_corpus.py`` is loaded through a real broker next to a stub model:
each is a typed load error whose message quotes who rejected it (erllama's header check or
llama.cpp's own log line), no model entry is left behind, and the stub keeps serving from the
same worker process. Then real native crashes mid-request: the AMX repacked-weight segfault
where the CPU has AMX, else a corpus file that llama.cpp loads and then aborts on
(``GGML_ABORT`` in the first ``llama_decode``), and a model file truncated under a running
worker (``SIGBUS`` in ``llama_decode``, after tokens were streamed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from erllama import Client, ErllamaError
from erllama.models import default_model_path
from tests.conftest import BrokerProcess, remove_runtime, short_tmpdir, start_broker, wait_for
from tests.gguf_corpus import VARIANTS, Expect, Variant, build_corpus, build_decode_abort_model

BESIDE_MODEL_ID = "beside"
WAIT_S = 120.0


def cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(
        word.startswith("amx")
        for line in flags.splitlines()
        if line.startswith("flags")
        for word in line.split()
    )


@pytest.fixture(scope="module")
def corpus_dir() -> Iterator[Path]:
    d = short_tmpdir("erl-gguf-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(corpus_dir: Path) -> dict[str, Variant]:
    return {v.name: v for v in build_corpus(default_model_path(), corpus_dir / "corpus")}


@pytest.fixture(scope="module")
def corpus_broker() -> Iterator[BrokerProcess]:
    """One broker for the whole corpus, with a stub model that must outlive every bad load."""
    rdir = short_tmpdir("erl-g-")
    bp = start_broker(rdir, "--no-default-model")
    try:
        with bp.client() as c:
            c.load_model(BESIDE_MODEL_ID, backend="stub", n_ctx=256, n_seq_max=2)
        yield bp
    finally:
        bp.stop()
        remove_runtime(rdir)  # and its shm tier


def assert_beside_model_serves(c: Client, pid: int | None = None) -> int:
    """The stub model answers a completion, from the same worker process if ``pid`` is given."""
    r = c.complete(BESIDE_MODEL_ID, "still serving", max_tokens=4)
    assert r.finish_reason == "length" and len(r.generated) == 4
    info = c.model_info(BESIDE_MODEL_ID)
    assert info["state"] == "ready"
    if pid is not None:
        assert info["worker_pid"] == pid, "the model beside was restarted"
    return info["worker_pid"]


@pytest.mark.parametrize("name", [v[0] for v in VARIANTS])
def test_a_malformed_gguf_is_a_typed_load_error_quoting_its_rejecter_and_other_models_keep_serving(
    corpus_broker: BrokerProcess, corpus: dict[str, Variant], name: str
):
    variant = corpus[name]
    with Client(corpus_broker.endpoint, timeout_s=60.0) as c:
        beside_pid = assert_beside_model_serves(c)
        broker_pid = c.ping()["pid"]
        with pytest.raises(ErllamaError) as exc:
            c.load_model(f"bad-{name}", str(variant.path), n_ctx=256, n_seq_max=1)
        err = exc.value
        assert err.code in ("load_failed", "malformed_gguf"), f"{name}: {err.code}: {err.message}"
        assert err.message and err.message != err.code
        if variant.expect is Expect.HEADER_REJECT:
            assert err.code == "malformed_gguf", f"{name}: {err.code}: {err.message}"
        # The message carries the rejecter's own words: for llama.cpp, its log line (not a generic
        # "could not load" or a stderr dump of the worker's last words).
        assert variant.says in err.message, f"{name}: {err.code}: {err.message}"
        assert c.ping()["pid"] == broker_pid
        assert f"bad-{name}" not in [m["id"] for m in c.list_models()]
        assert_beside_model_serves(c, beside_pid)


def test_every_llama_cpp_rejection_in_the_corpus_happens_before_the_worker_reports_ready(
    corpus: dict[str, Variant],
):
    """The corpus covers each depth of the file: the fixed header, the KV section, the tensor infos and
    the tensor data, plus metadata that parses but does not fit the architecture."""
    names = set(corpus)
    assert {
        "empty",
        "truncated_in_header",
        "truncated_in_kv",
        "truncated_in_tensor_info",
        "truncated_at_data_start",
        "truncated_mid_data",
        "flipped_magic",
        "flipped_version",
        "huge_tensor_count",
        "kv_count_plus_one",
        "kv_string_length_past_eof",
        "tensor_offset_past_eof",
        "tensor_wrong_shape",
        "missing_block_count",
    } <= names
    sizes = {n: v.path.stat().st_size for n, v in corpus.items()}
    assert sizes["empty"] == 0 and sizes["truncated_in_header"] < 24
    # Only the first few MB of each file are real: the rest is a hole, so the corpus is cheap to build.
    on_disk = sum(v.path.stat().st_blocks * 512 for v in corpus.values())
    assert on_disk < len(corpus) * 4 * 1024 * 1024


# --- real native crashes ----------------------------------------------------------------------------------


CRASH_STREAM_TIMEOUT_S = 120.0  # a wedged broker fails the test instead of hanging it


@pytest.fixture
def crash_broker() -> Iterator[BrokerProcess]:
    rdir = short_tmpdir("erl-c-")
    bp = start_broker(rdir, "--no-default-model")
    try:
        yield bp
    finally:
        bp.stop()
        kill_leftovers(rdir)
        remove_runtime(rdir)  # and its shm tier


def kill_leftovers(rdir: Path) -> None:
    """A crashed worker can leave descendants (ggml's backtrace fork in GGML_ABORT) that outlive it and
    its broker; they carry the worker's command line, which names this test's private runtime dir."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if (
                p.info["cmdline"]
                and any(str(rdir) in arg for arg in p.info["cmdline"])
                and p.pid != os.getpid()
            ):
                p.kill()
        except psutil.Error:
            pass


def _wait_back_ready(c: Client, model_id: str, dead_pids: set[int]) -> dict[str, Any]:
    return wait_for(
        lambda: (i := c.model_info(model_id))["state"] == "ready" and i["worker_pid"] not in dead_pids and i,
        WAIT_S,
        f"{model_id} restarted and ready",
    )


def test_a_native_crash_mid_request_is_worker_crashed_with_signal_and_stderr_and_the_model_comes_back(
    crash_broker: BrokerProcess, corpus_dir: Path
):
    """Where the CPU has AMX, llama.cpp's repacked-weight path segfaults in llama_decode for this model
    (``use_extra_bufts=True``). Elsewhere the same path is taken by a file llama.cpp loads and then
    aborts on: its final norm stored as F16, which ggml's CPU multiply has no kernel for
    (``GGML_ABORT("binary_op: unsupported types ...")`` -> SIGABRT)."""
    if cpu_has_amx():
        path, options, signal_name, says = None, {"use_extra_bufts": True}, "SIGSEGV", None
    else:
        crashy = build_decode_abort_model(default_model_path(), corpus_dir / "decode-abort")
        path, options, signal_name, says = str(crashy.path), {}, "SIGABRT", crashy.says
    with Client(crash_broker.endpoint, timeout_s=60.0) as c:
        c.load_model(BESIDE_MODEL_ID, backend="stub", n_ctx=256, n_seq_max=2, stub_decode_ms=5)
        beside_pid = assert_beside_model_serves(c)
        first = c.load_model("crashy", path, n_ctx=256, n_seq_max=1, **options)
        assert first["state"] == "ready"
        # A stream of the model beside runs across the crash and must not notice it.
        beside_stream = c.infer(
            BESIDE_MODEL_ID,
            "a long stream beside the crash",
            max_tokens=150,
            timeout_s=CRASH_STREAM_TIMEOUT_S,
        )
        stream = c.infer("crashy", "The capital of France is", max_tokens=8, timeout_s=CRASH_STREAM_TIMEOUT_S)
        with pytest.raises(ErllamaError) as exc:
            stream.collect()
        err = exc.value
        assert err.code == "worker_crashed", err
        assert err.detail.get("signal") == signal_name, err.detail
        assert err.detail.get("stderr_tail"), err.detail
        if says is not None:
            assert says in err.detail["stderr_tail"], err.detail["stderr_tail"][-1500:]
        # It crashed before its first token, so it was retried once on a fresh worker, which crashed too.
        assert err.detail.get("poison") is True, err.detail
        assert beside_stream.collect().finish_reason == "length"
        assert_beside_model_serves(c, beside_pid)
        back = _wait_back_ready(c, "crashy", {first["worker_pid"], err.detail["pid"]})
        assert back["restarts"] >= 1
        assert back["last_error"] is None or back["last_error"]["code"] == "worker_crashed"
        # Serving again: an operation that does not decode is answered by the new worker.
        assert c.tokenize("crashy", "hello", add_special=False)
        assert c.ping()
        assert_beside_model_serves(c, beside_pid)


def test_a_model_file_truncated_under_a_running_worker_is_sigbus_mid_stream_and_the_model_comes_back(
    crash_broker: BrokerProcess, corpus_dir: Path
):
    """The weights are mmapped: cutting the file while a stream is generating makes the next
    ``llama_decode`` touch pages past the new end of file, a real SIGBUS in native code. The stream
    had produced tokens, so it is failed (not retried); once the file is whole again the model
    comes back."""
    work = corpus_dir / "sigbus"
    work.mkdir(exist_ok=True)
    model = work / "model.gguf"
    spare = work / "spare.gguf"
    shutil.copyfile(default_model_path(), model)
    shutil.copyfile(default_model_path(), spare)
    with Client(crash_broker.endpoint, timeout_s=60.0) as c:
        c.load_model(BESIDE_MODEL_ID, backend="stub", n_ctx=256, n_seq_max=2)
        beside_pid = assert_beside_model_serves(c)
        first = c.load_model("mapped", str(model), n_ctx=512, n_seq_max=1, use_mmap=True)
        stream = c.infer(
            "mapped", "1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=400, timeout_s=CRASH_STREAM_TIMEOUT_S
        )
        events = iter(stream)
        got = [next(events)]
        os.truncate(model, 4096)
        with pytest.raises(ErllamaError) as exc:
            got.extend(events)
        os.replace(spare, model)  # whole again, for the restart
        err = exc.value
        assert err.code == "worker_crashed", err
        assert err.detail.get("signal") == "SIGBUS", err.detail
        assert err.detail.get("stderr_tail") is not None
        assert err.detail.get("poison") is not True
        assert len(got) >= 1
        assert_beside_model_serves(c, beside_pid)
        back = _wait_back_ready(c, "mapped", {first["worker_pid"], err.detail["pid"]})
        assert back["restarts"] >= 1
        r = c.complete("mapped", "The capital of France is", max_tokens=4)
        assert r.finish_reason == "length" and len(r.generated) == 4
        assert_beside_model_serves(c, beside_pid)
