"""Drill: a worker record forged in etcd (finding 4 of the trust review) against the default and the secure mode.

Whoever can write to etcd (here: with root's credentials) adds a READY decode
record pointing at a rogue gRPC server that answers health and load, and
streams tokens of its choosing. The drill counts what reaches the rogue while
real clients send requests through the router of a whole local factory
(`tandemctl up`'s LocalFactory, sim engine):

- default mode (plaintext, no etcd auth): the rogue gets real requests, i.e.
  prompts and live KV handles: the documented exposure (docs/security.md);
- secure mode (`--secure`): one rogue serves TLS with a certificate of its own
  CA, the other a real certificate of the fleet's CA that names another
  worker (a stolen one). Neither gets a single request; every real request
  is served, and the router counts the refused handshakes.

A decode worker handed a real KV handle re-pointed at a forged prefill record
does not pull it. On etcd's side, what each component's certificate may write
equals the pure permission plan, key by key: a worker's etcd user cannot write
another worker's record, a verdict or an intent; the router's can write
only its demand reports (the planner's input). And the operator's path works as docs/security.md tells it:
`tandemctl up --secure` then `generate` with the operator's certificate, and
`tandemctl certs` then `etcd-auth` against an etcd with TLS.
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import stat
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane import pki
from controlplane.etcd_server import EtcdServer
from controlplane.localfactory import FactoryOptions, FactoryState, LocalFactory
from controlplane.securemode import SecureFleet
from registry.etcd_auth import WorkerIdentity, allowed, permission_plan
from registry.etcd_client import EtcdClient, EtcdSettings, EtcdUnavailable
from registry.keys import Keys, Kind
from registry.records import encode, parse
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, worker_pb2, worker_pb2_grpc
from tests.faults.conftest import wait_until
from tests.integration.test_up import alive, kill_leftovers, wait_until_up

pytestmark = [pytest.mark.fault, pytest.mark.integration]

NODE = "node-a"
MODEL = "llama-3-8b"
REQUESTS = 24
# Long enough to be prefilled on the prefill worker, so the decode worker pulls KV over (verified) TLS.
PROMPT = " ".join(f"word{i}" for i in range(64))


class Rogue:
    """A gRPC server that claims to be a decode worker: health SERVING, an idle load, tokens of its own.

    `calls` counts every RPC other than health that reached it."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.server = grpc.aio.server()
        self.endpoint = ""

    async def start(self, tls: tuple[bytes, bytes] | None = None) -> Rogue:
        """Serves plaintext, or TLS with `tls` (key PEM, certificate PEM) and no client certificate asked."""
        rogue = self

        class Decode(worker_pb2_grpc.DecodeServicer):
            async def Decode(self, request: worker_pb2.DecodeRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeResponse]:
                rogue.calls["Decode"] += 1
                yield worker_pb2.DecodeResponse(request_id=request.request_id, token_ids=[42],
                                                finish_reason=common_pb2.FINISH_REASON_LENGTH)

        class Load(worker_pb2_grpc.WorkerServicer):
            async def WatchLoad(self, request: worker_pb2.WatchLoadRequest,
                                context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.LoadReport]:
                rogue.calls["WatchLoad"] += 1
                sequence = 0
                while True:
                    sequence += 1
                    yield worker_pb2.LoadReport(worker_id="decode-rogue", role=common_pb2.ROLE_DECODE,
                                                sequence=sequence, kv_blocks_total=100_000, max_batch_size=256)
                    await asyncio.sleep(0.2)

            async def GetLoad(self, request: worker_pb2.GetLoadRequest,
                              context: grpc.aio.ServicerContext) -> worker_pb2.LoadReport:
                rogue.calls["GetLoad"] += 1
                return worker_pb2.LoadReport(worker_id="decode-rogue", role=common_pb2.ROLE_DECODE)

        class Kv(worker_pb2_grpc.KvSourceServicer):
            async def Pull(self, request: worker_pb2.KvPullRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.KvChunk]:
                rogue.calls["Pull"] += 1
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such handle")
                yield worker_pb2.KvChunk()  # never reached: makes this an async generator

            async def Release(self, request: worker_pb2.KvReleaseRequest,
                              context: grpc.aio.ServicerContext) -> worker_pb2.KvReleaseResponse:
                rogue.calls["Release"] += 1
                return worker_pb2.KvReleaseResponse()

        worker_pb2_grpc.add_DecodeServicer_to_server(Decode(), self.server)
        worker_pb2_grpc.add_KvSourceServicer_to_server(Kv(), self.server)
        worker_pb2_grpc.add_WorkerServicer_to_server(Load(), self.server)
        checks = health.aio.HealthServicer()
        await checks.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checks, self.server)
        if tls is not None:
            port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([tls]))
        else:
            port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{port}"
        await self.server.start()
        return self

    @property
    def requests(self) -> int:
        return sum(self.calls.values())

    async def stop(self) -> None:
        await self.server.stop(0)


