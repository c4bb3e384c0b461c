"""tandemctl's pure parts: tables and JSON from plain protos, and the one-line error messages."""

from __future__ import annotations

import json

import grpc
import pytest

from controlplane.cli import render
from controlplane.cli.client import EXIT_AUTH, EXIT_ERROR, EXIT_NOT_FOUND, EXIT_UNREACHABLE, explain
from tandem.v1 import admin_pb2, common_pb2, registry_pb2

NOW = 1_800_000_000_000


def text(renderable: object) -> str:
    return render.render_text(renderable, width=200)  # type: ignore[arg-type]


def rows(output: str) -> list[list[str]]:
    """Each table line split on runs of 2+ spaces."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in output.splitlines() if line.strip()]


def test_fleet_status_table_counts_by_model_with_a_total_row() -> None:
    response = admin_pb2.FleetStatusResponse(
        gpu_models=[
            admin_pb2.GpuModelSummary(gpu_model="A100-80GB", total=4, decode=3, idle=1, simulated=4),
            admin_pb2.GpuModelSummary(gpu_model="H100-SXM", total=8, prefill=4, decode=2, unified=1, idle=1,
                                      unhealthy=1),
        ],
        nodes=3, cordoned_nodes=1, workers=10, workers_ready=8, workers_draining=1, workers_not_serving=1,
        leader=registry_pb2.LeaderRecord(replica_id="cp-1", endpoint="10.0.0.1:7070", since_unix_ms=NOW - 300_000),
        answered_by="cp-2", revision=42, view_staleness_s=0,
    )
    output = text(render.fleet_status(response, NOW))
    table = rows(output)
    assert ["A100-80GB", "4", "0", "3", "0", "1", "0", "4"] in table
    assert ["H100-SXM", "8", "4", "2", "1", "1", "1", "0"] in table
    assert ["all", "12", "4", "5", "1", "2", "1", "4"] in table
    assert "nodes    3 (1 cordoned)" in output
    assert "workers  10 (8 ready, 1 draining, 1 not serving)" in output
    assert "leader   cp-1 at 10.0.0.1:7070, since 5m" in output
    assert "view     live, revision 42, answered by cp-2" in output


def test_fleet_status_says_when_the_view_is_stale_or_there_is_no_leader() -> None:
    stale = text(render.fleet_status(admin_pb2.FleetStatusResponse(view_staleness_s=12.34), NOW))
    assert "view     stale 12.3s (etcd not answering)" in stale and "leader   none" in stale
    never = text(render.fleet_status(admin_pb2.FleetStatusResponse(view_staleness_s=float("inf")), NOW))
    assert "never synced with etcd" in never


def test_gpus_table_shows_unavailable_readings_as_dash_and_health_reasons() -> None:
    failed = registry_pb2.GpuInfo(index=1, uuid="GPU-2", name="NVIDIA L4", catalog_id="L4",
                                  memory_total_bytes=24 * 2**30, memory_used_bytes=6 * 2**30,
                                  health=registry_pb2.GPU_HEALTH_FAILED,
                                  health_reason="XID 79: GPU has fallen off the bus")
    read = registry_pb2.GpuInfo(index=0, uuid="GPU-1", name="NVIDIA Mystery", memory_total_bytes=2**30,
                                utilization_percent=0, temperature_c=55, power_w=71.6,
                                health=registry_pb2.GPU_HEALTH_OK)
    response = admin_pb2.ListGpusResponse(gpus=[
        admin_pb2.GpuStatus(node="n1", gpu=read, worker_id="p-0", role=common_pb2.ROLE_PREFILL),
        admin_pb2.GpuStatus(node="n1", gpu=failed, simulated=True),
    ])
    table = rows(text(render.gpus(response)))
    # A real 0% utilisation is a reading; the unknown model shows its NVML name.
    assert ["n1", "0", "NVIDIA Mystery", "GPU-1", "0.0/1.0", "0", "55C", "72", "ok", "p-0", "prefill"] in table
    assert ["n1", "1", "L4 (sim)", "GPU-2", "6.0/24.0", "-", "-", "-",
            "failed: XID 79: GPU has fallen off the bus", "-", "-"] in table


def test_workers_table_shows_state_verdict_and_why_not_routable() -> None:
    def worker(worker_id: str, **fields: object) -> registry_pb2.WorkerRecord:
        return registry_pb2.WorkerRecord(worker_id=worker_id, role=common_pb2.ROLE_DECODE, model="llama", node="n1",
                                         gpu_type="H100-SXM", gpu_count=2, engine="sim",
                                         endpoint="10.0.0.5:9000", started_at_unix_ms=NOW - 42_000,
                                         **fields)  # type: ignore[arg-type]

    response = admin_pb2.ListWorkersResponse(workers=[
        admin_pb2.WorkerStatus(record=worker("d-0", state=registry_pb2.WORKER_STATE_READY, simulated=True),
                               health=registry_pb2.HealthVerdict(status=registry_pb2.SERVING_STATUS_SERVING),
                               routable=True),
        admin_pb2.WorkerStatus(record=worker("d-1", state=registry_pb2.WORKER_STATE_READY),
                               drain=registry_pb2.DrainIntent(worker_id="d-1"), node_cordoned=True),
        admin_pb2.WorkerStatus(record=worker("d-2", state=registry_pb2.WORKER_STATE_STARTING),
                               health=registry_pb2.HealthVerdict(status=registry_pb2.SERVING_STATUS_NOT_SERVING,
                                                                 reason="3 probes failed")),
    ])
    table = rows(text(render.workers(response, NOW)))
    assert ["d-0", "decode", "llama", "n1", "2x H100-SXM (sim)", "sim", "ready", "serving", "yes",
            "10.0.0.5:9000", "42s"] in table
    assert ["d-1", "decode", "llama", "n1", "2x H100-SXM", "sim", "ready (drain requested)", "not probed",
            "no (node cordoned)", "10.0.0.5:9000", "42s"] in table
    assert ["d-2", "decode", "llama", "n1", "2x H100-SXM", "sim", "starting", "not_serving: 3 probes failed", "no",
            "10.0.0.5:9000", "42s"] in table


def test_nodes_table_and_inventory_notes() -> None:
    response = admin_pb2.ListNodesResponse(nodes=[
        admin_pb2.NodeStatus(record=registry_pb2.NodeRecord(
            node="gpu-1", host="10.0.0.7", labels={"zone": "a", "rack": "r1"}, simulated=True,
            updated_at_unix_ms=NOW - 3_000,
            gpus=[registry_pb2.GpuInfo(catalog_id="H100-SXM")] * 2 + [
                registry_pb2.GpuInfo(catalog_id="L4", health=registry_pb2.GPU_HEALTH_DEGRADED)]),
            cordoned=True, cordon=registry_pb2.CordonIntent(reason="maintenance")),
        admin_pb2.NodeStatus(record=registry_pb2.NodeRecord(
            node="cpu-1", inventory_note="No NVIDIA driver found; reporting no GPUs.")),
    ])
    output = text(render.nodes(response, NOW))
    assert ["gpu-1", "10.0.0.7", "2x H100-SXM, 1x L4", "1 degraded", "yes", "yes: maintenance", "-",
            "rack=r1,zone=a", "3s"] in rows(output)
    assert ["cpu-1", "-", "none", "ok", "no", "no", "(no driver)", "-", "-"] in rows(output)
    assert "cpu-1: No NVIDIA driver found; reporting no GPUs." in output


def test_leases_models_and_empty_lists() -> None:
    leases = admin_pb2.ListLeasesResponse(leases=[admin_pb2.LeaseInfo(
        lease_id=0x1F, granted_ttl_s=5, remaining_ttl_s=4, holder="node gpu-1", keys=["/tandem/v1/nodes/gpu-1"])])
    assert ["000000000000001f", "node gpu-1", "4s of 5s", "/tandem/v1/nodes/gpu-1"] in rows(text(render.leases(leases)))
    spec = registry_pb2.ModelSpec(name="llama", checkpoint="/models/llama", desired_prefill_workers=2,
                                  desired_decode_workers=4, slo=registry_pb2.ServiceLevelObjectives(ttft_ms=250),
                                  max_context_tokens=8192, max_output_tokens=1024)
    assert ["llama", "/models/llama", "(checkpoint's)", "2", "4", "250", "-", "8192", "1024"] in rows(
        text(render.models(admin_pb2.ListModelSpecsResponse(models=[spec]))))
    assert text(render.workers(admin_pb2.ListWorkersResponse(), NOW)).strip() == "no workers registered"
    assert text(render.models(admin_pb2.ListModelSpecsResponse())).strip() == "no model specs"


def test_json_is_canonical_with_every_plain_field_and_no_unavailable_readings() -> None:
    response = admin_pb2.ListGpusResponse(gpus=[admin_pb2.GpuStatus(
        node="n1", gpu=registry_pb2.GpuInfo(index=0, uuid="GPU-1", memory_total_bytes=10, utilization_percent=0))])
    data = json.loads(render.to_json(response))
    gpu = data["gpus"][0]["gpu"]
    assert gpu["utilizationPercent"] == 0 and "temperatureC" not in gpu and "powerW" not in gpu
    assert gpu["memoryTotalBytes"] == 10 and gpu["health"] == "GPU_HEALTH_UNSPECIFIED"
    assert data["gpus"][0]["workerId"] == "" and data["gpus"][0]["simulated"] is False
    assert render.to_json(response) == render.to_json(response)


def test_json_has_one_form_per_field_numbers_as_numbers_and_lease_ids_in_hex() -> None:
    status = json.loads(render.to_json(admin_pb2.FleetStatusResponse(revision=20)))
    assert status["revision"] == 20
    leases = json.loads(render.to_json(admin_pb2.ListLeasesResponse(leases=[admin_pb2.LeaseInfo(
        lease_id=0x694D7A5B2C1E0F03, granted_ttl_s=5, remaining_ttl_s=-1)])))
    (lease,) = leases["leases"]
    # The same id the table shows (and etcdctl prints); TTLs are numbers.
    assert lease == {"leaseId": "694d7a5b2c1e0f03", "grantedTtlS": 5, "remainingTtlS": -1, "holder": "", "keys": []}
    assert render.lease_hex(0x694D7A5B2C1E0F03) in text(render.leases(admin_pb2.ListLeasesResponse(leases=[
        admin_pb2.LeaseInfo(lease_id=0x694D7A5B2C1E0F03)])))
    workers = json.loads(render.to_json(admin_pb2.ListWorkersResponse(workers=[admin_pb2.WorkerStatus(
        record=registry_pb2.WorkerRecord(worker_id="d-0", lease_id=31, started_at_unix_ms=NOW))])))
    record = workers["workers"][0]["record"]
    assert (record["leaseId"], record["startedAtUnixMs"]) == ("000000000000001f", NOW)


def test_mutation_confirmations() -> None:
    drained = admin_pb2.DrainWorkerResponse(intent=registry_pb2.DrainIntent(worker_id="p-0", reason="bad disk"))
    assert render.drained(drained) == "worker p-0 is draining (reason: bad disk)"
    assert render.undrained("p-0", admin_pb2.UndrainWorkerResponse(removed=False)) == "worker p-0 had no drain request"
    cordoned = admin_pb2.CordonNodeResponse(intent=registry_pb2.CordonIntent(node="gpu-1"))
    assert render.cordoned(cordoned) == "node gpu-1 cordoned"
    assert render.uncordoned("gpu-1", admin_pb2.UncordonNodeResponse(removed=True)) == "node gpu-1 uncordoned"


@pytest.mark.parametrize(("at", "expected"), [(0, "-"), (NOW - 999, "0s"), (NOW - 59_000, "59s"),
                                              (NOW - 60_000, "1m"), (NOW - 7_200_000, "2h"),
                                              (NOW - 3 * 86_400_000, "3d"), (NOW + 5_000, "0s")])
def test_age(at: int, expected: str) -> None:
    assert render.age(at, NOW) == expected


# -- error lines ------------------------------------------------------------------------------------

def _explain(code: grpc.StatusCode, details: str, token: bool = False) -> tuple[str, int]:
    return explain(code, details, "10.0.0.1:7070", token_given=token, timeout=10, method="DrainWorker")


def test_unreachable_control_plane_names_the_endpoint_and_what_to_set() -> None:
    details = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:7070: "
               "Failed to connect to remote host: Connection refused")
    assert _explain(grpc.StatusCode.UNAVAILABLE, details) == (
        "tandemctl: cannot reach the control plane at 10.0.0.1:7070 (UNAVAILABLE: connection refused). "
        "Is tandem-controlplane running there? Set --endpoint or TANDEM_ENDPOINT.", EXIT_UNREACHABLE)
    line, status = _explain(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert status == EXIT_UNREACHABLE and "did not answer within 10s" in line and "--timeout" in line
    line, status = _explain(grpc.StatusCode.UNAVAILABLE, "etcd at 127.0.0.1:2379: put failed: connection refused")
    assert status == EXIT_UNREACHABLE and "answered, but cannot use etcd" in line


def test_missing_or_wrong_token_says_how_to_pass_one() -> None:
    assert _explain(grpc.StatusCode.UNAUTHENTICATED, "no bearer token given") == (
        "tandemctl: the control plane at 10.0.0.1:7070 needs an admin token for DrainWorker: "
        "pass --token or set TANDEM_ADMIN_TOKEN.", EXIT_AUTH)
    line, status = _explain(grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token given", token=True)
    assert status == EXIT_AUTH and "rejected the admin token" in line and "TANDEM_ADMIN_TOKEN" in line


def test_server_messages_pass_through_for_bad_requests() -> None:
    assert _explain(grpc.StatusCode.NOT_FOUND, "worker 'p-9' is not registered") == (
        "tandemctl: worker 'p-9' is not registered", EXIT_NOT_FOUND)
    assert _explain(grpc.StatusCode.INVALID_ARGUMENT, "reason must be at most 512 characters, got 900") == (
        "tandemctl: reason must be at most 512 characters, got 900", EXIT_ERROR)
    line, status = _explain(grpc.StatusCode.INTERNAL, "boom")
    assert (line, status) == ("tandemctl: DrainWorker at 10.0.0.1:7070 failed (INTERNAL: boom)", EXIT_ERROR)


# -- tables at a terminal's width -------------------------------------------------------------------

LONG_WORKERS = admin_pb2.ListWorkersResponse(workers=[
    admin_pb2.WorkerStatus(
        record=registry_pb2.WorkerRecord(
            worker_id=f"decode-h100-sxm-{i}", role=common_pb2.ROLE_DECODE, model="llama-3-8b", node="gpu-node-17",
            gpu_type="H100-SXM", gpu_count=1, engine="sim", simulated=True, endpoint="127.0.0.1:45678",
            state=registry_pb2.WORKER_STATE_READY, started_at_unix_ms=NOW - 42_000),
        health=registry_pb2.HealthVerdict(status=registry_pb2.SERVING_STATUS_SERVING), routable=True)
    for i in range(3)])


def fits(output: str, width: int) -> bool:
    return all(len(line.rstrip()) <= width for line in output.splitlines())


@pytest.mark.parametrize("width", [80, 120])
def test_narrow_tables_keep_whole_ids_and_drop_minor_columns(width: int) -> None:
    output = render.render_text(render.workers(LONG_WORKERS, NOW, width), width=width)
    assert fits(output, width), output
    table = rows(output)
    assert table[0][:3] == ["WORKER", "ROLE", "MODEL"] and "STATE" in table[0] and "ENGINE" not in table[0]
    assert [row[0] for row in table[2:]] == [f"decode-h100-sxm-{i}" for i in range(3)]
    assert "…" not in output

    gpus = admin_pb2.ListGpusResponse(gpus=[admin_pb2.GpuStatus(
        node="gpu-node-17", worker_id="decode-h100-sxm-0", role=common_pb2.ROLE_DECODE, simulated=True,
        gpu=registry_pb2.GpuInfo(index=0, uuid="GPU-5f0a3c2e-9b1d-4e7f-8a6b-2c4d6e8f0a1b", catalog_id="H100-SXM",
                                 memory_total_bytes=80 * 2**30, health=registry_pb2.GPU_HEALTH_OK))])
    output = render.render_text(render.gpus(gpus, width), width=width)
    assert fits(output, width) and "…" not in output, output
    assert "gpu-node-17" in output and "decode-h100-sxm-0" in output

    nodes = admin_pb2.ListNodesResponse(nodes=[admin_pb2.NodeStatus(record=registry_pb2.NodeRecord(
        node="gpu-node-17.cluster.example.com", host="10.0.0.7", labels={"zone": "eu-west-1a", "rack": "r17"},
        driver_version="550.54.15", simulated=True, updated_at_unix_ms=NOW,
        gpus=[registry_pb2.GpuInfo(catalog_id="H100-SXM")] * 4 + [registry_pb2.GpuInfo(catalog_id="A100-80GB")] * 2),
        cordoned=True, cordon=registry_pb2.CordonIntent(reason="maintenance"))])
    output = render.render_text(render.nodes(nodes, NOW, width), width=width)
    assert fits(output, width) and "…" not in output, output
    assert "gpu-node-17.cluster.example.com" in output and "yes: maintenance" in output

    leases = admin_pb2.ListLeasesResponse(leases=[admin_pb2.LeaseInfo(
        lease_id=0x694D7A5B2C1E0F03, granted_ttl_s=5, remaining_ttl_s=4, holder="worker decode-h100-sxm-0",
        keys=["/tandem/v1/workers/decode-h100-sxm-0", "/tandem/v1/gpus/gpu-node-17/GPU-5f0a3c2e"])])
    output = render.render_text(render.leases(leases, width), width=width)
    assert fits(output, width) and "…" not in output, output
    assert "694d7a5b2c1e0f03" in output and "decode-h100-sxm-0" in output


def test_wide_shows_every_column() -> None:
    output = render.render_text(render.workers(LONG_WORKERS, NOW, None), width=400)
    assert rows(output)[0] == ["WORKER", "ROLE", "MODEL", "NODE", "GPUS", "ENGINE", "STATE", "HEALTH", "ROUTABLE",
                               "ENDPOINT", "AGE"]
    assert ["decode-h100-sxm-0", "decode", "llama-3-8b", "gpu-node-17", "1x H100-SXM (sim)", "sim", "ready",
            "serving", "yes", "127.0.0.1:45678", "42s"] in rows(output)


def test_models_shows_specs_and_what_workers_serve() -> None:
    served = render.served_models(LONG_WORKERS)
    assert served == [render.Served("llama-3-8b", decode=3, ready=3)]
    spec = registry_pb2.ModelSpec(name="tiny-chat", checkpoint="tiny", desired_prefill_workers=1,
                                  desired_decode_workers=1)
    table = rows(text(render.models(admin_pb2.ListModelSpecsResponse(models=[spec]), served)))
    assert ["llama-3-8b", "3 decode (3 ready)", "(no spec)", "-", "-", "-", "-", "-", "-", "-"] in table
    assert ["tiny-chat", "none", "tiny", "(checkpoint's)", "1", "1", "-", "-", "-", "-"] in table
    assert served[0].to_dict() == {"model": "llama-3-8b", "prefill": 0, "decode": 3, "unified": 0, "ready": 3,
                                   "workers": 3}
    empty = text(render.models(admin_pb2.ListModelSpecsResponse(), []))
    assert empty.strip() == "no model specs and no workers"


def test_tls_mismatch_says_tls_is_the_likely_cause_and_which_flag() -> None:
    details = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:10.0.0.1:7070: Socket closed"
    line, status = _explain(grpc.StatusCode.UNAVAILABLE, details)
    assert status == EXIT_UNREACHABLE
    assert line.startswith("tandemctl: cannot reach the control plane at 10.0.0.1:7070 (UNAVAILABLE: socket closed)")
    assert "TLS is the likely cause" in line and "--ca-file" in line
    line, _ = explain(grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED",
                      "10.0.0.1:7070", token_given=False, timeout=10, method="ListWorkers", tls=True)
    assert "TLS is the likely cause" in line and "drop the TLS flags" in line


def test_router_tls_mismatch_names_the_generate_flags() -> None:
    from controlplane.cli.up import router_error

    error = router_error("127.0.0.1:50051", grpc.StatusCode.UNAVAILABLE, "Socket closed", tls=False)
    assert error.exit_code == EXIT_UNREACHABLE
    assert str(error).startswith("tandemctl: cannot reach the router at 127.0.0.1:50051 (UNAVAILABLE: Socket closed). "
                                 "TLS is the likely cause") and "--ca-file" in str(error)
    refused = router_error("127.0.0.1:50051", grpc.StatusCode.UNAVAILABLE, "Connection refused", tls=False)
    assert "Set --router or TANDEM_ROUTER" in str(refused)
