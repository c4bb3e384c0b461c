"""The router's own recent assignments, counted until a load report reflects them. Pure.

Load reports lag: a worker samples its load every 50 ms, and a decode
worker fed by a remote prefill sees the request only once the prefill is
done. A burst decided inside that lag would see every worker as idle and
herd onto one. So the policy notes each assignment here and, until the
worker's report can show it, adds it to the worker's reported load.

When does a report show an assignment? The worker starts it at
`starts_at` (the decision, or the expected end of the remote prefill), and
takes up to one sampling interval to report it: a report received at or
after `starts_at + reflect_s` is taken to include it. An assignment whose
report never comes (the stream broke, the call failed) is forgotten at
`starts_at + hold_s`; the stale-load penalty covers the worker from then.
hold_s = 0 turns the ledger off.

Not thread-safe: the router's one policy object calls it from its event loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from router_svc.candidates import Candidate, Load


@dataclass(frozen=True, slots=True)
class Assignment:
    """Work the router just sent to one worker."""

    # When the worker is expected to start it (router's monotonic clock).
    starts_at: float
    # Prompt tokens it queues for prefill on this worker.
    queued_tokens: int = 0
    # Tokens of KV it holds there (on average over its life, for a decode).
    kv_tokens: int = 0
    # Batch slots (sequences) it takes: 1 for a decode, 0 for a prefill.
    sequences: int = 0


class InflightLedger:
    """Assignments per worker id; `apply` adds the unreflected ones to a candidate's load."""

    def __init__(self, *, reflect_s: float, hold_s: float) -> None:
        if not (reflect_s >= 0 and hold_s >= 0):
            raise ValueError(f"reflect_s and hold_s must be >= 0, got {reflect_s} and {hold_s}")
        self.reflect_s = reflect_s
        self.hold_s = hold_s
        self._pending: dict[str, list[Assignment]] = {}
        # The last `apply` per worker: (the candidate given, the one returned, until when it holds). A
        # burst of decisions over one view applies the same pending work to the
        # same candidates again and again; this answers those in O(1), without
        # filtering the pending list again.
        self._applied: dict[str, tuple[Candidate, Candidate, float]] = {}
        self._swept_at = -math.inf

    def add(self, worker_id: str, assignment: Assignment) -> None:
        if self.hold_s > 0:
            self._pending.setdefault(worker_id, []).append(assignment)
            self._applied.pop(worker_id, None)

    def pending(self, c: Candidate, now: float) -> list[Assignment]:
        """The candidate's assignments its latest report cannot show yet (forgets the others)."""
        self._sweep(now)
        held = self._pending.get(c.worker_id)
        if not held:
            return []
        seen_at = c.load.received_at if c.load is not None else -math.inf
        left = [a for a in held if seen_at < a.starts_at + self.reflect_s and now < a.starts_at + self.hold_s]
        if len(left) != len(held):
            self._applied.pop(c.worker_id, None)
        if left:
            self._pending[c.worker_id] = left
        else:
            del self._pending[c.worker_id]
        return left

    def apply(self, c: Candidate, now: float) -> Candidate:
        """`c` with its pending assignments added to its load (the same object when there are none)."""
        cached = self._applied.get(c.worker_id)
        # Valid for the same candidate (same report) until its first assignment expires; add() drops it.
        if cached is not None and cached[0] is c and now < cached[2]:
            return cached[1]
        pending = self.pending(c, now)
        if not pending:
            return c
        # No report yet: the figures are ours alone, and as old as can be (the stale penalty still applies).
        load = c.load if c.load is not None else Load(received_at=-math.inf)
        block = c.block_size
        blocks = sum(-(-a.kv_tokens // block) for a in pending) if block > 0 else 0
        queued = sequences = 0
        for a in pending:
            queued += a.queued_tokens
            sequences += a.sequences
        applied = c.with_load(Load(
            queued_prefill_tokens=load.queued_prefill_tokens + queued,
            active_requests=load.active_requests + len(pending),
            active_sequences=load.active_sequences + sequences,
            kv_blocks_used=load.kv_blocks_used + blocks,
            kv_blocks_total=load.kv_blocks_total, kv_block_size=load.kv_block_size,
            max_batch_size=load.max_batch_size, draining=load.draining,
            prefix_cache_hit_rate=load.prefix_cache_hit_rate, received_at=load.received_at))
        self._applied[c.worker_id] = (c, applied, min(a.starts_at for a in pending) + self.hold_s)
        return applied

    def __len__(self) -> int:
        return sum(len(held) for held in self._pending.values())

    def _sweep(self, now: float) -> None:
        # Workers no request looks at any more (gone, or of an idle model) lose their entries too.
        if now - self._swept_at < self.hold_s:
            return
        self._swept_at = now
        for worker_id in list(self._pending):
            held = self._pending[worker_id]
            left = [a for a in held if now < a.starts_at + self.hold_s]
            if len(left) != len(held):
                self._applied.pop(worker_id, None)
            if left:
                self._pending[worker_id] = left
            else:
                del self._pending[worker_id]
