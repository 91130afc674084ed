"""Which prompt tokens a tick prefills: the prefill policy (load options ``prefill_policy``,
``prefill_budget_tokens``, ``prefill_chunk_size``).

A tick decodes every generating request's next token first, so streams keep flowing; what is left of
its budget goes to requests still reading their prompt. One ``llama_decode`` costs about the same per
token whatever mix it holds, so a request's first token comes when the tick that finishes its prompt
ends. Serving prompts one after another (``oldest``, or ``shortest`` first) therefore gives the first of
a wave its token after its own prefill instead of after everyone's, and the last no later than an equal
split would (``fair``, a slice of ``prefill_chunk_size`` each per tick).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from erllama.options import LoadOptions, PrefillOrder
from erllama.worker.request import Request

# A tick that has finished a prompt takes no further prompts once it holds this many prompt tokens:
# below it, the weights are read for too few tokens to be worth a tick of their own.
MIN_TICK_PREFILL_TOKENS: Final = 64
# ``shortest`` serves a request that has waited this long since it was received before shorter ones,
# so a long prompt cannot starve behind a stream of short ones.
SHORTEST_AGE_BOUND_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class PrefillPolicy:
    order: PrefillOrder
    budget_tokens: int  # prompt tokens per tick, after the decode rows
    slice_tokens: int  # ``fair``: one request's share of a tick

    @classmethod
    def fair(cls, slice_tokens: int) -> PrefillPolicy:
        """An equal slice of ``slice_tokens`` per prefilling request and tick, the whole batch as budget."""
        return cls(PrefillOrder.FAIR, 1 << 30, slice_tokens)

    @classmethod
    def of(cls, options: LoadOptions) -> PrefillPolicy:
        return cls(
            PrefillOrder(options.prefill_policy), options.prefill_budget_tokens, options.prefill_chunk_size
        )

    def plan(
        self, prefilling: Sequence[Request], room: Callable[[Request], int], free_rows: int, now_s: float
    ) -> list[tuple[Request, int]]:
        """How many prompt tokens each request prefills this tick. ``room(req)`` is how far it may go
        before it must stop (its prompt's end, or a save or copy point); ``free_rows`` is what the
        batch has left after the decode rows."""
        budget = min(self.budget_tokens, free_rows)
        plan: list[tuple[Request, int]] = []
        taken = 0
        for req in self._ordered(prefilling, now_s):
            if taken >= budget:
                break
            take = min(room(req), budget - taken)
            if self.order is PrefillOrder.FAIR:
                take = min(take, self.slice_tokens)
            if take <= 0:
                continue
            plan.append((req, take))
            taken += take
            finishes = req.n_past + take == len(req.prompt)
            if self.order is not PrefillOrder.FAIR and finishes and taken >= MIN_TICK_PREFILL_TOKENS:
                break  # its first token should not wait for the next prompt's tokens
        return plan

    def _ordered(self, prefilling: Sequence[Request], now_s: float) -> Sequence[Request]:
        if self.order is not PrefillOrder.SHORTEST:
            return prefilling  # admission order

        def key(req: Request) -> tuple[bool, int, float]:
            aged = now_s - req.received_s >= SHORTEST_AGE_BOUND_S
            return (not aged, len(req.prompt) - req.n_past, req.received_s)

        return sorted(prefilling, key=key)
