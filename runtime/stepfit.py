"""Fitting the step model (runtime/stepmodel.py) to published measurements. Pure.

A published row is a serving measurement, not a step time, so each kind is
turned into steps by a closed-form steady state:

- throughput (offline, every request queued at once): B requests run
  together, B = min(max_batch, KV capacity / (ISL + OSL)) (the engine
  reserves a request's whole length). One cycle of B requests prefills
  B x ISL tokens and decodes B x OSL, in max(OSL, B (ISL + OSL) / chunk)
  steps that each carry an even share of both (chunked prefill beside
  decode); output tokens/s = B x OSL / cycle time.
- ttft_ms at concurrency 1: the prompt's prefill steps alone (chunks of
  `chunk` tokens).
- itl_ms at concurrency c (closed loop): a decode step of c sequences at
  context ISL + OSL/2, plus, spread over the OSL - 1 gaps, the extra time of
  the c - 1 other users' prefills that land in this user's steps:
  ITL = step(c) + (c - 1) / (OSL - 1) x (step(c - 1 decodes + prompt) - step(c - 1)).
- decode_tok_s: one request's decode rate at concurrency c, 1000 / itl_ms.
- batch_latency_ms: `batch` prompts of ISL tokens generating OSL tokens
  together (vLLM's latency benchmark): one prefill step of them all, then
  OSL - 1 decode steps of the batch at context ISL + OSL/2.
- step_ms: one step of `batch` decodes at `context` plus `prefill` new tokens.

The fit minimises the summed squared log error over the calibration rows,
by coordinate descent with golden-section line searches inside fixed bounds
(deterministic: same rows, same start, same answer), once per combination
of the discrete engine options.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from runtime.catalog import GpuModel
from runtime.stepmodel import Hardware, ModelDims, StepParams, mixed_work, step_seconds

KINDS = ("throughput", "ttft_ms", "itl_ms", "decode_tok_s", "batch_latency_ms", "step_ms")


@dataclass(frozen=True)
class Row:
    """One published (or measured) figure, with what it was measured on."""

    source: str
    engine: str
    kind: str
    model: str
    gpu: str
    tp: int
    weights: str
    input_tokens: int
    output_tokens: int
    concurrency: int
    value: float
    # step_ms rows only.
    batch: int = 0
    context: int = 0
    prefill: int = 0

    def shape(self) -> str:
        return f"{self.input_tokens}/{self.output_tokens}"

    def describe(self) -> str:
        c = f" c={self.concurrency}" if self.concurrency else ""
        b = f" b={self.batch} ctx={self.context} p={self.prefill}" if self.kind == "step_ms" else ""
        return f"{self.model} {self.weights} {self.gpu} TP{self.tp} {self.kind} {self.shape()}{c}{b} ({self.engine})"


@dataclass(frozen=True)
class FitModel:
    """A model's dims at one weight precision (KV in bf16), and the bytes its weights occupy."""

    dims: ModelDims
    resident_bytes: float


@dataclass(frozen=True)
class EngineOptions:
    """Discrete engine settings the published rows do not state; chosen by the fit."""

    max_batch: int = 2048
    # KV cache bytes per element (2: bf16, 1: fp8).
    kv_bytes: int = 2
    # Tokens per step (max_num_tokens / max_num_batched_tokens).
    chunk: int = 8192
    # Share of the memory left after weights that holds KV.
    kv_fraction: float = 0.9
    activation_reserve_gb: float = 2.0


# Held-out rows, fixed before any fit and never fitted to: the interior
# request shapes of the throughput tables, and the interior concurrencies of
# the closed-loop tables. Everything else calibrates.
HELD_OUT_SHAPES = frozenset({"500/2000", "1000/2000", "2048/2048", "5000/500"})
HELD_OUT_CONCURRENCY = frozenset({5, 50})
HELD_OUT_STEPS = frozenset({8, 32, 1024, 4096})
SPLIT_RULE = ("held out: throughput rows with ISL/OSL in {500/2000, 1000/2000, 2048/2048, 5000/500}; "
              "closed-loop rows at concurrency 5 or 50; step_ms rows with batch 8 or 32 or a prefill of "
              "1024 or 4096 tokens; every row of a GPU type left with fewer than 6 calibration rows or of an engine "
              "left with fewer than 3 (predicted with the default efficiencies and the reference engine's "
              "overhead). All other rows calibrate.")


