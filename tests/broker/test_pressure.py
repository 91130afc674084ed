"""The memory-pressure watcher evicts the right amount above the high watermark, and only then."""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass

import pytest

from erllama.broker.pressure import (
    PressureConfig,
    PressureWatcher,
    TickOutcome,
    nvidia_source,
    system_source,
)
from erllama.protocol import ErllamaError
from erllama.resources import vram_info

GIB = 1024**3
THREAD_WAIT_S = 30.0  # a liveness bound for the background thread, never a timing assertion


@dataclass
class FakeSource:
    used: int
    total: int = 100 * GIB
    fail: bool = False

    def __call__(self) -> tuple[int, int]:
        if self.fail:
            raise OSError("sensor unplugged")
        return self.used, self.total


class Evictor:
    def __init__(self, frees: int | None = None, fail: bool = False):
        self.requests: list[int] = []
        self.frees = frees
        self.fail = fail
        self.called = threading.Event()

    def __call__(self, n: int) -> int:
        self.requests.append(n)
        self.called.set()
        if self.fail:
            raise RuntimeError("cache store is down")
        return n if self.frees is None else self.frees


def watcher(used: int, evictor: Evictor | None = None, **cfg) -> tuple[PressureWatcher, FakeSource, Evictor]:
    cfg.setdefault("enabled", True)
    src, ev = FakeSource(used), evictor or Evictor()
    return PressureWatcher(PressureConfig(**cfg), ev, source=src), src, ev


def test_below_the_high_watermark_nothing_is_evicted():
    w, _, ev = watcher(84 * GIB)
    assert w.tick().outcome is TickOutcome.BELOW_WATERMARK
    assert ev.requests == []
    st = w.status()
    assert st["last_used_b"] == 84 * GIB and st["last_total_b"] == 100 * GIB and st["last_evicted_b"] == 0


def test_at_the_high_watermark_it_asks_for_the_gap_down_to_the_low_watermark():
    w, _, ev = watcher(85 * GIB, high_watermark=0.85, low_watermark=0.75)
    r = w.tick()
    assert r.outcome is TickOutcome.EVICTED
    assert ev.requests == [10 * GIB]
    assert r.evicted_b == ev.requests[0]
    st = w.status()
    assert st["last_evicted_b"] == ev.requests[0] and st["evicted_total_b"] == ev.requests[0]
    assert st["counts"]["evicted"] == 1 and st["last_evicted_at"] is not None


def test_min_evict_bytes_is_the_floor_of_a_request():
    w, _, ev = watcher(99, high_watermark=0.9, low_watermark=0.89, min_evict_bytes=4096)
    w._source = FakeSource(99, total=100)  # 1% of 100 bytes is 1 byte, below the floor
    w.tick()
    assert ev.requests == [4096]


def test_pressure_falling_stops_eviction():
    w, src, ev = watcher(95 * GIB)
    assert w.tick().outcome is TickOutcome.EVICTED
    src.used = 70 * GIB
    assert w.tick().outcome is TickOutcome.BELOW_WATERMARK
    assert len(ev.requests) == 1
    counts = w.status()["counts"]
    assert counts["evicted"] == counts["below_watermark"] == 1
    assert sum(counts.values()) == 2


def test_a_zero_total_counts_as_no_pressure():
    w, src, ev = watcher(0)
    src.total = 0
    assert w.tick().outcome is TickOutcome.BELOW_WATERMARK and ev.requests == []


def test_an_evictor_that_frees_nothing_is_reported_as_nothing_to_evict():
    w, _, _ = watcher(99 * GIB, Evictor(frees=0))
    assert w.tick().outcome is TickOutcome.NOTHING_TO_EVICT
    assert w.status()["evicted_total_b"] == 0


def test_failing_source_or_evictor_is_counted_and_the_watcher_keeps_working():
    w, src, ev = watcher(99 * GIB, Evictor(fail=True))
    assert w.tick().outcome is TickOutcome.EVICT_FAILED
    src.fail = True
    assert w.tick().outcome is TickOutcome.SOURCE_FAILED
    src.fail, ev.fail = False, False
    assert w.tick().outcome is TickOutcome.EVICTED
    counts = w.status()["counts"]
    assert counts["evict_failed"] == counts["source_failed"] == counts["evicted"] == 1


def test_off_by_default_it_neither_samples_nor_starts_a_thread():
    ev = Evictor()
    src = FakeSource(99 * GIB)
    w = PressureWatcher(PressureConfig(), ev, source=src)
    assert w.tick().outcome is TickOutcome.DISABLED
    assert w.start() is False
    assert w.status()["running"] is False and ev.requests == []


def test_the_background_thread_ticks_until_stopped():
    w, _, ev = watcher(99 * GIB, interval_s=0.01)
    assert w.start() is True
    assert w.start() is False  # already running
    try:
        assert ev.called.wait(THREAD_WAIT_S)
        assert w.status()["running"] is True
    finally:
        w.stop()
    assert w.status()["running"] is False
    n = len(ev.requests)
    assert w.tick().outcome is TickOutcome.EVICTED and len(ev.requests) == n + 1  # tick() still works


