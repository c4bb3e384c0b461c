"""`tandemctl up`: a whole Tandem factory on one machine, started and stopped in order.

    etcd (embedded, unless --etcd) -> node agent -> control plane
      -> prefill and decode workers -> router

Planning is pure (`plan_workers`, `check_options`): which worker runs with
which role on which (simulated) GPU, and every option checked before any
process starts. Running is `LocalFactory`: each child is a real process
started through controlplane.supervisor and waited for until it serves;
setting `abort` (Ctrl-C) cuts start-up short at once. `stop()` stops what
started in reverse order by PID (each revokes its own lease on SIGTERM),
then etcd; setting `hurry` (a second Ctrl-C) skips the grace. The state file
(`up.json` in the state directory) lists every endpoint, metrics endpoint
and PID; it is rewritten as each process starts ("status": "starting") and
once all serve ("status": "up"), for scripts and tests.

`secure` (`tandemctl up --secure`) runs it as docs/security.md describes:
certificates in {state_dir}/pki, etcd with TLS and auth (each process logs
in with its own certificate and may write only its own keys), mutual TLS
on every gRPC hop, and routers and decode workers that check each worker's
certificate names the worker its registry record describes
(controlplane.securemode).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from controlplane.etcd_server import EtcdServer, EtcdStartError
from controlplane.planner.service import MODES as PLANNER_MODES
from controlplane.securemode import SecureFleet
from controlplane.simulated_gpus import simulated_gpus
from controlplane.supervisor import ManagedProcess, ProcessStartError, StartAborted
from registry.etcd_auth import WorkerIdentity
from runtime.catalog import GpuCatalog, default_catalog
from runtime.peers import PeerTls, default_node_name

# Share of a simulated fleet's GPUs that prefill: prompt work is heavy per
# request but short; most GPUs decode. 1/3 is a common starting ratio.
PREFILL_SHARE = 1 / 3
# The sim engine models a GPU; without --fleet each sim worker gets one of these.
DEFAULT_SIM_GPU = "H100-SXM"
ENGINES = ("torch", "sim", "vllm")


@dataclass(frozen=True)
class WorkerPlan:
    name: str
    role: str  # "prefill" or "decode"
    gpu_type: str = ""
    gpu_uuid: str = ""


def plan_workers(engine: str, fleet: str, prefill: int, decode: int, node: str,
                 catalog: GpuCatalog | None = None) -> list[WorkerPlan]:
    """The workers of a local factory. Pure.

    Without a fleet: `prefill` + `decode` workers with no GPU (CPU), or for
    the sim engine each on a simulated DEFAULT_SIM_GPU (it models one).
    With a fleet ("H100-SXM:2,A100-80GB:4", sim engine): one worker per
    simulated GPU; the most compute-rich GPUs (highest bf16 FLOP/s per HBM
    byte/s) prefill, about PREFILL_SHARE of them, the bandwidth-rich rest
    decode, and there is always at least one decode worker.
    """
    if not fleet:
        if decode < 1:
            raise ValueError("a factory needs at least one decode worker (--decode 1)")
        if prefill < 0:
            raise ValueError(f"--prefill must be >= 0, got {prefill}")
        plans = ([WorkerPlan(f"prefill-{i}", "prefill") for i in range(prefill)]
                 + [WorkerPlan(f"decode-{i}", "decode") for i in range(decode)])
        if engine != "sim":
            return plans
        sims = simulated_gpus(node, default_fleet(engine, fleet, prefill, decode), catalog or default_catalog())
        return [WorkerPlan(plan.name, plan.role, gpu.catalog_id, gpu.uuid)
                for plan, gpu in zip(plans, sims, strict=True)]
    if engine != "sim":
        raise ValueError("--fleet simulates GPUs and needs --engine sim")
    catalog = catalog or default_catalog()
    # The same uuids the node agent reports for --simulate-gpus, so claims match its inventory.
    gpus = [(gpu.catalog_id, gpu.uuid) for gpu in simulated_gpus(node, fleet, catalog)]

    def intensity(gpu: tuple[str, str]) -> float:
        model = catalog.get(gpu[0])
        return model.bf16_flops / model.hbm_bytes_per_s

    ranked = sorted(gpus, key=intensity, reverse=True)
    n_prefill = min(len(ranked) - 1, round(len(ranked) * PREFILL_SHARE))
    plans = []
    for i, (gpu_type, uuid) in enumerate(ranked):
        role = "prefill" if i < n_prefill else "decode"
        plans.append(WorkerPlan(f"{role}-{gpu_type.lower()}-{uuid.rsplit('-', 1)[1]}", role, gpu_type, uuid))
    return plans


def default_fleet(engine: str, fleet: str, prefill: int, decode: int) -> str:
    """The simulated GPUs the node agent declares: `fleet`, or one DEFAULT_SIM_GPU per sim worker. Pure."""
    if fleet or engine != "sim":
        return fleet
    return f"{DEFAULT_SIM_GPU}:{prefill + decode}"


def _address_problem(flag: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"{flag} expects host:port (port 0..65535, 0 for any free one), got {value!r}"
    return ""


def check_options(options: FactoryOptions) -> list[str]:
    """Every problem with `options` a person can fix, before anything starts. Pure (no ports probed)."""
    problems = []
    if options.engine not in ENGINES:
        problems.append(f"--engine must be one of {', '.join(ENGINES)}, got {options.engine!r}")
    else:
        try:
            plan_workers(options.engine, options.fleet, options.prefill, options.decode, options.node)
        except ValueError as exc:
            problems.append(str(exc))
    for flag, value in (("--router-listen", options.router_listen), ("--admin-listen", options.admin_listen),
                        *((("--http-listen", options.http_listen),) if options.http_listen else ())):
        problems.append(_address_problem(flag, value))
    for endpoint in filter(None, options.etcd.split(",")):
        problems.append(_address_problem("--etcd", endpoint.strip().removeprefix("http://")))
    if options.router_listen == options.admin_listen and not options.router_listen.endswith(":0"):
        problems.append(f"--router-listen and --admin-listen are both {options.router_listen}")
    if options.planner not in PLANNER_MODES:
        problems.append(f"--planner must be one of {', '.join(PLANNER_MODES)}, got {options.planner!r}")
    if options.secure and options.etcd:
        problems.append("--secure starts its own etcd with TLS and auth; it cannot take --etcd")
    return [p for p in problems if p]


def busy_ports(options: FactoryOptions) -> list[str]:
    """The fixed listen addresses something else already holds (a factory still running?)."""
    problems = []
    for flag, value in (("--router-listen", options.router_listen), ("--admin-listen", options.admin_listen),
                        *((("--http-listen", options.http_listen),) if options.http_listen else ())):
        host, _, port = value.rpartition(":")
        if int(port) == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as sock:
            try:
                sock.bind((host.strip("[]"), int(port)))
            except OSError as exc:
                problems.append(f"{value} ({flag}) is not free: {exc.strerror}. Is another factory running? "
                                f"Stop it, or pass {flag} HOST:0 for any free port.")
    return problems


@dataclass
class FactoryOptions:
    engine: str = "torch"
    model: str = ""
    fleet: str = ""
    prefill: int = 1
    decode: int = 1
    etcd: str = ""
    router_listen: str = "127.0.0.1:50051"
    # The router's OpenAI-compatible HTTP API (docs/http-api.md); "" leaves it off.
    http_listen: str = "127.0.0.1:8000"
    admin_listen: str = "127.0.0.1:7070"
    state_dir: Path | None = None
    lease_ttl: int = 5
    speedup: float = 1.0
    metrics: bool = True
    node: str = field(default_factory=default_node_name)
    # Mutual TLS everywhere, etcd with TLS and per-component users (docs/security.md).
    secure: bool = False
    # The control plane's role planner: off, recommend or enact (docs/planner.md).
    planner: str = "recommend"

    @property
    def served_model(self) -> str:
        # A real instruct model by default, so the first answer a newcomer sees is real text.
        return self.model or {"sim": "llama-3-8b", "vllm": "tiny-vllm"}.get(self.engine, "smollm2-135m")


@dataclass
class FactoryState:
    """What `up.json` holds. `metrics`: name -> host:port serving Prometheus /metrics."""

    status: str  # "starting" or "up"
    etcd: str
    admin: str
    router: str
    model: str
    logs: str
    pids: dict[str, int]
    metrics: dict[str, str]
    workers: list[dict[str, str]]
    # Secure mode: the CA and the operator's client certificate and key, for tandemctl (empty otherwise).
    tls: dict[str, str] = field(default_factory=dict)
    # The router's OpenAI base URL (http://HOST:PORT/v1; https in secure mode), "" when off.
    openai: str = ""


class LocalFactory:
    """Start once, stop once (stop is safe twice, after a failed start and after an aborted one).

    The constructor checks every option (ValueError listing all problems) and starts nothing.
    `abort` and `hurry` may be set from a signal handler or another thread.
    """

    def __init__(self, options: FactoryOptions, progress: Callable[[str], None] = lambda _: None) -> None:
        problems = check_options(options)
        problems += busy_ports(options) if not problems else []
        if problems:
            raise ValueError("; ".join(problems))
        self.options = options
        self.progress = progress
        self.abort = threading.Event()
        self.hurry = threading.Event()
        self.plans = plan_workers(options.engine, options.fleet, options.prefill, options.decode, options.node)
        self.state_dir = Path(options.state_dir or tempfile.mkdtemp(prefix="tandem-up-"))
        self.log_dir = self.state_dir / "logs"
        self.secure = SecureFleet(self.state_dir / "pki") if options.secure else None
        try:
            # Finds the etcd binary and picks free ports now; the process starts in start().
            self.etcd_server = None if options.etcd else EtcdServer(
                data_dir=self.state_dir / "etcd", log_path=self.log_dir / "etcd.log",
                tls=self.secure.etcd_tls() if self.secure is not None else None)
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
        self.children: list[ManagedProcess] = []
        self.state: FactoryState | None = None

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd_server.endpoint if self.etcd_server is not None else self.options.etcd

    def _child_args(self) -> list[str]:
        return ["--metrics-listen", "127.0.0.1:0"] if self.options.metrics else []

    def _secure_args(self, cert: str, *, serves: bool = True) -> list[str]:
        """Secure mode: etcd login with `cert`, mutual TLS served (`serves`) and to workers; [] otherwise."""
        if self.secure is None:
            return []
        s = self.secure
        return [*s.etcd_args(cert), *s.peer_args(cert), *(s.serve_args(cert) if serves else [])]

    def _python(self, name: str, module: str, *args: str, timeout: float = 180.0) -> ManagedProcess:
        # gRPC's C core writes plain-text lines (handshake failures) into the JSON log stream unless silenced.
        child = ManagedProcess(name, [sys.executable, "-m", module, *args, *self._child_args()], log_dir=self.log_dir,
                               env={"GRPC_VERBOSITY": "NONE"})
        self.children.append(child)
        child.start()
        self._write_state("starting")  # its PID is known from now on
        child.wait_ready(timeout, abort=self.abort, tls=self.client_tls)
        return child

    @property
    def client_tls(self) -> PeerTls | None:
        """How local tools call the services: the operator's certificate in secure mode, else plaintext."""
        return self.secure.client_tls() if self.secure is not None else None

    def _prepare_secure(self) -> None:
        """Certificates for every planned process (kept when current), before anything starts."""
        assert self.secure is not None
        self.progress(f"certificates in {self.secure.directory}")
        self.secure.prepare([(plan.name, self.options.node) for plan in self.plans], [self.options.node])

    def _provision_etcd(self) -> None:
        """One etcd user per process, each allowed only its own keys; then auth on."""
        assert self.secure is not None
        self.progress("etcd users and roles (auth on)")
        workers = [WorkerIdentity(plan.name, self.options.node, (plan.gpu_uuid,) if plan.gpu_uuid else ())
                   for plan in self.plans]
        try:
            self.secure.provision(self.etcd_endpoint, workers, [self.options.node])
        except Exception as exc:  # grpc, etcd3aio and EtcdUnavailable errors all carry etcd's reason
            raise ProcessStartError(f"provisioning etcd users failed: {type(exc).__name__}: {exc}\n"
                                    f"{self.etcd_server.log_tail() if self.etcd_server else ''}") from exc

    def _start_etcd(self, timeout: float = 20.0) -> None:
        assert self.etcd_server is not None
        self.progress("starting etcd")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.etcd_server.launch()
        self._write_state("starting")
        deadline = time.monotonic() + timeout
        while True:
            if self.abort.is_set():
                raise StartAborted("start-up aborted while waiting for etcd")
            try:
                self.etcd_server.wait_healthy(0.2)  # short, to notice an abort
                return
            except EtcdStartError as exc:
                if not self.etcd_server.running or time.monotonic() > deadline:
                    raise ProcessStartError(str(exc)) from None

    def start(self) -> FactoryState:
        """Start everything in order; ProcessStartError if a process fails, StartAborted once `abort` is set.

        Either way the caller calls stop(), which stops whatever did start."""
        opts = self.options
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.secure is not None:
            self._prepare_secure()
        if self.etcd_server is not None:
            self._start_etcd()
        if self.secure is not None:
            self._provision_etcd()
        common = ["--etcd", self.etcd_endpoint, "--lease-ttl", str(opts.lease_ttl)]
        self.progress("starting the node agent")
        agent_args = [*common, "--node", opts.node, *self._secure_args(f"agent-{opts.node}", serves=False)]
        simulated = default_fleet(opts.engine, opts.fleet, opts.prefill, opts.decode)
        if simulated:
            agent_args += ["--simulate-gpus", simulated]
        self._python("agent", "controlplane.agent", *agent_args)
        self.progress("starting the control plane")
        self._python("controlplane", "controlplane.server", *common, "--listen", opts.admin_listen,
                     "--replica-id", "cp-0", "--planner-mode", opts.planner, *self._secure_args("controlplane"))
        worker_args = [*common, "--engine", opts.engine, "--model", opts.served_model, "--node", opts.node,
                       "--listen", "127.0.0.1:0", "--speedup", str(opts.speedup)]
        for plan in self.plans:
            self.progress(f"starting {plan.name} ({opts.engine} engine{', ' + plan.gpu_type if plan.gpu_type else ''})")
            args = [*worker_args, "--worker-id", plan.name, *self._secure_args(f"worker-{plan.name}")]
            if plan.gpu_type:
                args += ["--gpu-type", plan.gpu_type, "--gpu-uuids", plan.gpu_uuid]
            self._python(plan.name, "prefill_svc" if plan.role == "prefill" else "decode_svc", *args)
        self.progress("starting the router")
        self._python("router", "router_svc", *common, "--listen", opts.router_listen, *self._secure_args("router"),
                     *(["--http-listen", opts.http_listen] if opts.http_listen else []), *self._tokenizer_args())
        self.state = self._write_state("up")
        return self.state

    def _tokenizer_args(self) -> list[str]:
        """The router's --tokenizer for vLLM's built-in tiny model (the workers built it; this prints where)."""
        if self.options.engine != "vllm" or self.options.served_model != "tiny-vllm":
            return []
        found = subprocess.run([sys.executable, "-m", "engine.vllm.tiny_model"], capture_output=True, text=True,
                               check=True)
        return ["--tokenizer", f"tiny-vllm={found.stdout.strip().splitlines()[-1]}"]

    def _endpoint(self, name: str) -> str:
        return next((c.endpoint for c in self.children if c.name == name), "")

    def _openai_url(self) -> str:
        from router_svc.http_api.examples import base_url

        port = next((c.info.get("http_port") for c in self.children if c.name == "router"), 0)
        return base_url(self.options.http_listen, int(port), tls=self.secure is not None) if port else ""

    def _write_state(self, status: str) -> FactoryState:
        metrics = {"etcd": self.etcd_server.metrics_endpoint} if self.etcd_server is not None and self.options.metrics \
            else {}
        metrics |= {c.name: f"127.0.0.1:{c.info['metrics_port']}" for c in self.children
                    if c.info.get("metrics_port")}
        pids = {"etcd": self.etcd_server.pid} if self.etcd_server is not None and self.etcd_server.pid else {}
        pids |= {c.name: c.pid for c in self.children if c.process is not None}
        state = FactoryState(
            status=status, etcd=self.etcd_endpoint, admin=self._endpoint("controlplane"),
            router=self._endpoint("router"), model=self.options.served_model, logs=str(self.log_dir), pids=pids,
            metrics=metrics, workers=[asdict(plan) for plan in self.plans],
            tls={"ca_file": str(self.secure.ca), "cert_file": str(self.secure.cert("operator")),
                 "key_file": str(self.secure.key("operator"))} if self.secure is not None else {},
            openai=self._openai_url())
        path = self.state_dir / "up.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2))
        os.replace(tmp, path)
        return state

    def stop(self) -> None:
        """Router first (no new requests), workers, control plane, agent, then etcd: whatever started."""
        for child in reversed(self.children):
            self.progress(f"stopping {child.name}")
            child.stop(hurry=self.hurry)
        self.children.clear()
        if self.etcd_server is not None and self.etcd_server.pid is not None:
            self.progress("stopping etcd")
            with contextlib.suppress(OSError):
                self.etcd_server.stop(timeout=0.5 if self.hurry.is_set() else 10.0)