def held_out(row: Row) -> bool:
    """The fixed split (SPLIT_RULE)."""
    if row.kind == "throughput":
        return row.shape() in HELD_OUT_SHAPES
    if row.kind == "step_ms":
        return row.batch in HELD_OUT_STEPS or row.prefill in HELD_OUT_STEPS
    return row.concurrency in HELD_OUT_CONCURRENCY


REFERENCE_ENGINE = "trtllm"


def params_for(values: Mapping[str, float], gpu: str, engine: str) -> StepParams:
    """StepParams of one (GPU, engine) from a flat parameter map (names: see `parameter_names`).

    A GPU type the map lacks gets the geometric mean of the fitted types' efficiencies; an engine it
    lacks, the reference engine's overhead (that is how the router and the sim engine price them too).
    """
    return StepParams(
        mfu=values.get(f"mfu:{gpu}") or default_efficiency(values, "mfu"),
        mbu=values.get(f"mbu:{gpu}") or default_efficiency(values, "mbu"),
        overhead_s=values.get(f"overhead_s:{engine}", values.get(f"overhead_s:{REFERENCE_ENGINE}", 0.0)),
        interference=values["interference"], allreduce_s=values.get("allreduce_s", 0.0),
    )


def default_efficiency(values: Mapping[str, float], kind: str) -> float:
    """The geometric mean of the fitted `kind` ("mfu" or "mbu") values: for GPU types without rows."""
    fitted = [v for name, v in values.items() if name.startswith(f"{kind}:")]
    return math.prod(fitted) ** (1 / len(fitted))


def parameter_names(rows: Sequence[Row]) -> list[str]:
    gpus = sorted({r.gpu for r in rows})
    engines = sorted({r.engine for r in rows})
    names = [f"{k}:{g}" for g in gpus for k in ("mfu", "mbu")]
    names += [f"overhead_s:{e}" for e in engines]
    names += ["interference"]
    if any(r.tp > 1 for r in rows):
        names.append("allreduce_s")
    return names


# Upper bounds from measurement, not datasheets: on an H200 an 8192^3 bf16
# matmul reached 769-798 of 989 TFLOP/s (0.81) and a device-to-device copy
# about 4.3 of 4.8 TB/s (0.9) (/work/shared/gpu-datasheets.md figures,
# docs/costmodel.md). A fit that wants more is blaming the wrong term.
BOUNDS: dict[str, tuple[float, float]] = {
    "mfu": (0.05, 0.81), "mbu": (0.05, 0.9), "overhead_s": (0.0, 0.03), "interference": (0.0, 1.0),
    "allreduce_s": (0.0, 100e-6),
}
START: dict[str, float] = {"mfu": 0.5, "mbu": 0.7, "overhead_s": 0.002, "interference": 0.5, "allreduce_s": 10e-6}


def _kind(name: str) -> str:
    return name.split(":")[0]


def predict(row: Row, model: FitModel, gpu: GpuModel, params: StepParams, opts: EngineOptions) -> float:
    """The row's figure as the step model predicts it, in the row's unit."""
    hw = Hardware(gpu, row.tp, fp8=row.weights == "fp8")
    dims = model.dims
    if opts.kv_bytes != 2:
        dims = _with_kv(dims, dims.kv_bytes_per_token * opts.kv_bytes / 2)

    def step(decodes: float, context: float, prefill: float, pairs: float | None = None) -> float:
        return step_seconds(mixed_work(dims, decodes, context, prefill, pairs), hw, params)

    isl, osl = row.input_tokens, row.output_tokens
    if row.kind == "step_ms":
        return 1e3 * step(row.batch, row.context, row.prefill)
    if row.kind == "ttft_ms":
        return 1e3 * _prefill_alone(step, isl, opts.chunk)
    if row.kind == "batch_latency_ms":
        b = max(1, row.batch)
        first = step(0, 0, b * isl, b * isl * (isl + 1) / 2)
        return 1e3 * (first + max(0, osl - 1) * step(b, isl + osl / 2, 0))
    if row.kind == "decode_tok_s":
        return 1e3 / predict(replace(row, kind="itl_ms"), model, gpu, params, opts)
    if row.kind == "itl_ms":
        c = max(1, row.concurrency)
        context = isl + osl / 2
        base = step(c, context, 0)
        if c == 1 or osl <= 1:
            return 1e3 * base
        others = c - 1
        extra = sum(step(others, context, n, pairs) - step(others, context, 0) for n, pairs in _chunks(isl, opts.chunk))
        return 1e3 * (base + others / (osl - 1) * extra)
    if row.kind == "throughput":
        free = gpu.memory_bytes * row.tp - model.resident_bytes - opts.activation_reserve_gb * 1e9 * row.tp
        capacity = max(0.0, free * opts.kv_fraction / dims.kv_bytes_per_token)
        batch = max(1, min(opts.max_batch, math.floor(capacity / (isl + osl))))
        steps = max(float(osl), batch * (isl + osl) / opts.chunk)
        prefill = batch * isl / steps
        decodes = batch * osl / steps
        # Each prompt token attends (ISL + 1) / 2 positions on average.
        cycle = steps * step(decodes, isl + osl / 2, prefill, prefill * (isl + 1) / 2)
        return batch * osl / cycle
    raise ValueError(f"unknown row kind {row.kind!r}; known: {', '.join(KINDS)}")


