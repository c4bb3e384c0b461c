"""One simulated sequence: its tokens, KV progress and stop rules. Pure; no I/O."""

from __future__ import annotations

import enum
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from engine.base import FinishReason, Sampling
from engine.byte_tokenizer import EOS_ID, token_bytes
from engine.sim.blocks import BlockTable
from engine.sim.tokens import TokenStream


class SequenceKind(enum.Enum):
    """Which engine call a simulated sequence serves (not registry.keys.Kind, a registry key's kind)."""

    # Engine.prefill: ends after its first token; its KV is exported.
    PREFILL = "prefill"
    # Engine.decode: runs until a stop rule ends it.
    DECODE = "decode"


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


class StopRules:
    """Decides when a sequence ends. `delivered`: output tokens already counted (migration)."""

    def __init__(self, sampling: Sampling, max_context: int, delivered: Seq[int] = ()) -> None:
        self.max_tokens = sampling.max_tokens
        self.max_context = max_context
        self.count = len(delivered)
        self._stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            self._stop_ids.add(EOS_ID)
        # The byte tokenizer's text is the UTF-8 of its bytes, so a stop
        # string ends at a token exactly when the output bytes end with it.
        self._stops = [s.encode("utf-8") for s in sampling.stop]
        self._keep = max((len(s) for s in self._stops), default=0)
        self._tail = token_bytes(delivered)[-self._keep :] if self._keep else b""

    def before_start(self, context_len: int) -> str | None:
        """A finish reason when nothing may be generated at all."""
        if self.count >= self.max_tokens:
            return FinishReason.LENGTH
        if context_len >= self.max_context:
            return FinishReason.CONTEXT_FULL
        return None

    def after(self, token: int, context_len: int) -> str | None:
        """Counts `token` (now at position context_len - 1); a finish reason when the sequence ends with it."""
        self.count += 1
        if token in self._stop_ids:
            return FinishReason.STOP_TOKEN
        if self._keep:
            self._tail = (self._tail + token_bytes([token]))[-self._keep :]
            if any(self._tail.endswith(s) for s in self._stops):
                return FinishReason.STOP_STRING
        if self.count >= self.max_tokens:
            return FinishReason.LENGTH
        if context_len >= self.max_context:
            return FinishReason.CONTEXT_FULL
        return None


@dataclass(eq=False)
class Sequence:
    """`tokens` are the whole context: prompt, then output; KV exists for `tokens[:num_computed]`.

    The scheduler computes the rest, then draws one token per step. `sink`
    belongs to the engine (where produced tokens go).
    """

    request_id: str
    kind: SequenceKind
    tokens: list[int]
    stream: TokenStream
    rules: StopRules
    arrived_at: float
    num_computed: int = 0
    table: BlockTable = field(default_factory=BlockTable)
    state: State = State.WAITING
    # Whether the prefix-cache lookup of this sequence counts toward the hit rate.
    count_prefix_hit: bool = True
    # Prompt tokens the prefix cache served at the first prefill.
    cached_tokens: int = 0
    scheduled_at: float | None = None
    # Set when a prefill phase (local or recompute after preemption) started.
    prefill_started_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    preemptions: int = 0
    sink: Any = None

    @property
    def pending(self) -> int:
        """Tokens whose KV the next steps must compute before the next token is drawn."""
        return len(self.tokens) - self.num_computed