@pytest.mark.parametrize(
    "cfg",
    [
        {"high_watermark": 0.5, "low_watermark": 0.5},
        {"high_watermark": 0.5, "low_watermark": 0.6},
        {"high_watermark": 1.1},
        {"low_watermark": -0.1},
        {"high_watermark": float("nan")},
        {"high_watermark": "0.9"},
        {"interval_s": 0},
        {"interval_s": -1.0},
        {"min_evict_bytes": -1},
        {"min_evict_bytes": 1.5},
        {"source": "nvidia_smi"},
        {"enabled": "yes"},
    ],
)
def test_invalid_configuration_is_invalid_params(cfg):
    with pytest.raises(ErllamaError) as ei:
        PressureWatcher(PressureConfig(**cfg), Evictor())
    assert ei.value.code == "invalid_params"


def test_the_watermark_bounds_themselves_are_valid():
    PressureConfig(high_watermark=1.0, low_watermark=0.0).validate()


def test_system_source_reports_plausible_host_memory():
    used, total = system_source()
    assert 0 < used <= total


# --- GPUs ---------------------------------------------------------------------------------------------------


def test_vram_info_without_a_gpu_is_no_gpu_and_with_one_is_consistent():
    try:
        info = vram_info()
    except ErllamaError as exc:
        assert exc.code == "no_gpu"
        with pytest.raises(ErllamaError):
            nvidia_source()
        return
    assert info["devices"] >= 1 and info["total_b"] >= info["used_b"] >= 0


def fake_nvml(mems: list[tuple[int, int, int]], init_fails: bool = False) -> types.ModuleType:
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init() -> None:
        if init_fails:
            raise NVMLError("Driver Not Loaded")

    m.NVMLError = NVMLError
    m.nvmlInit = init
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: len(mems)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=mems[h][0], free=mems[h][1], used=mems[h][2]
    )
    return m


def test_vram_info_sums_over_every_gpu(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_nvml([(8 * GIB, 6 * GIB, 2 * GIB), (16 * GIB, 4 * GIB, 12 * GIB)])
    )
    assert vram_info() == {"total_b": 24 * GIB, "free_b": 10 * GIB, "used_b": 14 * GIB, "devices": 2}
    assert nvidia_source() == (14 * GIB, 24 * GIB)


@pytest.mark.parametrize(
    "nvml", [fake_nvml([]), fake_nvml([(1, 1, 0)], init_fails=True)], ids=["no-device", "no-driver"]
)
def test_vram_info_is_no_gpu_when_nvml_cannot_help(monkeypatch, nvml):
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with pytest.raises(ErllamaError) as ei:
        vram_info()
    assert ei.value.code == "no_gpu"


def test_nvidia_source_failure_is_a_counted_source_failure_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([]))
    w = PressureWatcher(PressureConfig(enabled=True, source="nvidia"), Evictor())
    assert w.tick().outcome is TickOutcome.SOURCE_FAILED
    assert w.status()["source"] == "nvidia"


def test_the_broker_s_watcher_evicts_cache_rows_under_real_memory_pressure(tmp_path):
    """End to end: [pressure] in the broker's config, the system source, and a high watermark every
    machine exceeds, so the store is asked to free bytes and rows leave the RAM tier."""
    from erllama.cachestore.client import CacheClient
    from erllama.transport import CACHESTORE_SOCKET_NAME, ipc_endpoint
    from tests.conftest import remove_runtime, short_tmpdir, start_broker, wait_for

    cfg = tmp_path / "erllama.toml"
    cfg.write_text(
        '[pressure]\nenabled = true\nsource = "system"\nhigh_watermark = 0.001\nlow_watermark = 0.0\n'
        "interval_s = 0.2\n"
    )
    rdir = short_tmpdir("erl-p-")
    bp = start_broker(rdir, "--config", str(cfg))
    try:
        c = bp.client(timeout_s=30)
        c.load_model("s", backend="stub", cache_min_tokens=4, cold_align_tokens=4, cold_trim_tokens=0)
        for i in range(5):
            c.complete("s", f"prompt number {i} is long enough to save", max_tokens=4)
        status = wait_for(lambda: (p := c.ping()["pressure"])["evicted_total_b"] > 0 and p, 30, "an eviction")
        assert status["counts"]["evicted"] >= 1 and status["last_ratio"] > 0.001
        with CacheClient(ipc_endpoint(rdir, CACHESTORE_SOCKET_NAME)) as store:
            moved = lambda: (n := store.stats()["counters"])["demotions"] + n["evictions"]
            assert (
                wait_for(moved, 30, "rows to leave the RAM tier") > 0
            )  # moves run on the store's I/O threads
    finally:
        bp.stop()
        remove_runtime(rdir)
