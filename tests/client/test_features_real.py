"""erllama 0.1-0.5 generation features, on the real default model through broker and worker."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from erllama import Client, ErllamaError
from tests.conftest import BrokerProcess, serving, wait_for
from tests.exactness import random_text
from tests.reference import assert_identical

MODEL = "feat"
THINK = {"start": "<think>", "end": "</think>"}
TOOLS = {"start": "<tool_call>", "end": "</tool_call>"}
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"}]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fb() -> Iterator[BrokerProcess]:
    with serving(
        "erl-f-",
        MODEL,
        env={"ERLLAMA_THINKING_SIGNING_KEY": "test-key"},
        n_ctx=2048,
        n_seq_max=3,
        thinking_markers=THINK,
        tool_call_markers=TOOLS,
        cache_min_tokens=16,
        cold_align_tokens=16,
        cold_trim_tokens=4,
    ) as bp:
        yield bp


@pytest.fixture
def c(fb: BrokerProcess) -> Iterator[Client]:
    client = Client(fb.endpoint, timeout_s=120)
    yield client
    client.close()


# --- chat templates -------------------------------------------------------------------------------------


def test_chat_template_renders_like_llama_cpp_python(c: Client):
    template = c.model_info(MODEL)["model"]["chat_template"]
    messages = CONVERSATION + [
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
    ]
    expected = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")(
        messages=messages
    ).prompt
    assert c.apply_chat_template(MODEL, messages) == c.tokenize(MODEL, expected, parse_special=True)


def test_chat_streams_a_reply_and_a_resent_conversation_hits_the_cache(c: Client):
    first = c.chat(MODEL, CONVERSATION, max_tokens=24).collect()
    assert first.finish_reason in ("stop", "length") and first.reply
    wait_for(lambda: c.cached_prefix_len(MODEL, first.context_tokens) >= len(first.context_tokens) - 1, 60)
    turn2 = CONVERSATION + [
        {"role": "assistant", "content": first.reply},
        {"role": "user", "content": "And Spain?"},
    ]
    second = c.chat(MODEL, turn2, max_tokens=8).collect()
    assert second.cache_hit_kind == "partial" and second.cache_delta["read"] >= 16


def test_content_blocks_are_invalid_content_and_a_model_without_template_is_no_template(c: Client):
    with pytest.raises(ErllamaError) as exc:
        c.apply_chat_template(MODEL, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert exc.value.code == "invalid_content"
    c.load_model("no-template", backend="stub")
    try:
        with pytest.raises(ErllamaError) as exc:
            c.apply_chat_template("no-template", CONVERSATION)
        assert exc.value.code == "no_template"
    finally:
        c.unload_model("no-template")


# --- grammar --------------------------------------------------------------------------------------------

COLOR_GRAMMAR = (
    r'root ::= "Colors: " color (", " color){2} "."' + '\ncolor ::= "red" | "green" | "blue" | "yellow"'
)
COLOR_RE = re.compile(r"^Colors: (red|green|blue|yellow)(, (red|green|blue|yellow)){2}\.$")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_output_always_parses_under_the_grammar_with_any_sampling(c: Client, seed: int):
    r = c.complete(
        MODEL,
        "Name three colors.",
        grammar=COLOR_GRAMMAR,
        temperature=1.0,
        top_k=40,
        seed=seed,
        max_tokens=40,
    )
    assert COLOR_RE.match(r.reply), r.reply


WORDS_GRAMMAR = r'root ::= ([a-z]+ " "){3,12} [a-z]+ "."'


def test_greedy_under_a_grammar_matches_the_reference_token_for_token(c: Client, reference: Any):
    """Greedy sampling tries the argmax against the grammar before constraining the whole vocabulary;
    the tokens must be those of llama.cpp's full constraint, on prompts of random words."""
    rng = random.Random(20261202)
    for i in range(6):
        prompt = reference.tokenize(random_text(rng, 40))
        result = c.complete(MODEL, prompt, grammar=WORDS_GRAMMAR, temperature=0, max_tokens=32)
        n = len(result.generated)
        ref = reference.greedy_under_grammar(prompt, n + 1, WORDS_GRAMMAR)  # up to its end-of-generation
        assert_identical(
            result.generated, ref[:n] if result.finish_reason == "length" else ref, f"prompt {i}"
        )


