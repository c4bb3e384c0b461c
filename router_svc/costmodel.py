"""Expected time of work on a given worker: the calibrated step model over the GPU catalog. Pure.

Every estimate is a step of runtime/stepmodel.py, the model the sim engine
and the fleet simulator time their steps with: a fixed overhead per step,
max(compute, memory) plus the fitted share of the smaller one that the
kernels do not hide (so a prefill chunk sharing a step slows the decode
tokens in it), tensor-parallel all-reduces over the catalog's link
bandwidth, and attention that grows with context. Its parameters are fitted
per GPU type to published measurements (runtime/data/step_params.toml,
docs/costmodel.md); GPU types without published rows get the fitted types'
geometric mean, and workers of unknown type a modest GPU.

The router's ModelShape carries parameters, KV bytes and weight bytes, not
layers or hidden size; those are estimated from the parameter count (a
power law through Llama-3 8B and 70B: 32 and 80 layers) unless the shape
carries `num_layers` and `hidden_size` itself.

Only ratios between candidates matter to the policy, so the model must be
right about *which GPU is faster at what*; docs/costmodel.md gives its error
against published measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# ModelShape lives with the candidates that publish it; imported from here too.
from router_svc.candidates import Candidate, ModelShape
from runtime.catalog import GpuCatalog, GpuModel, default_catalog
from runtime.stepmodel import Hardware, ModelDims, StepParams, StepRates
from runtime.stepparams import StepParamsTable, default_step_params

__all__ = ["UNKNOWN_GPU", "CostConfig", "CostModel", "ModelShape", "blocks_needed", "model_dims"]

# For workers whose gpu_type is empty or not in the catalog (CPU test
# workers, new parts): a modest GPU, so a known fast part wins over it and a
# fleet of unknown parts degenerates to load-based routing.
UNKNOWN_GPU = GpuModel(catalog_id="unknown", nvml_names=(), bf16_tflops=100.0, memory_gb=24.0, hbm_tbps=0.5)

# Prompt tokens (queued or new) are priced per token at this chunk size: the
# queue holds many prompts of unknown lengths, and the policy hands over a
# prompt's uncached tokens without the prefix they attend to.
QUEUE_CHUNK_TOKENS = 2048


@dataclass(frozen=True)
class CostConfig:
    # Overrides of the fitted efficiencies (None: the fitted value per GPU type).
    compute_efficiency: float | None = None
    bandwidth_efficiency: float | None = None
    # Engine whose fitted step overhead applies (None: the parameter file's reference engine).
    engine: str | None = None
    # KV cache transfer rates between workers (bytes/s): shared memory on one
    # host, the network between hosts.
    same_host_kv_bytes_per_s: float = 20e9
    cross_host_kv_bytes_per_s: float = 10e9

# Step-rate entries kept before the cache starts over (a handful of GPU types x shapes are live).
_MAX_RATES = 1024


def model_dims(shape: ModelShape) -> ModelDims:
    """The step model's view of a router ModelShape (layers and hidden size estimated when absent)."""
    layers = int(getattr(shape, "num_layers", 0) or 0)
    hidden = int(getattr(shape, "hidden_size", 0) or 0)
    if layers <= 0:
        # Llama-3: 32 layers at 7.5B active parameters, 80 at 69.5B.
        layers = max(1, round(32 * (shape.params / 7.5e9) ** (math.log(80 / 32) / math.log(69.5 / 7.5))))
    if hidden <= 0:
        # Dense transformer: about 12 x layers x hidden^2 parameters.
        hidden = max(1, round(math.sqrt(shape.params / (12 * layers))))
    return ModelDims(active_params=shape.params, weight_bytes=shape.weight_bytes,
                     kv_bytes_per_token=shape.kv_bytes_per_token, num_layers=layers, hidden_size=hidden,
                     attention_flops_per_pair=4.0 * layers * hidden)


