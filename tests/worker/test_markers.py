"""The span automaton classifies every sampled token exactly once, by whole marker sequences."""

from __future__ import annotations

import hashlib
import hmac

import llama_cpp as L
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from erllama.models import default_model_path
from erllama.protocol import ErllamaError
from erllama.worker.markers import (
    EventKind,
    MarkerKind,
    MarkerSpec,
    SamplerKind,
    SpanAutomaton,
    SpanEvent,
    SpanState,
    TokenRole,
)
from erllama.worker.stub_backend import StubBackend

K = EventKind
# A toy vocabulary: ids 0..9 are letters, 20.. are marker pieces.
VOCAB = {i: bytes([ord("a") + i]) for i in range(10)} | {
    20: b"<th",
    21: b"ink>",
    22: b"</th",
    23: b"<tool>",
    24: b"</tool>",
    25: b"<args>",
    26: b"</args>",
    27: b"",
}
THINK = ((20, 21), (22, 21))
TOOL = ((23,), (24,), (25,), (26,))


def run(
    auto: SpanAutomaton, ids: list[int], vocab: dict[int, bytes] = VOCAB, finish: bool = True
) -> list[SpanEvent]:
    out: list[SpanEvent] = []
    for t in ids:
        out += auto.feed(t, vocab[t])
    if finish:
        out += auto.finish()
    return out


def kinds(events: list[SpanEvent]) -> list[EventKind]:
    return [e.kind for e in events]


def auto(**kw) -> SpanAutomaton:
    kw.setdefault("spec", MarkerSpec.from_ids(thinking=THINK, tool_call=TOOL))
    kw.setdefault("thinking", True)
    return SpanAutomaton(**kw)


# --- plain text, thinking ----------------------------------------------------------------------------------


def test_text_without_markers_passes_through_one_event_per_token():
    a = auto()
    for t in (1, 2, 3):
        ev = a.feed(t, VOCAB[t])
        assert ev == [SpanEvent(K.TEXT, TokenRole.TEXT, (t,), VOCAB[t])]
        assert a.sampler_kind is SamplerKind.REQUEST
    assert a.finish() == []


def test_multi_token_thinking_block_is_start_deltas_end_then_text():
    ev = run(auto(), [1, 20, 21, 2, 3, 22, 21, 4])
    assert kinds(ev) == [K.TEXT, K.THINKING_START, K.THINKING_DELTA, K.THINKING_DELTA, K.THINKING_END, K.TEXT]
    assert ev[1].token_ids == (20, 21) and ev[1].data == b"<think>"
    assert ev[4].token_ids == (22, 21) and ev[4].data == b"</think>"
    assert ev[4].span == b"cd" and not ev[4].synthetic


def test_marker_prefix_is_held_without_events_until_it_completes():
    a = auto()
    assert a.feed(20, b"<th") == []
    assert a.held_tokens == 1 and a.state is SpanState.TEXT
    assert kinds(a.feed(21, b"ink>")) == [K.THINKING_START]
    assert a.state is SpanState.THINKING and a.held_tokens == 0


def test_false_start_releases_held_tokens_as_text_in_order():
    a = auto()
    assert a.feed(20, b"<th") == []
    ev = a.feed(5, b"f")
    assert ev == [
        SpanEvent(K.TEXT, TokenRole.TEXT, (20,), b"<th"),
        SpanEvent(K.TEXT, TokenRole.TEXT, (5,), b"f"),
    ]


def test_false_start_followed_directly_by_a_real_marker_still_matches():
    ev = run(auto(), [20, 20, 21, 1, 22, 21])
    assert kinds(ev) == [K.TEXT, K.THINKING_START, K.THINKING_DELTA, K.THINKING_END]
    assert ev[0].token_ids == (20,)


def test_a_shorter_marker_inside_a_diverging_longer_prefix_is_found():
    spec = MarkerSpec.from_ids(thinking=((1, 2, 3, 5), (9,)), tool_call=((2, 3), (8,)))
    ev = run(SpanAutomaton(spec, thinking=True), [1, 2, 3, 4, 8])
    assert kinds(ev) == [K.TEXT, K.TOOL_CALL_START, K.TOOL_CALL_DELTA, K.TOOL_CALL_END]
    assert ev[1].token_ids == (2, 3) and ev[2].token_ids == (4,)


