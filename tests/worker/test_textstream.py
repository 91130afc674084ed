"""Streamed text is whole UTF-8 characters and stop strings are cut exactly."""

from hypothesis import given
from hypothesis import strategies as st

from erllama.worker.textstream import TextStream


def feed_all(ts: TextStream, pieces: list[bytes]) -> str:
    out = "".join(ts.feed(p) for p in pieces)
    return out + ts.flush()


def test_multibyte_character_split_across_tokens_is_held_until_complete():
    ts = TextStream()
    euro = "€".encode()  # 3 bytes
    assert ts.feed(euro[:1]) == ""
    assert ts.feed(euro[1:2]) == ""
    assert ts.feed(euro[2:] + b"!") == "€!"


def test_stop_spanning_two_tokens_is_cut_with_everything_after_it():
    ts = TextStream(stops=("END",))
    assert ts.feed(b"hello E") == "hello "
    assert ts.feed(b"ND and more") == ""
    assert ts.matched_stop == "END"
    assert ts.text == "hello "
    assert ts.flush() == ""


def test_leftmost_stop_wins_and_longest_breaks_a_tie():
    ts = TextStream(stops=("bc", "ab", "abc"))
    ts.feed(b"xxabcd")
    assert ts.matched_stop == "abc"
    assert ts.text == "xx"


def test_text_is_held_only_while_a_stop_could_still_match():
    ts = TextStream(stops=("STOP",))
    assert ts.feed(b"aST") == "a"
    assert ts.feed(b"x") == "STx"  # "STx" can no longer begin "STOP"
    assert ts.flush() == ""


def test_unfinished_stop_prefix_is_released_at_the_end():
    ts = TextStream(stops=("STOP",))
    assert ts.feed(b"abc STO") == "abc "
    assert ts.flush() == "STO"
    assert ts.matched_stop is None


@given(st.text(max_size=60), st.lists(st.integers(min_value=1, max_value=7), max_size=30))
def test_any_split_of_any_text_streams_back_the_same_text(text, cuts):
    data = text.encode()
    pieces, i = [], 0
    for c in cuts:
        pieces.append(data[i : i + c])
        i += c
    pieces.append(data[i:])
    ts = TextStream()
    assert feed_all(ts, pieces) == text


@given(st.text(alphabet="abcS", max_size=40), st.sampled_from(["Sa", "bS", "cc", "abc"]), st.integers(1, 5))
def test_stop_cut_equals_cut_of_the_whole_text(text, stop, step):
    data = text.encode()
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    ts = TextStream(stops=(stop,))
    out = feed_all(ts, pieces)
    at = text.find(stop)
    assert out == (text if at == -1 else text[:at])
