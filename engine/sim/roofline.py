"""Step timing of prefill and decode: pure functions of GPU, model and work.

Two timings, chosen by `RooflineParams.timing`:

- "calibrated" (default): the step model of runtime/stepmodel.py with the
  parameters fitted to published measurements for the GPU type
  (runtime/data/step_params.toml; docs/costmodel.md): a fixed overhead per
  step, max(compute, memory) plus the fitted share of the smaller one that
  the kernels do not hide (prefill-decode interference in a shared step),
  and tensor-parallel all-reduces over the catalog's link bandwidth. FP8
  weights (profile dense_weight_bytes 1) compute at the GPU's FP8 rate.
  `mfu` / `mbu`, when set, override the fitted efficiencies.
- "roofline": every step is charged ``max(FLOPs / compute, bytes / bandwidth)``
  with compute = peak bf16 FLOP/s x gpu_count x TP efficiency x MFU and
  bandwidth = HBM bytes/s x gpu_count x TP efficiency x MBU (TP efficiency
  only when gpu_count > 1); MFU 0.5 and MBU 0.7 unless set.

Both count the same work. A step computes, for each sequence in it, ``n``
new tokens on top of ``c`` tokens already in the KV cache (prefill: n =
prompt tokens not served from the prefix cache; decode: n = 1, c = the
context so far). With T = sum of n:

- FLOPs = 2 x active_params x T
        + 4 x layers x heads x head_dim x sum(n x c + n(n+1)/2)
  (QK^T and AV, causal: new token i attends to c + i + 1 positions)
- bytes = weight bytes touched by T tokens + kv_bytes_per_token x sum(c + n)
  (every weight read once per step; each sequence's cached KV read and its
  new KV written once)

Weights touched: all dense weights except the embedding table (a lookup),
plus, for MoE, the experts the step's tokens route to. With uniform routing
of k of E experts per token, T tokens leave an expert untouched with
probability (1 - k/E)^T, so the expert bytes read are
``expert_weight_bytes x (1 - (1 - k/E)^T)``: k/E of them at T = 1, nearly
all for large batches.

KV capacity: ``floor((memory x gpu_count x memory_utilization - weight bytes
- activation reserve x gpu_count) / (block_size x kv_bytes_per_token))``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar

from engine.base import EngineError
from engine.sim.profiles import ModelProfile
from runtime.catalog import GpuCatalog, GpuModel, default_catalog
from runtime.stepmodel import Hardware, ModelDims, StepParams, StepRates, count_work, work_of
from runtime.stepmodel import step_seconds as model_step_seconds
from runtime.stepparams import default_step_params

TIMINGS = ("calibrated", "roofline")
# The plain roofline's efficiencies when none are set.
ROOFLINE_MFU, ROOFLINE_MBU = 0.5, 0.7


@dataclass(frozen=True)
class RooflineParams:
    """Timing assumptions. Build with `create(...)` to have every range checked."""

    # "calibrated" (the fitted step model) or "roofline" (max(FLOPs, bytes) only).
    timing: str = "calibrated"
    # Fraction of peak FLOP/s the matmuls reach; None: fitted (calibrated) or 0.5 (roofline).
    mfu: float | None = None
    # Fraction of HBM bandwidth the kernels reach; None: fitted (calibrated) or 0.7 (roofline).
    mbu: float | None = None
    # Roofline timing only: fraction of each GPU left after tensor-parallel all-reduces.
    tp_efficiency: float = 0.9
    # Fraction of GPU memory the engine may use (vLLM's gpu_memory_utilization).
    memory_utilization: float = 0.9
    # Per GPU, held back for activations, CUDA graphs and the allocator (GB).
    activation_reserve_gb: float = 2.0

    _DESCRIPTIONS: ClassVar[dict[str, str]] = {
        "timing": "step timing: calibrated step model (docs/costmodel.md) or plain roofline",
        "mfu": "fraction of peak FLOP/s reached (None: the fitted value per GPU type)",
        "mbu": "fraction of HBM bandwidth reached (None: the fitted value per GPU type)",
        "tp_efficiency": "roofline timing only: per-GPU efficiency under tensor parallelism (gpu_count > 1)",
        "memory_utilization": "fraction of GPU memory for weights + KV cache",
        "activation_reserve_gb": "GB per GPU held back for activations",
    }

    @classmethod
    def create(cls, **values: float | str | None) -> RooflineParams:
        """Checks every range; EngineError names the field and the allowed range."""
        params = cls(**values)  # type: ignore[arg-type]
        if params.timing not in TIMINGS:
            raise EngineError(f"sim timing must be one of {', '.join(TIMINGS)}, got {params.timing!r}")
        for name in ("mfu", "mbu", "tp_efficiency", "memory_utilization"):
            value = getattr(params, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise EngineError(f"sim {name} must be in (0, 1], got {value}")
        if not 0.0 <= params.activation_reserve_gb < math.inf:
            raise EngineError(f"sim activation_reserve_gb must be >= 0, got {params.activation_reserve_gb}")
        return params

    def describe(self) -> list[str]:
        """One line per assumption, for printing next to benchmark results."""
        return [f"{f.name} = {getattr(self, f.name)}: {self._DESCRIPTIONS[f.name]}" for f in fields(self)]

    def step_params(self, gpu_type: str) -> StepParams:
        """The calibrated step model's parameters for `gpu_type`, with this object's overrides."""
        return _step_params(self, gpu_type)


@functools.lru_cache(maxsize=256)
def _step_params(params: RooflineParams, gpu_type: str) -> StepParams:
    # Cached: the fleet simulator times millions of steps.
    fitted = default_step_params().for_gpu(gpu_type)
    return replace(fitted, mfu=params.mfu if params.mfu is not None else fitted.mfu,
                   mbu=params.mbu if params.mbu is not None else fitted.mbu)


DEFAULT_PARAMS = RooflineParams()
# The plain roofline with its historical efficiencies, for comparisons.
ROOFLINE_PARAMS = RooflineParams(timing="roofline")


@dataclass(frozen=True)
class GpuSet:
    """`count` GPUs of one catalog model serving one model replica (tensor parallel)."""

    gpu: GpuModel
    count: int = 1

    def _scale(self, params: RooflineParams) -> float:
        return self.count * (params.tp_efficiency if self.count > 1 else 1.0)

    def compute_flops(self, params: RooflineParams = ROOFLINE_PARAMS) -> float:
        """Roofline timing's FLOP/s: peak bf16 x count x TP efficiency x MFU."""
        return self.gpu.bf16_flops * self._scale(params) * (params.mfu or ROOFLINE_MFU)

    def bandwidth(self, params: RooflineParams = ROOFLINE_PARAMS) -> float:
        """Roofline timing's bytes/s: HBM bandwidth x count x TP efficiency x MBU."""
        return self.gpu.hbm_bytes_per_s * self._scale(params) * (params.mbu or ROOFLINE_MBU)

    @property
    def memory_bytes(self) -> float:
        return self.gpu.memory_bytes * self.count

    def describe(self) -> str:
        return f"{self.count} x {self.gpu.catalog_id}"


