"""The torch engine's model thread: one thread owns the model and runs every forward pass.

Contract: `submit()` may be called from any thread (the event loop); jobs
run in FIFO order on the model thread, interleaved with decode steps so a
long prompt never stalls running sequences for more than one prefill.
Results and decode steps leave through the callbacks each job carries; those
are called on the model thread and must only hand off (call_soon_threadsafe).

Scheduling loop, one iteration:
1. take every queued command (cancellations apply at once);
2. run at most one prefill / sequence-start job;
3. run one decode step for every active sequence: in batches of
   `max_batch_size` with left padding, attention mask and per-row positions
   when every cache is a plain DynamicCache (`torch_kv.cache_is_plain`),
   else one sequence at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.base import DecodeStep, EngineError, KvBlob, KvLayoutSpec, Sampling
from engine.torch_kv import cache_is_plain, export_kv, import_kv, new_cache, stack_caches, unstack_cache
from engine.torch_sampling import StopRule, choose_token

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    """Prefill `prompt`, choose the first token, export the KV unless the sequence finished."""

    prompt: tuple[int, ...]
    sampling: Sampling
    seed: int
    rule: StopRule
    done: Callable[[Any], None]  # (first_token, finish_reason, KvBlob | None, queue_s, prefill_s) or an exception
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class StartJob:
    """Build a sequence's cache (import, local prefill or migration replay) and make it active."""

    seq_id: int
    prompt: tuple[int, ...]
    sampling: Sampling
    seed: int
    rule: StopRule
    kv: KvBlob | None
    # Tokens after the prompt that are already chosen (first token and/or migrated ones).
    known: tuple[int, ...]
    emit: Callable[[DecodeStep | BaseException], None]
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Sequence:
    seq_id: int
    tokens: list[int]  # prompt + generated; the cache covers all but the last
    sampling: Sampling
    seed: int
    rule: StopRule
    cache: Any
    emit: Callable[[DecodeStep | BaseException], None]
    # (prefill_s, queue_s) for the first step when the start emitted no token.
    first_timings: tuple[float, float] | None = None


_STOP = object()


