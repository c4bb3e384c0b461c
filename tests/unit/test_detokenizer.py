"""Streaming detokenizer: whole characters only, stop strings cut exactly, any chunking."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.base import Tokenizer
from engine.detokenizer import Detokenizer, IncrementalDecoder, StopMatcher


class Bytes(Tokenizer):
    """ids = UTF-8 bytes. Records the longest id list it was asked to decode."""

    def __init__(self) -> None:
        self.longest_decode = 0
        self.decodes = 0

    @property
    def eos_token_id(self) -> int | None:
        return None

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int]) -> str:
        self.longest_decode = max(self.longest_decode, len(token_ids))
        self.decodes += 1
        return bytes(token_ids).decode("utf-8", errors="replace")


class Pieces(Tokenizer):
    """SentencePiece-like: "▁" marks a space, the text's leading space is dropped,
    and <0xNN> pieces are raw bytes. A token decodes differently alone than in context."""

    PIECES = ["▁hello", "▁world", "lo", "▁", "!", "▁你", *(f"<0x{b:02X}>" for b in range(256))]

    @property
    def eos_token_id(self) -> int | None:
        return None

    @property
    def vocab_size(self) -> int:
        return len(self.PIECES)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, token_ids: list[int]) -> str:
        out = bytearray()
        for i in token_ids:
            piece = self.PIECES[i]
            if piece.startswith("<0x"):
                out.append(int(piece[3:5], 16))
            else:
                out += piece.replace("▁", " ").encode()
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def stream(detok: Detokenizer, ids: Sequence[int], sizes: Sequence[int] = (1,)) -> list[str]:
    """Feeds `ids` in chunks of the given sizes (cycled); returns every delta's text."""
    deltas, at, k = [], 0, 0
    while at < len(ids) and not detok.stopped:
        size = max(1, sizes[k % len(sizes)])
        deltas.append(detok.feed(ids[at : at + size]).text)
        at, k = at + size, k + 1
    deltas.append(detok.finish().text)
    return deltas


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Reference: text before the stop string that completes first (ties: the longer one)."""
    best = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (best is None or (at + len(stop), at) < best):
            best = (at + len(stop), at)
    return text if best is None else text[: best[1]]


@pytest.mark.parametrize("text", ["héllo", "你好", "rocket 🚀!", "a\u0301 e\u0301", "🚀🚀你é"])
def test_multibyte_characters_are_never_split(text: str) -> None:
    tok = Bytes()
    detok = Detokenizer(tok)
    deltas = stream(detok, tok.encode(text))
    assert "".join(deltas) == text == detok.text
    for delta in deltas:
        assert "\ufffd" not in delta


def test_a_four_byte_character_arrives_whole_on_its_last_byte() -> None:
    detok = Detokenizer(Bytes())
    assert [detok.feed([b]).text for b in "🚀".encode()] == ["", "", "", "🚀"]


def test_an_incomplete_character_at_the_end_flushes_as_replacement() -> None:
    detok = Detokenizer(Bytes())
    assert detok.feed([0x41, 0xE4, 0xBD]).text == "A"
    assert detok.finish().text == "\ufffd"
    assert detok.finish().text == ""


def test_stop_string_cuts_the_output_and_reports_the_token() -> None:
    tok = Bytes()
    detok = Detokenizer(tok, stop=["STOP"])
    ids = tok.encode("Hello STOP world")
    first = detok.feed(ids[:8])  # "Hello ST": "ST" may start the stop string
    assert first.text == "Hello " and not first.stopped and first.consumed == 8
    second = detok.feed(ids[8:])
    assert second.stopped and second.stop == "STOP" and second.text == ""
    assert second.consumed == 2  # "O" and "P"; " world" is not taken
    assert detok.feed(tok.encode("more")).consumed == 0
    assert detok.finish().text == "" and detok.text == "Hello "


def test_a_false_start_of_a_stop_string_is_released() -> None:
    tok = Bytes()
    detok = Detokenizer(tok, stop=["STOP"])
    assert detok.feed(tok.encode("ST")).text == ""
    assert detok.feed(tok.encode("AR")).text == "STAR"
    assert detok.feed(tok.encode("S")).text == ""
    assert detok.finish().text == "S"


def test_stop_string_with_multibyte_characters() -> None:
    tok = Bytes()
    detok = Detokenizer(tok, stop=["好🚀"])
    deltas = stream(detok, tok.encode("你好 你好🚀 tail"))
    assert "".join(deltas) == "你好 你" and detok.stopped


def test_the_stop_string_that_completes_first_wins() -> None:
    tok = Bytes()
    for sizes in ([1], [4], [2, 1]):
        detok = Detokenizer(tok, stop=["abcd", "bc"])
        assert "".join(stream(detok, tok.encode("xabcd"), sizes)) == "xa"


def test_tokens_that_decode_differently_in_context() -> None:
    tok = Pieces()
    ids = [0, 1, 3, 4, 2, 5]  # "▁hello▁world▁!lo▁你" -> "hello world !lo 你"
    detok = Detokenizer(tok)
    deltas = stream(detok, ids)
    assert "".join(deltas) == tok.decode(ids) == "hello world !lo 你"
    assert deltas[1] == " world"  # the space a lone "▁world" would lose


def test_context_ids_give_the_first_token_its_leading_space() -> None:
    tok = Pieces()
    detok = Detokenizer(tok, context_ids=[0])  # the prompt "hello"
    assert detok.feed([1]).text == " world"


def test_byte_fallback_pieces_join_into_characters() -> None:
    tok = Pieces()
    rocket = [6 + b for b in "🚀".encode()]
    detok = Detokenizer(tok)
    assert [detok.feed([i]).text for i in [0, *rocket]] == ["hello", "", "", "", "🚀"]


def test_a_long_run_of_invalid_bytes_keeps_the_window_short() -> None:
    tok = Bytes()
    ids = [0x80] * 2000 + list("é".encode())
    detok = Detokenizer(tok)
    deltas = stream(detok, ids)
    assert tok.longest_decode <= 16
    assert "".join(deltas) == Bytes().decode(ids)


def test_a_whole_answer_is_decoded_once_not_per_token() -> None:
    # The router detokenizes a non-streamed answer in one batch: its cost must not grow per token.
    tok = Bytes()
    text = "a whole answer of many tokens, héllo 🚀 " * 8
    detok = Detokenizer(tok, context_ids=tok.encode("prompt"))
    before = tok.decodes
    assert detok.feed(tok.encode(text)).text + detok.finish().text == text
    assert tok.decodes - before <= 3


def test_a_batch_ending_mid_character_holds_the_partial_character_back() -> None:
    tok = Bytes()
    detok = Detokenizer(tok)
    rocket = list("🚀".encode())
    assert detok.feed([*tok.encode("ok "), *rocket[:2]]).text == "ok "
    assert detok.feed(rocket[2:]).text == "🚀"


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        StopMatcher(["ok", ""])


def test_decoder_reports_generated_ids_without_context() -> None:
    decoder = IncrementalDecoder(Bytes(), context_ids=[65, 66])
    for b in b"xy":
        decoder.push(b)
    assert decoder.generated_ids == [120, 121]


chunkings = st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40), sizes=chunkings, data=st.data())
def test_deltas_join_to_the_decoded_text_cut_at_the_stop_string(
    text: str, sizes: list[int], data: st.DataObject
) -> None:
    # Stop strings: some drawn from the text itself so they do match, some random.
    stops = data.draw(st.lists(st.text(min_size=1, max_size=4), max_size=2))
    if text and data.draw(st.booleans()):
        start = data.draw(st.integers(0, len(text) - 1))
        stops.append(text[start : start + data.draw(st.integers(1, 5))])
    tok = Bytes()
    ids = tok.encode(text)
    detok = Detokenizer(tok, stop=stops)
    deltas = stream(detok, ids, sizes)
    expected = cut_at_stop(text, stops)
    assert "".join(deltas) == expected
    assert detok.stopped == (expected != text or any(s in text for s in stops))
    for delta in deltas:
        assert "\ufffd" not in delta


# Bytes that start, continue, break and complete multibyte characters, so long
# runs of undecidable tails (the settle path) come up often.
tricky_bytes = st.lists(st.sampled_from(b"\x80\xe4\xbd\xa0\xf0\x9f\x9a\x80\xc3\xa9\xffA"), max_size=80).map(bytes)


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.binary(max_size=60), tricky_bytes), sizes=chunkings)
def test_arbitrary_bytes_join_to_their_lossy_decoding(raw: bytes, sizes: list[int]) -> None:
    tok = Bytes()
    detok = Detokenizer(tok)
    assert "".join(stream(detok, list(raw), sizes)) == tok.decode(list(raw))


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, len(Pieces.PIECES) - 1), max_size=30), sizes=chunkings)
def test_context_sensitive_tokenizer_joins_to_the_whole_decoding(ids: list[int], sizes: list[int]) -> None:
    tok = Pieces()
    assert "".join(stream(Detokenizer(tok), ids, sizes)) == tok.decode(ids)
