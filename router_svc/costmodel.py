"""Expected time of work on a given worker: a roofline over the GPU catalog. Pure.

Prefill is compute-bound: its time is the prompt's FLOPs over the GPU's
bf16 rate. A decode step is memory-bound at small batch (read the weights
and every live sequence's KV once per step) and compute-bound at large
batch; its time is the larger of the two. Datasheet peaks are scaled by an
achieved efficiency; operators calibrate the catalog rather than this code.

Only ratios between candidates matter to the policy, so a crude model that
is right about *which GPU is faster at what* does its job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# ModelShape lives with the candidates that publish it; imported from here too.
from router_svc.candidates import Candidate, ModelShape
from runtime.catalog import GpuCatalog, GpuModel, default_catalog

__all__ = ["UNKNOWN_GPU", "CostConfig", "CostModel", "ModelShape", "blocks_needed"]

# For workers whose gpu_type is empty or not in the catalog (CPU test
# workers, new parts): a modest GPU, so a known fast part wins over it and a
# fleet of unknown parts degenerates to load-based routing.
UNKNOWN_GPU = GpuModel(catalog_id="unknown", nvml_names=(), bf16_tflops=100.0, memory_gb=24.0, hbm_tbps=0.5)


@dataclass(frozen=True)
class CostConfig:
    # Share of peak bf16 FLOP/s a prefill (or a large decode batch) achieves.
    compute_efficiency: float = 0.5
    # Share of peak memory bandwidth a decode step achieves.
    bandwidth_efficiency: float = 0.7
    # KV cache transfer rates between workers (bytes/s): shared memory on one
    # host, the network between hosts.
    same_host_kv_bytes_per_s: float = 20e9
    cross_host_kv_bytes_per_s: float = 10e9


class CostModel:
    """Time estimates per candidate. Thread-safe for reads; caches catalog lookups per GPU type."""

    def __init__(self, catalog: GpuCatalog | None = None, config: CostConfig | None = None) -> None:
        self.catalog = catalog if catalog is not None else default_catalog()
        self.config = config or CostConfig()
        self._gpus: dict[str, GpuModel] = {}
        # (gpu_type, gpu_count) -> (FLOP/s, bytes/s): scoring a thousand
        # candidates per request must not repeat catalog lookups.
        self._rates: dict[tuple[str, int], tuple[float, float]] = {}

    def gpu(self, gpu_type: str) -> GpuModel:
        """The catalog row for `gpu_type`, or UNKNOWN_GPU."""
        found = self._gpus.get(gpu_type)
        if found is None:
            found = self.catalog.get(gpu_type) if gpu_type in self.catalog else UNKNOWN_GPU
            self._gpus[gpu_type] = found
        return found

    def _rates_of(self, c: Candidate) -> tuple[float, float]:
        key = (c.gpu_type, c.gpu_count)
        rates = self._rates.get(key)
        if rates is None:
            gpu, count = self.gpu(c.gpu_type), max(1, c.gpu_count)
            rates = (
                gpu.bf16_flops * count * self.config.compute_efficiency,
                gpu.hbm_bytes_per_s * count * self.config.bandwidth_efficiency,
            )
            self._rates[key] = rates
        return rates

    def flops(self, c: Candidate) -> float:
        """Achievable FLOP/s of the worker's whole GPU set."""
        return self._rates_of(c)[0]

    def bandwidth(self, c: Candidate) -> float:
        """Achievable memory bytes/s of the worker's whole GPU set."""
        return self._rates_of(c)[1]

    def prefix_hit_tokens(self, c: Candidate, prompt_tokens: int) -> int:
        """Prompt tokens the worker's prefix cache is expected to serve (its lifetime hit rate)."""
        if c.load is None or prompt_tokens <= 1:
            return 0
        # The last prompt token is always computed: it yields the first token.
        return min(prompt_tokens - 1, int(c.load.prefix_cache_hit_rate * prompt_tokens))

    def prefill_queue_s(self, c: Candidate, shape: ModelShape) -> float:
        """Time to work off the prompt tokens already queued on the worker."""
        queued = c.load.queued_prefill_tokens if c.load is not None else 0
        return queued * shape.flops_per_token / self.flops(c)

    def prefill_s(self, c: Candidate, prompt_tokens: int, shape: ModelShape) -> float:
        """Time to prefill this prompt on the worker, once it reaches the head of the queue."""
        work = prompt_tokens - self.prefix_hit_tokens(c, prompt_tokens)
        return work * shape.flops_per_token / self.flops(c)

    def step_s(self, c: Candidate, shape: ModelShape, batch: int, kv_tokens: float) -> float:
        """One decode step for `batch` sequences holding `kv_tokens` of KV in all."""
        flops, bandwidth = self._rates_of(c)
        memory = (shape.weight_bytes + kv_tokens * shape.kv_bytes_per_token) / bandwidth
        compute = batch * shape.flops_per_token / flops
        return max(memory, compute)

    def inter_token_s(self, c: Candidate, shape: ModelShape, prompt_tokens: int, max_tokens: int) -> float:
        """Expected time between this request's tokens once it joins the worker's batch."""
        load = c.load
        batch = (load.active_sequences if load is not None else 0) + 1
        kv_in_use = (load.kv_blocks_used if load is not None else 0) * c.block_size
        # Over its life the request holds the prompt plus, on average, half its output.
        return self.step_s(c, shape, batch, kv_in_use + prompt_tokens + max_tokens / 2)

    def kv_transfer_s(self, prompt_tokens: int, shape: ModelShape, same_host: bool) -> float:
        rate = self.config.same_host_kv_bytes_per_s if same_host else self.config.cross_host_kv_bytes_per_s
        return prompt_tokens * shape.kv_bytes_per_token / rate


def blocks_needed(tokens: int, block_size: int) -> int:
    """KV blocks holding `tokens`; 0 when the worker is not block-structured."""
    return math.ceil(tokens / block_size) if block_size > 0 else 0
