"""The calibrated step-time model: seconds of one engine step on a set of GPUs. Pure.

One engine step (a batch of decode tokens, possibly with a prefill chunk)
costs, on `n` GPUs of one type running one tensor-parallel replica:

    step = overhead
         + all-reduces                       (n > 1 only)
         + max(compute, memory)
         + interference x min(compute, memory)

- compute = linear FLOPs / (n x peak at the weights' precision x mfu)
          + attention FLOPs / (n x bf16 peak x mfu)
- memory  = (weight bytes read + KV bytes read and written) / (n x HBM bytes/s x mbu)
- all-reduces = count x (allreduce_s + bytes x 2(n-1)/n / link bytes/s):
  two per layer (after attention and after the MLP), each over the step's
  activations (tokens x hidden x 2 bytes); the link figure is the GPU
  catalog's `link_gbps`.
- overhead: a fixed cost per step (scheduling, kernel launches, sampling)
  that a roofline misses and that dominates small decode batches.
- interference in [0, 1]: how much of the smaller of compute and memory the
  kernels fail to hide under the larger. 0 is the plain roofline, where a
  decode batch rides free on a compute-bound prefill chunk; 1 charges a
  decode batch sharing a step with a prefill chunk its full memory time, as
  if they ran one after the other.

Attention grows with context: decode reads every cached KV byte (memory),
prefill computes 4 x layers x heads x head_dim FLOPs per (query, key) pair.

The parameters (`StepParams`) are fitted to published measurements by
bench/calibrate_costmodel.py and stored in runtime/data/step_params.toml
(see docs/costmodel.md); runtime/stepparams.py loads them. The router's cost
model, the sim engine and the fleet simulator all time steps with this one
function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from runtime.catalog import GpuModel

__all__ = [
    "ACTIVATION_BYTES",
    "FALLBACK_LINK_BYTES_PER_S",
    "Hardware",
    "ModelDims",
    "StepParams",
    "StepWork",
    "WorkCounts",
    "count_work",
    "mixed_work",
    "step_seconds",
    "work_of",
]

# Activations cross the all-reduce in bf16.
ACTIVATION_BYTES = 2.0
# Parts without a recorded link figure: an assumed PCIe Gen4 x16-class link.
# An assumption, not a measurement; record link_gbps in the catalog instead.
FALLBACK_LINK_BYTES_PER_S = 25e9


@dataclass(frozen=True)
class StepParams:
    """Fitted efficiencies and costs for one GPU type on one engine."""

    # Share of the peak FLOP/s the matmuls reach.
    mfu: float
    # Share of the HBM bandwidth the kernels reach.
    mbu: float
    # Fixed seconds per step.
    overhead_s: float
    # Share of min(compute, memory) not hidden under the larger (0: roofline, 1: serial).
    interference: float
    # Latency of one tensor-parallel all-reduce (seconds), before its bytes.
    allreduce_s: float

    def __post_init__(self) -> None:
        for name in ("mfu", "mbu"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not 0.0 <= self.interference <= 1.0:
            raise ValueError(f"interference must be in [0, 1], got {self.interference}")
        for name in ("overhead_s", "allreduce_s"):
            value = getattr(self, name)
            if not 0.0 <= value < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite, got {value}")


@dataclass(frozen=True)
class Hardware:
    """Peak rates of `count` GPUs of one type serving one tensor-parallel replica."""

    gpu: GpuModel
    count: int = 1
    # Weights in FP8: the matmuls run at the part's FP8 rate (bf16 where it has none).
    fp8: bool = False

    @property
    def linear_flops(self) -> float:
        return (self.gpu.fp8_flops if self.fp8 else self.gpu.bf16_flops) * self.count

    @property
    def attention_flops(self) -> float:
        return self.gpu.bf16_flops * self.count

    @property
    def bandwidth(self) -> float:
        return self.gpu.hbm_bytes_per_s * self.count

    @property
    def link_bytes_per_s(self) -> float:
        return self.gpu.link_bytes_per_s or FALLBACK_LINK_BYTES_PER_S


@dataclass(frozen=True)
class ModelDims:
    """What the step model needs of a model's shape."""

    # Parameters doing matmul work per token (no input embedding; routed experts only).
    active_params: float
    # Weight bytes one step reads (dense models: all but the embedding table).
    weight_bytes: float
    kv_bytes_per_token: float
    num_layers: int
    hidden_size: int
    # 4 x layers x heads x head_dim: FLOPs per (query, key) pair over all layers.
    attention_flops_per_pair: float


@dataclass(frozen=True)
class StepWork:
    """What one step computes and moves."""

    tokens: int
    linear_flops: float
    attention_flops: float
    weight_bytes: float
    kv_bytes: float
    # Tensor-parallel all-reduces and the bytes each carries.
    allreduces: int
    allreduce_bytes: float


def work_of(dims: ModelDims, work: Iterable[tuple[int, int]], weight_bytes: float | None = None) -> StepWork:
    """The step computing, per sequence, `new` tokens after `cached` ones (causal attention).

    `weight_bytes` overrides the dense read (MoE: the experts the step's tokens touch).
    """
    counts = count_work(work)
    return _work(dims, counts.tokens, counts.pairs, counts.kv_tokens, weight_bytes)


@dataclass(frozen=True)
class WorkCounts:
    """The token counts a step's cost follows from."""

    tokens: int  # new tokens computed
    pairs: float  # causal (query, key) pairs the new tokens attend over
    kv_tokens: int  # KV entries read or written: every new and cached token


