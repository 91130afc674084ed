"""worker/sharing.py: the common prefix of two prompts, and which running request a newcomer waits for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from erllama.options import SamplingParams
from erllama.worker.request import Request
from erllama.worker.sharing import SHARE_MIN_TOKENS, common_prefix_len, find_donor

tokens = st.lists(st.integers(0, 3), max_size=60)  # a small alphabet, so long common prefixes are common


def brute_common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < min(len(a), len(b), limit) and a[n] == b[n]:
        n += 1
    return n


@given(tokens, tokens, st.integers(0, 80))
def test_common_prefix_len_agrees_with_a_token_by_token_scan(a, b, limit):
    assert common_prefix_len(a, b, limit) == brute_common_prefix(a, b, limit)


@given(tokens, st.integers(0, 60))
def test_a_prompt_extended_by_another_shares_all_of_it(a, extra):
    assert common_prefix_len(a, a + [9] * extra, len(a) + extra) == len(a)


def request(rid: int, prompt: list[int], seq_id: int = 0, **kw) -> Request:
    return Request(rid, prompt, SamplingParams(), 0.0, seq_id=seq_id, **kw)


START = list(range(100, 100 + 2 * SHARE_MIN_TOKENS))


def test_the_donor_is_the_running_request_sharing_the_most():
    newcomer = request(9, START + [1, 2, 3])
    short = request(1, START[:SHARE_MIN_TOKENS] + [7] * 50, seq_id=1)
    long = request(2, START + [1, 2, 5], seq_id=2)
    assert find_donor(newcomer, [short, long], epoch=0) == (long, len(START) + 2)


def test_no_donor_unless_it_beats_what_the_request_holds_by_the_floor():
    newcomer = request(9, START + [1], n_past=len(START) - SHARE_MIN_TOKENS + 1)  # restored most of it
    donor = request(1, START + [2], seq_id=1)
    assert find_donor(newcomer, [donor], epoch=0) is None


def test_verifies_waiters_cancelled_requests_and_other_adapter_sets_are_never_donors():
    newcomer = request(9, START + [1])
    candidates = [
        request(1, START + [2], seq_id=1, verify_from=3),
        request(2, START + [2], seq_id=2, donor_rid=5),
        request(3, START + [2], seq_id=3, cancelled=True),
        request(4, START + [2], seq_id=0, adapter_epoch=1),
    ]
    assert find_donor(newcomer, candidates, epoch=0) is None
