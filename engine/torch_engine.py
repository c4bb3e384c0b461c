"""The reference engine: PyTorch + transformers on a local Hugging Face checkpoint.

Config (engine.base.EngineConfig) used here:
- `model`: a checkpoint directory (config.json, safetensors, tokenizer.json),
  any causal LM that AutoModelForCausalLM loads; or "tiny", a small seeded
  random Llama built once into `cache_dir` (engine/tiny_model.py) and loaded
  through the same path. `seed` seeds the tiny model.
- `device` ("cpu", "cuda", "cuda:N"), `dtype` ("float32", "bfloat16", "float16").
- `max_batch_size`: sequences per batched decode step.
- `max_context_tokens`: 0 means the model's max_position_embeddings.
- `kv_blocks` x `kv_block_size` tokens: admission limit for decode; 0 blocks
  sizes it from free memory (GPU: free device memory; CPU: half the RAM).
- `extra["batching"]="0"` runs every decode step per sequence.

Batching: decode steps of models whose cache is a plain DynamicCache (every
layer full attention: Llama, Qwen2, Mistral without sliding window, GPT-2...)
run as one forward over all active sequences, left-padded with an attention
mask and per-row positions. Other caches (sliding-window or hybrid layers)
step one sequence at a time and cannot export KV.

Determinism: greedy output is a pure function of the prompt; sampled tokens
at position p use a generator seeded by (seed, p). Prefill here + decode
there gives exactly the tokens of a local run, since the imported KV is the
same bytes; a migrated sequence replays its tokens one step at a time, the
computation the first worker did. Batching left-pads other rows, which may
change float rounding; a near-tie between the two best logits could then
differ from an unbatched run (it did not in the tests on the tiny model).

All model work runs on one thread per engine (engine/torch_runner.py): the
event loop only validates, queues and relays.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator
from typing import Any

from engine.base import (
    CapacityExhausted,
    DecodeRequest,
    DecodeStep,
    EngineConfig,
    EngineError,
    EngineStats,
    PrefillRequest,
    PrefillResult,
    Sampling,
)
from engine.checkpoint_engine import CheckpointEngine
from engine.hf_tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_DEVICE_HINT = 'device must be "cpu", "cuda" or "cuda:N"'


class TorchEngine(CheckpointEngine):
    """See the module docstring. start() once; close() is safe twice and after a failed start."""

    name = "torch"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._runner: Any = None
        self._kv_blocks_total = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads weights and tokenizer on a worker thread; EngineError says what is wrong."""
        if self._runner is not None or self._closed:
            raise EngineError("TorchEngine.start() is called once, before close()")
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from engine.torch_loader import load_model

        loaded = load_model(self._config)
        self.checkpoint = loaded.checkpoint
        self._tokenizer = load_tokenizer(loaded.checkpoint)
        self._layout = loaded.layout
        self._shape = loaded.shape
        self._max_context = loaded.max_context
        self._kv_blocks_total = loaded.kv_blocks_total
        self._vocab_size = loaded.vocab_size
        from engine.torch_runner import ModelRunner

        runner = ModelRunner(
            loaded.model, layout=loaded.layout, device=loaded.device,
            max_batch_size=self._config.max_batch_size,
            batching=self._config.extra.get("batching", "1") not in ("0", "false", "no"),
            kv_block_size=self._config.kv_block_size,
        )
        runner.start()
        self._runner = runner
        log.info("torch engine ready: %s on %s (%s), layout %s", loaded.checkpoint, loaded.device,
                 self._config.dtype, loaded.layout)

    async def close(self) -> None:
        """Stops the model thread; in-flight work ends with EngineError. Safe twice, and after a failed start."""
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            await asyncio.to_thread(runner.stop)

    # -- properties (the loaded model's: engine.checkpoint_engine) ----------------------------------

    def stats(self) -> EngineStats:
        runner = self._runner
        if runner is None:
            return EngineStats(kv_block_size=self._config.kv_block_size, max_batch_size=self._config.max_batch_size)
        return EngineStats(
            queued_prefill_tokens=max(0, runner.queued_prefill_tokens),
            active_requests=runner.active_sequences,
            active_sequences=runner.active_sequences,
            kv_blocks_used=runner.kv_blocks_used,
            kv_blocks_total=self._kv_blocks_total,
            kv_block_size=self._config.kv_block_size,
            max_batch_size=self._config.max_batch_size,
        )

    # -- work -------------------------------------------------------------------------------------

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """First token and exported KV of the prompt (no KV when the sequence ended with the first token)."""
        from engine.torch_runner import PrefillJob

        runner = self._running()
        self._check_prompt(request.prompt, ())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(outcome: Any) -> None:
            loop.call_soon_threadsafe(_settle, future, outcome)

        rule = self._rule(request.sampling, ())
        runner.submit(PrefillJob(request.prompt, request.sampling, _seed(request.sampling), rule, done))
        first, finish, blob, queue_s, prefill_s = await future
        return PrefillResult(first_token=first, kv=blob, finish_reason=finish, queue_s=queue_s, prefill_s=prefill_s)

    def decode(self, request: DecodeRequest) -> AsyncGenerator[DecodeStep, None]:
        """Steps of one sequence; validation errors raise at the first `__anext__`. Closing early frees it."""
        return self._decode(request)

    async def _decode(self, request: DecodeRequest) -> AsyncGenerator[DecodeStep, None]:
        from engine.torch_runner import StartJob

        runner = self._running()
        known = self._check_decode(request)
        self._admit(len(request.prompt) + len(known) + 1)
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[DecodeStep | BaseException] = asyncio.Queue()
        seq_id = next(self._ids)
        generated_before = known
        rule = self._rule(request.sampling, generated_before)
        job = StartJob(seq_id, request.prompt, request.sampling, _seed(request.sampling), rule, request.kv,
                       known, lambda step: _hand_over(loop, steps, step))
        runner.submit(job)
        finished = False
        try:
            while not finished:
                step = await steps.get()
                if isinstance(step, BaseException):
                    raise step
                finished = step.finish_reason is not None
                yield step
        finally:
            if not finished:
                runner.cancel(seq_id)

    # -- checks (prompt and decode request: engine.checkpoint_engine) -------------------------------

    def _admit(self, tokens: int) -> None:
        runner = self._running()
        need = -(-tokens // self._config.kv_block_size)
        if runner.kv_blocks_used + need > self._kv_blocks_total:
            raise CapacityExhausted(
                f"KV cache full: {runner.kv_blocks_used} of {self._kv_blocks_total} blocks in use, "
                f"this sequence needs {need}"
            )

    def _running(self) -> Any:
        if self._runner is None:
            raise EngineError("the torch engine is closed" if self._closed else "the torch engine is not started")
        return self._runner


def _seed(sampling: Sampling) -> int:
    # Unseeded sampling is not reproducible by contract; greedy ignores the seed.
    return sampling.seed if sampling.seed is not None else secrets.randbits(63)


def _hand_over(loop: asyncio.AbstractEventLoop, steps: asyncio.Queue[DecodeStep | BaseException],
               step: DecodeStep | BaseException) -> None:
    loop.call_soon_threadsafe(steps.put_nowait, step)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)