class CostModel:
    """Time estimates per candidate. Thread-safe for reads; caches catalog and parameter lookups per GPU type."""

    def __init__(self, catalog: GpuCatalog | None = None, config: CostConfig | None = None,
                 params: StepParamsTable | None = None) -> None:
        self.catalog = catalog if catalog is not None else default_catalog()
        self.config = config or CostConfig()
        self.params = params if params is not None else default_step_params()
        self._gpus: dict[str, GpuModel] = {}
        self._steps: dict[str, StepParams] = {}
        self._dims: dict[ModelShape, ModelDims] = {}
        # (gpu_type, gpu_count, id(shape)) -> (shape, its step rates on those GPUs).
        self._step_rates: dict[tuple[str, int, int], tuple[ModelShape, StepRates]] = {}
        # (gpu_type, gpu_count, shape) -> seconds per queued prompt token.
        self._per_token: dict[tuple[str, int, ModelShape], float] = {}

    def gpu(self, gpu_type: str) -> GpuModel:
        """The catalog row for `gpu_type`, or UNKNOWN_GPU."""
        found = self._gpus.get(gpu_type)
        if found is None:
            found = self.catalog.get(gpu_type) if gpu_type in self.catalog else UNKNOWN_GPU
            self._gpus[gpu_type] = found
        return found

    def step_params(self, gpu_type: str) -> StepParams:
        """Fitted parameters of the GPU type (with the config's overrides)."""
        found = self._steps.get(gpu_type)
        if found is None:
            found = self.params.for_gpu(self.gpu(gpu_type).catalog_id, self.config.engine)
            cfg = self.config
            found = replace(found, mfu=cfg.compute_efficiency or found.mfu, mbu=cfg.bandwidth_efficiency or found.mbu)
            self._steps[gpu_type] = found
        return found

    def _dims_of(self, shape: ModelShape) -> ModelDims:
        dims = self._dims.get(shape)
        if dims is None:
            dims = self._dims[shape] = model_dims(shape)
        return dims

    def _hw(self, c: Candidate, shape: ModelShape) -> Hardware:
        return Hardware(self.gpu(c.gpu_type), max(1, c.gpu_count), fp8=shape.bytes_per_param <= 1.0)

    def _rates(self, c: Candidate, shape: ModelShape) -> StepRates:
        # By the shape's identity, not its value: hashing a ModelShape would cost as much as the step.
        key = (c.gpu_type, c.gpu_count, id(shape))
        found = self._step_rates.get(key)
        if found is None or found[0] is not shape:
            if len(self._step_rates) >= _MAX_RATES:
                self._step_rates.clear()  # shapes come and go with views; a few dozen are ever live
            found = self._step_rates[key] = (shape, StepRates(self._dims_of(shape), self._hw(c, shape),
                                                              self.step_params(c.gpu_type)))
        return found[1]

    def _step(self, c: Candidate, shape: ModelShape, decodes: float, context: float, prefill: float,
              pairs: float | None = None) -> float:
        """step_seconds(mixed_work(...)) on the worker's GPUs (runtime.stepmodel.StepRates: the same value)."""
        return self._rates(c, shape).mixed(decodes, context, prefill, pairs)

    def flops(self, c: Candidate) -> float:
        """Achievable bf16 FLOP/s of the worker's whole GPU set (fitted MFU)."""
        return self.gpu(c.gpu_type).bf16_flops * max(1, c.gpu_count) * self.step_params(c.gpu_type).mfu

    def bandwidth(self, c: Candidate) -> float:
        """Achievable memory bytes/s of the worker's whole GPU set (fitted MBU)."""
        return self.gpu(c.gpu_type).hbm_bytes_per_s * max(1, c.gpu_count) * self.step_params(c.gpu_type).mbu

    def prefix_hit_tokens(self, c: Candidate, prompt_tokens: int) -> int:
        """Prompt tokens the worker's prefix cache is expected to serve (its lifetime hit rate)."""
        if c.load is None or prompt_tokens <= 1:
            return 0
        # The last prompt token is always computed: it yields the first token.
        return min(prompt_tokens - 1, int(c.load.prefix_cache_hit_rate * prompt_tokens))

    def _queue_token_s(self, c: Candidate, shape: ModelShape) -> float:
        key = (c.gpu_type, c.gpu_count, shape)
        found = self._per_token.get(key)
        if found is None:
            found = self._per_token[key] = self._step(c, shape, 0, 0, QUEUE_CHUNK_TOKENS) / QUEUE_CHUNK_TOKENS
        return found

    def prefill_queue_s(self, c: Candidate, shape: ModelShape) -> float:
        """Time to work off the prompt tokens already queued on the worker."""
        queued = c.load.queued_prefill_tokens if c.load is not None else 0
        return queued * self._queue_token_s(c, shape)

    def prefill_s(self, c: Candidate, prompt_tokens: int, shape: ModelShape) -> float:
        """Time to prefill this prompt on the worker, once it reaches the head of the queue.

        Priced per token like the queue ahead of it (a chunk of
        QUEUE_CHUNK_TOKENS: a busy engine shares each step's overhead and
        weight reads among the prompts in it), times the tokens the prefix
        cache does not serve. The policy passes only the uncached count, not
        the cached prefix those tokens attend to, so attention is priced at
        the chunk's average context.
        """
        work = prompt_tokens - self.prefix_hit_tokens(c, prompt_tokens)
        return work * self._queue_token_s(c, shape) if work > 0 else 0.0

    def step_s(self, c: Candidate, shape: ModelShape, batch: int, kv_tokens: float) -> float:
        """One decode step for `batch` sequences holding `kv_tokens` of KV in all."""
        batch = max(1, batch)
        return self._step(c, shape, batch, kv_tokens / batch, 0)

    def inter_token_s(self, c: Candidate, shape: ModelShape, prompt_tokens: int, max_tokens: int) -> float:
        """Expected time between this request's tokens once it joins the worker's batch.

        A decode step of the batch it joins, plus the share of the prompts
        queued on the worker that will be prefilled in steps this request
        shares (their interference, spread over its `max_tokens`).
        """
        load = c.load
        batch = (load.active_sequences if load is not None else 0) + 1
        kv_in_use = (load.kv_blocks_used if load is not None else 0) * c.block_size
        # Over its life the request holds the prompt plus, on average, half its output.
        kv = kv_in_use + prompt_tokens + max_tokens / 2
        context = kv / batch
        rates = self._rates(c, shape)
        step = rates.mixed(batch, context, 0)  # step_s(c, shape, batch, kv)
        queued = load.queued_prefill_tokens if load is not None else 0
        if queued <= 0 or max_tokens <= 0:
            return step
        chunk = min(queued, QUEUE_CHUNK_TOKENS)
        extra_per_chunk = rates.mixed(batch, context, chunk) - step
        return step + extra_per_chunk * (queued / chunk) / max_tokens

    def kv_transfer_s(self, prompt_tokens: int, shape: ModelShape, same_host: bool) -> float:
        rate = self.config.same_host_kv_bytes_per_s if same_host else self.config.cross_host_kv_bytes_per_s
        return prompt_tokens * shape.kv_bytes_per_token / rate


def blocks_needed(tokens: int, block_size: int) -> int:
    """KV blocks holding `tokens`; 0 when the worker is not block-structured."""
    return math.ceil(tokens / block_size) if block_size > 0 else 0
