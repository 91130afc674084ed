"""Prompts that start like a request already running in this worker.

The cache store shares a prefix across time: a row saved by one request is restored by the next.
Requests that arrive together (eight agents sent at once with the same new system prompt) would
all miss it, since nothing is saved yet, and prefill the same tokens side by side, each at a
fraction of the machine. Instead a newcomer whose prompt shares at least ``SHARE_MIN_TOKENS``
more tokens with a running request (its donor) than the cache gave it waits, without taking
batch rows, until the donor has prefilled the shared part; then it copies the donor's KV into its
own sequence (``llama_state_seq_get_data``/``set_data``: immediate, unlike ``llama_memory_seq_cp``
across split KV streams, which is deferred to the next decode) and prefills only its own suffix.
The request reports ``cache_hit_kind = shared``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from erllama.worker.request import Request

# Copying a sequence costs ~1 ms per 40 tokens of KV (state get + set at ~6 GB/s), far below
# prefilling them; the floor only keeps a short common start (a chat template's first tokens)
# from making a request wait for another.
SHARE_MIN_TOKENS: Final = 64


def common_prefix_len(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``limit``. Slice comparisons
    run in C: a binary search over them beats a Python loop over thousands of tokens."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo] holds; a[:hi + 1] != b[:hi + 1] is known
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def find_donor(
    req: Request, running: Iterable[Request], epoch: int, cuttable: bool = True
) -> tuple[Request, int] | None:
    """The running request whose prompt shares the most with ``req``'s, and how many tokens ``req``
    would take from it; None unless that beats what ``req`` already holds by ``SHARE_MIN_TOKENS``.

    A donor must hold KV made under the current adapter set and be a plain request (not a verify,
    whose candidates are guesses, nor one itself waiting for a donor). ``req`` keeps its last prompt
    token to decode (its logits are not in any KV state). Where the memory cannot be cut
    (``cuttable`` False: recurrent, hybrid, sliding window), a donor must not have prefilled past the
    shared part yet: it then pauses there (the scheduler ends its chunk at the share point) and is
    copied whole."""
    if req.is_verify or req.adapter_epoch != epoch:
        return None
    limit = len(req.prompt) - 1
    best: tuple[Request, int] | None = None
    for donor in running:
        if donor is req or donor.is_verify or donor.cancelled or donor.donor_rid is not None:
            continue
        if donor.adapter_epoch != epoch or donor.seq_id < 0:
            continue
        n = common_prefix_len(req.prompt, donor.prompt, limit)
        if not cuttable and donor.n_past > n:
            continue
        if n - req.n_past >= SHARE_MIN_TOKENS and (best is None or n > best[1]):
            best = (donor, n)
    return best