def gpu_set(gpu_type: str, count: int = 1, catalog: GpuCatalog | None = None) -> GpuSet:
    """The GpuSet for a catalog id; EngineError names the known ids or the bad count."""
    if count < 1:
        raise EngineError(f"gpu_count must be >= 1, got {count}")
    if not gpu_type:
        raise EngineError("the sim engine needs gpu_type, a GPU catalog id such as 'H100-SXM'")
    try:
        return GpuSet((catalog or default_catalog()).get(gpu_type), count)
    except KeyError as exc:
        raise EngineError(str(exc.args[0])) from None


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float


def weight_bytes_touched(profile: ModelProfile, tokens: int) -> float:
    """Weight bytes one step over `tokens` tokens reads (see module docstring)."""
    if tokens <= 0:
        return 0.0
    dense = (profile.dense_params - profile.embedding_params) * profile.dense_weight_bytes
    if not profile.is_moe:
        return dense
    untouched = (1.0 - profile.experts_per_token / profile.num_experts) ** tokens
    return dense + profile.expert_params * profile.expert_weight_bytes * (1.0 - untouched)


def attention_flops_per_pair(profile: ModelProfile) -> float:
    """Causal attention FLOPs of one (query, key) pair, all layers."""
    return 4.0 * profile.num_layers * profile.num_heads * profile.head_dim


def step_cost(profile: ModelProfile, work: Iterable[tuple[int, int]]) -> StepCost:
    """FLOPs and bytes of one step; `work` holds (new_tokens, cached_tokens) per sequence."""
    counts = count_work(work)
    flops = attention_flops_per_pair(profile) * counts.pairs + 2.0 * profile.active_params * counts.tokens
    nbytes = weight_bytes_touched(profile, counts.tokens) + float(profile.kv_bytes_per_token) * counts.kv_tokens
    return StepCost(flops, nbytes)


@functools.cache
def model_dims(profile: ModelProfile) -> ModelDims:
    """The step model's view of a profile (weight bytes: a one-token step's read)."""
    return ModelDims(
        active_params=profile.active_params,
        weight_bytes=weight_bytes_touched(profile, 1),
        kv_bytes_per_token=profile.kv_bytes_per_token,
        num_layers=profile.num_layers,
        hidden_size=profile.hidden_size,
        attention_flops_per_pair=attention_flops_per_pair(profile),
    )


