"""Streaming detokenization: token ids in, text deltas out, stop strings applied.

    detok = Detokenizer(tokenizer, stop=("\\n\\n",))
    for batch in steps:
        delta = detok.feed(batch)        # delta.text: new text, never half a character
        send(batch[:delta.consumed], delta.text)
        if delta.stopped:
            break                        # a stop string matched; cancel generation
    tail = detok.finish()                # the text held back so far

Contract: the concatenation of every delta's text (feed and finish) equals
`tokenizer.decode(all ids)` cut before the first stop string to complete,
and each delta is whole characters.

Two stages, each usable alone:

- `IncrementalDecoder` keeps a window of ids and decodes it whole (the
  prefix-offset technique), because many tokenizers decode a token
  differently alone than in context (SentencePiece's leading space, byte
  fallback). It holds text back while the window's decoding ends in U+FFFD:
  the bytes of a character may still be arriving.
- `StopMatcher` holds back any tail that could be the start of a stop
  string until the next text decides it.

Not thread-safe: one instance per sequence, fed from one task.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.base import Tokenizer

REPLACEMENT = "\ufffd"
# Ids of context decoded ahead of the first new token, so it decodes as it
# would in place (a leading space, a merge across the boundary).
CONTEXT_TOKENS = 6
# A UTF-8 character spans at most 4 bytes; with tokens of at least one byte
# an incomplete character involves at most the last 4 ids. Past this many
# held ids the text before those last 4 is settled, so the window stays
# short even when a model emits invalid bytes over and over.
MAX_HELD_TOKENS = 8
_LOOKAHEAD = 4


class IncrementalDecoder:
    """Token ids -> text deltas that never end in an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()) -> None:
        """`context_ids`: ids already decoded elsewhere (the prompt); their text is not emitted."""
        self._tokenizer = tokenizer
        # Only the tail of the context is ever decoded again.
        self._ids: list[int] = list(context_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = max(0, len(self._ids) - CONTEXT_TOKENS)
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._generated = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        ids = self._ids[start:end]
        return self._tokenizer.decode(ids) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one id; returns the text it completes ("" while held back)."""
        self._ids.append(token_id)
        self._generated += 1
        new_text = self._decode(self._prefix_offset)
        if len(new_text) > len(self._prefix_text) and not new_text.endswith(REPLACEMENT):
            return self._advance(new_text, len(self._ids))
        if len(self._ids) - self._read_offset > MAX_HELD_TOKENS:
            settle = len(self._ids) - _LOOKAHEAD
            settled = self._decode(self._prefix_offset, settle)
            # Settled only if the later ids did not change it (they would
            # have, had they completed a character that began before).
            if len(settled) > len(self._prefix_text) and new_text.startswith(settled):
                return self._advance(settled, settle)
        return ""

    def push_many(self, token_ids: Sequence[int]) -> str | None:
        """Add several ids with one decode; returns their text, or None (nothing added) if it ends mid-character.

        The same text as pushing them one by one, for a fraction of the
        decoding: one window decode per batch instead of one per id. On None
        the caller pushes them one by one, which holds back the incomplete tail.
        """
        before = len(self._ids)
        self._ids.extend(token_ids)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) > len(self._prefix_text) and not new_text.endswith(REPLACEMENT):
            self._generated += len(token_ids)
            return self._advance(new_text, len(self._ids))
        del self._ids[before:]
        return None

    def _advance(self, text: str, read_to: int) -> str:
        delta = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, read_to
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return delta

    def flush(self) -> str:
        """Everything still held, incomplete characters included (as U+FFFD). Safe to call twice."""
        text = self._decode(self._prefix_offset)
        if len(text) <= len(self._prefix_text):
            return ""
        return self._advance(text, len(self._ids))

    @property
    def generated_ids(self) -> list[int]:
        """Ids pushed so far (not the context)."""
        return self._ids[len(self._ids) - self._generated :]


class StopMatcher:
    """Text -> text with everything from the first completed stop string on removed.

    Among stop strings, the one that completes first wins (ties: the one that
    starts first), which does not depend on how the text was chunked.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(dict.fromkeys(stops))
        if any(not s for s in self.stops):
            raise ValueError("stop strings must not be empty")
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Add text; returns what is now certain to be output ("" after a match)."""
        if self.matched is not None:
            return ""
        pending = self._pending + text
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            at = pending.find(stop)
            if at >= 0 and (best is None or (at + len(stop), at) < best[:2]):
                best = (at + len(stop), at, stop)
        if best is not None:
            self.matched = best[2]
            self._pending = ""
            return pending[: best[1]]
        held = self._held(pending)
        self._pending = pending[len(pending) - held :] if held else ""
        return pending[: len(pending) - held]

    def _held(self, pending: str) -> int:
        """Length of the longest tail of `pending` that some stop string starts with."""
        for size in range(min(len(pending), self._longest - 1), 0, -1):
            tail = pending[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0

    def flush(self) -> str:
        """The held tail: no more text is coming, so it can no longer become a stop string."""
        pending, self._pending = self._pending, ""
        return pending if self.matched is None else ""


@dataclass(frozen=True)
class Delta:
    text: str
    # Ids of this feed() call taken into the output: all of them, or up to
    # and including the one whose text completed a stop string.
    consumed: int
    stopped: bool = False
    # The stop string that matched, when stopped.
    stop: str | None = None


class Detokenizer:
    """Incremental decoding plus stop strings, for one sequence. See the module docstring."""

    def __init__(self, tokenizer: Tokenizer, *, stop: Iterable[str] = (), context_ids: Sequence[int] = ()) -> None:
        self._decoder = IncrementalDecoder(tokenizer, context_ids)
        self._matcher = StopMatcher(stop)
        self._chunks: list[str] = []
        self._finished = False

    @property
    def stopped(self) -> bool:
        return self._matcher.matched is not None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def feed(self, token_ids: Iterable[int]) -> Delta:
        """Add generated ids; after a stop string has matched, nothing more is taken."""
        if self.stopped or self._finished:
            return Delta("", 0, self.stopped, self._matcher.matched)
        if not self._matcher.stops:
            # No stop string can end the text inside the batch: decode it whole (the common case, and a
            # whole answer arrives as one batch).
            ids = token_ids if isinstance(token_ids, list) else list(token_ids)
            if len(ids) > 1:
                whole = self._decoder.push_many(ids)
                if whole is not None:
                    return self._emit(whole, len(ids))
            token_ids = ids
        out: list[str] = []
        consumed = 0
        for token_id in token_ids:
            consumed += 1
            piece = self._decoder.push(token_id)
            if piece:
                out.append(self._matcher.push(piece))
                if self.stopped:
                    break
        return self._emit("".join(out), consumed)

    def finish(self) -> Delta:
        """Flushes held text at the end of the sequence. Safe to call twice."""
        if self._finished or self.stopped:
            self._finished = True
            return Delta("", 0, self.stopped, self._matcher.matched)
        self._finished = True
        text = self._matcher.push(self._decoder.flush())
        text += self._matcher.flush()
        return self._emit(text, 0)

    def _emit(self, text: str, consumed: int) -> Delta:
        if text:
            self._chunks.append(text)
        return Delta(text, consumed, self.stopped, self._matcher.matched)
