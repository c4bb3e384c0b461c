"""Sim timing against values computed by hand: the plain roofline (timing="roofline") from the
catalog's datasheet figures, and the calibrated step model from the committed fitted parameters."""

from __future__ import annotations

import dataclasses

import pytest

from engine.base import EngineError
from engine.sim import (
    ROOFLINE_PARAMS,
    RooflineParams,
    decode_step_seconds,
    get_profile,
    gpu_set,
    kv_capacity_blocks,
    prefill_seconds,
    step_seconds,
    weight_bytes_touched,
)
from engine.sim.roofline import model_dims
from engine.sim.settings import SimSettings
from runtime.stepparams import default_step_params

# Datasheet figures (runtime/data/gpus.toml), written out so a catalog edit shows here.
H100_FLOPS, H100_BW, H100_MEM = 989e12, 3.35e12, 80e9
A100_FLOPS, A100_BW = 312e12, 2.039e12

# Llama-3-70B by hand: 80 layers, 64 heads x 128, 8 KV heads, 70.6e9 params,
# of which the 128256 x 8192 input embedding does no matmul work.
L70_ACTIVE = 70.6e9 - 128256 * 8192
L70_READ = L70_ACTIVE * 2  # bf16 weights read per step (embedding excluded)
L70_KV = 2 * 80 * 8 * 128 * 2  # bytes per token
ATTN_70 = 4 * 80 * 64 * 128  # FLOPs per (query, key) pair, all layers
R = ROOFLINE_PARAMS  # the plain roofline: MFU 0.5, MBU 0.7, TP efficiency 0.9


def test_profile_shapes() -> None:
    assert get_profile("llama-3-8b").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert get_profile("llama-3-70b").kv_bytes_per_token == L70_KV == 327680
    oss = get_profile("gpt-oss-120b")
    assert oss.kv_bytes_per_token == 2 * 36 * 8 * 64 * 2
    assert oss.active_params == pytest.approx(5.1e9, rel=0.02)
    # Experts in MXFP4 (4.25 bits), the rest bf16: about the shipped 65 GB.
    assert oss.weight_bytes == pytest.approx((116.8e9 - 114.65e9) * 2 + 114.65e9 * 4.25 / 8)
    with pytest.raises(EngineError, match="unknown sim model profile 'llama-2'; known: gpt-oss-120b"):
        get_profile("llama-2")


@pytest.mark.parametrize(
    ("gpu", "flops", "bw"), [("H100-SXM", H100_FLOPS, H100_BW), ("A100-80GB", A100_FLOPS, A100_BW)]
)
def test_llama70b_prefill_3000_tokens_on_4_gpus(gpu: str, flops: float, bw: float) -> None:
    compute = flops * 4 * 0.9 * 0.5  # count x TP efficiency x MFU
    bandwidth = bw * 4 * 0.9 * 0.7  # count x TP efficiency x MBU
    total_flops = 2 * L70_ACTIVE * 3000 + ATTN_70 * (3000 * 3001 / 2)
    total_bytes = L70_READ + L70_KV * 3000
    expected = max(total_flops / compute, total_bytes / bandwidth)
    assert total_flops / compute > total_bytes / bandwidth  # prefill is compute-bound
    got = prefill_seconds(gpu_set(gpu, 4), get_profile("llama-3-70b"), 3000, params=R)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx({"H100-SXM": 0.2410, "A100-80GB": 0.7641}[gpu], rel=1e-3)


def test_prefill_with_cached_prefix_computes_only_new_tokens() -> None:
    compute = H100_FLOPS * 4 * 0.9 * 0.5
    flops = 2 * L70_ACTIVE * 1000 + ATTN_70 * (1000 * 2000 + 1000 * 1001 / 2)
    got = prefill_seconds(gpu_set("H100-SXM", 4), get_profile("llama-3-70b"), 1000, cached_tokens=2000, params=R)
    assert got == pytest.approx(flops / compute, rel=1e-12)
    assert got < prefill_seconds(gpu_set("H100-SXM", 4), get_profile("llama-3-70b"), 3000, params=R) / 2


@pytest.mark.parametrize("batch", [1, 64])
def test_llama70b_decode_step_is_bandwidth_bound(batch: int) -> None:
    gpus, profile = gpu_set("H100-SXM", 4), get_profile("llama-3-70b")
    context = 3000
    total_bytes = L70_READ + L70_KV * batch * (context + 1)
    total_flops = 2 * L70_ACTIVE * batch + ATTN_70 * batch * (context + 1)
    bandwidth = H100_BW * 4 * 0.9 * 0.7
    compute = H100_FLOPS * 4 * 0.9 * 0.5
    assert total_bytes / bandwidth > total_flops / compute
    got = decode_step_seconds(gpus, profile, [context] * batch, R)
    assert got == pytest.approx(total_bytes / bandwidth, rel=1e-12)
    assert got == pytest.approx({1: 0.01659, 64: 0.02393}[batch], rel=1e-3)