def test_a_bad_grammar_is_invalid_grammar_at_admission_and_the_worker_keeps_serving(c: Client):
    pid = c.model_info(MODEL)["worker_pid"]
    with pytest.raises(ErllamaError) as exc:
        c.complete(MODEL, "hi", grammar="root ::= ( unclosed")
    assert exc.value.code == "invalid_grammar"
    assert c.complete(MODEL, "hi", max_tokens=2).finish_reason == "length"
    assert c.model_info(MODEL)["worker_pid"] == pid


# --- embeddings -----------------------------------------------------------------------------------------


def test_embeddings_are_deterministic_unit_vectors_that_tell_inputs_apart(c: Client):
    a = c.embed(MODEL, "The cat sat on the mat.")
    b = c.embed(MODEL, "The cat sat on the mat.")
    other = c.embed(MODEL, c.tokenize(MODEL, "Quarterly revenue grew by four percent."))
    assert a == b and len(a) == 576
    assert abs(sum(x * x for x in a) - 1.0) < 1e-6
    assert sum(x * y for x, y in zip(a, other)) < 0.99


# --- thinking and tool calls ----------------------------------------------------------------------------

THINK_GRAMMAR = r'root ::= "<think>" [a-z ]{8,40} "</think>" " The answer is " [0-9] "."'
TOOL_GRAMMAR = r'root ::= "<tool_call>" "{\"name\": \"" [a-z_]{3,16} "\"}" "</tool_call>" " Done."'


def test_thinking_streams_deltas_then_exactly_one_signed_end_then_the_reply(c: Client):
    import hashlib
    import hmac

    stream = c.infer(
        MODEL, "Question: what is 2+2? Think first.", grammar=THINK_GRAMMAR, thinking=True, max_tokens=60
    )
    events = list(stream)
    kinds = [e.kind for e in events]
    assert kinds.count("thinking_end") == 1
    end = kinds.index("thinking_end")
    assert all(k == "thinking" for k in kinds[:end]) and all(k == "text" for k in kinds[end + 1 :])
    thinking = "".join(e.text for e in events[:end])
    assert events[end].text == thinking == stream.result.thinking[0]
    assert events[end].signature == hmac.new(b"test-key", thinking.encode(), hashlib.sha256).digest()
    assert stream.result.reply.startswith(" The answer is ")
    # the span's tokens stay in the context, so the row key describes the KV bytes
    assert stream.result.generated == [t for e in events for t in e.token_ids]


def test_a_thinking_budget_closes_the_block_early(c: Client):
    stream = c.infer(
        MODEL,
        "Question: what is 2+2? Think first.",
        grammar=THINK_GRAMMAR,
        thinking=True,
        thinking_budget_tokens=3,
        max_tokens=60,
    )
    events = list(stream)
    kinds = [e.kind for e in events]
    assert kinds.count("thinking_end") == 1
    assert (
        sum(len(e.token_ids) for e in events[: kinds.index("thinking_end")]) <= 3 + 8
    )  # budget + the start marker


def test_a_tool_call_streams_its_exact_bytes_and_is_byte_deterministic_from_a_fixed_prefix(c: Client):
    # The start marker is sampled like any text (the request's sampler may spell it with different
    # tokens); from there on, syntax tokens are greedy: one spelling of the start, one call.
    calls_by_start: dict[tuple[int, ...], set[str]] = {}
    for seed in range(1, 5):
        stream = c.infer(
            MODEL, "Call the weather tool.", grammar=TOOL_GRAMMAR, temperature=0.8, seed=seed, max_tokens=60
        )
        events = list(stream)
        deltas = "".join(e.text for e in events if e.kind == "tool_call")
        (end,) = [e for e in events if e.kind == "tool_call_end"]
        assert end.text == deltas == stream.result.tool_calls[0]
        assert deltas.startswith("<tool_call>") and deltas.endswith("</tool_call>")
        start_ids = tuple(t for e in events if e.kind == "tool_call" for t in e.token_ids)
        spelled = c.detokenize(MODEL, list(start_ids))
        start = start_ids[
            : next(
                i
                for i in range(1, len(start_ids) + 1)
                if c.detokenize(MODEL, list(start_ids[:i])) == "<tool_call>"
            )
        ]
        assert spelled == deltas
        calls_by_start.setdefault(start, set()).add(deltas)
    assert max(len(calls) for calls in calls_by_start.values()) == 1
    assert len(calls_by_start) < 4  # at least two runs shared a start spelling


