from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.base import InvalidRequest
from engine.byte_tokenizer import EOS_ID, VOCAB_SIZE, ByteTokenizer


@given(st.text())
def test_any_text_round_trips(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(3 <= i < VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_one_id_per_utf8_byte() -> None:
    tok = ByteTokenizer()
    assert tok.encode("hé") == [ord("h") + 3, 0xC3 + 3, 0xA9 + 3]
    assert tok.vocab_size == 259 and tok.eos_token_id == EOS_ID == 1


def test_incomplete_utf8_tail_decodes_as_replacement_char() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("ok \N{GRINNING FACE}")
    assert tok.decode(ids[:-1]) == "ok \ufffd"
    assert tok.decode(ids) == "ok \N{GRINNING FACE}"


def test_specials_have_no_text_and_bad_ids_are_refused() -> None:
    tok = ByteTokenizer()
    assert tok.decode([0, *tok.encode("a"), EOS_ID, 2]) == "a"
    with pytest.raises(InvalidRequest, match=r"token id must be 0\.\.258 for the byte tokenizer, got 259"):
        tok.decode([259])
