from __future__ import annotations

import pytest

from controlplane.localfactory import FactoryOptions, check_options, default_fleet, plan_workers


def test_cpu_factory_is_prefill_plus_decode_without_gpus() -> None:
    plans = plan_workers("torch", "", prefill=1, decode=2, node="n")
    assert [(p.name, p.role, p.gpu_type) for p in plans] == [
        ("prefill-0", "prefill", ""), ("decode-0", "decode", ""), ("decode-1", "decode", "")]


def test_compute_rich_gpus_prefill_and_bandwidth_rich_gpus_decode() -> None:
    # H100-SXM: 989 TFLOP/s over 3.35 TB/s; A100-80GB: 312 over 2.04; L40S: 362 over 0.864 (most compute-bound).
    plans = plan_workers("sim", "H100-SXM:2,A100-80GB:3,L40S:1", prefill=0, decode=0, node="n")
    roles = {p.gpu_uuid: (p.gpu_type, p.role) for p in plans}
    assert len(plans) == 6
    prefill = sorted(t for t, r in roles.values() if r == "prefill")
    assert prefill == ["H100-SXM", "L40S"], "a third of the GPUs, the most compute-intensive ones, prefill"
    assert all(p.gpu_uuid.startswith("SIM-n-") for p in plans)
    assert len({p.name for p in plans}) == 6


def test_one_gpu_fleet_still_decodes() -> None:
    plans = plan_workers("sim", "H200:1", prefill=0, decode=0, node="n")
    assert [p.role for p in plans] == ["decode"]


def test_bad_plans_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="needs --engine sim"):
        plan_workers("torch", "H100-SXM:1", prefill=0, decode=0, node="n")
    with pytest.raises(ValueError, match="at least one decode worker"):
        plan_workers("torch", "", prefill=1, decode=0, node="n")
    with pytest.raises(ValueError, match="RTX-9090"):
        plan_workers("sim", "RTX-9090:1", prefill=0, decode=0, node="n")


def test_sim_without_a_fleet_gets_one_default_gpu_per_worker() -> None:
    plans = plan_workers("sim", "", prefill=1, decode=2, node="n")
    assert [(p.name, p.role, p.gpu_type) for p in plans] == [
        ("prefill-0", "prefill", "H100-SXM"), ("decode-0", "decode", "H100-SXM"), ("decode-1", "decode", "H100-SXM")]
    assert [p.gpu_uuid for p in plans] == ["SIM-n-0", "SIM-n-1", "SIM-n-2"]
    # The node agent declares the same GPUs, so the workers' claims match its inventory.
    assert default_fleet("sim", "", 1, 2) == "H100-SXM:3"
    assert default_fleet("sim", "L4:1", 1, 2) == "L4:1" and default_fleet("torch", "", 1, 1) == ""


def test_every_option_is_checked_before_anything_starts() -> None:
    assert check_options(FactoryOptions(engine="sim", node="n")) == []
    assert check_options(FactoryOptions(node="n")) == []
    problems = check_options(FactoryOptions(engine="tensorrt", router_listen="50051", admin_listen="127.0.0.1:99999",
                                            etcd="10.0.0.5", node="n"))
    assert problems == [
        "--engine must be one of torch, sim, vllm, got 'tensorrt'",
        "--router-listen expects host:port (port 0..65535, 0 for any free one), got '50051'",
        "--admin-listen expects host:port (port 0..65535, 0 for any free one), got '127.0.0.1:99999'",
        "--etcd expects host:port (port 0..65535, 0 for any free one), got '10.0.0.5'",
    ]
    assert check_options(FactoryOptions(router_listen="127.0.0.1:7070", node="n")) == [
        "--router-listen and --admin-listen are both 127.0.0.1:7070"]


def test_the_secure_mode_runs_its_own_etcd() -> None:
    assert check_options(FactoryOptions(secure=True, node="n")) == []
    assert check_options(FactoryOptions(secure=True, etcd="10.0.0.5:2379", node="n")) == [
        "--secure starts its own etcd with TLS and auth; it cannot take --etcd"]