def count_work(work: Iterable[tuple[int, int]]) -> WorkCounts:
    """Counts of the step computing, per sequence, `new` tokens after `cached` ones; ValueError if negative."""
    tokens = 0
    pairs = 0.0
    kv_tokens = 0
    for new, cached in work:
        if new < 0 or cached < 0:
            raise ValueError(f"token counts must be >= 0, got new={new} cached={cached}")
        tokens += new
        kv_tokens += new + cached
        pairs += new * cached + new * (new + 1) / 2
    return WorkCounts(tokens, pairs, kv_tokens)


def mixed_work(dims: ModelDims, decodes: float, decode_context: float, prefill_tokens: float,
               prefill_pairs: float | None = None) -> StepWork:
    """A step with `decodes` decode tokens (each after `decode_context` cached ones) and
    `prefill_tokens` prompt tokens. Counts may be averages over steps.

    `prefill_pairs`: the (query, key) pairs the prompt tokens attend over; by default one
    prompt of `prefill_tokens` from scratch, n(n+1)/2.
    """
    if prefill_pairs is None:
        prefill_pairs = prefill_tokens * (prefill_tokens + 1) / 2
    pairs = decodes * (decode_context + 1) + prefill_pairs
    kv_tokens = decodes * (decode_context + 1) + prefill_tokens
    return _work(dims, decodes + prefill_tokens, pairs, kv_tokens, None)


def _work(dims: ModelDims, tokens: float, pairs: float, kv_tokens: float, weight_bytes: float | None) -> StepWork:
    if tokens <= 0:
        return StepWork(0, 0.0, 0.0, 0.0, 0.0, 0, 0.0)
    return StepWork(
        tokens=math.ceil(tokens),
        linear_flops=2.0 * dims.active_params * tokens,
        attention_flops=dims.attention_flops_per_pair * pairs,
        weight_bytes=dims.weight_bytes if weight_bytes is None else weight_bytes,
        kv_bytes=dims.kv_bytes_per_token * kv_tokens,
        allreduces=2 * dims.num_layers,
        allreduce_bytes=tokens * dims.hidden_size * ACTIVATION_BYTES,
    )


def step_seconds(work: StepWork, hw: Hardware, params: StepParams) -> float:
    """Seconds of one step (module docstring); 0 for a step with no tokens."""
    if work.tokens <= 0:
        return 0.0
    compute = (work.linear_flops / (hw.linear_flops * params.mfu)
               + work.attention_flops / (hw.attention_flops * params.mfu))
    memory = (work.weight_bytes + work.kv_bytes) / (hw.bandwidth * params.mbu)
    comm = 0.0
    if hw.count > 1:
        ring = 2.0 * (hw.count - 1) / hw.count
        comm = work.allreduces * (params.allreduce_s + work.allreduce_bytes * ring / hw.link_bytes_per_s)
    return params.overhead_s + comm + max(compute, memory) + params.interference * min(compute, memory)


class StepRates:
    """`step_seconds` for one model on one GPU set with one StepParams, with the constants worked out once.

    For callers that time many steps (the sim engine times each it runs,
    the router prices several per routing decision): the same operations in
    the same order as `_work` + `step_seconds`, over precomputed rates, so
    the answer is theirs to the last bit, without building a StepWork.
    """

    __slots__ = ("_allreduces", "_attention", "_dims", "_linear", "_link", "_memory", "_params", "_ring", "_tp")

    def __init__(self, dims: ModelDims, hw: Hardware, params: StepParams) -> None:
        self._dims = dims
        self._params = params
        self._linear = hw.linear_flops * params.mfu
        self._attention = hw.attention_flops * params.mfu
        self._memory = hw.bandwidth * params.mbu
        self._tp = hw.count > 1
        self._ring = 2.0 * (hw.count - 1) / hw.count
        self._link = hw.link_bytes_per_s
        self._allreduces = 2 * dims.num_layers

    def seconds(self, tokens: float, pairs: float, kv_tokens: float, weight_bytes: float | None = None) -> float:
        """One step computing `tokens` new tokens over `pairs` (query, key) pairs, touching `kv_tokens` KV
        entries; `weight_bytes` overrides the dense weight read (MoE). 0 for no tokens."""
        if tokens <= 0:
            return 0.0
        dims, params = self._dims, self._params
        compute = (2.0 * dims.active_params * tokens / self._linear
                   + dims.attention_flops_per_pair * pairs / self._attention)
        memory = ((dims.weight_bytes if weight_bytes is None else weight_bytes)
                  + dims.kv_bytes_per_token * kv_tokens) / self._memory
        comm = 0.0
        if self._tp:
            allreduce_bytes = tokens * dims.hidden_size * ACTIVATION_BYTES
            comm = self._allreduces * (params.allreduce_s + allreduce_bytes * self._ring / self._link)
        return params.overhead_s + comm + max(compute, memory) + params.interference * min(compute, memory)

    def mixed(self, decodes: float, decode_context: float, prefill_tokens: float,
              prefill_pairs: float | None = None) -> float:
        """`step_seconds(mixed_work(...))` for the same arguments (see mixed_work)."""
        if prefill_pairs is None:
            prefill_pairs = prefill_tokens * (prefill_tokens + 1) / 2
        decode_kv = decodes * (decode_context + 1)
        return self.seconds(decodes + prefill_tokens, decode_kv + prefill_pairs, decode_kv + prefill_tokens)