@pytest.fixture
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LocalFactory, FactoryState]]:
    options = FactoryOptions(engine="sim", prefill=1, decode=1, router_listen="127.0.0.1:0",
                             http_listen="127.0.0.1:0", admin_listen="127.0.0.1:0", state_dir=tmp_path / "factory",
                             lease_ttl=3, speedup=100, node=NODE, secure=request.param)
    local = LocalFactory(options)
    try:
        yield local, local.start()
    finally:
        children = list(local.children)  # stop() forgets them
        local.stop()
        assert not [c.name for c in children if c.alive()], "children left running"
        assert local.etcd_server is not None and not local.etcd_server.running


async def real_record(etcd: EtcdSettings, worker_id: str) -> registry_pb2.WorkerRecord:
    async with EtcdClient(etcd) as client:
        real = await client.get(Keys().worker(worker_id))
    assert real is not None, f"{worker_id} is not registered"
    record = parse(Kind.WORKER, real.value)
    assert isinstance(record, registry_pb2.WorkerRecord)
    return record


async def forge_record(etcd: EtcdSettings, endpoint: str, worker_id: str = "decode-rogue",
                       like: str = "decode-0") -> None:
    """Writes a READY record for `worker_id` at `endpoint`, copied from the real worker `like`'s."""
    keys = Keys()
    async with EtcdClient(etcd) as client:
        real = await client.get(keys.worker(like))
        assert real is not None, f"the real worker {like} is not registered"
        record = parse(Kind.WORKER, real.value)
        assert isinstance(record, registry_pb2.WorkerRecord)
        record.worker_id, record.endpoint, record.metrics_endpoint = worker_id, endpoint, ""
        record.state = registry_pb2.WORKER_STATE_READY
        await client.put(keys.worker(worker_id), encode(record))


def channel(state: FactoryState, endpoint: str = "") -> grpc.aio.Channel:
    """To the router (or `endpoint`), with the operator's certificate in secure mode."""
    if not state.tls:
        return grpc.aio.insecure_channel(endpoint or state.router)
    credentials = grpc.ssl_channel_credentials(
        Path(state.tls["ca_file"]).read_bytes(), Path(state.tls["key_file"]).read_bytes(),
        Path(state.tls["cert_file"]).read_bytes())
    return grpc.aio.secure_channel(endpoint or state.router, credentials)


async def routes_to_decode_workers(stub: inference_pb2_grpc.InferenceStub, n: int) -> bool:
    """Whether the router lists `n` routable decode workers of MODEL."""
    models = (await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)).models
    return next((m.decode_workers for m in models if m.name == MODEL), 0) == n


async def send(stub: inference_pb2_grpc.InferenceStub, n: int) -> list[inference_pb2.GenerateResponse | Exception]:
    """`n` real requests, one after another; each answer or the error it ended with."""
    answers: list[inference_pb2.GenerateResponse | Exception] = []
    for i in range(n):
        try:
            # Distinct prompts (the index first): no cached prefix tempts the router into a local prefill.
            answers.append(await stub.Complete(inference_pb2.GenerateRequest(
                model=MODEL, prompt=f"request {i}: {PROMPT}", sampling=common_pb2.SamplingParams(max_tokens=8)),
                timeout=30))
        except grpc.aio.AioRpcError as exc:
            answers.append(exc)
    return answers


def read_text(path: Path) -> str:
    return path.read_text(errors="replace")


