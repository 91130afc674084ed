"""Bad input gets a typed error and the daemon keeps serving."""

from __future__ import annotations

import os
import resource
import shutil
import signal
from pathlib import Path

import msgpack
import pytest
import zmq

from erllama.cachestore.codec import row_key
from erllama.protocol import (
    LOCAL_TIERS,
    MAX_CACHE_CONTROL_BYTES,
    MAX_CACHE_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    CacheTier,
    ErrorCode,
    SaveOutcome,
)
from erllama.transport import make_socket
from tests.cachestore.cachestore_support import Daemon, payload_for
from tests.wire_support import raw_frame

MIB = 1 << 20


def raw_request(endpoint: str, frames: list[bytes]) -> dict:
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.DEALER, MAX_CACHE_PAYLOAD_BYTES)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10_000), "no reply"
        return msgpack.unpackb(sock.recv_multipart()[0])
    finally:
        sock.close(linger=0)


BAD_MESSAGES = {
    "garbage": [b"\xc1\xff not msgpack"],
    "not a map": [msgpack.packb([1, 2, 3])],
    "wrong version": [msgpack.packb({"v": PROTOCOL_VERSION + 1, "t": "c.stats", "rid": 1})],
    "unknown type": [raw_frame("c.nope", rid=1)],
    "missing field": [raw_frame("c.exact", rid=1)],
    "wrongly typed field": [raw_frame("c.exact", rid=1, key="not bytes")],
    "oversized control frame": [raw_frame("c.stats", rid=1, pad=b"x" * (MAX_CACHE_CONTROL_BYTES + 1))],
    "too many frames": [raw_frame("c.stats", rid=1), b"a", b"b"],
    "payload on a lookup": [raw_frame("c.stats", rid=1), b"payload"],
    "reply type as request": [raw_frame("c.ok", rid=1)],
}


def test_malformed_messages_get_typed_errors_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    daemon.start()
    for name, frames in BAD_MESSAGES.items():
        reply = raw_request(daemon.endpoint, frames)
        assert reply["t"] == "err" and reply["code"] == ErrorCode.PROTOCOL_ERROR, name
    c = daemon.client()
    assert c.save(b"fp", [1], b"ok" * 1000, "cold") is SaveOutcome.STORED
    assert c.stats()["counters"]["bad_messages"] == len(BAD_MESSAGES)


def test_invalid_params_are_refused(daemon: Daemon) -> None:
    daemon.start()
    for fields in (
        {"fp": b"", "tokens": b"\0\0\0\0"},
        {"fp": b"f", "tokens": b"\0\0\0"},
        {"fp": b"f", "tokens": b""},
    ):
        reply = raw_request(
            daemon.endpoint, [raw_frame("c.reserve", rid=7, payload_len=10, reason="cold", pid=1, **fields)]
        )
        assert (reply["t"], reply["code"], reply["rid"]) == ("err", ErrorCode.INVALID_PARAMS, 7)
    reply = raw_request(
        daemon.endpoint,
        [raw_frame("c.reserve", rid=8, fp=b"f", tokens=b"\1\0\0\0", payload_len=10, reason="bored", pid=1)],
    )
    assert reply["code"] == ErrorCode.INVALID_PARAMS


