"""The documented example fleet (docs/deploy.md, deploy/etc/tandem/*.env) starts and answers, as shipped.

Each service reads what its systemd unit gives it (Environment=, then its
EnvironmentFile= examples, through test_systemd_units.service_environment),
overridden only where this machine must differ: loopback listen addresses and
free ports, the test's etcd without TLS, the sim engine and its GPU uuids for
the checkpoint and the GPUs, temp dirs for caches and the admin token, and the
router's tokenizer (the sim engine's own, as there is no checkpoint here).
The model the router is told about, the one the workers serve and the one
docs/deploy.md publishes must be one name. The router and the control plane
run with memory-deny-write-execute on, as their units set it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import grpc
import pytest

from controlplane.etcd_server import EtcdServer
from controlplane.supervisor import ManagedProcess
from router_svc.models import parse_tokenizer_map
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.integration.test_systemd_units import CASES, ROOT, UnitCase, service_environment
from tests.support import mdwe

pytestmark = pytest.mark.integration

DEPLOY_DOC = ROOT / "docs" / "deploy.md"
BY_FILE = {case.file: case for case in CASES}


def models_put() -> tuple[str, str]:
    """(model, checkpoint) of the `tandemctl models put` step in docs/deploy.md."""
    found = re.findall(r"^tandemctl models put (\S+) --checkpoint (\S+)", DEPLOY_DOC.read_text(), re.M)
    assert len(found) == 1, f"docs/deploy.md: expected one `tandemctl models put` step, found {found}"
    return found[0]


def test_the_examples_name_one_model() -> None:
    model, checkpoint = models_put()
    router = service_environment(BY_FILE["tandem-router.service"])
    assert parse_tokenizer_map(router["TANDEM_TOKENIZER"]) == {model: checkpoint}, \
        "router.env's tokenizer must be the model docs/deploy.md publishes"
    for file in ("tandem-prefill@.service", "tandem-decode@.service"):
        env = service_environment(BY_FILE[file])
        assert env["TANDEM_SERVED_MODEL_NAME"] == model, f"{BY_FILE[file].own_env} serves another model"
        assert env["TANDEM_MODEL"] == checkpoint, f"{BY_FILE[file].own_env} loads another checkpoint"


def local(env: dict[str, str], etcd: EtcdServer, tmp: Path, **overrides: str) -> dict[str, str]:
    """The shipped environment with what must differ on this machine replaced (None values removed)."""
    out = {k: v for k, v in env.items()
           if not k.startswith(("TANDEM_ETCD_", "TANDEM_TLS_")) and k not in ("TANDEM_ADMIN_TOKEN_FILE",)}
    out.update(TANDEM_ETCD=etcd.endpoint, TANDEM_ADVERTISE_HOST="127.0.0.1", TANDEM_HOST="127.0.0.1",
               TANDEM_LISTEN="127.0.0.1:0", TANDEM_METRICS_LISTEN="127.0.0.1:0", TANDEM_LEASE_TTL="2",
               TANDEM_LOG_FORMAT="json")
    for key in ("TANDEM_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME"):
        if key in out:
            out[key] = str(tmp / "cache")
    out.update(overrides)
    return out


def start(processes, name: str, module: str, env: dict[str, str], *, under_mdwe: bool = False) -> ManagedProcess:  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", *(("tests.support.mdwe",) if under_mdwe else ()), module]
    child = ManagedProcess(name, argv, env=env, log_dir=processes.log_dir)
    processes.children.append(child)
    child.start()
    child.wait_ready(120)
    return child


async def test_the_documented_fleet_serves_the_documented_model(etcd: EtcdServer, processes,  # type: ignore[no-untyped-def]
                                                                tmp_path: Path) -> None:
    assert mdwe.supported(), "this kernel lacks PR_SET_MDWE (Linux 6.3+)"
    model, _ = models_put()
    token = tmp_path / "admin-token"
    token.write_text("t" * 32 + "\n")

    def env_of(file: str, **overrides: str) -> dict[str, str]:
        case: UnitCase = BY_FILE[file]
        return local(service_environment(case), etcd, tmp_path, **overrides)

    # Per docs/deploy.md, gpu-a holds the prefill workers and gpu-b (TANDEM_NODE edited) the decode ones.
    nodes = {"tandem-prefill@.service": ("gpu-a", "H100-SXM"), "tandem-decode@.service": ("gpu-b", "H200")}
    for node, gpu in nodes.values():
        start(processes, f"agent-{node}", "controlplane.agent",
              env_of("tandem-agent.service", TANDEM_NODE=node, TANDEM_SIMULATE_GPUS=f"{gpu}:1"))
    controlplane = start(processes, "controlplane", "controlplane.server",
                         env_of("tandem-controlplane.service", TANDEM_ADMIN_TOKEN_FILE=str(token)), under_mdwe=True)
    for file, (node, _gpu) in nodes.items():
        env = env_of(file, TANDEM_NODE=node, TANDEM_ENGINE="sim", TANDEM_MODEL="llama-3-8b", TANDEM_SPEEDUP="1000",
                     TANDEM_GPU_UUIDS=f"SIM-{node}-0", CUDA_VISIBLE_DEVICES="")
        env["TANDEM_WORKER_ID"] = env["TANDEM_WORKER_ID"].replace("gpu-a", node)
        start(processes, env["TANDEM_WORKER_ID"], "decode_svc" if "decode" in file else "prefill_svc", env)
    router = start(processes, "router", "router_svc",
                   env_of("tandem-router.service", TANDEM_TOKENIZER="", TANDEM_LOCAL_PREFILL_MAX_PROMPT_TOKENS="4"),
                   under_mdwe=True)
    assert controlplane.alive()

    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for prompt in ("a prompt long enough to be prefilled on gpu-a", "hi"):
            reply = await stub.Complete(inference_pb2.GenerateRequest(
                model=model, prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=60)
            assert len(reply.token_ids) == 4

    # GRPC_VERBOSITY=NONE (the units' Environment=) keeps gRPC's own lines out of the JSON log stream.
    for child in processes.children:
        for line in child.log_path.read_text().splitlines():
            assert isinstance(json.loads(line), dict), f"{child.name}: not a JSON log line: {line!r}"
