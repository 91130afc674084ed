"""Leases (a reader holds a row; it is not moved or evicted meanwhile) and the liveness of the client
processes that hold leases and reservations."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(slots=True)
class Lease:
    lease_id: int
    key: bytes
    ident: bytes
    pid: int
    expires_at: float  # time.monotonic()


class ProcessWatch:
    """Which client processes are alive. The start time recorded at first sight catches pid reuse."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}

    def register(self, pid: int) -> None:
        if pid not in self._started:
            try:
                self._started[pid] = psutil.Process(pid).create_time()
            except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
                self._started[pid] = -1.0  # unknown (another pid namespace): trust TTLs only

    def alive(self, pid: int) -> bool:
        started = self._started.get(pid, -1.0)
        if started < 0:
            return True
        try:
            proc = psutil.Process(pid)
            return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True

    def forget(self, keep: set[int]) -> None:
        for pid in [p for p in self._started if p not in keep]:
            del self._started[pid]
