"""Tier budgets, where a row goes, and the order in which rows leave a tier.

Tiers from hottest to coldest: RAM, shm, disk. A new row enters the hottest tier whose budget can hold
it once colder unleased rows are moved out; under pressure a tier hands its lowest-scoring rows to the
next colder tier (the coldest evicts them); a load from a colder tier promotes the row afterwards.

Eviction score (lowest leaves first)::

    age_s  = seconds since the row was last loaded (or stored)
    heat   = hits * 0.5 ** (age_s / HIT_HALF_LIFE_S)                      # decayed hit count
    score  = (1 + heat) / ((1 + age_s / RECENCY_SCALE_S) * sqrt(1 + size / SIZE_SCALE_BYTES))

Rows that other stored rows extend (a shared system prompt, an earlier turn) sort after every row
that no stored row extends, whatever their scores: a prefix never leaves before its extensions.
Leased rows and rows being moved or verified are never chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from erllama.cachestore.index import Index, RowEntry, RowState
from erllama.protocol import LOCAL_TIERS, CacheTier

TIER_ORDER: Final = LOCAL_TIERS
HIT_HALF_LIFE_S: Final = 3600.0
RECENCY_SCALE_S: Final = 60.0
SIZE_SCALE_BYTES: Final = 16 * 1024 * 1024


def score(entry: RowEntry, now_ns: int) -> float:
    """The value of keeping ``entry`` where it is; see the module docstring."""
    age_s = max(0.0, (now_ns - entry.last_used_ns) / 1e9)
    heat = entry.hits * 0.5 ** (age_s / HIT_HALF_LIFE_S)
    return (1.0 + heat) / ((1.0 + age_s / RECENCY_SCALE_S) * math.sqrt(1.0 + entry.size / SIZE_SCALE_BYTES))


def is_idle(entry: RowEntry) -> bool:
    """A row that may be moved or evicted now."""
    return entry.leases == 0 and entry.state is RowState.READY


def eviction_order(index: Index, tier: CacheTier, now_ns: int) -> list[RowEntry]:
    """The idle rows of ``tier``, first to leave first."""
    rows = [e for e in index.in_tier(tier) if is_idle(e)]
    rows.sort(key=lambda e: (index.extensions(e) > 0, score(e, now_ns), e.last_used_ns))
    return rows


@dataclass(slots=True)
class TierState:
    """Byte accounting of one tier. ``rows_bytes`` counts rows that live there (a row being moved out
    still does until the move lands); ``reserved_bytes`` counts writes and moves heading there."""

    tier: CacheTier
    budget: int
    enabled: bool
    row_limit: int | None = None  # the RAM tier holds one memfd per row: bounded by the fd limit
    rows: int = 0
    rows_bytes: int = 0
    reserved_bytes: int = 0
    outgoing_bytes: int = 0

    def committed(self) -> int:
        return self.rows_bytes + self.reserved_bytes - self.outgoing_bytes

    def excess(self) -> int:
        """Bytes over budget once moves already under way have landed (a disabled tier: all of them)."""
        return self.committed() - (self.budget if self.enabled else 0)

    def free(self) -> int:
        return (self.budget - self.committed()) if self.enabled else 0

    def add_row(self, size: int) -> None:
        self.rows += 1
        self.rows_bytes += size

    def remove_row(self, size: int) -> None:
        self.rows -= 1
        self.rows_bytes -= size

    def snapshot(self) -> dict[str, int | bool | None]:
        return {
            "enabled": self.enabled,
            "budget": self.budget,
            "rows": self.rows,
            "bytes": self.rows_bytes,
            "reserved": self.reserved_bytes,
            "outgoing": self.outgoing_bytes,
            "row_limit": self.row_limit,
        }


class Tiers:
    """The three ``TierState``s and the placement rules over them."""

    def __init__(self, states: dict[CacheTier, TierState]):
        self.states = states

    def __getitem__(self, tier: CacheTier) -> TierState:
        return self.states[tier]

    def _fits(self, tier: CacheTier, size: int, index: Index) -> bool:
        st = self.states[tier]
        if not st.enabled or size > st.budget:
            return False
        if st.row_limit is not None and st.rows >= st.row_limit:
            return False
        if st.free() >= size:
            return True
        reclaimable = sum(e.size for e in index.in_tier(tier) if is_idle(e))
        return st.free() + reclaimable >= size

    def place(self, size: int, index: Index, preferred: CacheTier | None = None) -> CacheTier | None:
        """The hottest tier (``preferred`` or colder, if given) that can
        take a new row of ``size`` bytes, moving colder idle rows out if it must; None if none can."""
        order = TIER_ORDER if preferred is None else TIER_ORDER[TIER_ORDER.index(preferred) :]
        for tier in order:
            if self._fits(tier, size, index):
                return tier
        return None

    def promotion_target(self, entry: RowEntry, index: Index) -> CacheTier | None:
        """The hottest tier above the row's that can take it, or None."""
        for tier in TIER_ORDER[: TIER_ORDER.index(entry.tier)]:
            if self._fits(tier, entry.size, index):
                return tier
        return None

    def demotion_target(self, tier: CacheTier, size: int) -> CacheTier | None:
        """The next enabled colder tier whose budget could ever hold ``size`` bytes, or None (evict)."""
        for colder in TIER_ORDER[TIER_ORDER.index(tier) + 1 :]:
            st = self.states[colder]
            if st.enabled and size <= st.budget:
                return colder
        return None
