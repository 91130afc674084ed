"""``KvIndex``: which cache store holds which prefix blocks, from the stores' KV events.

One source per store: a host's name, or ``""`` for the broker's own machine. Per source, a dict from
block hash to the number of rows holding that block in each tier (rows overlap: a row of 10 blocks and
one of 12 share 10, and removing one keeps the blocks the other still has). ``match`` walks a prompt's
block hashes from the first while a source holds them: the hashes chain (``erllama.blockhash``), so a
run of known hashes is a prefix that source could restore. Pure data: the callers bring the batches
and ask for a resynchronisation when ``apply`` reports a gap.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from erllama.protocol import LOCAL_TIERS, CacheTier, KvEvent, KvEventBatch, KvEventKind

log = logging.getLogger(__name__)

_TIER_SLOT: Final = {tier: i for i, tier in enumerate(LOCAL_TIERS)}  # hottest first


@dataclass(slots=True)
class _Source:
    publisher: str
    seq: int
    stale: bool = False  # a gap: what is known may be out of date until the next snapshot
    next_part: int = 0  # the snapshot part expected next (0: none under way)
    blocks: dict[int, list[int]] = field(default_factory=dict)  # hash -> rows holding it, per tier slot
    fingerprints: Counter[bytes] = field(default_factory=Counter)  # rows per model fingerprint

    def stored(self, fingerprint: bytes, blocks: list[int], tier: CacheTier) -> None:
        slot = _TIER_SLOT.get(tier)
        if slot is None:
            return
        self.fingerprints[fingerprint] += 1
        for h in blocks:
            counts = self.blocks.get(h)
            if counts is None:
                counts = self.blocks[h] = [0] * len(LOCAL_TIERS)
            counts[slot] += 1

    def removed(self, fingerprint: bytes, blocks: list[int], tier: CacheTier) -> None:
        slot = _TIER_SLOT.get(tier)
        if slot is None:
            return
        rows = self.fingerprints.get(fingerprint, 0)
        if rows > 1:
            self.fingerprints[fingerprint] = rows - 1
        elif rows:
            del self.fingerprints[fingerprint]
        for h in blocks:
            counts = self.blocks.get(h)
            if counts is None or not counts[slot]:
                continue  # not known here (an event from before a snapshot we lost track of)
            counts[slot] -= 1
            if not any(counts):
                del self.blocks[h]

    def apply(self, event: KvEvent) -> None:
        if event.kind is KvEventKind.STORED:
            self.stored(event.fingerprint, event.blocks, event.tier)
        elif event.kind is KvEventKind.REMOVED:
            self.removed(event.fingerprint, event.blocks, event.tier)
        elif event.from_tier is not None:  # moved
            self.removed(event.fingerprint, event.blocks, event.from_tier)
            self.stored(event.fingerprint, event.blocks, event.tier)


class KvIndex:
    """The broker's view of every cache store's prefix blocks (see the module docstring)."""

    def __init__(self) -> None:
        self._sources: dict[str, _Source] = {}

    def apply(self, source: str, batch: KvEventBatch) -> bool:
        """Take one batch of ``source``'s events. False: a gap (another publisher without a snapshot, a
        sequence number that does not follow, a snapshot part out of order); the source is then stale
        until a snapshot arrives, and the caller should ask for one (``HostKvResync``)."""
        src = self._sources.get(source)
        if batch.snapshot and batch.part == 0:
            src = self._sources[source] = _Source(batch.publisher, batch.last_seq)
        elif src is None or src.stale or src.publisher != batch.publisher:
            return self._gap(source, src, batch)
        elif batch.snapshot:
            if batch.part != src.next_part or batch.last_seq != src.seq:
                return self._gap(source, src, batch)
        elif src.next_part or batch.first_seq != src.seq + 1:
            return self._gap(source, src, batch)
        for event in batch.events:
            src.apply(event)
        if batch.snapshot:
            src.next_part = batch.part + 1 if batch.part + 1 < batch.parts else 0
        else:
            src.seq = max(src.seq, batch.last_seq)
        return True

    def _gap(self, source: str, src: _Source | None, batch: KvEventBatch) -> bool:
        if src is not None and not src.stale:
            log.info(
                "KV events of %r: a gap (publisher %s seq %d, got %s %d..%d): resynchronising",
                source,
                src.publisher,
                src.seq,
                batch.publisher,
                batch.first_seq,
                batch.last_seq,
            )
            src.stale = True
        return False

    def drop(self, source: str) -> None:
        """Forget ``source`` (its host died or left; it sends a snapshot when it joins again)."""
        self._sources.pop(source, None)

    def match(self, fingerprint: bytes, blocks: Sequence[int]) -> dict[str, tuple[int, CacheTier]]:
        """For each source holding at least the first of ``blocks`` (a prompt's block hashes under the
        model's ``fingerprint``): how many leading blocks it holds, and the hottest tier holding the last
        of them. Stale sources are included: what they held at the gap is still the best guess."""
        out: dict[str, tuple[int, CacheTier]] = {}
        for name, src in self._sources.items():
            if not blocks or fingerprint not in src.fingerprints:
                continue
            n, last = 0, None
            for h in blocks:
                counts = src.blocks.get(h)
                if counts is None:
                    break
                n, last = n + 1, counts
            if last is not None:
                out[name] = (n, LOCAL_TIERS[next(i for i, c in enumerate(last) if c)])
        return out

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per source: its store's ``publisher``, the last ``seq`` applied, the distinct ``blocks`` held
        and whether it is ``stale`` (for ``model_info`` and ``ping``)."""
        return {
            name: {
                "publisher": src.publisher,
                "seq": src.seq,
                "blocks": len(src.blocks),
                "stale": src.stale or bool(src.next_part),
            }
            for name, src in self._sources.items()
        }