def pem_pair(directory: Path, name: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of certificate `name` in a controlplane.pki directory."""
    return (directory / f"{name}.key").read_bytes(), (directory / f"{name}.pem").read_bytes()


def metric(address: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("factory", [False], indirect=True, ids=["default"])
async def test_default_mode_routes_real_requests_to_a_forged_worker(factory: tuple[LocalFactory, FactoryState]) -> None:
    _, state = factory
    rogue = await Rogue().start()
    try:
        await forge_record(EtcdSettings.parse(state.etcd), rogue.endpoint)
        async with channel(state) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            await wait_until(lambda: routes_to_decode_workers(stub, 2), 30, "router routes to the forged worker")
            answers = await send(stub, REQUESTS)
        # The exposure: real prompts (and their KV handles) went to a server nobody vetted.
        print(f"default mode: the rogue got {rogue.calls['Decode']} of {REQUESTS} requests ({dict(rogue.calls)})")
        assert rogue.calls["Decode"] > 0, "the forged record got no traffic: the default mode's exposure is gone?"
        assert all(not isinstance(a, Exception) for a in answers)
    finally:
        await rogue.stop()


@pytest.mark.parametrize("factory", [True], indirect=True, ids=["secure"])
async def test_secure_mode_gives_a_forged_worker_nothing(factory: tuple[LocalFactory, FactoryState],
                                                         tmp_path: Path) -> None:
    local, state = factory
    assert local.secure is not None
    fleet = local.secure
    # Rogue 1: TLS with a certificate of its own CA. Rogue 2: a real certificate of the fleet's CA, stolen
    # from decode-0 (so it names decode-0 on node-a, not the record it is forged into).
    own_ca, _ = pki.ensure_ca(tmp_path / "rogue-ca")
    pki.issue_into(tmp_path / "rogue-ca", own_ca, [pki.worker_spec("decode-self", NODE)])
    self_signed = await Rogue().start(pem_pair(tmp_path / "rogue-ca", "worker-decode-self"))
    stolen = await Rogue().start(pem_pair(fleet.directory, "worker-decode-0"))
    try:
        root = fleet.etcd_settings(state.etcd, "root")
        await forge_record(root, self_signed.endpoint, "decode-rogue-1")
        await forge_record(root, stolen.endpoint, "decode-rogue-2")
        async with channel(state) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            # Until the prober's verdicts land the router sees the forged records as routable: only the
            # identity check at the handshake keeps traffic away from them. The requests go out now.
            await wait_until(lambda: metric(state.metrics["router"], "tandem_peer_identity_failures_total") > 0,
                             30, "router counts the refused handshakes")
            answers = await send(stub, REQUESTS)
            # The prober checks identities too: both forged records end NOT_SERVING, out of routing.
            await wait_until(lambda: routes_to_decode_workers(stub, 1), 60, "the prober judged the forged workers")
        failures = metric(state.metrics["router"], "tandem_peer_identity_failures_total")
        print(f"secure mode: rogue with its own CA got {self_signed.requests}, rogue with a stolen certificate got "
              f"{stolen.requests} of {REQUESTS} requests; router refused {failures:.0f} handshakes")
        assert self_signed.requests == 0 and stolen.requests == 0, (dict(self_signed.calls), dict(stolen.calls))
        served = [a for a in answers if not isinstance(a, Exception)]
        assert len(served) == REQUESTS, [a for a in answers if isinstance(a, Exception)]
        assert all(len(a.token_ids) == 8 for a in served)
        assert {a.route.decode_worker_id for a in served} == {"decode-0"}, "a rogue's answer got through"
        # Disaggregated (the router may prefill a repeated prompt locally, on its cached prefix): the decode
        # worker pulled KV from prefill-0 over identity-checked mutual TLS.
        print("routes:", collections.Counter((a.route.prefill_worker_id, a.route.local_prefill) for a in served))
        assert any(a.route.prefill_worker_id == "prefill-0" and not a.route.local_prefill for a in served)
        # Not a retry storm: one refused handshake per suspect period and load-stream backoff, not per request.
        assert failures < 10 * REQUESTS
        # Visible: the router's log names each refused worker's expected identity.
        log = read_text(local.log_dir / "router.log")
        assert "decode-rogue-1.node-a.worker.tandem" in log and "decode-rogue-2.node-a.worker.tandem" in log
    finally:
        await self_signed.stop()
        await stolen.stop()


@pytest.mark.parametrize("factory", [True], indirect=True, ids=["secure"])
async def test_secure_mode_decode_workers_pull_kv_only_from_the_producer_the_record_names(
        factory: tuple[LocalFactory, FactoryState]) -> None:
    """A handle naming a forged prefill record (at a server with prefill-0's stolen certificate) is not pulled."""
    local, state = factory
    assert local.secure is not None
    stolen = await Rogue().start(pem_pair(local.secure.directory, "worker-prefill-0"))
    try:
        root = local.secure.etcd_settings(state.etcd, "root")
        await forge_record(root, stolen.endpoint, "prefill-rogue", like="prefill-0")
        prefill, decode = await real_record(root, "prefill-0"), await real_record(root, "decode-0")
        async with channel(state, prefill.endpoint) as ch:
            prompt = list(range(1, 65))
            answer = await worker_pb2_grpc.PrefillStub(ch).Prefill(worker_pb2.PrefillRequest(
                model=MODEL, prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=8),
                kv_transports=["grpc"]), timeout=30)
        # A real handle, re-pointed at the rogue: every field checks out against the forged record.
        handle = answer.handle
        handle.source_endpoint, handle.source_worker_id = stolen.endpoint, "prefill-rogue"
        async with channel(state, decode.endpoint) as ch:
            stub = worker_pb2_grpc.DecodeStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in stub.Decode(worker_pb2.DecodeRequest(
                        model=MODEL, prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=8),
                        handle=handle, first_token_id=answer.first_token_id), timeout=30):
                    pass
        print(f"decode worker refused the forged producer: {failed.value.code().name} {failed.value.details()}")
        assert stolen.requests == 0, dict(stolen.calls)
        assert metric(state.metrics["decode-0"], "tandem_peer_identity_failures_total") > 0
    finally:
        await stolen.stop()


