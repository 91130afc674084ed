"""Where the worker saves a prompt's KV (pure policy, no processes)."""

from __future__ import annotations

from erllama.worker.kvcache import CachePolicy

POLICY = CachePolicy(min_tokens=64, cold_trim_tokens=32, cold_align_tokens=64, continued_interval_tokens=512)


def test_a_cold_prompt_is_saved_at_its_trimmed_aligned_boundary():
    assert POLICY.cold_save_at(1400, 0) == 1344
    assert POLICY.cold_save_at(90, 0) == 0  # the boundary (0) is below min_tokens


def test_a_prompt_restored_but_for_a_few_tokens_is_not_saved_again_before_it_finishes():
    # Turn 2 of a chat: 1,431 tokens restored, 151 new; the finish save follows shortly.
    assert POLICY.cold_save_at(1582, 1431) == 0


def test_a_prompt_with_a_long_new_part_after_its_cached_prefix_is_still_saved_cold():
    assert POLICY.cold_save_at(4000, 1000) == 3968
    assert POLICY.cold_save_at(4000, 3968) == 0  # the boundary is already in the cache