def hardware(gpus: GpuSet, profile: ModelProfile) -> Hardware:
    """The step model's rates; dense weights of 1 byte are FP8 and compute at the FP8 rate."""
    return Hardware(gpus.gpu, gpus.count, fp8=profile.dense_weight_bytes <= 1.0)


def step_seconds(
    gpus: GpuSet, profile: ModelProfile, work: Iterable[tuple[int, int]], params: RooflineParams = DEFAULT_PARAMS
) -> float:
    """Seconds of one step (module docstring: calibrated or roofline timing); 0 for no work."""
    if params.timing == "roofline":
        cost = step_cost(profile, work)
        if cost.flops == 0.0:
            return 0.0
        return max(cost.flops / gpus.compute_flops(params), cost.bytes / gpus.bandwidth(params))
    work = list(work)
    tokens = sum(new for new, _ in work)
    if tokens <= 0:
        return 0.0
    step = work_of(model_dims(profile), work, weight_bytes_touched(profile, tokens))
    return model_step_seconds(step, hardware(gpus, profile), params.step_params(gpus.gpu.catalog_id))


class StepTimer:
    """`step_seconds` for one GPU set, profile and params, with everything no step changes worked out once.

    The sim engine times every step it runs, several per request: this is the
    calibrated step model (runtime.stepmodel.StepRates over precomputed
    rates, the same operations in the same order as work_of and
    step_seconds), so the answer is step_seconds' to the last bit
    (tests/unit/test_sim_step_timer.py holds it to that).
    """

    def __init__(self, gpus: GpuSet, profile: ModelProfile, params: RooflineParams = DEFAULT_PARAMS) -> None:
        self._gpus = gpus
        self._profile = profile
        self._params = params
        self._calibrated = params.timing != "roofline"
        if not self._calibrated:
            return
        self._rates = StepRates(model_dims(profile), hardware(gpus, profile),
                                params.step_params(gpus.gpu.catalog_id))
        # Dense models read the same weights whatever the batch; MoE ones depend on the step's tokens.
        self._dense_weight_bytes = None if profile.is_moe else weight_bytes_touched(profile, 1)

    def seconds(self, work: Sequence[tuple[int, int]]) -> float:
        """Seconds of one step of `work`, (new, cached) per sequence; 0 for no work."""
        if not self._calibrated:
            return step_seconds(self._gpus, self._profile, work, self._params)
        tokens = 0
        kv_tokens = 0
        pairs = 0.0
        for new, cached in work:
            tokens += new
            kv_tokens += new + cached
            pairs += new * cached + new * (new + 1) / 2
        if tokens <= 0:
            return 0.0
        weight_bytes = self._dense_weight_bytes
        if weight_bytes is None:
            weight_bytes = weight_bytes_touched(self._profile, tokens)
        return self._rates.seconds(tokens, pairs, kv_tokens, weight_bytes)


def prefill_seconds(
    gpus: GpuSet, profile: ModelProfile, new_tokens: int, cached_tokens: int = 0,
    params: RooflineParams = DEFAULT_PARAMS,
) -> float:
    """Seconds to prefill `new_tokens` after `cached_tokens` prefix-cached ones, alone on the GPUs."""
    return step_seconds(gpus, profile, [(new_tokens, cached_tokens)], params)


def decode_step_seconds(
    gpus: GpuSet, profile: ModelProfile, contexts: Sequence[int], params: RooflineParams = DEFAULT_PARAMS
) -> float:
    """Seconds of one decode step: one new token for each sequence, `contexts` cached tokens each."""
    return step_seconds(gpus, profile, [(1, c) for c in contexts], params)


def kv_capacity_blocks(
    gpus: GpuSet, profile: ModelProfile, block_size: int, params: RooflineParams = DEFAULT_PARAMS
) -> int:
    """KV blocks that fit beside the weights; EngineError when the model does not fit."""
    if block_size < 1:
        raise EngineError(f"kv_block_size must be >= 1, got {block_size}")
    usable = gpus.memory_bytes * params.memory_utilization
    reserve = params.activation_reserve_gb * 1e9 * gpus.count
    free = usable - profile.weight_bytes - reserve
    blocks = math.floor(free / (block_size * profile.kv_bytes_per_token)) if free > 0 else 0
    if blocks < 1:
        raise EngineError(
            f"{profile.profile_id} does not fit on {gpus.describe()}: weights {profile.weight_bytes / 1e9:.1f} GB"
            f" + activation reserve {reserve / 1e9:.1f} GB leave no room for a KV block in"
            f" {usable / 1e9:.1f} GB ({params.memory_utilization:.0%} of {gpus.memory_bytes / 1e9:.0f} GB);"
            " use more GPUs (gpu_count) or a larger GPU type"
        )
    return blocks