async def test_etcd_enforces_the_permission_plan(tmp_path: Path) -> None:
    """Real etcd with TLS and auth: each component's certificate may write exactly what the plan allows."""
    fleet = SecureFleet(tmp_path / "pki")
    fleet.prepare([("decode-0", NODE), ("decode-1", NODE)], [NODE, "node-b"])
    keys = Keys()
    workers = [WorkerIdentity("decode-0", NODE, ("GPU-0",)), WorkerIdentity("decode-1", NODE, ("GPU-1",))]
    plan = {role.user: role for role in permission_plan(keys, workers, [NODE, "node-b"])}
    with EtcdServer(data_dir=tmp_path / "etcd", tls=fleet.etcd_tls()) as etcd:
        await fleet.provision_async(etcd.endpoint, workers, [NODE, "node-b"])
        targets = [keys.worker("decode-0"), keys.worker("decode-1"), keys.health("decode-0"), keys.drain("decode-1"),
                   keys.cordon(NODE), keys.node(NODE), keys.node("node-b"), keys.gpu_claim("GPU-0"),
                   keys.gpu_claim("GPU-1"), keys.model(MODEL), keys.role("decode-0"), keys.plan(MODEL),
                   keys.demand("router-0")]
        users = {"worker-decode-0": "worker:decode-0", "agent-node-b": "agent:node-b",
                 "router": "tandem-router", "controlplane": "tandem-controlplane"}
        outcomes = {}
        for cert, user in users.items():
            async with EtcdClient(fleet.etcd_settings(etcd.endpoint, cert)) as client:
                assert (await client.get_prefix(keys.prefix + "/"))[0] > 0, f"{user} reads the registry"
                for key in targets:
                    try:
                        await client.put(key, b"{}")
                        outcomes[user, key] = True
                    except EtcdUnavailable as exc:
                        assert "permission denied" in str(exc), exc
                        outcomes[user, key] = False
        # What etcd enforced is what the pure plan says, key by key.
        for (user, key), wrote in outcomes.items():
            assert wrote == allowed(plan[user], key, write=True), (user, key, wrote)
        assert outcomes["worker:decode-0", keys.worker("decode-0")]
        assert not outcomes["worker:decode-0", keys.worker("decode-1")], "a worker wrote another worker's record"
        assert not outcomes["worker:decode-0", keys.health("decode-0")], "a worker wrote its own verdict"
        assert [key for key in targets if outcomes["tandem-router", key]] == [keys.demand("router-0")], \
            "the router wrote more than its demand report"
        # A certificate of another CA does not even get a connection.
        other, _ = pki.ensure_ca(tmp_path / "other")
        pki.issue_into(tmp_path / "other", other, [pki.CertSpec("root", "root")])
        intruder = EtcdSettings.parse(etcd.endpoint, ca_file=fleet.ca, cert_file=tmp_path / "other" / "root.pem",
                                      key_file=tmp_path / "other" / "root.key", timeout=1.0)
        async with EtcdClient(intruder) as client:
            with pytest.raises(EtcdUnavailable):
                await client.put(keys.worker("decode-9"), b"{}")


