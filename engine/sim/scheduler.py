"""Continuous batching for the sim engine: which sequences each step advances. Pure; no I/O.

Each step (vLLM-like, one prompt at a time):

1. sequences that already hold their KV (imported from a prefill worker)
   join the running batch while it has fewer than `max_batch` sequences;
2. every running sequence past its prefill computes one token; when the KV
   blocks for it are not there, the newest running sequence is preempted
   (its blocks released, its tokens recomputed later, as vLLM does);
3. the head of the prefill queue (FIFO) computes a chunk of its pending
   tokens, at most `max_step_tokens` minus the decode tokens, and at most
   what the free blocks hold. Its prefix-cache hit is looked up when it
   first becomes the head, so a queued prompt reuses blocks computed while
   it waited.

`complete(plan)` applies a step: KV computed, full blocks committed to the
prefix cache, one token drawn for every sequence whose KV is complete.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from engine.sim.blocks import BlockManager
from engine.sim.sequence import Sequence, SequenceKind, State

# Work and Produced are named tuples, not frozen dataclasses: one of each per sequence per step, and a
# tuple is several times cheaper to build.


class Work(NamedTuple):
    """One sequence's share of a step: `new` tokens computed on top of `cached`."""

    seq: Sequence
    new: int
    cached: int


class Produced(NamedTuple):
    """A token drawn for `seq` at the end of a step; `finish_reason` when it ends the sequence."""

    seq: Sequence
    token: int
    finish_reason: str | None


