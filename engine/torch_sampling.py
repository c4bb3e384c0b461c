"""Token choice and stop rules for the torch engine: pure functions of values, no model.

Determinism: the random draw for the token at absolute position p uses a
generator seeded by (seed, p) only, so the token chosen at p does not depend
on which worker computes it, on batching, or on how many tokens were drawn
before (migration, disaggregation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from engine.base import FinishReason, Sampling


def position_seed(seed: int, position: int) -> int:
    """A 63-bit seed that is a pure function of (seed, position)."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def choose_token(logits: torch.Tensor, sampling: Sampling, seed: int, position: int) -> int:
    """The token at `position` from a 1-D logits vector: argmax when greedy, else a seeded draw.

    The draw runs on the CPU in float32 whatever the model's device and dtype,
    so equal logits give equal tokens everywhere.
    """
    if sampling.greedy:
        return int(torch.argmax(logits).item())
    scores = logits.detach().to("cpu", torch.float32) / sampling.temperature
    if 0 < sampling.top_k < scores.numel():
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the best token).
        cut = torch.cumsum(probs, dim=-1) - probs >= sampling.top_p
        sorted_scores = sorted_scores.masked_fill(cut, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    generator = torch.Generator(device="cpu").manual_seed(position_seed(seed, position))
    return int(torch.multinomial(probs, 1, generator=generator).item())


class StopRule:
    """Decides when one sequence ends. Feed every generated token in order with `check`.

    `generated_before` are tokens an earlier worker already produced and
    checked (migration, or the prefill worker's first token): they count
    against max_tokens and are part of the text that stop strings match.
    """

    def __init__(
        self,
        sampling: Sampling,
        *,
        eos_token_id: int | None,
        max_context_tokens: int,
        decode: Callable[[list[int]], str],
        generated_before: Sequence[int] = (),
    ) -> None:
        self._sampling = sampling
        self._stop_ids = set(sampling.stop_token_ids)
        if eos_token_id is not None and not sampling.ignore_eos:
            self._stop_ids.add(eos_token_id)
        self._max_context = max_context_tokens
        self._decode = decode
        self._generated: list[int] = list(generated_before)
        # A stop string of n UTF-8 bytes spans at most n tokens (every token
        # decodes to at least one byte); a few more absorb partial characters
        # and tokenizers that drop a leading space at the start of a text.
        longest = max((len(s.encode()) for s in sampling.stop), default=0)
        self._window = longest + 4 if longest else 0

    @property
    def generated(self) -> int:
        return len(self._generated)

    def check(self, token: int, sequence_length: int) -> str | None:
        """Records `token` (now `sequence_length` tokens in the sequence) and returns a finish reason or None."""
        self._generated.append(token)
        if token in self._stop_ids:
            return FinishReason.STOP_TOKEN
        if self._window and self._matches_stop_string():
            return FinishReason.STOP_STRING
        if len(self._generated) >= self._sampling.max_tokens:
            return FinishReason.LENGTH
        # The next step would feed this token at position sequence_length - 1
        # and produce one at sequence_length, which must stay in the window.
        if sequence_length >= self._max_context:
            return FinishReason.CONTEXT_FULL
        return None

    def already_finished(self, sequence_length: int) -> str | None:
        """A finish reason when tokens produced elsewhere (`generated_before`) leave nothing to do."""
        if len(self._generated) >= self._sampling.max_tokens:
            return FinishReason.LENGTH
        if sequence_length >= self._max_context:
            return FinishReason.CONTEXT_FULL
        return None

    def _matches_stop_string(self) -> bool:
        text = self._decode(self._generated[-self._window:])
        return any(stop in text for stop in self._sampling.stop)