def test_a_marker_spelled_with_other_tokens_matches_when_registered_as_an_alternative():
    # "<think>" as (20, 21) or as one id 30; "</think>" as (22, 21) or ids (31, 32).
    vocab = VOCAB | {30: b"<think>", 31: b"</", 32: b"think>"}
    spec = MarkerSpec.from_ids(thinking=([(20, 21), (30,)], [(22, 21), (31, 32)]))
    ev = run(SpanAutomaton(spec, thinking=True), [30, 1, 31, 32, 20, 21, 2, 22, 21], vocab)
    assert kinds(ev) == [K.THINKING_START, K.THINKING_DELTA, K.THINKING_END] * 2


def test_marker_split_differently_than_registered_is_text():
    vocab = VOCAB | {30: b"<think>"}
    ev = run(auto(), [30, 1], vocab)
    assert kinds(ev) == [K.TEXT, K.TEXT]


def test_thinking_disabled_makes_thinking_markers_ordinary_text():
    ev = run(auto(thinking=False), [20, 21, 1, 22, 21])
    assert kinds(ev) == [K.TEXT] * 5


def test_several_thinking_blocks_each_get_exactly_one_end():
    ev = run(auto(), [20, 21, 1, 22, 21, 2, 20, 21, 3, 22, 21])
    assert kinds(ev).count(K.THINKING_END) == 2
    assert [e.span for e in ev if e.kind is K.THINKING_END] == [b"b", b"d"]


def test_thinking_signature_is_hmac_sha256_of_the_block_bytes():
    key = b"secret"
    ev = run(auto(signing_key=key), [20, 21, 1, 2, 22, 21])
    end = ev[-1]
    assert end.signature == hmac.new(key, b"bc", hashlib.sha256).digest()
    assert run(auto(), [20, 21, 1, 22, 21])[-1].signature == b""


def test_start_in_thinking_treats_the_first_tokens_as_thinking():
    ev = run(auto(start_in_thinking=True), [1, 22, 21, 2])
    assert kinds(ev) == [K.THINKING_DELTA, K.THINKING_END, K.TEXT]


# --- budget -------------------------------------------------------------------------------------------------


def test_budget_closes_the_block_with_one_synthetic_end_and_later_thinking_is_text():
    a = auto(thinking_budget_tokens=2, signing_key=b"k")
    ev = run(a, [20, 21, 1, 2, 3, 22, 21, 20, 21, 4])
    assert kinds(ev) == [K.THINKING_START, K.THINKING_DELTA, K.THINKING_DELTA, K.THINKING_END] + [K.TEXT] * 6
    end = ev[3]
    assert end.synthetic and end.token_ids == () and end.span == b"bc"
    assert end.signature == hmac.new(b"k", b"bc", hashlib.sha256).digest()
    assert a.capped and a.thinking_tokens == 2
    assert b"".join(e.data for e in ev[4:]) == b"d</think><think>e"  # the model's own markers are text now


def test_budget_counts_across_blocks():
    ev = run(auto(thinking_budget_tokens=3), [20, 21, 1, 2, 22, 21, 20, 21, 3, 4])
    assert kinds(ev) == [
        K.THINKING_START,
        K.THINKING_DELTA,
        K.THINKING_DELTA,
        K.THINKING_END,
        K.THINKING_START,
        K.THINKING_DELTA,
        K.THINKING_END,
        K.TEXT,
    ]
    assert ev[6].synthetic


def test_budget_must_be_positive():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            auto(thinking_budget_tokens=bad)


# --- tool calls ---------------------------------------------------------------------------------------------


def test_tool_call_roles_sampler_kinds_and_full_span():
    a = auto()
    steps = [  # token, expected event kinds, role of the last event, sampler for the next token
        (1, [K.TEXT], TokenRole.TEXT, SamplerKind.REQUEST),
        (23, [K.TOOL_CALL_START], TokenRole.MARKER, SamplerKind.GREEDY),
        (2, [K.TOOL_CALL_DELTA], TokenRole.TOOL_SYNTAX, SamplerKind.GREEDY),
        (25, [K.TOOL_CALL_DELTA], TokenRole.MARKER, SamplerKind.REQUEST),
        (3, [K.TOOL_CALL_DELTA], TokenRole.TOOL_PAYLOAD, SamplerKind.REQUEST),
        (27, [K.TOOL_CALL_DELTA], TokenRole.TOOL_PAYLOAD, SamplerKind.REQUEST),  # empty bytes still counted
        (26, [K.TOOL_CALL_DELTA], TokenRole.MARKER, SamplerKind.GREEDY),
        (4, [K.TOOL_CALL_DELTA], TokenRole.TOOL_SYNTAX, SamplerKind.GREEDY),
        (24, [K.TOOL_CALL_END], TokenRole.MARKER, SamplerKind.REQUEST),
        (5, [K.TEXT], TokenRole.TEXT, SamplerKind.REQUEST),
    ]
    events: list[SpanEvent] = []
    for tok, want, role, sampler in steps:
        ev = a.feed(tok, VOCAB[tok])
        assert kinds(ev) == want, tok
        assert ev[-1].role is role
        assert a.sampler_kind is sampler
        events += ev
    end = next(e for e in events if e.kind is K.TOOL_CALL_END)
    assert end.span == b"<tool>c<args>d</args>e</tool>"
    start = events.index(next(e for e in events if e.kind is K.TOOL_CALL_START))
    assert end.span == b"".join(e.data for e in events[start : events.index(end) + 1])


