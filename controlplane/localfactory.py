"""`tandemctl up`: a whole Tandem factory on one machine, started and stopped in order.

    etcd (embedded, unless --etcd) -> node agent -> control plane
      -> prefill and decode workers -> router

Planning is pure (`plan_workers`): which worker runs with which role on which
(simulated) GPU. Running is `LocalFactory`: each child is a real process
started through controlplane.supervisor and waited for until it serves;
`stop()` stops them in reverse order by PID (each revokes its own lease on
SIGTERM), then etcd. The state file (`up.json` in the state directory) lists
every endpoint and PID, for scripts and tests.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from controlplane.etcd_server import EtcdServer
from controlplane.simulated_gpus import simulated_gpus
from controlplane.supervisor import ManagedProcess
from runtime.catalog import GpuCatalog, default_catalog
from runtime.peers import default_node_name

# Share of a simulated fleet's GPUs that prefill: prompt work is heavy per
# request but short; most GPUs decode. 1/3 is a common starting ratio.
PREFILL_SHARE = 1 / 3


@dataclass(frozen=True)
class WorkerPlan:
    name: str
    role: str  # "prefill" or "decode"
    gpu_type: str = ""
    gpu_uuid: str = ""


def plan_workers(engine: str, fleet: str, prefill: int, decode: int, node: str,
                 catalog: GpuCatalog | None = None) -> list[WorkerPlan]:
    """The workers of a local factory. Pure.

    Without a fleet: `prefill` + `decode` workers with no GPU (CPU).
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
        return ([WorkerPlan(f"prefill-{i}", "prefill") for i in range(prefill)]
                + [WorkerPlan(f"decode-{i}", "decode") for i in range(decode)])
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


@dataclass
class FactoryOptions:
    engine: str = "torch"
    model: str = ""
    fleet: str = ""
    prefill: int = 1
    decode: int = 1
    etcd: str = ""
    router_listen: str = "127.0.0.1:50051"
    admin_listen: str = "127.0.0.1:7070"
    state_dir: Path | None = None
    lease_ttl: int = 5
    speedup: float = 1.0
    node: str = field(default_factory=default_node_name)

    @property
    def served_model(self) -> str:
        # A real instruct model by default, so the first answer a newcomer sees is real text.
        return self.model or ("llama-3-8b" if self.engine == "sim" else "smollm2-135m")


@dataclass
class FactoryState:
    """What `up.json` holds."""

    etcd: str
    admin: str
    router: str
    model: str
    logs: str
    pids: dict[str, int]
    workers: list[dict[str, str]]


class LocalFactory:
    """Start once, stop once (stop is safe twice and after a failed start)."""

    def __init__(self, options: FactoryOptions, progress: Callable[[str], None] = lambda _: None) -> None:
        self.options = options
        self.progress = progress
        self.state_dir = Path(options.state_dir or tempfile.mkdtemp(prefix="tandem-up-"))
        self.log_dir = self.state_dir / "logs"
        self.etcd_server: EtcdServer | None = None
        self.children: list[ManagedProcess] = []
        self.plans = plan_workers(options.engine, options.fleet, options.prefill, options.decode, options.node)
        self.state: FactoryState | None = None

    def _python(self, name: str, module: str, *args: str, timeout: float = 180.0) -> ManagedProcess:
        child = ManagedProcess(name, [sys.executable, "-m", module, *args], log_dir=self.log_dir)
        self.children.append(child)
        child.start()
        child.wait_ready(timeout)
        return child

    def start(self) -> FactoryState:
        opts = self.options
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if opts.etcd:
            etcd_endpoint = opts.etcd
        else:
            self.progress("starting etcd")
            self.etcd_server = EtcdServer(data_dir=self.state_dir / "etcd", log_path=self.log_dir / "etcd.log")
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.etcd_server.start()
            etcd_endpoint = self.etcd_server.endpoint
        common = ["--etcd", etcd_endpoint, "--lease-ttl", str(opts.lease_ttl)]
        self.progress("starting the node agent")
        agent_args = [*common, "--node", opts.node]
        if opts.fleet:
            agent_args += ["--simulate-gpus", opts.fleet]
        self._python("agent", "controlplane.agent", *agent_args)
        self.progress("starting the control plane")
        admin = self._python("controlplane", "controlplane.server", *common, "--listen", opts.admin_listen,
                             "--replica-id", "cp-0")
        worker_args = [*common, "--engine", opts.engine, "--model", opts.served_model, "--node", opts.node,
                       "--listen", "127.0.0.1:0", "--speedup", str(opts.speedup)]
        for plan in self.plans:
            self.progress(f"starting {plan.name} ({opts.engine} engine{', ' + plan.gpu_type if plan.gpu_type else ''})")
            args = [*worker_args, "--worker-id", plan.name]
            if plan.gpu_type:
                args += ["--gpu-type", plan.gpu_type, "--gpu-uuids", plan.gpu_uuid]
            self._python(plan.name, "prefill_svc" if plan.role == "prefill" else "decode_svc", *args)
        self.progress("starting the router")
        router = self._python("router", "router_svc", *common, "--listen", opts.router_listen)
        self.state = FactoryState(
            etcd=etcd_endpoint, admin=admin.endpoint, router=router.endpoint, model=opts.served_model,
            logs=str(self.log_dir),
            pids={**({"etcd": self.etcd_server.pid or 0} if self.etcd_server else {}),
                  **{c.name: c.pid for c in self.children}},
            workers=[asdict(plan) for plan in self.plans])
        path = self.state_dir / "up.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        os.replace(tmp, path)
        return self.state

    def stop(self) -> None:
        """Router first (no new requests), workers, control plane, agent, then etcd."""
        for child in reversed(self.children):
            self.progress(f"stopping {child.name}")
            child.stop()
        self.children.clear()
        if self.etcd_server is not None:
            self.progress("stopping etcd")
            self.etcd_server.stop()
            self.etcd_server = None
