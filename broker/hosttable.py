"""The broker's table of hosts (``erllama-host`` processes that joined): what each has, its state, when it
was last heard from, and the workers it reports. A model is placed on a host by name (``ModelEntry.host``);
a later replica or routing change reads the same table to choose among hosts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from erllama.protocol import HostResources, HostState, HostWorker

LIVE_HOST_STATES = (HostState.JOINING, HostState.UP, HostState.DRAINING)


@dataclass(slots=True)
class HostEntry:
    name: str
    identity: bytes  # its routing id on the host socket
    pid: int
    resources: HostResources
    address: str | None  # the address its connection came from
    state: HostState = HostState.JOINING
    last_seen_s: float = field(default_factory=time.monotonic)
    joined_at: float = field(default_factory=time.time)
    workers: list[HostWorker] = field(default_factory=list)  # as of its last beat
    cachestore_up: bool = False
    joins: int = 1  # 1 + the times it joined again after being declared dead or leaving
    last_error: dict[str, Any] | None = None

    @property
    def live(self) -> bool:
        return self.state in LIVE_HOST_STATES

    def describe(self, models: list[str]) -> dict[str, Any]:
        """One row of ``list_hosts``: from the broker's own table, no round trip."""
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid,
            "address": self.address,
            "heartbeat_age_s": round(time.monotonic() - self.last_seen_s, 3),
            "joined_at": self.joined_at,
            "joins": self.joins,
            "resources": msgspec.to_builtins(self.resources),
            "cachestore_up": self.cachestore_up,
            "workers": [{"model": w.model, "pid": w.pid} for w in self.workers],
            "models": models,
            "last_error": self.last_error,
        }