def test_tandemctl_up_secure_serves_generate_with_the_operator_certificate_only(tmp_path: Path) -> None:
    state_dir = tmp_path / "factory"
    log = open(tmp_path / "up.log", "wb")
    cli = [sys.executable, "-m", "controlplane.cli"]
    free = ["--router-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    up = subprocess.Popen([*cli, "up", "--secure", "--engine", "sim", "--speedup", "100", "--state-dir",
                           str(state_dir), "--lease-ttl", "3", *free],
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        state = wait_until_up(up, state_dir, tmp_path / "up.log", what="tandemctl up --secure")
        tls = ["--ca-file", state["tls"]["ca_file"], "--cert-file", state["tls"]["cert_file"],
               "--key-file", state["tls"]["key_file"]]
        ask = ["generate", "--router", state["router"], "--max-tokens", "8", PROMPT]
        generated = subprocess.run([*cli, *tls, *ask], capture_output=True, text=True, timeout=60)
        assert generated.returncode == 0, generated.stderr
        assert re.search(r"\[llama-3-8b: \d+ prompt \+ 8 completion tokens", generated.stderr), generated.stderr
        # Without the operator's certificate the router does not answer (mutual TLS), and says why.
        refused = subprocess.run([*cli, "--ca-file", state["tls"]["ca_file"], *ask], capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 3 and "TLS is the likely cause" in refused.stderr, refused.stderr
        # `tandemctl certs` on the factory's directory keeps its CA and certificates.
        pki_dir = Path(state["tls"]["ca_file"]).parent
        before = (pki_dir / "ca.pem").read_bytes()
        again = subprocess.run([*cli, "certs", "--dir", str(pki_dir), "--worker", f"decode-0@{NODE}"],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "CA kept" in again.stdout, again.stdout + again.stderr
        assert (pki_dir / "ca.pem").read_bytes() == before
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, (tmp_path / "up.log").read_text()
        assert not [name for name, pid in state["pids"].items() if alive(pid)]
    finally:
        kill_leftovers(up, state_dir)
        log.close()


def test_tandemctl_certs_and_etcd_auth_provision_a_real_etcd(tmp_path: Path) -> None:
    """The operator's path (docs/security.md): certs, then etcd-auth on an etcd with TLS; both safe to repeat."""
    cli = [sys.executable, "-m", "controlplane.cli"]
    pki_dir = tmp_path / "pki"
    workers = ["--worker", f"decode-0@{NODE}", "--worker", f"decode-1@{NODE}"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    run("certs", "--dir", str(pki_dir), *workers)
    fleet = SecureFleet(pki_dir)
    with EtcdServer(data_dir=tmp_path / "etcd", tls=fleet.etcd_tls()) as etcd:
        first = run("etcd-auth", "--dir", str(pki_dir), "--etcd", etcd.endpoint,
                    "--worker", f"decode-0@{NODE}=GPU-0", "--worker", f"decode-1@{NODE}=GPU-1")
        assert "worker:decode-0: read /tandem/*, readwrite /tandem/v1/workers/decode-0, " \
               "readwrite /tandem/v1/gpus/GPU-0" in first.stdout
        run("etcd-auth", "--dir", str(pki_dir), "--etcd", etcd.endpoint,
            "--worker", f"decode-0@{NODE}=GPU-0", "--worker", f"decode-1@{NODE}=GPU-1")
        assert stat.S_IMODE((pki_dir / "etcd-root-password").stat().st_mode) == 0o600

        async def writes(cert: str, key: str) -> bool:
            async with EtcdClient(fleet.etcd_settings(etcd.endpoint, cert)) as client:
                try:
                    await client.put(key, b"{}")
                except EtcdUnavailable as exc:
                    assert "permission denied" in str(exc), exc
                    return False
                return True

        keys = Keys()
        assert asyncio.run(writes("worker-decode-0", keys.worker("decode-0")))
        assert not asyncio.run(writes("worker-decode-0", keys.worker("decode-1")))
        assert not asyncio.run(writes("worker-decode-0", keys.gpu_claim("GPU-1")))
        assert asyncio.run(writes("root", keys.worker("decode-1")))