def test_tool_end_closes_an_open_payload():
    spec = MarkerSpec.from_ids(tool_call=((23,), (24,), (25,)))
    a = SpanAutomaton(spec)
    ev = run(a, [23, 1, 25, 2, 24, 3])
    assert kinds(ev) == [
        K.TOOL_CALL_START,
        K.TOOL_CALL_DELTA,
        K.TOOL_CALL_DELTA,
        K.TOOL_CALL_DELTA,
        K.TOOL_CALL_END,
        K.TEXT,
    ]
    assert ev[3].role is TokenRole.TOOL_PAYLOAD and ev[4].span == b"<tool>b<args>c</tool>"


def test_thinking_precedes_a_tool_call_and_tool_markers_inside_thinking_are_thinking():
    ev = run(auto(), [20, 21, 23, 1, 22, 21, 23, 2, 24])
    assert kinds(ev) == [
        K.THINKING_START,
        K.THINKING_DELTA,
        K.THINKING_DELTA,
        K.THINKING_END,
        K.TOOL_CALL_START,
        K.TOOL_CALL_DELTA,
        K.TOOL_CALL_END,
    ]


def test_tool_calls_off_leaves_tool_markers_as_text():
    assert kinds(run(auto(tool_calls=False), [23, 1, 24])) == [K.TEXT] * 3


# --- finish -------------------------------------------------------------------------------------------------


def test_finish_releases_a_held_prefix_as_text():
    a = auto()
    assert a.feed(20, b"<th") == []
    assert a.finish() == [SpanEvent(K.TEXT, TokenRole.TEXT, (20,), b"<th")]


def test_finish_inside_thinking_emits_one_synthetic_end():
    ev = run(auto(), [20, 21, 1, 22])  # "</th" held, then released at finish as thinking
    assert kinds(ev) == [K.THINKING_START, K.THINKING_DELTA, K.THINKING_DELTA, K.THINKING_END]
    assert ev[-1].synthetic and ev[-1].span == b"b</th"


def test_finish_inside_a_tool_call_emits_a_synthetic_end_with_the_partial_span():
    ev = run(auto(), [23, 1, 2])
    assert ev[-1].kind is K.TOOL_CALL_END and ev[-1].synthetic and ev[-1].span == b"<tool>bc"


def test_feed_after_finish_is_an_error_and_finish_is_idempotent():
    a = auto()
    a.finish()
    assert a.finish() == []
    with pytest.raises(RuntimeError):
        a.feed(1, b"b")


# --- spec construction --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"thinking": ((1,), (2,)), "tool_call": ((1, 3), (4,))},  # thinking start is a prefix of tool start
        {"tool_call": ((1,), (2, 3), (2,))},  # payload start is a prefix of tool end
        {"tool_call": ((1,), (2,), (3,), (2,))},  # payload end equals tool end
        {"tool_call": ((1,), (2,), None, (3,))},  # payload end without payload start
        {"tool_call": ((1,), ())},
        {"thinking": ((1,), None)},
        {"thinking": ((-1,), (2,))},
    ],
)
def test_ambiguous_or_incomplete_markers_are_rejected(kw):
    with pytest.raises(ValueError):
        MarkerSpec.from_ids(**kw)


def test_markers_that_overlap_only_across_states_are_accepted():
    MarkerSpec.from_ids(thinking=((1, 2), (1,)), tool_call=((3,), (1, 2)))


