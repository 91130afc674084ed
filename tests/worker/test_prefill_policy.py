"""The prefill policy: who gets a tick's prompt tokens (worker/prefill.py), on the stub backend.

A tick's cost grows with the tokens it decodes, so "prompt tokens decoded up to the tick that produced a
request's first token" is the stub's measure of its time to first token."""

from __future__ import annotations

import time
from dataclasses import dataclass

from erllama.options import PrefillOrder, SamplingParams, parse_load_options
from erllama.worker.backend import BatchRow
from erllama.worker.prefill import SHORTEST_AGE_BOUND_S, PrefillPolicy
from erllama.worker.scheduler import Scheduler
from erllama.worker.stub_backend import StubBackend
from tests.worker.test_scheduler import Recorder


class TallyingStub(StubBackend):
    """Counts the tokens of every decode."""

    def __init__(self, **kw: int):
        super().__init__(**kw)
        self.decoded = 0

    def decode(self, rows: list[BatchRow]) -> list[int]:  # type: ignore[override]
        self.decoded += sum(len(r.tokens) for r in rows)
        return super().decode(rows)


@dataclass
class Wave:
    """Requests submitted together; the decoded-token count at each one's first token."""

    scheduler: Scheduler
    recorder: Recorder
    backend: TallyingStub

    def first_token_at(self) -> dict[int, int]:
        seen: dict[int, int] = {}
        while self.scheduler.has_work():
            self.scheduler.tick()
            for rid, toks in self.recorder.tokens.items():
                if toks and rid not in seen:
                    seen[rid] = self.backend.decoded
        return seen


def wave(policy: PrefillPolicy, prompts: dict[int, int], n_batch: int = 512) -> Wave:
    be = TallyingStub(n_ctx=2048, n_seq_max=len(prompts), n_batch=n_batch)
    rec = Recorder()
    s = Scheduler(be, rec, policy)
    for rid, n in prompts.items():
        s.submit(rid, [2 + (rid * 7 + i) % 200 for i in range(n)], SamplingParams(max_tokens=2))
    return Wave(s, rec, be)


def mean(xs: dict[int, int]) -> float:
    return sum(xs.values()) / len(xs)


def test_oldest_first_gives_each_request_its_token_after_its_own_prefill_and_lowers_the_mean():
    four = {rid: 150 for rid in (1, 2, 3, 4)}
    oldest = wave(PrefillPolicy(PrefillOrder.OLDEST, 512, 256), four).first_token_at()
    fair = wave(PrefillPolicy(PrefillOrder.FAIR, 512, 256), four).first_token_at()
    # one prompt per tick, in admission order (plus the decode rows of those already answered)
    assert oldest[1] == 150 and oldest[1] < oldest[2] < oldest[3] < oldest[4]
    assert max(oldest.values()) <= max(fair.values()) + 3  # the last one is not later
    assert mean(oldest) <= 0.75 * mean(fair)  # ~30% lower on this wave


def test_shortest_first_serves_the_short_prompt_before_a_long_one_admitted_earlier():
    w = wave(PrefillPolicy(PrefillOrder.SHORTEST, 128, 256), {1: 400, 2: 40})
    first = w.first_token_at()
    assert first[2] == 128 < first[1]


def test_shortest_first_still_serves_a_request_that_has_waited_past_the_age_bound():
    w = wave(PrefillPolicy(PrefillOrder.SHORTEST, 128, 256), {1: 380, 2: 40})
    for req in w.scheduler.waiting:
        if req.rid == 1:
            req.received_s = time.monotonic() - SHORTEST_AGE_BOUND_S - 1
    first = w.first_token_at()
    assert first[1] < first[2]


def test_a_lone_prompt_prefills_in_ticks_of_the_whole_budget():
    w = wave(PrefillPolicy(PrefillOrder.OLDEST, 512, 256), {1: 1200})
    ticks = 0
    while not w.recorder.tokens.get(1):
        w.scheduler.tick()
        ticks += 1
    assert ticks == 3  # 512 + 512 + 176, not 256-token slices


def test_the_budget_bounds_prefill_beside_running_streams_which_get_a_token_every_tick():
    be, rec = TallyingStub(n_ctx=2048, n_seq_max=2, n_batch=512), Recorder()
    s = Scheduler(be, rec, PrefillPolicy(PrefillOrder.OLDEST, 64, 256))
    s.submit(1, [5] * 8, SamplingParams(max_tokens=1000))
    s.tick()
    s.submit(2, [3] * 300, SamplingParams(max_tokens=1))
    before, ticks = len(rec.tokens[1]), 0
    while 2 not in rec.results:
        s.tick()
        ticks += 1
    assert ticks >= 300 // 64
    assert len(rec.tokens[1]) - before == ticks


def test_every_policy_gives_the_same_tokens():
    prompts = {1: 300, 2: 40, 3: 150}
    outs = []
    for order in PrefillOrder:
        w = wave(PrefillPolicy(order, 96, 32), prompts)
        w.first_token_at()
        outs.append({rid: w.recorder.results[rid]["generated"] for rid in prompts})
    assert outs[0] == outs[1] == outs[2]


def test_the_load_options_choose_the_policy():
    policy = PrefillPolicy.of(
        parse_load_options({"prefill_policy": "shortest", "prefill_budget_tokens": 128})
    )
    assert policy == PrefillPolicy(PrefillOrder.SHORTEST, 128, 256)
    assert PrefillPolicy.of(parse_load_options({})).order is PrefillOrder.OLDEST
