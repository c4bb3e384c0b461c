"""API keys of the HTTP front (router_svc.http_api.keys): parsing, matching, rotation through the file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from router_svc.http_api.keys import ApiKeys, KeyFileError, bearer_token, matches, parse_keys


def test_a_key_file_holds_one_key_a_line_with_comments_and_blanks() -> None:
    assert parse_keys("# production\nsk-one\n\n  sk-two  \n#sk-old\n") == (b"sk-one", b"sk-two")


def test_the_setting_is_comma_separated() -> None:
    assert parse_keys("sk-a, sk-b,") == (b"sk-a", b"sk-b")


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer sk-1", b"sk-1"), ("bearer   sk-1 ", b"sk-1"), ("Basic c2stMQ==", None), ("Bearer", None), ("", None),
    (None, None),
])
def test_only_a_bearer_header_carries_a_token(header: str | None, token: bytes | None) -> None:
    assert bearer_token(header) == token


def test_a_token_matches_any_of_the_keys_and_nothing_else() -> None:
    keys = (b"sk-one", b"sk-two")
    assert matches(b"sk-two", keys) and matches(b"sk-one", keys)
    assert not matches(b"sk-tw", keys) and not matches(b"sk-one ", keys) and not matches(None, keys)
    assert not matches(b"sk-one", ())


def test_without_keys_auth_is_off() -> None:
    keys = ApiKeys(None, "")
    assert not keys.enabled and keys.allows(None)


def test_keys_from_the_setting_are_checked() -> None:
    keys = ApiKeys(None, "sk-a,sk-b")
    assert keys.enabled and keys.allows("Bearer sk-b") and not keys.allows("Bearer sk-c") and not keys.allows(None)


def write(path: Path, text: str) -> None:
    # As an operator rotates: a new file renamed over the old one.
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_rotated_key_file_takes_effect_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    write(path, "sk-old\n")
    keys = ApiKeys(path)
    assert keys.allows("Bearer sk-old") and not keys.allows("Bearer sk-new")
    write(path, "sk-old\nsk-new\n")  # both during the switch-over
    assert keys.allows("Bearer sk-old") and keys.allows("Bearer sk-new")
    write(path, "sk-new\n")
    assert not keys.allows("Bearer sk-old") and keys.allows("Bearer sk-new")


def test_a_key_file_that_breaks_keeps_the_last_keys_and_says_so_without_the_keys(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    write(path, "sk-secret-1\n")
    keys = ApiKeys(path)
    write(path, "# emptied by a half-done edit\n")
    with caplog.at_level(logging.WARNING):
        assert keys.allows("Bearer sk-secret-1")
    path.unlink()
    with caplog.at_level(logging.WARNING):
        assert keys.allows("Bearer sk-secret-1") and not keys.allows("Bearer other")
    assert "holds no key" in caplog.text and "cannot read" in caplog.text
    assert "sk-secret-1" not in caplog.text


def test_a_missing_or_empty_key_file_stops_the_router_at_start(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        ApiKeys(tmp_path / "absent")
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(KeyFileError, match="holds no key"):
        ApiKeys(tmp_path / "empty")
