"""Memory-pressure watcher: when memory runs high, ask the cache to give some back.

Every ``interval_s`` the watcher samples ``(used, total)`` bytes from its source. When
``used / total >= high_watermark`` it calls ``evict_bytes(n)`` with
``n = max((high_watermark - low_watermark) * total, min_evict_bytes)``: enough to get back
under the low watermark in one go, so it does not evict a sliver on every tick while hovering
at the high mark. It evicts cache rows only (through the callback); it never touches a model.

Sources: ``system`` (psutil: total minus *available*, so reclaimable page cache does not count
as pressure), ``nvidia`` (NVML, summed over GPUs), ``noop`` (always (0, 1)), or any callable
returning ``(used, total)``. Off by default: ``start()`` does nothing unless ``enabled``.
``tick()`` runs one check synchronously, for tests and for a forced check.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psutil

from erllama.protocol import ErllamaError, ErrorCode
from erllama.resources import vram_info

log = logging.getLogger(__name__)

Source = Callable[[], tuple[int, int]]
EvictFn = Callable[[int], int]

DEFAULT_HIGH_WATERMARK: Final = 0.85
DEFAULT_LOW_WATERMARK: Final = 0.75
DEFAULT_INTERVAL_S: Final = 5.0
DEFAULT_MIN_EVICT_BYTES: Final = 1024 * 1024
STOP_TIMEOUT_S: Final = 10.0


class SourceName(enum.StrEnum):
    SYSTEM = "system"
    NVIDIA = "nvidia"
    NOOP = "noop"


class TickOutcome(enum.StrEnum):
    EVICTED = "evicted"
    BELOW_WATERMARK = "below_watermark"  # also when the source reports a total of 0
    NOTHING_TO_EVICT = "nothing_to_evict"
    DISABLED = "disabled"
    SOURCE_FAILED = "source_failed"
    EVICT_FAILED = "evict_failed"


def system_source() -> tuple[int, int]:
    """Host RAM: (total - available, total) bytes."""
    vm = psutil.virtual_memory()
    return int(vm.total - vm.available), int(vm.total)


def nvidia_source() -> tuple[int, int]:
    """GPU memory over every NVIDIA device; ``ErllamaError("no_gpu")`` without one."""
    info = vram_info()
    return info["used_b"], info["total_b"]


def noop_source() -> tuple[int, int]:
    return 0, 1


SOURCES: Final[dict[SourceName, Source]] = {
    SourceName.SYSTEM: system_source,
    SourceName.NVIDIA: nvidia_source,
    SourceName.NOOP: noop_source,
}


def _bad(key: str, why: str) -> ErllamaError:
    return ErllamaError(ErrorCode.INVALID_PARAMS, f"{key}: {why}", {"key": key})


@dataclass(frozen=True, slots=True)
class PressureConfig:
    """Watcher settings; ``validate()`` enforces ``0 <= low < high <= 1`` and positive intervals."""

    enabled: bool = False
    source: str = SourceName.SYSTEM.value
    high_watermark: float = DEFAULT_HIGH_WATERMARK
    low_watermark: float = DEFAULT_LOW_WATERMARK
    interval_s: float = DEFAULT_INTERVAL_S
    min_evict_bytes: int = DEFAULT_MIN_EVICT_BYTES

    def validate(self) -> PressureConfig:
        if not isinstance(self.enabled, bool):
            raise _bad("enabled", "expected true or false")
        if self.source not in SourceName.__members__.values():
            raise _bad("source", f"{self.source!r} is not one of {', '.join(s.value for s in SourceName)}")
        for key in ("high_watermark", "low_watermark", "interval_s"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise _bad(key, "expected a number")
        if not 0.0 <= self.low_watermark < self.high_watermark <= 1.0:
            raise _bad("low_watermark", "watermarks must satisfy 0 <= low < high <= 1")
        if not self.interval_s > 0:
            raise _bad("interval_s", "must be positive")
        if (
            isinstance(self.min_evict_bytes, bool)
            or not isinstance(self.min_evict_bytes, int)
            or self.min_evict_bytes < 0
        ):
            raise _bad("min_evict_bytes", "expected a non-negative integer")
        return self


@dataclass(frozen=True, slots=True)
class TickResult:
    outcome: TickOutcome
    used_b: int = 0
    total_b: int = 0
    requested_b: int = 0
    evicted_b: int = 0


class PressureWatcher:
    """Samples a memory source and evicts through ``evict_bytes`` above the high watermark.

    ``source`` overrides ``config.source`` (tests inject a fake). ``evict_bytes(n)`` must return
    the bytes it actually freed. ``tick()`` and ``status()`` are safe to call from any thread.
    """

    def __init__(self, config: PressureConfig, evict_bytes: EvictFn, source: Source | None = None):
        self.config = config.validate()
        self._evict = evict_bytes
        self._source = source if source is not None else SOURCES[SourceName(config.source)]
        self._source_label = "custom" if source is not None else config.source
        self._lock = threading.Lock()  # one tick at a time; guards the status fields
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: TickResult | None = None
        self._last_sampled_at: float | None = None  # wall clock, for operators
        self._last_evicted_at: float | None = None
        self._counts: dict[TickOutcome, int] = {o: 0 for o in TickOutcome}
        self._evicted_total_b = 0

    def tick(self) -> TickResult:
        """One check: sample, compare with the watermarks, evict if needed."""
        with self._lock:
            result = self._check()
            self._last = result
            self._counts[result.outcome] += 1
            return result

    def _check(self) -> TickResult:
        cfg = self.config
        if not cfg.enabled:
            return TickResult(TickOutcome.DISABLED)
        try:
            used, total = self._source()
        except (ErllamaError, OSError, ValueError, TypeError) as exc:
            log.warning("memory-pressure source %s failed: %s", self._source_label, exc)
            return TickResult(TickOutcome.SOURCE_FAILED)
        self._last_sampled_at = time.time()
        if total <= 0 or used / total < cfg.high_watermark:
            return TickResult(TickOutcome.BELOW_WATERMARK, used, total)
        want = max(round((cfg.high_watermark - cfg.low_watermark) * total), cfg.min_evict_bytes)
        try:
            freed = int(self._evict(want))
        except Exception as exc:  # noqa: BLE001 - a failing callback must not kill the watcher thread
            log.warning("evict_bytes(%d) failed: %s: %s", want, type(exc).__name__, exc)
            return TickResult(TickOutcome.EVICT_FAILED, used, total, want)
        if freed <= 0:
            log.info("memory pressure %.0f%% but nothing to evict", 100 * used / total)
            return TickResult(TickOutcome.NOTHING_TO_EVICT, used, total, want)
        log.info("memory pressure %.0f%%: evicted %d of %d bytes requested", 100 * used / total, freed, want)
        self._last_evicted_at = time.time()
        self._evicted_total_b += freed
        return TickResult(TickOutcome.EVICTED, used, total, want, freed)

    def status(self) -> dict[str, Any]:
        """Configuration, the last sample and eviction, and counts of every tick outcome."""
        with self._lock:
            last = self._last
            cfg = self.config
            return {
                "enabled": cfg.enabled,
                "running": self._thread is not None and self._thread.is_alive(),
                "source": self._source_label,
                "interval_s": cfg.interval_s,
                "high_watermark": cfg.high_watermark,
                "low_watermark": cfg.low_watermark,
                "min_evict_bytes": cfg.min_evict_bytes,
                "last_outcome": last.outcome.value if last else None,
                "last_used_b": last.used_b if last else None,
                "last_total_b": last.total_b if last else None,
                "last_ratio": (last.used_b / last.total_b) if last and last.total_b > 0 else None,
                "last_requested_b": last.requested_b if last else None,
                "last_evicted_b": last.evicted_b if last else None,
                "sampled_at": self._last_sampled_at,
                "last_evicted_at": self._last_evicted_at,
                "evicted_total_b": self._evicted_total_b,
                "counts": {o.value: n for o, n in self._counts.items()},
            }

    def start(self) -> bool:
        """Start the daemon thread; returns False (and does nothing) when disabled or already running."""
        if not self.config.enabled:
            log.debug("memory-pressure watcher is disabled")
            return False
        if self._thread is not None and self._thread.is_alive():
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="erllama-pressure", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop the thread and wait for it (a tick in progress finishes first)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(STOP_TIMEOUT_S)

    def _loop(self) -> None:
        # Event.wait doubles as the sleep, so stop() interrupts it at once.
        while not self._stop.wait(self.config.interval_s):
            self.tick()
