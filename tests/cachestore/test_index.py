"""The prefix index agrees with a brute-force reference on random token sets (property-based)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from erllama.cachestore.codec import row_key_bytes, tokens_to_bytes
from erllama.cachestore.index import Index, RowEntry
from erllama.protocol import CacheTier, SaveReason

FP = b"model-a"
# A tiny alphabet and short rows make shared prefixes, splits and merges frequent.
token_seqs = st.lists(st.integers(0, 3), min_size=1, max_size=12).map(tuple)


def entry(tokens: tuple[int, ...], fp: bytes = FP) -> RowEntry:
    tb = tokens_to_bytes(tokens)
    return RowEntry(
        key=row_key_bytes(fp, tb),
        fingerprint=fp,
        token_bytes=tb,
        size=len(tokens),
        payload_offset=64,
        payload_len=1,
        reason=SaveReason.COLD,
        created_ns=0,
        hits=0,
        last_used_ns=0,
        tier=CacheTier.RAM,
        path="",
    )


def lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokens_of(e: RowEntry) -> tuple[int, ...]:
    import array

    arr = array.array("I")
    arr.frombytes(e.token_bytes)
    return tuple(arr)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), token_seqs), min_size=1, max_size=60),
    queries=st.lists(token_seqs, min_size=1, max_size=20),
    min_len=st.integers(1, 4),
)
def test_longest_prefix_and_extension_counts_match_brute_force(ops, queries, min_len) -> None:
    index = Index()
    stored: dict[tuple[int, ...], RowEntry] = {}
    for insert, tokens in ops:
        if insert and tokens not in stored:
            stored[tokens] = entry(tokens)
            index.add(stored[tokens])
        elif not insert and tokens in stored:
            index.remove(stored.pop(tokens).key)
        assert len(index) == len(stored)
    # A row of another fingerprint must never answer.
    index.add(entry((0, 1, 2, 3), fp=b"model-b"))

    for q in queries:
        best = max((lcp(t, q) for t in stored), default=0)
        found = index.longest_prefix(FP, tokens_to_bytes(q), min_len)
        if best < min_len:
            assert found is None
            continue
        assert found is not None
        row, common = found
        assert common == best
        assert lcp(tokens_of(row), q) == best
        assert row.fingerprint == FP
        if q[:best] in stored:  # a row ending exactly at the match point needs no truncation: it wins
            assert tokens_of(row) == q[:best]

    for tokens, e in stored.items():
        expected = sum(1 for t in stored if len(t) > len(tokens) and t[: len(tokens)] == tokens)
        assert Index.extensions(e) == expected


def test_a_longer_row_answers_with_the_common_length() -> None:
    index = Index()
    index.add(entry((1, 2, 3, 4, 5, 6)))
    row, common = index.longest_prefix(FP, tokens_to_bytes((1, 2, 3, 9)), 1)
    assert (row.n_tokens, common) == (6, 3)
    assert index.longest_prefix(FP, tokens_to_bytes((1, 2, 3, 9)), 4) is None
    assert index.longest_prefix(FP, tokens_to_bytes((7,)), 1) is None


def test_removing_every_row_leaves_an_empty_index() -> None:
    index = Index()
    rows = [entry(t) for t in ((1,), (1, 2), (1, 2, 3), (1, 3), (2,))]
    for e in rows:
        index.add(e)
    for e in rows:
        index.remove(e.key)
    assert len(index) == 0 and index.longest_prefix(FP, tokens_to_bytes((1, 2)), 1) is None


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(token_seqs, min_size=1, max_size=40),
    queries=st.lists(token_seqs, min_size=1, max_size=20),
    max_len=st.one_of(st.none(), st.integers(1, 8)),
    max_overhang=st.one_of(st.none(), st.integers(0, 3)),
)
def test_limited_lookups_answer_only_usable_rows_and_never_miss_a_usable_prefix_row(
    rows, queries, max_len, max_overhang
) -> None:
    """A limited lookup never answers a row longer than ``max_len`` or extending more than
    ``max_overhang`` past its common prefix, and shares at least as much as the longest stored row that
    is a prefix of the query and fits ``max_len``; with ``max_overhang=0`` it is exactly that row."""
    index = Index()
    stored = {tokens: entry(tokens) for tokens in set(rows)}
    for e in stored.values():
        index.add(e)
    for q in queries:
        prefix_rows = [t for t in stored if t == q[: len(t)] and (max_len is None or len(t) <= max_len)]
        floor = max((len(t) for t in prefix_rows), default=0)
        found = index.longest_prefix(FP, tokens_to_bytes(q), 1, max_len, max_overhang)
        if found is None:
            assert floor == 0
            continue
        row, common = found
        t = tokens_of(row)
        assert common == lcp(t, q) >= floor
        assert max_len is None or len(t) <= max_len
        assert max_overhang is None or len(t) - common <= max_overhang
        if max_overhang == 0:
            assert len(t) == common == floor
