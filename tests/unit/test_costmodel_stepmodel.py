"""The step model (runtime/stepmodel.py) against values computed by hand, with plain numbers."""

from __future__ import annotations

import pytest

from runtime.catalog import GpuModel, default_catalog
from runtime.stepmodel import (
    FALLBACK_LINK_BYTES_PER_S,
    Hardware,
    ModelDims,
    StepParams,
    mixed_work,
    step_seconds,
    work_of,
)

# A toy GPU with round figures: 1000 TFLOP/s bf16, 2000 fp8, 4 TB/s, 800 GB/s links.
GPU = GpuModel("toy", (), bf16_tflops=1000, memory_gb=100, hbm_tbps=4.0, fp8_tflops=2000, link_gbps=800)
# A toy model: 10B active parameters, 20 GB of weights, 100 kB of KV per token, 40 layers of width 5000.
DIMS = ModelDims(active_params=10e9, weight_bytes=20e9, kv_bytes_per_token=100e3, num_layers=40, hidden_size=5000,
                 attention_flops_per_pair=4 * 40 * 5000)
P = StepParams(mfu=0.5, mbu=0.8, overhead_s=0.002, interference=0.5, allreduce_s=10e-6)


def test_decode_step_by_hand() -> None:
    # 8 sequences at 999 cached tokens: 8 new tokens, 8 x 1000 KV tokens read and written.
    work = work_of(DIMS, [(1, 999)] * 8)
    compute = 2 * 10e9 * 8 / (1000e12 * 0.5) + 4 * 40 * 5000 * 8 * 1000 / (1000e12 * 0.5)
    memory = (20e9 + 100e3 * 8 * 1000) / (4e12 * 0.8)
    expected = 0.002 + max(compute, memory) + 0.5 * min(compute, memory)
    assert memory > compute  # decode is bandwidth-bound
    assert step_seconds(work, Hardware(GPU), P) == pytest.approx(expected, rel=1e-12)


def test_prefill_on_two_gpus_pays_the_all_reduces() -> None:
    work = work_of(DIMS, [(4000, 0)])
    compute = (2 * 10e9 * 4000 / (2 * 1000e12 * 0.5)
               + 4 * 40 * 5000 * (4000 * 4001 / 2) / (2 * 1000e12 * 0.5))
    memory = (20e9 + 100e3 * 4000) / (2 * 4e12 * 0.8)
    # Two all-reduces per layer, each of 4000 tokens x 5000 x 2 bytes, ring factor 2(n-1)/n = 1.
    comm = 80 * (10e-6 + 4000 * 5000 * 2 * 1.0 / 800e9)
    expected = 0.002 + comm + compute + 0.5 * memory
    assert step_seconds(work, Hardware(GPU, 2), P) == pytest.approx(expected, rel=1e-12)


def test_fp8_weights_run_the_matmuls_at_the_fp8_rate_and_attention_at_bf16() -> None:
    work = work_of(DIMS, [(4000, 0)])
    no_overhead = StepParams(mfu=0.5, mbu=0.8, overhead_s=0.0, interference=0.0, allreduce_s=0.0)
    fp8 = step_seconds(work, Hardware(GPU, fp8=True), no_overhead)
    linear, attention = 2 * 10e9 * 4000, 4 * 40 * 5000 * 4000 * 4001 / 2
    assert fp8 == pytest.approx(linear / (2000e12 * 0.5) + attention / (1000e12 * 0.5), rel=1e-12)


def test_interference_charges_decode_tokens_riding_on_a_prefill_chunk() -> None:
    hw = Hardware(GPU)
    roofline = StepParams(mfu=0.5, mbu=0.8, overhead_s=0.0, interference=0.0, allreduce_s=0.0)
    serial = StepParams(mfu=0.5, mbu=0.8, overhead_s=0.0, interference=1.0, allreduce_s=0.0)
    chunk, mixed = mixed_work(DIMS, 0, 0, 2048), mixed_work(DIMS, 64, 3000, 2048)
    decode_compute = (2 * 10e9 * 64 + 4 * 40 * 5000 * 64 * 3001) / (1000e12 * 0.5)
    decode_kv = 100e3 * 64 * 3001 / (4e12 * 0.8)
    # The roofline's free ride: 64 decodes add only their FLOPs to a compute-bound chunk.
    free = step_seconds(mixed, hw, roofline) - step_seconds(chunk, hw, roofline)
    assert free == pytest.approx(decode_compute, rel=1e-9)
    # Fully serial: they also pay for reading their KV (the weights are read once for both).
    paid = step_seconds(mixed, hw, serial) - step_seconds(chunk, hw, serial)
    assert paid == pytest.approx(decode_compute + decode_kv, rel=1e-9)


def test_attention_grows_with_context() -> None:
    hw = Hardware(GPU)
    short, long = (step_seconds(mixed_work(DIMS, 32, c, 0), hw, P) for c in (500, 8000))
    # 32 x 7500 more KV tokens read (memory-bound), and their attention FLOPs at the interference share.
    kv = 32 * 7500 * 100e3 / (4e12 * 0.8)
    flops = 4 * 40 * 5000 * 32 * 7500 / (1000e12 * 0.5)
    assert long - short == pytest.approx(kv + 0.5 * flops, rel=1e-9)


def test_no_work_costs_nothing_and_bad_parameters_are_refused() -> None:
    assert step_seconds(work_of(DIMS, []), Hardware(GPU), P) == 0.0
    assert step_seconds(mixed_work(DIMS, 0, 0, 0), Hardware(GPU), P) == 0.0
    with pytest.raises(ValueError, match="token counts must be >= 0"):
        work_of(DIMS, [(-1, 0)])
    with pytest.raises(ValueError, match=r"mfu must be in \(0, 1\], got 1.2"):
        StepParams(mfu=1.2, mbu=0.5, overhead_s=0, interference=0, allreduce_s=0)
    with pytest.raises(ValueError, match=r"interference must be in \[0, 1\], got -0.1"):
        StepParams(mfu=0.5, mbu=0.5, overhead_s=0, interference=-0.1, allreduce_s=0)
    with pytest.raises(ValueError, match="overhead_s must be >= 0"):
        StepParams(mfu=0.5, mbu=0.5, overhead_s=-1, interference=0, allreduce_s=0)


def test_catalog_link_and_fp8_figures() -> None:
    catalog = default_catalog()
    h100, a100, l40s = catalog.get("H100-SXM"), catalog.get("A100-80GB"), catalog.get("L40S")
    assert Hardware(h100, 2).link_bytes_per_s == 900e9
    assert Hardware(a100, 2).link_bytes_per_s == 600e9
    assert Hardware(l40s, 2).link_bytes_per_s == FALLBACK_LINK_BYTES_PER_S  # no recorded figure
    assert Hardware(h100, 1, fp8=True).linear_flops == 1979e12
    # A100 has no FP8 tensor cores: FP8 weights compute at the bf16 rate.
    assert Hardware(a100, 1, fp8=True).linear_flops == 312e12