def test_from_text_tokenizes_erllama_style_marker_options():
    stub = StubBackend(n_ctx=64, n_seq_max=1, n_batch=8)
    tok = lambda s: stub.tokenize(s, add_special=False)
    spec = MarkerSpec.from_text(
        tok, {"start": "<think>", "end": "</think>"}, {"start": "<tool_call>", "end": "</tool_call>"}
    )
    assert spec.markers[MarkerKind.THINKING_START] == (tuple(tok("<think>")),)
    assert spec.has_thinking and spec.has_tool_calls
    assert MarkerKind.PAYLOAD_START not in spec.markers
    for bad in (
        {"start": "", "end": "x"},
        {"start": 3, "end": "x"},
        {"start": "<s>", "end": "<a>b", "payload_start": "<a>"},
        {"start": "<s>", "end": "</s>", "payload_begin": "<a>"},
    ):
        with pytest.raises(ErllamaError) as ei:
            MarkerSpec.from_text(tok, None, bad)
        assert ei.value.code == "invalid_params"


def test_byte_level_markers_over_stub_tokens_route_a_whole_conversation():
    stub = StubBackend(n_ctx=64, n_seq_max=1, n_batch=8)
    tok = lambda s: stub.tokenize(s, add_special=False)
    spec = MarkerSpec.from_text(
        tok, {"start": "<think>", "end": "</think>"}, {"start": "<tool_call>", "end": "</tool_call>"}
    )
    text = 'a <th<think>x</thin k</think><tool><tool_call>{"n": 1}</tool_call>ok'
    ids = tok(text)
    ev = run(SpanAutomaton(spec, thinking=True), ids, {t: stub.token_bytes(t) for t in ids})
    joined = {k: b"".join(e.data for e in ev if e.kind is k) for k in K}
    assert joined[K.TEXT] == b"a <th<tool>ok"
    assert joined[K.THINKING_DELTA] == b"x</thin k"
    assert [e.span for e in ev if e.kind is K.TOOL_CALL_END] == [b'<tool_call>{"n": 1}</tool_call>']


def test_markers_tokenized_by_the_real_vocabulary_match_the_model_spelling():
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(default_model_path()).encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    try:

        def tok(s: str) -> list[int]:
            buf = (L.llama_token * 256)()
            n = L.llama_tokenize(vocab, s.encode(), len(s.encode()), buf, 256, False, True)
            return list(buf[:n])

        def piece(t: int) -> bytes:
            buf = L.ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(vocab, t, buf, 64, 0, False)
            return buf.raw[:n]

        spec = MarkerSpec.from_text(
            tok, {"start": "<think>", "end": "</think>"}, {"start": "<|im_start|>tool", "end": "<|im_end|>"}
        )
        assert len(spec.markers[MarkerKind.THINKING_START][0]) > 1  # multi-token in SmolLM2's vocabulary
        ids = tok("<think>") + tok("Paris is big.") + tok("</think>") + tok("\n") + tok("<|im_start|>tool")
        ids += tok('{"x": 1}') + tok("<|im_end|>") + tok("Done")
        ev = run(SpanAutomaton(spec, thinking=True), ids, {t: piece(t) for t in ids})
        assert [e.kind for e in ev if e.kind not in (K.TEXT, K.THINKING_DELTA, K.TOOL_CALL_DELTA)] == [
            K.THINKING_START,
            K.THINKING_END,
            K.TOOL_CALL_START,
            K.TOOL_CALL_END,
        ]
        assert next(e for e in ev if e.kind is K.THINKING_END).span == b"Paris is big."
        assert b"".join(e.data for e in ev if e.kind is K.TEXT) == b"\nDone"
    finally:
        L.llama_model_free(model)


# --- properties ---------------------------------------------------------------------------------------------

ALPHABET = 5  # few ids, so random streams hit markers and near-misses often


def reference(spec: MarkerSpec, ids: list[int], thinking: bool, budget: int | None) -> list[tuple]:
    """Offline leftmost matching over the complete stream: what the online automaton must equal."""
    m = spec.markers
    state, count, capped, i, out = "text", 0, False, 0, []
    while i < len(ids):
        kinds_here = {
            "text": ([MarkerKind.THINKING_START] if thinking and not capped else [])
            + [MarkerKind.TOOL_START],
            "think": [MarkerKind.THINKING_END],
            "syntax": [MarkerKind.TOOL_END, MarkerKind.PAYLOAD_START],
            "payload": [MarkerKind.PAYLOAD_END, MarkerKind.TOOL_END],
        }[state]
        hit = next(
            ((k, s) for k in kinds_here for s in m.get(k, ()) if tuple(ids[i : i + len(s)]) == s), None
        )
        if hit:
            k, s = hit
            ev = {
                MarkerKind.THINKING_START: K.THINKING_START,
                MarkerKind.THINKING_END: K.THINKING_END,
                MarkerKind.TOOL_START: K.TOOL_CALL_START,
                MarkerKind.TOOL_END: K.TOOL_CALL_END,
            }.get(k, K.TOOL_CALL_DELTA)
            out.append((ev, s, False))
            state = {
                MarkerKind.THINKING_START: "think",
                MarkerKind.THINKING_END: "text",
                MarkerKind.TOOL_START: "syntax",
                MarkerKind.TOOL_END: "text",
                MarkerKind.PAYLOAD_START: "payload",
                MarkerKind.PAYLOAD_END: "syntax",
            }[k]
            i += len(s)
            continue
        tok = (ids[i],)
        i += 1
        if state == "text":
            out.append((K.TEXT, tok, False))
        elif state == "think":
            out.append((K.THINKING_DELTA, tok, False))
            count += 1
            if budget is not None and count >= budget:
                out.append((K.THINKING_END, (), True))
                state, capped = "text", True
        else:
            out.append((K.TOOL_CALL_DELTA, tok, False))
    if state == "think":
        out.append((K.THINKING_END, (), True))
    elif state in ("syntax", "payload"):
        out.append((K.TOOL_CALL_END, (), True))
    return out