def test_row_over_every_budget_is_dropped(daemon: Daemon) -> None:
    daemon.start(ram_bytes=MIB, shm_bytes=MIB, disk_bytes=MIB)
    c = daemon.client()
    assert c.save(b"fp", [1, 2], payload_for(1, 2 * MIB), "cold") is SaveOutcome.DROPPED
    assert c.save(b"fp", [1, 2], payload_for(1, MIB // 2), "cold") is SaveOutcome.STORED
    assert c.stats()["counters"]["saves_dropped"] == 1


def test_wrong_checksum_at_commit_is_refused(daemon: Daemon) -> None:
    daemon.start()
    c = daemon.client()
    for i, tier in enumerate(LOCAL_TIERS):
        pending = c.begin_save(b"fp", [3, i], MIB, "cold", tier=tier)
        pending.payload[:] = payload_for(2, MIB)
        pending._head_crc ^= 1  # the writer computes a checksum over other bytes than it wrote
        assert pending.commit() is SaveOutcome.DROPPED
        assert c.exact(row_key(b"fp", [3, i])) is None
    s = daemon.wait_quiet(c)
    assert s["counters"]["saves_dropped"] == 3
    assert os.listdir(daemon.shm_dir / "tmp") == [] and os.listdir(daemon.disk_dir / "tmp") == []


@pytest.mark.parametrize("tier", [CacheTier.SHM, CacheTier.DISK])
def test_row_corrupted_at_rest_is_removed_counted_and_never_served(daemon: Daemon, tier: CacheTier) -> None:
    daemon.start()
    c = daemon.client()
    tokens = [4, 5, 6]
    assert c.save(b"fp", tokens, payload_for(4, MIB), "cold", tier=tier) is SaveOutcome.STORED
    assert daemon.stop() == 0
    path = (
        daemon.shm_dir if tier is CacheTier.SHM else daemon.disk_dir
    ) / f"{row_key(b'fp', tokens).hex()}.kvr"
    with open(path, "r+b") as f:  # one flipped bit deep in the payload
        f.seek(MIB // 2)
        byte = f.read(1)
        f.seek(MIB // 2)
        f.write(bytes([byte[0] ^ 1]))
    daemon.start()
    c = daemon.client()
    assert c.exact(row_key(b"fp", tokens)) is not None  # the head is fine: found at the restart scan
    assert c.load(row_key(b"fp", tokens)) is None  # the first load verifies the checksum
    assert c.exact(row_key(b"fp", tokens)) is None
    assert daemon.wait_quiet(c)["counters"]["corrupt_rows"] == 1  # quiet: the delete runs in the background
    assert not path.exists()


def test_missing_disk_directory_is_an_error_for_the_writer_only(daemon: Daemon) -> None:
    daemon.start()
    c = daemon.client()
    shutil.rmtree(daemon.disk_dir)
    daemon.disk_dir.write_bytes(b"")  # a file where the directory was: it cannot be re-created
    try:
        assert c.save(b"fp", [8], payload_for(8, MIB), "cold", tier=CacheTier.DISK) is SaveOutcome.DROPPED
        assert c.save(b"fp", [9], payload_for(9, MIB), "cold", tier=CacheTier.SHM) is SaveOutcome.STORED
    finally:
        daemon.disk_dir.unlink()
        daemon.disk_dir.mkdir()


def _limit_file_size() -> None:
    # A full disk, as the daemon sees it: writes past 4 MiB fail (EFBIG) instead of killing it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * MIB, 4 * MIB))


def test_disk_full_is_a_dropped_save_not_a_crash(daemon: Daemon) -> None:
    daemon.preexec = _limit_file_size
    daemon.start(ram_bytes=0)
    c = daemon.client()
    assert c.save(b"fp", [1], payload_for(1, 8 * MIB), "cold", tier=CacheTier.DISK) is SaveOutcome.DROPPED
    assert c.save(b"fp", [2], payload_for(2, MIB), "cold", tier=CacheTier.DISK) is SaveOutcome.STORED
    with c.load(row_key(b"fp", [2])) as row:
        assert row.payload == payload_for(2, MIB)


def test_cache_cli_shows_tiers_and_counters(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    from erllama.cachestore.cli import run

    daemon.start()
    c = daemon.client()
    assert c.save(b"fp", [1, 2, 3], payload_for(1, MIB), "finish") is SaveOutcome.STORED
    assert run(["--endpoint", daemon.endpoint]) == 0
    out = capsys.readouterr().out
    assert "ram" in out and "saves_finish=1" in out and "1 rows" in out
    assert run(["--endpoint", daemon.endpoint, "evict", "1M", "--tier", "ram"]) == 0
    assert "leaving ram" in capsys.readouterr().out
    assert run(["--endpoint", daemon.endpoint, "stats", "--json"]) == 0
    assert '"saves_finish": 1' in capsys.readouterr().out
    assert run(["--endpoint", "ipc:///nonexistent/cs.sock", "--timeout", "0.2"]) == 1


def test_missing_shm_falls_back_to_ram_and_disk(daemon: Daemon) -> None:
    daemon.shm_dir = Path("/dev/null/no-shm-here")  # cannot be created
    daemon.start()
    c = daemon.client()
    s = c.stats()
    assert s["tiers"]["shm"]["enabled"] is False
    assert c.save(b"fp", [1], payload_for(1, MIB), "cold", tier=CacheTier.SHM) is SaveOutcome.STORED
    assert c.exact(row_key(b"fp", [1])).tier is CacheTier.DISK  # shm asked, the next colder tier took it
    assert "shm tier off" in daemon.log()


def test_a_too_small_shm_turns_the_tier_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from erllama.cachestore.config import StoreConfig
    from erllama.cachestore.storage import Storage
    from erllama.cachestore.store import Store

    storage = Storage(tmp_path / "shm", tmp_path / "disk")
    storage.fs_free_bytes = lambda tier: 64 * MIB  # type: ignore[method-assign]  # Docker's default
    config = StoreConfig(endpoint="inproc://x", shm_dir=tmp_path / "shm", disk_dir=tmp_path / "disk")
    store = Store(config, storage, submit=lambda fn, on_done, *a, **kw: None)
    store.restore()
    assert store.tiers[CacheTier.SHM].enabled is False
    assert "shm tier off" in caplog.text


def test_a_second_daemon_on_the_same_directories_refuses_to_start(daemon: Daemon) -> None:
    import subprocess
    import sys

    daemon.start()
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "erllama.cachestore.main",
            "--endpoint",
            daemon.endpoint + "2",
            "--shm-dir",
            str(daemon.shm_dir),
            "--disk-dir",
            str(daemon.disk_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 2 and "another process holds" in second.stderr
    assert daemon.client().stats()["rows"] == 0  # the first one is unharmed
