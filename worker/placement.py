"""Where a request's known prompt prefix comes from, and the rule that keeps it exact.

A sequence can start with KV from three places: its sticky session's sequence, a row restored from the
cache store, or a copy of a running request's sequence (``sharing.py``). Each holds some tokens, the
first ``common`` of them equal to the prompt's. What the request keeps must be exactly the KV a cold
prefill of those tokens makes, on every memory kind:

- a transformer's KV can be cut anywhere (``llama_memory_seq_rm``);
- a sliding-window model's saved state holds its window layers' cells for only its last ~``n_swa``
  positions, so it can be cut only where the window before the cut is still there: in practice only
  rows that are a prefix of the prompt restore there, and ``Backend.seq_keep`` checks the cut;
- a recurrent or hybrid model's state cannot be cut at all: only a row that is a prefix of the prompt
  can be used, whole.

The last prompt token's logits are not part of a KV state. A row that carries them (``kvrow.py``)
restores a whole prompt and samples from them; otherwise the request keeps all but the last prompt
token and decodes it again (on a transformer; the other kinds use a shorter row instead, which the
lookup limits ask for). Where the memory refuses a cut anyway, the request goes cold and the refusal
is counted; no other request is touched.
"""

from __future__ import annotations

import logging
import time

from erllama.logsetup import for_request
from erllama.protocol import CacheHitKind, MemoryKind
from erllama.worker.backend import Backend, BackendError
from erllama.worker.kvcache import KVCache, RowLimits
from erllama.worker.request import Request

log = logging.getLogger(__name__)


class Placement:
    """Puts known prefixes into a request's sequence (for the scheduler, on its thread)."""

    def __init__(self, backend: Backend, cache: KVCache | None):
        self.backend = backend
        self.cache = cache
        self.refused = 0  # reuses the memory could not cut exactly: those requests went cold

    @property
    def cuttable(self) -> bool:
        """Whether any prefix of a held sequence can be kept (else only a prefix of the prompt, whole)."""
        return self.backend.memory is MemoryKind.TRANSFORMER

    def limits(self, req: Request) -> RowLimits:
        """Which cached rows ``req`` can use on this model."""
        if self.cuttable:
            return RowLimits(self.backend.n_ctx_seq, None, needs_logits=False)
        if req.is_verify:  # the candidates' logits are needed: the row must end before them
            return RowLimits(req.verify_from, 0, needs_logits=False)
        return RowLimits(len(req.prompt), 0, needs_logits=True)

    @for_request
    def place(
        self, req: Request, held: int, common: int, kind: CacheHitKind, logits: bytes | None = None
    ) -> bool:
        """``req``'s sequence holds ``held`` tokens, the first ``common`` of them the prompt's, and
        ``logits`` for its last token if known. Keep what is exact; False (the sequence cleared, the
        request cold) if nothing could be kept."""
        n = len(req.prompt)
        if req.is_verify:
            limit = req.verify_from  # it needs the logits of every candidate position
        elif logits is not None and held == common == n:
            limit = n  # the whole prompt: its first token is sampled from the stored logits
        else:
            limit = n - 1  # the last prompt token is decoded again for fresh logits
        keep = min(common, limit)
        if keep > 0 and self.backend.seq_keep(req.seq_id, held, keep):
            req.n_past = keep
            req.cache_hit_kind = kind
            req.prefix_len = keep
            req.last_save_at = keep  # what was restored is in the cache already: no continued save of it
            req.stored_logits = logits if keep == n else None
            return True
        if keep > 0:
            self.refused += 1
            log.info(
                "the %s memory cannot keep %d of %d held tokens exactly; prefilling cold",
                self.backend.memory.value,
                keep,
                held,
            )
        self.backend.seq_clear(req.seq_id)
        req.n_past = req.prefix_len = req.last_save_at = 0
        req.cache_hit_kind = CacheHitKind.COLD
        req.stored_logits = None
        return False

    @for_request
    def restore_from_cache(self, req: Request) -> None:
        """Restore the longest usable cached prefix of the prompt into the request's (empty) sequence."""
        if self.cache is None:
            return
        t0_ns = time.perf_counter_ns()
        found = self.cache.find(req.prompt, req.params.parent_key, self.limits(req))
        t1_ns = time.perf_counter_ns()
        self.cache.counters.lookup_ns += t1_ns - t0_ns
        req.cache_lookup_ms = (t1_ns - t0_ns) / 1e6
        if found is None:
            return
        try:
            self.backend.seq_restore(req.seq_id, found.state)
            copy_ns = time.perf_counter_ns() - t1_ns
            logits = found.logits
        except BackendError as exc:
            # A row under our fingerprint that llama.cpp rejects is broken: the store drops it, so it
            # neither answers later lookups nor blocks this worker's own save of the same tokens.
            log.warning("restoring a cached row failed, prefilling cold: %s", exc)
            self.cache.counters.restore_failures += 1
            self.backend.seq_clear(req.seq_id)
            found.close(bad=True)
            return
        found.close()
        if self.place(req, found.n_tokens, found.common, found.kind, logits):
            req.cache_tier = found.tier.value
            req.state_copy_ms = copy_ns / 1e6
            self.cache.count_hit(found, req.n_past, copy_ns)
            log.info(
                "restored %d prompt tokens from the %s tier (%s): lookup and load %.1f ms, state copy %.1f ms",
                req.n_past,
                req.cache_tier,
                found.kind.value,
                req.cache_lookup_ms,
                req.state_copy_ms,
            )