seq = st.lists(st.integers(0, ALPHABET - 1), min_size=1, max_size=3).map(tuple)


@st.composite
def scenarios(draw):
    thinking = (draw(seq), draw(seq)) if draw(st.booleans()) else None
    tool = None
    if draw(st.booleans()):
        payload = draw(st.sampled_from(["none", "start", "both"]))
        tool = (
            draw(seq),
            draw(seq),
            draw(seq) if payload != "none" else None,
            draw(seq) if payload == "both" else None,
        )
    try:
        spec = MarkerSpec.from_ids(thinking=thinking, tool_call=tool)
    except ValueError:
        assume(False)
    vocab = {i: draw(st.binary(max_size=3)) for i in range(ALPHABET)}
    ids = draw(st.lists(st.integers(0, ALPHABET - 1), max_size=60))
    return spec, vocab, ids, draw(st.booleans()), draw(st.one_of(st.none(), st.integers(1, 6)))


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_online_classification_equals_offline_leftmost_matching(sc):
    spec, vocab, ids, thinking, budget = sc
    ev = run(SpanAutomaton(spec, thinking=thinking, thinking_budget_tokens=budget), ids, vocab)
    assert [(e.kind, e.token_ids, e.synthetic) for e in ev] == reference(spec, ids, thinking, budget)


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_every_token_and_byte_comes_out_once_in_order_and_spans_are_well_formed(sc):
    spec, vocab, ids, thinking, budget = sc
    a = SpanAutomaton(spec, thinking=thinking, thinking_budget_tokens=budget, signing_key=b"k")
    ev: list[SpanEvent] = []
    for t in ids:
        got = a.feed(t, vocab[t])
        ev += got
        assert a.sampler_kind is (
            SamplerKind.GREEDY if a.state is SpanState.TOOL_SYNTAX else SamplerKind.REQUEST
        )
        assert a.held_tokens < 3  # never more than a marker's length minus one
    ev += a.finish()
    assert [t for e in ev for t in e.token_ids] == ids
    assert b"".join(e.data for e in ev) == b"".join(vocab[t] for t in ids)
    assert all(e.data == b"".join(vocab[t] for t in e.token_ids) for e in ev)
    # Grammar: spans open and close exactly once; only their deltas come in between.
    open_kind, deltas, tool_bytes = None, [], b""
    for e in ev:
        if e.kind is K.THINKING_START:
            assert open_kind is None
            open_kind, deltas = K.THINKING_START, []
        elif e.kind is K.THINKING_DELTA:
            assert open_kind is K.THINKING_START
            deltas.append(e.data)
        elif e.kind is K.THINKING_END:
            assert open_kind is K.THINKING_START
            assert e.span == b"".join(deltas)
            assert e.signature == hmac.new(b"k", e.span, hashlib.sha256).digest()
            open_kind = None
        elif e.kind is K.TOOL_CALL_START:
            assert open_kind is None
            open_kind, tool_bytes = K.TOOL_CALL_START, e.data
        elif e.kind is K.TOOL_CALL_DELTA:
            assert open_kind is K.TOOL_CALL_START
            tool_bytes += e.data
        elif e.kind is K.TOOL_CALL_END:
            assert open_kind is K.TOOL_CALL_START and e.span == tool_bytes + e.data
            open_kind = None
        else:
            assert open_kind is None
    assert open_kind is None
    n_thinking = sum(e.kind is K.THINKING_DELTA for e in ev)
    assert budget is None or n_thinking <= budget
    assert sum(e.kind is K.THINKING_END for e in ev) == sum(e.kind is K.THINKING_START for e in ev)