class ModelRunner:
    """Runs jobs and decode steps on one dedicated thread. start() once; stop() is safe twice."""

    def __init__(self, model: Any, *, layout: KvLayoutSpec, device: torch.device, max_batch_size: int,
                 batching: bool, kv_block_size: int) -> None:
        self._model = model
        self._config = model.config
        self._layout = layout
        self._device = device
        self._max_batch = max_batch_size
        self._batching = batching
        self._block_size = kv_block_size
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending: list[PrefillJob | StartJob] = []
        self._active: dict[int, _Sequence] = {}
        self._thread = threading.Thread(target=self._run, name="torch-engine-model", daemon=True)
        self._cache_kw = _cache_keyword(model)
        self._keep_kw = "logits_to_keep" in _forward_params(model)
        # Read without locks from the event loop (plain ints: GIL-atomic).
        self.queued_prefill_tokens = 0
        self.active_sequences = 0
        self.kv_blocks_used = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: PrefillJob | StartJob) -> None:
        self.queued_prefill_tokens += len(job.prompt)
        self._commands.put(job)

    def cancel(self, seq_id: int) -> None:
        """Frees the sequence (active or still queued) at the next loop iteration. Idempotent."""
        self._commands.put(("cancel", seq_id))

    def stop(self, timeout: float = 30.0) -> None:
        """Ends the thread; queued and active work fails with EngineError. Safe twice; blocks up to `timeout`."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    # -- model thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._take_commands():
                    if self._pending:
                        self._run_job(self._pending.pop(0))
                    if self._active:
                        self._decode_step()
                    self._update_counters()
        finally:
            closed = EngineError("the engine is closed")
            for job in self._pending:
                (job.done if isinstance(job, PrefillJob) else job.emit)(closed)
            for seq in self._active.values():
                seq.emit(closed)
            self._pending.clear()
            self._active.clear()
            self._update_counters()

    def _take_commands(self) -> bool:
        """Drains the command queue, blocking when idle; False once told to stop."""
        idle = not self._pending and not self._active
        while True:
            try:
                command = self._commands.get(block=idle)
            except queue.Empty:
                return True
            idle = False
            if command is _STOP:
                return False
            if isinstance(command, tuple):
                self._drop(command[1])
            else:
                self._pending.append(command)

    def _drop(self, seq_id: int) -> None:
        self._active.pop(seq_id, None)
        for job in self._pending:
            if isinstance(job, StartJob) and job.seq_id == seq_id:
                self._pending.remove(job)
                self.queued_prefill_tokens -= len(job.prompt)
                break
        self._update_counters()

    def _run_job(self, job: PrefillJob | StartJob) -> None:
        started = time.monotonic()
        self.queued_prefill_tokens -= len(job.prompt)
        try:
            if isinstance(job, PrefillJob):
                self._prefill(job, started)
            else:
                self._start_sequence(job, started)
        except Exception as exc:
            log.exception("torch engine job failed")
            (job.done if isinstance(job, PrefillJob) else job.emit)(exc)

    def _prefill(self, job: PrefillJob, started: float) -> None:
        cache = new_cache(self._config)
        logits = self._forward(list(job.prompt), cache, start=0)
        first = choose_token(logits[0], job.sampling, job.seed, len(job.prompt))
        finish = job.rule.check(first, len(job.prompt) + 1)
        blob = None if finish else export_kv(cache, self._layout, len(job.prompt))
        job.done((first, finish, blob, started - job.submitted, time.monotonic() - started))

    def _start_sequence(self, job: StartJob, started: float) -> None:
        tokens = list(job.prompt) + list(job.known)
        step_tokens: list[int] = []
        finish: str | None = None
        if job.kv is not None:
            cache = import_kv(job.kv, self._layout, self._config, self._device)
            fed = len(job.prompt)
        else:
            cache = new_cache(self._config)
            logits = self._forward(list(job.prompt), cache, start=0)
            fed = len(job.prompt)
            if not job.known:
                first = choose_token(logits[0], job.sampling, job.seed, len(job.prompt))
                tokens.append(first)
                step_tokens.append(first)
                finish = job.rule.check(first, len(tokens))
        # Migration: replay known tokens one per step, the computation the first
        # worker did, so the continuation matches it bit for bit.
        for position in range(fed, len(tokens) - 1):
            self._forward([tokens[position]], cache, start=position)
        if finish is None:
            finish = job.rule.already_finished(len(tokens))
        elapsed = time.monotonic() - started
        timings = (elapsed, started - job.submitted)
        if finish is None:
            # Without a token yet, the first decode step carries the timings.
            self._active[job.seq_id] = _Sequence(job.seq_id, tokens, job.sampling, job.seed, job.rule, cache,
                                                 job.emit, None if step_tokens else timings)
            self._update_counters()  # before the caller sees a step, so stats() agree with it
        if step_tokens or finish:
            job.emit(DecodeStep(step_tokens, finish, prefill_s=timings[0], queue_s=timings[1]))

    def _decode_step(self) -> None:
        sequences = list(self._active.values())
        size = self._max_batch if self._batching else 1
        for index in range(0, len(sequences), size):
            group = sequences[index:index + size]
            try:
                if len(group) > 1 and all(cache_is_plain(s.cache) for s in group):
                    rows = self._batched_forward(group)
                else:
                    rows = [self._forward([s.tokens[-1]], s.cache, start=len(s.tokens) - 1)[0] for s in group]
            except Exception as exc:
                log.exception("torch engine decode step failed")
                for seq in group:
                    self._active.pop(seq.seq_id, None)
                    seq.emit(exc)
                continue
            for seq, logits in zip(group, rows, strict=True):
                token = choose_token(logits, seq.sampling, seq.seed, len(seq.tokens))
                seq.tokens.append(token)
                finish = seq.rule.check(token, len(seq.tokens))
                if finish:
                    self._active.pop(seq.seq_id, None)
                    self._update_counters()
                prefill_s, queue_s = seq.first_timings or (0.0, 0.0)
                seq.first_timings = None
                seq.emit(DecodeStep([token], finish, prefill_s=prefill_s, queue_s=queue_s))

    def _batched_forward(self, group: list[_Sequence]) -> list[torch.Tensor]:
        caches = [s.cache for s in group]
        batch, mask, lengths = stack_caches(caches, self._config)
        input_ids = torch.tensor([[s.tokens[-1]] for s in group], device=self._device)
        positions = torch.tensor([[length] for length in lengths], device=self._device)
        kwargs: dict[str, Any] = {self._cache_kw: batch, "use_cache": True, "position_ids": positions,
                                  "attention_mask": mask}
        logits = self._model(input_ids=input_ids, **kwargs).logits[:, -1, :]
        unstack_cache(batch, caches, lengths)
        return list(logits)

    def _forward(self, token_ids: list[int], cache: Any, *, start: int) -> torch.Tensor:
        """Feeds `token_ids` at positions start.. into a batch-1 cache; logits of the last position, [1, vocab]."""
        input_ids = torch.tensor([token_ids], device=self._device)
        positions = torch.arange(start, start + len(token_ids), device=self._device).unsqueeze(0)
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True, "position_ids": positions}
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        return self._model(input_ids=input_ids, **kwargs).logits[:, -1, :]

    def _update_counters(self) -> None:
        self.active_sequences = len(self._active)
        size = self._block_size
        self.kv_blocks_used = sum(-(-len(s.tokens) // size) for s in self._active.values())


def _forward_params(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _cache_keyword(model: Any) -> str:
    """transformers >= 5.2x names the cache argument `cache`; older code and remote models `past_key_values`."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"