def test_single_gpu_has_no_tp_discount() -> None:
    profile = get_profile("llama-3-8b")
    read = (8.03e9 - 128256 * 4096) * 2
    expected = (read + 131072 * 101) / (H100_BW * 0.7)
    assert decode_step_seconds(gpu_set("H100-SXM"), profile, [100], R) == pytest.approx(expected, rel=1e-12)


def test_moe_expert_reads_grow_with_batch() -> None:
    oss = get_profile("gpt-oss-120b")
    dense = (116.8e9 - 114.65e9 - 201088 * 2880) * 2
    experts = 114.65e9 * 4.25 / 8
    assert weight_bytes_touched(oss, 1) == pytest.approx(dense + experts * 4 / 128)
    assert weight_bytes_touched(oss, 64) == pytest.approx(dense + experts * (1 - (124 / 128) ** 64))
    assert weight_bytes_touched(oss, 100_000) == pytest.approx(dense + experts)
    gpus = gpu_set("H100-SXM")
    one = decode_step_seconds(gpus, oss, [1000], R)
    assert one == pytest.approx((dense + experts * 4 / 128 + 73728 * 1001) / (H100_BW * 0.7), rel=1e-12)
    # 64 sequences cost far less than 64 single steps, but more than one.
    assert one < decode_step_seconds(gpus, oss, [1000] * 64, R) < 64 * one


def test_mixed_step_charges_weights_once() -> None:
    gpus, profile = gpu_set("H100-SXM"), get_profile("llama-3-8b")
    mixed = step_seconds(gpus, profile, [(500, 0), (1, 200), (1, 300)], R)
    assert mixed < prefill_seconds(gpus, profile, 500, params=R) + decode_step_seconds(gpus, profile, [200, 300], R)
    assert step_seconds(gpus, profile, []) == 0.0


