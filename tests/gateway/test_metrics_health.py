"""``/metrics`` is Prometheus text that ``prometheus_client``'s own parser reads, and its counters move
as requests are served."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REAL_MODEL_ID
from tests.gateway.conftest import GatewayProcess, auth

MODEL = REAL_MODEL_ID


def scrape(gateway: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{gateway.url}/metrics", headers=auth())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_their_counters_move_as_requests_are_served(
    gateway: GatewayProcess, oai: openai.OpenAI
):
    before = scrape(gateway)
    r = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    after = scrape(gateway)
    generated = value(after, "erllama_tokens_total", model=MODEL, kind="generated")
    assert generated - value(before, "erllama_tokens_total", model=MODEL, kind="generated") == 5
    prompted = value(after, "erllama_tokens_total", model=MODEL, kind="prompted")
    assert (
        prompted - value(before, "erllama_tokens_total", model=MODEL, kind="prompted")
        == r.usage.prompt_tokens
    )
    done = {"model": MODEL, "endpoint": "completions", "outcome": "finished_length"}
    assert (
        value(after, "erllama_requests_total", **done) == value(before, "erllama_requests_total", **done) + 1
    )
    ttft = value(after, "erllama_time_to_first_token_seconds_count", model=MODEL)
    assert ttft == value(before, "erllama_time_to_first_token_seconds_count", model=MODEL) + 1
    assert value(after, "erllama_broker_up") == 1.0
    assert value(after, "erllama_model_ready", model=MODEL, state="ready") == 1.0
    assert value(after, "erllama_slots", model=MODEL) == 4
    assert ("erllama_cache_tier_bytes", (("tier", "ram"),)) in after


def test_a_refused_request_is_counted_by_its_outcome(gateway: GatewayProcess, oai: openai.OpenAI):
    key = {"model": "no-such-model", "endpoint": "chat", "outcome": "error_model_not_found"}
    before = value(scrape(gateway), "erllama_requests_total", **key)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert value(scrape(gateway), "erllama_requests_total", **key) == before + 1