# --- speculative decoding -------------------------------------------------------------------------------


def test_verify_accepts_the_model_s_own_draft_and_stops_at_a_wrong_candidate(c: Client):
    prefix = c.tokenize(MODEL, "The capital of France is")
    draft = c.draft_tokens(MODEL, prefix, 6)
    follow = c.complete(MODEL, prefix, max_tokens=7, temperature=0).generated
    accepted, nxt = c.verify(MODEL, prefix, draft)
    assert accepted == len(draft) == 6 and nxt == follow[6]
    wrong = draft[:2] + [(draft[2] + 1) % 49152] + draft[3:]
    accepted, nxt = c.verify(MODEL, prefix, wrong)
    assert accepted == 2 and nxt == draft[2]


def test_verify_leaves_running_requests_untouched(c: Client, fb: BrokerProcess):
    solo = c.complete(MODEL, "1, 2, 3, 4,", max_tokens=40).generated
    got: list[int] = []

    def stream() -> None:
        with Client(fb.endpoint) as other:
            got.extend(t for ev in other.infer(MODEL, "1, 2, 3, 4,", max_tokens=40) for t in ev.token_ids)

    t = threading.Thread(target=stream)
    t.start()
    prefix = c.tokenize(MODEL, "The capital of France is")
    for _ in range(3):
        c.verify(MODEL, prefix, c.draft_tokens(MODEL, prefix, 4))
    t.join(timeout=120)
    assert got == solo


# --- LoRA -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "adapter.gguf"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_lora.py"),
            "--out",
            str(out),
            "--rank",
            "8",
            "--scale-init",
            "0.2",
            "--seed",
            "7",
        ],
        check=True,
        timeout=300,
    )
    return out


def test_lora_scale_zero_equals_the_base_model_and_a_scale_changes_the_output(c: Client, lora: Path):
    prompt = "Once upon a time, in a small village,"
    base = c.complete(MODEL, prompt, max_tokens=16).generated
    handle = c.load_adapter(MODEL, str(lora))["handle"]
    try:
        assert [a["handle"] for a in c.list_adapters(MODEL)] == [handle]
        c.set_adapter_scale(MODEL, handle, 0.0)
        assert c.complete(MODEL, prompt, max_tokens=16).generated == base
        c.set_adapter_scale(MODEL, handle, 4.0)
        assert c.complete(MODEL, prompt, max_tokens=16).generated != base
    finally:
        assert c.unload_adapter(MODEL, handle) is True
    assert c.complete(MODEL, prompt, max_tokens=16).generated == base


def test_the_cache_never_crosses_adapter_sets(c: Client, lora: Path):
    prompt = c.tokenize(MODEL, "The lighthouse keeper climbed the stairs and wound the clock. " * 4)
    c.complete(MODEL, prompt, max_tokens=4)
    wait_for(lambda: c.cached_prefix_len(MODEL, prompt) >= len(prompt) - 8, 60)
    handle = c.load_adapter(MODEL, str(lora))["handle"]
    try:
        c.set_adapter_scale(MODEL, handle, 2.0)
        with_adapter = c.complete(MODEL, prompt, max_tokens=4)
        assert with_adapter.cache_hit_kind == "cold"  # the base model's rows are not served
    finally:
        c.unload_adapter(MODEL, handle)
    assert c.complete(MODEL, prompt, max_tokens=4).cache_hit_kind == "exact"  # back to the base rows


# --- resources ------------------------------------------------------------------------------------------


def test_vram_info_reports_no_gpu_cleanly(c: Client):
    with pytest.raises(ErllamaError) as exc:
        c.vram_info()
    assert exc.value.code == "no_gpu"
