"""Echoing client input in error messages, safely.

An error message quotes what the client sent so a person can see what was
wrong, but grpc carries the message in a header: a 100 KB field echoed whole
exceeds the client's metadata limit and turns a clear INVALID_ARGUMENT into
a transport error. Quote through `clip`; `cap` bounds a whole message.
"""

from __future__ import annotations

MAX_DETAILS = 1024


def clip(value: object, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters with its full length noted."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, (str, bytes)) else len(text)
    return f"{text[:limit]}... ({size} characters)"


def cap(message: str, limit: int = MAX_DETAILS) -> str:
    """`message` cut to `limit` characters (a last guard at the point where a call is aborted)."""
    return message if len(message) <= limit else message[: limit - 14] + "... (truncated)"