def test_kv_capacity_is_the_memory_arithmetic() -> None:
    # 8B on one H100: 80 GB x 0.9 - 16.06 GB weights - 2 GB reserve, in 16-token blocks of 128 KiB/token.
    expected_8b = int((H100_MEM * 0.9 - 8.03e9 * 2 - 2e9) // (16 * 131072))
    assert kv_capacity_blocks(gpu_set("H100-SXM"), get_profile("llama-3-8b"), 16) == expected_8b == 25720
    expected_70b = int((4 * H100_MEM * 0.9 - 70.6e9 * 2 - 4 * 2e9) // (32 * L70_KV))
    assert kv_capacity_blocks(gpu_set("H100-SXM", 4), get_profile("llama-3-70b"), 32) == expected_70b
    tight = RooflineParams.create(memory_utilization=0.5, activation_reserve_gb=0)
    assert kv_capacity_blocks(gpu_set("H100-SXM"), get_profile("llama-3-8b"), 16, tight) == int(
        (H100_MEM * 0.5 - 8.03e9 * 2) // (16 * 131072)
    )


@pytest.mark.parametrize(("gpu", "count"), [("H100-SXM", 1), ("A100-80GB", 2), ("L40S", 2)])
def test_model_that_does_not_fit_is_refused(gpu: str, count: int) -> None:
    with pytest.raises(EngineError, match=rf"llama-3-70b does not fit on {count} x {gpu}: weights 141.2 GB"):
        kv_capacity_blocks(gpu_set(gpu, count), get_profile("llama-3-70b"), 16)


def test_gpt_oss_fits_one_h100_as_shipped() -> None:
    assert kv_capacity_blocks(gpu_set("H100-SXM"), get_profile("gpt-oss-120b"), 16) > 0


def test_bad_inputs_are_refused_with_names() -> None:
    with pytest.raises(EngineError, match="unknown GPU type 'RTX-9090'; known: H100-SXM"):
        gpu_set("RTX-9090")
    with pytest.raises(EngineError, match="needs gpu_type"):
        gpu_set("")
    with pytest.raises(EngineError, match="gpu_count must be >= 1, got 0"):
        gpu_set("H100-SXM", 0)
    with pytest.raises(EngineError, match=r"mfu must be in \(0, 1\], got 1.5"):
        RooflineParams.create(mfu=1.5)
    with pytest.raises(EngineError, match="kv_block_size must be >= 1"):
        kv_capacity_blocks(gpu_set("H100-SXM"), get_profile("llama-3-8b"), 0)


def test_settings_parse_and_describe() -> None:
    settings = SimSettings.from_extra({"sim_mfu": "0.4", "sim_kv_bytes": "real", "other_engine_key": "x"})
    assert settings.roofline.mfu == 0.4 and settings.kv_bytes == "real"
    lines = settings.describe()
    assert "mfu = 0.4: fraction of peak FLOP/s reached (None: the fitted value per GPU type)" in lines
    assert any(line.startswith("mbu = None") for line in lines)
    assert lines[0].startswith("timing = calibrated")
    assert SimSettings.from_extra({"sim_timing": "roofline"}).roofline.timing == "roofline"
    with pytest.raises(EngineError, match="sim_timing must be one of calibrated, roofline, got 'guess'"):
        SimSettings.from_extra({"sim_timing": "guess"})
    with pytest.raises(EngineError, match="unknown sim setting 'sim_mfv'; known: sim_activation_reserve_gb"):
        SimSettings.from_extra({"sim_mfv": "0.4"})
    with pytest.raises(EngineError, match=r"sim_mbu must be in \(0, 1\], got 0.0"):
        SimSettings.from_extra({"sim_mbu": "0"})
    with pytest.raises(EngineError, match="sim_max_step_tokens must be an integer, got 'lots'"):
        SimSettings.from_extra({"sim_max_step_tokens": "lots"})
    with pytest.raises(EngineError, match="sim_kv_bytes must be one of tokens, real, got 'fake'"):
        SimSettings.from_extra({"sim_kv_bytes": "fake"})


def test_calibrated_decode_step_by_hand_from_the_fitted_parameters() -> None:
    p = default_step_params().for_gpu("H100-SXM")
    batch, context = 64, 3000
    compute = (2 * L70_ACTIVE * batch / (H100_FLOPS * 4 * p.mfu)
               + ATTN_70 * batch * (context + 1) / (H100_FLOPS * 4 * p.mfu))
    memory = (L70_READ + L70_KV * batch * (context + 1)) / (H100_BW * 4 * p.mbu)
    # Two all-reduces per layer over 64 tokens x 8192 x 2 bytes; NVLink 900 GB/s, ring factor 2 x 3/4.
    comm = 160 * (p.allreduce_s + batch * 8192 * 2 * 1.5 / 900e9)
    expected = p.overhead_s + comm + max(compute, memory) + p.interference * min(compute, memory)
    got = decode_step_seconds(gpu_set("H100-SXM", 4), get_profile("llama-3-70b"), [context] * batch)
    assert got == pytest.approx(expected, rel=1e-9)


def test_calibrated_steps_charge_decodes_that_share_a_prefill_chunk() -> None:
    gpus, profile = gpu_set("H100-SXM", 4), get_profile("llama-3-70b")
    chunk = [(2048, 0)]
    mixed = [(2048, 0)] + [(1, 3000)] * 64
    # The plain roofline charges 64 decodes riding on a compute-bound chunk only their FLOPs; the
    # calibrated model also charges the fitted share of their KV reads (64 x 3001 tokens x 320 KiB).
    roofline_extra = step_seconds(gpus, profile, mixed, R) - step_seconds(gpus, profile, chunk, R)
    calibrated_extra = step_seconds(gpus, profile, mixed) - step_seconds(gpus, profile, chunk)
    p = default_step_params().for_gpu("H100-SXM")
    kv_read = L70_KV * 64 * 3001 / (H100_BW * 4 * p.mbu)
    assert calibrated_extra > roofline_extra + 0.5 * p.interference * kv_read


def test_fp8_weights_prefill_at_the_fp8_rate() -> None:
    bf16 = get_profile("llama-3-70b")
    fp8 = dataclasses.replace(bf16, dense_weight_bytes=1.0)
    gpus = gpu_set("H100-SXM", 2)
    assert prefill_seconds(gpus, fp8, 4000) < 0.7 * prefill_seconds(gpus, bf16, 4000)
    # A100 has no FP8 tensor cores: only the weight reads shrink.
    a100 = gpu_set("A100-80GB", 2)
    assert prefill_seconds(a100, fp8, 4000) > 0.9 * prefill_seconds(a100, bf16, 4000)


@pytest.mark.parametrize(("gpu", "count"), [("H100-SXM", 2), ("H200", 1)])
def test_sim_steps_are_the_calibrated_models_steps(gpu: str, count: int) -> None:
    # The sim engine times a step exactly as the fit predicts published rows (docs/costmodel.md), so a
    # --engine sim fleet of FP8 Llama-3-70B behaves like the published hardware within the held-out error.
    from runtime.stepmodel import Hardware, work_of
    from runtime.stepmodel import step_seconds as model_step_seconds

    fp8 = dataclasses.replace(get_profile("llama-3-70b"), dense_weight_bytes=1.0)
    gpus = gpu_set(gpu, count)
    params = default_step_params().for_gpu(gpu)
    for work in ([(1, 5249)], [(1, 5249)] * 25, [(5000, 0)], [(2048, 0)] + [(1, 3000)] * 64):
        expected = model_step_seconds(work_of(model_dims(fp8), work), Hardware(gpus.gpu, count, fp8=True), params)
        assert step_seconds(gpus, fp8, work) == pytest.approx(expected, rel=1e-12)
