"""The store's counters: plain integers owned by the daemon's loop thread, reported by ``stats``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from erllama.protocol import SaveReason


@dataclass(slots=True)
class Counters:
    """Monotonic since the daemon started (they are not persisted; hit counts per row are)."""

    lookups: int = 0
    hits_exact: int = 0
    hits_prefix: int = 0
    misses: int = 0
    lookup_ns: int = 0  # total time answering exact and prefix lookups
    loads: int = 0
    load_ns: int = 0  # total time granting loads (includes a first-load verification)
    saves_cold: int = 0
    saves_continued: int = 0
    saves_finish: int = 0
    saves_evict: int = 0
    saves_shutdown: int = 0
    already_present: int = 0
    conflicts: int = 0
    saves_dropped: int = 0  # reserved but never stored: no room, no space, bad checksum, expired, aborted
    expired_reservations: int = 0
    promotions: int = 0
    demotions: int = 0
    evictions: int = 0
    recycled_files: int = 0  # new rows written into the file of a row that had just left the tier
    corrupt_rows: int = 0
    leases_reaped: int = 0  # leases ended because their holder died, said bye or overstayed
    bad_messages: int = 0

    def count_save(self, reason: SaveReason) -> None:
        name = f"saves_{reason.value}"
        setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