class Scheduler:
    """Owns the queues and the running batch of one engine. Not thread-safe."""

    def __init__(self, blocks: BlockManager, max_batch: int, max_step_tokens: int) -> None:
        if max_batch < 1 or max_step_tokens < 1:
            raise ValueError(f"max_batch and max_step_tokens must be >= 1, got {max_batch} and {max_step_tokens}")
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.running: list[Sequence] = []
        self._ready: deque[Sequence] = deque()
        self._prefill_queue: deque[Sequence] = deque()
        self._active: Sequence | None = None
        # Prompt tokens of each queued sequence its prefix cache held when it was queued: the load report
        # counts only the rest as queued work (an estimate: the cache may change before it is the head).
        self._expected_hits: dict[Sequence, int] = {}

    # -- admission --------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queues `seq`: to join the batch when its KV is all there, else to prefill (FIFO)."""
        seq.state = State.WAITING
        ready = seq.pending == 1 and seq.num_computed > 0
        (self._ready if ready else self._prefill_queue).append(seq)
        if not ready and not seq.table.blocks:
            self._expected_hits[seq] = self.blocks.cached_prefix_tokens(seq.tokens)

    def abort(self, seq: Sequence) -> None:
        """Removes `seq` wherever it is and releases its blocks. Safe to call twice."""
        if seq.state is State.DONE:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self._ready:
            self._ready.remove(seq)
        elif seq in self._prefill_queue:
            self._prefill_queue.remove(seq)
        if self._active is seq:
            self._active = None
        self._expected_hits.pop(seq, None)
        self.blocks.release(seq.table)
        seq.state = State.DONE

    # -- load -------------------------------------------------------------

    @property
    def queued_prefill_tokens(self) -> int:
        """Tokens still to prefill: the queue (less what the prefix cache held when each was queued) plus
        the rest of the prompt in progress."""
        active = self._active.pending if self._active is not None else 0
        hits = self._expected_hits
        return active + sum(max(0, seq.pending - hits.get(seq, 0)) for seq in self._prefill_queue)

    @property
    def num_waiting(self) -> int:
        return len(self._ready) + len(self._prefill_queue)

    @property
    def num_holding_kv(self) -> int:
        """Sequences holding KV blocks: the running batch and imported ones waiting to join."""
        return len(self.running) + sum(1 for seq in self._ready if seq.table.blocks)

    # -- steps ------------------------------------------------------------

    def schedule(self, now: float) -> list[Work]:
        """The work of the next step; empty when there is nothing to do."""
        plan = self._schedule(now)
        if not plan and self._active is not None and (self._ready or self._prefill_queue):
            # The prompt in progress is stuck for blocks that waiting
            # sequences hold while it holds the last batch slot: step aside.
            self._preempt(self._active, front=False)
            plan = self._schedule(now)
        return plan

    def _schedule(self, now: float) -> list[Work]:
        plan: list[Work] = []
        while self._ready and len(self.running) < self.max_batch:
            self._start(self._ready.popleft(), now)
        block_size = self.blocks.block_size
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            # Most steps need no new block: only then ask the block manager (and maybe preempt).
            if seq is not self._active and (seq.num_computed < len(seq.table.blocks) * block_size
                                            or self._grow_or_preempt(seq)):
                plan.append(Work(seq, 1, seq.num_computed))
            i += 1
        budget = self.max_step_tokens - len(plan)
        if budget <= 0:
            return plan
        if self._active is None and self._prefill_queue and len(self.running) < self.max_batch:
            seq = self._prefill_queue[0]
            shared = not seq.table.blocks
            if shared:
                seq.num_computed = self.blocks.share_prefix(seq.table, seq.tokens)
            if self._fit(seq) == 0:
                # Nothing fits now: keep the queue order; hold no cached
                # blocks meanwhile (imported KV stays, it cannot be rebuilt).
                if shared:
                    self.blocks.release(seq.table)
                    seq.num_computed = 0
                return plan
            if shared and seq.count_prefix_hit:
                self.blocks.record_lookup(len(seq.tokens), seq.num_computed)
                seq.cached_tokens = seq.num_computed
            seq.count_prefix_hit = False
            self._prefill_queue.popleft()
            self._expected_hits.pop(seq, None)
            self._start(seq, now)
            seq.prefill_started_at = now
            self._active = seq
        if self._active is not None:
            seq = self._active
            chunk = min(seq.pending, budget, self._fit(seq))
            if chunk > 0:
                self.blocks.grow(seq.table, seq.num_computed + chunk)
                plan.append(Work(seq, chunk, seq.num_computed))
        return plan

    def complete(self, plan: list[Work], now: float) -> list[Produced]:
        """Applies a finished step; returns the tokens drawn. Skips sequences aborted meanwhile."""
        produced: list[Produced] = []
        block_size = self.blocks.block_size
        for seq, new, cached in plan:
            if seq.state is not State.RUNNING:
                continue
            computed = seq.num_computed = cached + new
            if computed // block_size > len(seq.table.hashes):  # a block filled up: into the prefix cache
                self.blocks.commit(seq.table, seq.tokens, computed)
            if len(seq.tokens) > computed:  # still prefilling
                continue
            if self._active is seq:
                self._active = None
            token = seq.stream.next()
            seq.tokens.append(token)
            reason = seq.rules.after(token, len(seq.tokens))
            if reason is not None or seq.kind is SequenceKind.PREFILL:
                self._finish(seq, reason, now)
            produced.append(Produced(seq, token, reason))
        return produced

    # -- internals --------------------------------------------------------

    def _grow_or_preempt(self, seq: Sequence) -> bool:
        """Gives running `seq` a block for its next token, preempting the newest sequences until one is free;
        False when `seq` itself was preempted."""
        while not self.blocks.grow(seq.table, seq.num_computed + 1):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _fit(self, seq: Sequence) -> int:
        """Tokens `seq` may compute now, given the blocks it holds and the ones available."""
        room = (len(seq.table.blocks) + self.blocks.num_available) * self.blocks.block_size
        return max(0, min(seq.pending, room - seq.num_computed))

    def _start(self, seq: Sequence, now: float) -> None:
        seq.state = State.RUNNING
        if seq.scheduled_at is None:
            seq.scheduled_at = now
        self.running.append(seq)

    def _finish(self, seq: Sequence, reason: str | None, now: float) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.state = State.DONE
        seq.finish_reason = reason
        seq.finished_at = now

    def _preempt(self, seq: Sequence, *, front: bool = True) -> None:
        """Releases `seq`'s blocks and queues it to recompute them (first, unless `front` is False)."""
        self.running.remove(seq)
        if self._active is seq:
            self._active = None
        self.blocks.release(seq.table)
        seq.num_computed = 0
        seq.preemptions += 1
        seq.state = State.WAITING
        if front:
            self._prefill_queue.appendleft(seq)
        else:
            self._prefill_queue.append(seq)
