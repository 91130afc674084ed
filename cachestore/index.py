"""The daemon's in-memory index: every stored row by key, and a radix tree of token ids per fingerprint.

The tree answers ``longest_prefix`` at token granularity (no stride, no floor beyond the caller's
minimum) by walking the query once, and counts for every row how many stored rows extend it, which the
eviction order uses to keep a shared prefix until its extensions are gone. Only the daemon's loop thread
touches it.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from erllama.protocol import CacheTier, SaveReason

TOKEN_BYTES: Final = 4
NEAREST_ROW_MAX_VISITS: Final = 256  # bound on the search for the shortest row below a match point


class RowState(enum.StrEnum):
    READY = "ready"
    VERIFYING = "verifying"  # a full checksum runs before its first load in this daemon's life
    MOVING = "moving"  # being copied to another tier; still served from where it is


@dataclass(slots=True, eq=False)
class RowEntry:
    """One stored row as the daemon tracks it (the row's bytes stay in its tier)."""

    key: bytes
    fingerprint: bytes
    token_bytes: bytes
    size: int  # the whole row: head + payload
    payload_offset: int
    payload_len: int
    reason: SaveReason
    created_ns: int
    hits: int
    last_used_ns: int
    tier: CacheTier
    path: str  # what readers open: the file, or /proc/<daemon>/fd/<memfd> for the RAM tier
    fd: int = -1  # the memfd holding a RAM-tier row
    ino: int = 0  # inode of the row's file or memfd
    verified: bool = False
    state: RowState = RowState.READY
    leases: int = 0
    usage_dirty: bool = False  # hit count / last use not yet written back to the file
    promote_pending: bool = False  # hit on a lower tier: promote once its leases are gone
    shared: bool = False  # a copy is in the shared tier (written there by us, or fetched from it)
    blocks: list[int] = field(default_factory=list, repr=False)  # block hashes (``erllama.blockhash``)
    node: _Node | None = field(default=None, repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.token_bytes) // TOKEN_BYTES


class _Node:
    """A radix-tree node; ``label`` is the u32-LE token ids on the edge from its parent."""

    __slots__ = ("children", "depth", "label", "n_rows", "parent", "row")

    def __init__(self, label: bytes, parent: _Node | None, depth: int):
        self.label = label
        self.parent = parent
        self.children: dict[bytes, _Node] = {}
        self.row: RowEntry | None = None
        self.n_rows = 0  # rows ending at this node or below it
        self.depth = depth  # tokens from the root to the end of this node's label


def _shared_tokens(query: bytes, offset: int, label: bytes) -> int:
    """Whole tokens shared by ``query[offset:]`` and ``label`` (binary search over memcmp'd slices)."""
    n = min(len(query) - offset, len(label)) // TOKEN_BYTES
    if query[offset : offset + n * TOKEN_BYTES] == label[: n * TOKEN_BYTES]:
        return n
    lo, hi = 0, n - 1  # the first token of a label always matches (children are keyed by it)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        end = mid * TOKEN_BYTES
        if query[offset : offset + end] == label[:end]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    """All rows of one fingerprint, keyed by their token ids."""

    def __init__(self) -> None:
        self.root = _Node(b"", None, 0)

    def __len__(self) -> int:
        return self.root.n_rows

    def insert(self, entry: RowEntry) -> None:
        tokens = entry.token_bytes
        node, pos = self.root, 0
        while pos < len(tokens):
            head = tokens[pos : pos + TOKEN_BYTES]
            child = node.children.get(head)
            if child is None:
                leaf = _Node(tokens[pos:], node, len(tokens) // TOKEN_BYTES)
                node.children[head] = leaf
                node, pos = leaf, len(tokens)
                break
            k = _shared_tokens(tokens, pos, child.label)
            if k * TOKEN_BYTES < len(child.label):  # diverges inside the edge: split it
                mid = _Node(child.label[: k * TOKEN_BYTES], node, node.depth + k)
                mid.n_rows = child.n_rows
                node.children[head] = mid
                child.label = child.label[k * TOKEN_BYTES :]
                child.parent = mid
                mid.children[child.label[:TOKEN_BYTES]] = child
                child = mid
            node, pos = child, pos + k * TOKEN_BYTES
        if node.row is not None:
            raise KeyError("a row with these tokens is already indexed")
        node.row = entry
        entry.node = node
        walk: _Node | None = node
        while walk is not None:
            walk.n_rows += 1
            walk = walk.parent

    def remove(self, entry: RowEntry) -> None:
        node = entry.node
        if node is None or node.row is not entry:
            raise KeyError("row is not in this tree")
        node.row = None
        entry.node = None
        walk: _Node | None = node
        while walk is not None:
            walk.n_rows -= 1
            walk = walk.parent
        # Prune: drop an empty leaf, then merge a row-less node that has a single child into it.
        while node.parent is not None and node.row is None:
            parent = node.parent
            if not node.children:
                del parent.children[node.label[:TOKEN_BYTES]]
            elif len(node.children) == 1:
                (child,) = node.children.values()
                child.label = node.label + child.label
                child.parent = parent
                parent.children[node.label[:TOKEN_BYTES]] = child
            else:
                break
            node = parent

    def longest_prefix(
        self, tokens: bytes, max_len: int | None = None, max_overhang: int | None = None
    ) -> tuple[RowEntry, int] | None:
        """The row sharing the most leading tokens with ``tokens`` and that count.

        Among the rows sharing that many, one that ends exactly there (no truncation needed) wins,
        else the shortest one found below the match point. With limits, a row is usable only if it
        has at most ``max_len`` tokens and extends at most ``max_overhang`` tokens past what it shares
        with the query (0: it is a prefix of the query); when the best match is not usable, the deepest
        usable row on the query's path answers (rows branching off the path earlier are not searched).
        """

        def usable(row: RowEntry, common: int) -> bool:
            n = row.n_tokens
            return (max_len is None or n <= max_len) and (max_overhang is None or n - common <= max_overhang)

        node, pos = self.root, 0
        on_path: tuple[RowEntry, int] | None = None  # the deepest usable row that is a prefix of the query
        while pos < len(tokens):
            child = node.children.get(tokens[pos : pos + TOKEN_BYTES])
            if child is None:
                break
            k = _shared_tokens(tokens, pos, child.label)
            pos += k * TOKEN_BYTES
            if k * TOKEN_BYTES < len(child.label):
                below = _nearest_row(child)
                return (below, pos // TOKEN_BYTES) if usable(below, pos // TOKEN_BYTES) else on_path
            node = child
            if node.row is not None and usable(node.row, node.depth):
                on_path = (node.row, node.depth)
        if pos == 0:
            return None
        if node.row is None:
            below = _nearest_row(node)  # the shortest row below: if it is not usable, no row below is
            if usable(below, pos // TOKEN_BYTES):
                return below, pos // TOKEN_BYTES
        return on_path


def _nearest_row(start: _Node) -> RowEntry:
    """The row with the fewest tokens at or below ``start`` (bounded search; every leaf holds a row)."""
    heap: list[tuple[int, int, _Node]] = [(start.depth, 0, start)]
    seq, node = 1, start
    while heap:
        _, _, node = heapq.heappop(heap)
        if node.row is not None:
            return node.row
        if seq >= NEAREST_ROW_MAX_VISITS:
            break
        for child in node.children.values():
            heapq.heappush(heap, (child.depth, seq, child))
            seq += 1
    while node.row is None:  # search budget spent: any row below this node will do
        node = next(iter(node.children.values()))
    return node.row


class Index:
    """Rows by key, by tier, and by (fingerprint, token prefix)."""

    def __init__(self) -> None:
        self.rows: dict[bytes, RowEntry] = {}
        self.by_tier: dict[CacheTier, dict[bytes, RowEntry]] = {t: {} for t in CacheTier}
        self._trees: dict[bytes, PrefixTree] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: bytes) -> bool:
        return key in self.rows

    def get(self, key: bytes) -> RowEntry | None:
        return self.rows.get(key)

    def add(self, entry: RowEntry) -> None:
        if entry.key in self.rows:
            raise KeyError("key already indexed")
        self._trees.setdefault(entry.fingerprint, PrefixTree()).insert(entry)
        self.rows[entry.key] = entry
        self.by_tier[entry.tier][entry.key] = entry

    def remove(self, key: bytes) -> RowEntry:
        entry = self.rows.pop(key)
        del self.by_tier[entry.tier][key]
        tree = self._trees[entry.fingerprint]
        tree.remove(entry)
        if not len(tree):
            del self._trees[entry.fingerprint]
        return entry

    def relocate(self, entry: RowEntry, tier: CacheTier, path: str, fd: int, ino: int) -> None:
        del self.by_tier[entry.tier][entry.key]
        entry.tier, entry.path, entry.fd, entry.ino = tier, path, fd, ino
        self.by_tier[tier][entry.key] = entry

    def in_tier(self, tier: CacheTier) -> Iterator[RowEntry]:
        return iter(self.by_tier[tier].values())

    def longest_prefix(
        self,
        fingerprint: bytes,
        token_bytes: bytes,
        min_len: int,
        max_len: int | None = None,
        max_overhang: int | None = None,
    ) -> tuple[RowEntry, int] | None:
        """See ``PrefixTree.longest_prefix``; None unless at least ``min_len`` tokens are shared."""
        tree = self._trees.get(fingerprint)
        if tree is None:
            return None
        found = tree.longest_prefix(token_bytes, max_len, max_overhang)
        if found is None or found[1] < max(1, min_len):
            return None
        return found

    @staticmethod
    def extensions(entry: RowEntry) -> int:
        """How many other stored rows (same fingerprint) have this row's tokens as a strict prefix."""
        return entry.node.n_rows - 1 if entry.node is not None else 0