def _chunks(tokens: int, chunk: int) -> list[tuple[int, float]]:
    """(new tokens, attention pairs) of each prefill chunk of one prompt."""
    out, done = [], 0
    while done < tokens:
        n = min(chunk, tokens - done)
        out.append((n, n * done + n * (n + 1) / 2))
        done += n
    return out


def _prefill_alone(step: Callable[..., float], tokens: int, chunk: int) -> float:
    return sum(step(0, 0, n, pairs) for n, pairs in _chunks(tokens, chunk))


def _with_kv(dims: ModelDims, kv_bytes_per_token: float) -> ModelDims:
    return ModelDims(dims.active_params, dims.weight_bytes, kv_bytes_per_token, dims.num_layers, dims.hidden_size,
                     dims.attention_flops_per_pair)


@dataclass
class Fit:
    values: dict[str, float]
    options: dict[str, EngineOptions]
    loss: float
    names: list[str] = field(default_factory=list)


Predictor = Callable[[Row, Mapping[str, float], EngineOptions], float]


def _loss(rows: Sequence[Row], values: Mapping[str, float], opts: Mapping[str, EngineOptions],
          predictor: Predictor) -> float:
    total = 0.0
    for r in rows:
        p = predictor(r, values, opts[r.engine])
        total += math.log(p / r.value) ** 2 if p > 0 else 1e6
    return total


def fit(rows: Sequence[Row], predictor: Predictor,
        option_choices: Mapping[str, Sequence[EngineOptions]], *, sweeps: int = 30) -> Fit:
    """Least squares in log space over `rows` (the calibration set only), for each combination of engine options."""
    names = parameter_names(rows)
    engines = sorted({r.engine for r in rows})
    best: Fit | None = None
    for combo in itertools.product(*(option_choices.get(e, [EngineOptions()]) for e in engines)):
        opts = dict(zip(engines, combo, strict=True))
        values = {n: START[_kind(n)] for n in names}
        loss = _loss(rows, values, opts, predictor)
        for _ in range(sweeps):
            before = loss
            for name in names:
                lo, hi = BOUNDS[_kind(name)]
                values[name], loss = _golden(_along(rows, values, name, opts, predictor), lo, hi)
            if before - loss < 1e-10:
                break
        if best is None or loss < best.loss:
            best = Fit(dict(values), opts, loss, names)
    assert best is not None
    return best


def _along(rows: Sequence[Row], values: dict[str, float], name: str, opts: Mapping[str, EngineOptions],
           predictor: Predictor) -> Callable[[float], float]:
    """The loss as a function of one parameter, the others held."""
    return lambda v: _loss(rows, {**values, name: v}, opts, predictor)


def _golden(f: Callable[[float], float], lo: float, hi: float, iterations: int = 40) -> tuple[float, float]:
    """Minimum of `f` on [lo, hi] by golden-section search (unimodal assumed); also tries both ends."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    candidates = [(fc, c), (fd, d), (f(lo), lo), (f(hi), hi)]
    value, x = min(candidates)
    return x, value


@dataclass(frozen=True)
class Errors:
    """Absolute percentage errors of one group of rows."""

    count: int
    median_pct: float
    worst_pct: float


def errors(pairs: Sequence[tuple[float, float]]) -> Errors:
    """(predicted, measured) pairs -> median and worst absolute percentage error."""
    if not pairs:
        return Errors(0, float("nan"), float("nan"))
    pct = [abs(p / m - 1) * 100 for p, m in pairs]
    return Errors(len(pct), statistics.median(pct), max(pct))
