"""TLS between Tandem processes: workers serve TLS; the router, decode workers (KV pulls) and the
control plane's prober call them with --peer-ca-file. Nothing between services stays plaintext."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from controlplane.supervisor import health_status
from runtime.peers import PeerTls
from tandem.v1 import admin_pb2, admin_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2
from tests.support.testbed import Testbed

pytestmark = pytest.mark.integration

SIM = ("--engine", "sim", "--model", "llama-3-8b", "--gpu-type", "H100-SXM", "--speedup", "1000")


def make_ca_and_cert(root: Path) -> tuple[Path, Path, Path]:
    """A private CA, and a server certificate it signs for 127.0.0.1 / localhost."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make test certificates: apt-get install openssl (.ci/run does)")
    ca_key, ca, key, csr, cert = (root / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = root / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "1", "-subj", "/CN=tandem-test-ca")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=worker")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return ca, cert, key


async def test_router_workers_and_prober_talk_tls(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_cert(tmp_path)
    tls = PeerTls(ca)
    serve_tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    peer = ("--peer-ca-file", str(ca))
    bed = Testbed(tmp_path / "bed")
    try:
        bed.start("p0", "prefill_svc", *SIM, *serve_tls, *peer, tls=tls)
        decode = bed.start("d0", "decode_svc", *SIM, *serve_tls, *peer, tls=tls)
        cp = bed.start("cp", "controlplane.server", *peer, "--probe-interval", "0.2")
        router = bed.start("router", "router_svc", *peer, "--local-prefill-max-prompt-tokens", "4")

        # The workers refuse plaintext.
        assert health_status(decode.endpoint) != "SERVING"
        assert health_status(decode.endpoint, tls=tls) == "SERVING"

        async with grpc.aio.insecure_channel(router.endpoint) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            deadline = time.monotonic() + 20
            while not (await stub.ListModels(inference_pb2.ListModelsRequest())).models:
                assert time.monotonic() < deadline, "router never saw the TLS workers"
                await asyncio.sleep(0.05)  # poll interval
            reply = await stub.Complete(inference_pb2.GenerateRequest(
                model="llama-3-8b", prompt="a prompt long enough to be prefilled on p0",
                sampling=common_pb2.SamplingParams(max_tokens=8)), timeout=30)
        assert len(reply.token_ids) == 8
        # Disaggregated: Prefill on p0 and the KV pull by d0 both went over TLS (tcp is off with TLS).
        assert reply.route.prefill_worker_id == "p0" and reply.route.decode_worker_id == "d0"
        assert not reply.route.local_prefill

        # The leader's prober reaches the workers over TLS: both SERVING.
        async with grpc.aio.insecure_channel(cp.endpoint) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            deadline = time.monotonic() + 20
            while True:
                workers = (await admin.ListWorkers(admin_pb2.ListWorkersRequest())).workers
                verdicts = {w.record.worker_id: w.health.status for w in workers}
                if verdicts == {"p0": registry_pb2.SERVING_STATUS_SERVING, "d0": registry_pb2.SERVING_STATUS_SERVING}:
                    break
                assert time.monotonic() < deadline, f"prober verdicts: {verdicts}"
                await asyncio.sleep(0.05)  # poll interval
    finally:
        assert not bed.close(), "children left running"
