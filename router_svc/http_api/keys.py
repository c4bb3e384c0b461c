"""API keys of the HTTP front: `Authorization: Bearer KEY` checked against a file and/or a setting.

The file holds one key per line (blank lines and `#` comments ignored). It
is stat()ed on every check and re-read when it changed (inode, size or
mtime), so keys rotate without a restart: write the new file next to the
old one and rename it over it. A file that becomes unreadable or empty
keeps the last keys it held (a half-written file must not lock everyone
out, or let everyone in), and the router logs why once.

Keys are compared with hmac.compare_digest against every key (time does not
depend on where a guess differs, nor on which key matched) and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def parse_keys(text: str) -> tuple[bytes, ...]:
    """Keys of a key file's text, or of a comma-separated setting. Pure."""
    keys = []
    for line in text.replace(",", "\n").splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key.encode())
    return tuple(keys)


def bearer_token(header: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None. Pure."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode()


def matches(token: bytes | None, keys: Iterable[bytes]) -> bool:
    """True when `token` is one of `keys`; compares against every key in constant time per key. Pure."""
    if token is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


class KeyFileError(Exception):
    """The key file cannot be read, or holds no key."""


class ApiKeys:
    """The keys in force now: those of `path` (re-read when it changes) plus the fixed `extra` ones."""

    def __init__(self, path: Path | None, extra: str = "") -> None:
        self.path = path
        self.extra = parse_keys(extra)
        self._stamp: tuple[int, int, int] | None = None
        self._file_keys: tuple[bytes, ...] = ()
        self._warned = ""
        if path is not None:
            self._reload(strict=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self.extra)

    def _reload(self, *, strict: bool = False) -> None:
        assert self.path is not None
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if stamp == self._stamp:
                return
            keys = parse_keys(self.path.read_text())
            if not keys:
                raise KeyFileError(f"API key file {self.path} holds no key")
        except (OSError, UnicodeDecodeError, KeyFileError) as exc:
            problem = str(exc) if isinstance(exc, KeyFileError) else f"cannot read API key file {self.path}: {exc}"
            if strict:
                raise KeyFileError(problem) from None
            if problem != self._warned:
                log.warning("%s; keeping the %d keys read before", problem, len(self._file_keys))
                self._warned = problem
            return
        if self._stamp is not None:
            log.info("API keys re-read", extra={"path": str(self.path), "keys": len(keys)})
        self._stamp, self._file_keys, self._warned = stamp, keys, ""

    def allows(self, authorization: str | None) -> bool:
        """True when auth is off, or the header carries a key in force now."""
        if not self.enabled:
            return True
        if self.path is not None:
            self._reload()
        return matches(bearer_token(authorization), (*self._file_keys, *self.extra))
