"""The systemd units in deploy/: systemd's own checks, their key properties, the example settings, readiness.

How `systemd-analyze verify` is run: it loads a unit file given by path
against the host's unit search path (for network-online.target,
sysinit.target...) and checks, among the rest, that every ExecStart= program
exists and is executable. The units name the console scripts of
/opt/tandem/venv/bin, which a test machine does not have. Each unit is
therefore copied into a temp dir with only the `/opt/tandem/venv/bin/` prefix
rewritten to a temp dir of executable stand-ins; every other line is checked
as shipped. `--root=` is not used: it needs a complete unit tree under the
root, and a copy of the host's tree breaks its relative symlinks. A template
is verified as an instance (tandem-prefill@h100-0.service, a symlink to the
staged template), the way systemd loads it. verify exits 0 for some
problems (an unknown key, a value it cannot parse), printing a warning, so
any output line that names one of our units fails the test as well.

systemd-analyze missing is a failure, not a skip: CI installs Debian's
`systemd` package (see MISSING below).
"""

from __future__ import annotations

import importlib
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from controlplane.agent import AgentSettings, resolve
from controlplane.etcd_server import EtcdServer
from router_svc.__main__ import RouterSettings
from router_svc.models import parse_tokenizer_map
from runtime.config import load_config
from worker.process import EXIT_BAD_SETTINGS, EXIT_ENGINE_FAILED, EXIT_GPU_CLAIMED, NO_RESTART_EXIT_STATUSES
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = ROOT / "deploy" / "systemd"
ETC_DIR = ROOT / "deploy" / "etc" / "tandem"
SYSUSERS = ROOT / "deploy" / "sysusers.d" / "tandem.conf"
VENV_BIN = "/opt/tandem/venv/bin/"
MISSING = ("systemd-analyze is not installed; on Debian/Ubuntu run "
           "`apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd`")
# What `systemd-analyze security --offline` may score each unit at most (0 best, 10 worst).
# GPU units keep the host /dev (device cgroup instead) and no system-call allow list.
EXPOSURE_LIMIT = {"plain": 2.5, "gpu": 4.0}
# Seconds between the end of the services' shutdown grace and systemd's SIGKILL.
STOP_MARGIN_S = 30.0


@dataclass(frozen=True)
class UnitCase:
    file: str           # in deploy/systemd
    name: str           # the unit name systemd loads (an instance for templates)
    section: str        # the service's table in the TOML file
    settings: str       # "module:Class" of its settings, imported when needed
    own_env: str        # the per-service or per-instance environment file in deploy/etc/tandem
    gpu: bool

    @property
    def instance(self) -> str:
        return self.name.partition("@")[2].removesuffix(".service")


WORKER = "worker.settings:WorkerSettings"
CASES = [
    UnitCase("tandem-agent.service", "tandem-agent.service", "agent", "controlplane.agent:AgentSettings",
             "agent.env", True),
    UnitCase("tandem-controlplane.service", "tandem-controlplane.service", "controlplane",
             "controlplane.server:ControlPlaneSettings", "controlplane.env", False),
    UnitCase("tandem-router.service", "tandem-router.service", "router", "router_svc.__main__:RouterSettings",
             "router.env", False),
    UnitCase("tandem-prefill@.service", "tandem-prefill@h100-0.service", "prefill", WORKER, "h100-0.env", True),
    UnitCase("tandem-decode@.service", "tandem-decode@h200-0.service", "decode", WORKER, "h200-0.env", True),
]
IDS = [case.name for case in CASES]


def settings_class(case: UnitCase) -> type:
    module, _, name = case.settings.partition(":")
    cls: type = getattr(importlib.import_module(module), name)
    return cls


# -- reading the files (systemd's syntax, the subset these files use) --------------------------------------------

def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} in file order; repeated keys stay repeated."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: continuation lines are not used here"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None and "=" in line, f"{path.name}:{number}: not KEY=VALUE in a section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Mapping[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Mapping[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times, expected once"
    return found[0]


ENV_LINE = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^\s\"'$\\%]*)\Z")


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines. Values are held to what systemd reads literally (no quotes, $ or %)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        match = ENV_LINE.match(line)
        assert match, f"{path.name}:{number}: expected KEY=VALUE with a literal value, got {line!r}"
        env[match["key"]] = match["value"]
    return env


def seconds(text: str) -> float:
    """A systemd time span as used here: '90', '30min', '1h'."""
    match = re.fullmatch(r"(\d+)(s|min|h)?", text)
    assert match, f"unexpected time span {text!r}"
    return int(match[1]) * {None: 1, "s": 1, "min": 60, "h": 3600}[match[2]]


def expand(text: str, case: UnitCase) -> str:
    """The specifiers the units use, as systemd would expand them on host gpu-a."""
    return (text.replace("%i", case.instance).replace("%H", "gpu-a").replace("%C", "/var/cache")
            .replace("%%", "%"))


def service_environment(case: UnitCase) -> dict[str, str]:
    """What the service's process sees: Environment=, then each EnvironmentFile= in order (files win)."""
    unit = parse_unit(UNIT_DIR / case.file)
    env: dict[str, str] = {}
    for assignment in values(unit, "Service", "Environment"):
        key, _, val = expand(assignment, case).partition("=")
        env[key] = val
    for entry in values(unit, "Service", "EnvironmentFile"):
        path = Path(expand(entry.removeprefix("-"), case))
        assert path.parent == Path("/etc/tandem"), f"{case.file}: environment file outside /etc/tandem: {path}"
        example = ETC_DIR / path.name
        assert example.is_file(), f"{case.file} reads {path}, but deploy/etc/tandem has no {path.name} example"
        env.update(parse_env_file(example))
    if "TANDEM_CONFIG" in env:
        env["TANDEM_CONFIG"] = str(ETC_DIR / Path(env["TANDEM_CONFIG"]).name)
    return env


# -- systemd's own checks ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(MISSING)
    return path


@pytest.fixture(scope="module")
def staged_units() -> Iterator[Path]:
    """Every unit copied with its ExecStart= pointed at executable stand-ins; instances as symlinks."""
    stage = Path(tempfile.mkdtemp(prefix="tandem-units-"))
    bin_dir = stage / "bin"
    bin_dir.mkdir()
    for case in CASES:
        text = (UNIT_DIR / case.file).read_text()
        for program in re.findall(re.escape(VENV_BIN) + r"(\S+)", text):
            stand_in = bin_dir / program
            stand_in.write_text("#!/bin/sh\nexit 0\n")
            stand_in.chmod(0o755)
        (stage / case.file).write_text(text.replace(VENV_BIN, f"{bin_dir}/"))
        if case.name != case.file:
            (stage / case.name).symlink_to(case.file)
    yield stage
    shutil.rmtree(stage, ignore_errors=True)


def test_the_cases_cover_every_unit_shipped() -> None:
    assert sorted(p.name for p in UNIT_DIR.glob("*.service")) == sorted(case.file for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_systemd_analyze_verify(case: UnitCase, systemd_analyze: str, staged_units: Path) -> None:
    result = subprocess.run([systemd_analyze, "verify", str(staged_units / case.name)],
                            capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "tandem" in line]
    assert result.returncode == 0 and not complaints, \
        f"systemd-analyze verify {case.name} (status {result.returncode}):\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exposure_stays_low(case: UnitCase, systemd_analyze: str, staged_units: Path) -> None:
    result = subprocess.run([systemd_analyze, "security", "--offline=yes", "--no-pager", str(staged_units / case.name)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}{result.stderr}"
    limit = EXPOSURE_LIMIT["gpu" if case.gpu else "plain"]
    assert float(match[1]) <= limit, f"{case.name} exposure {match[1]} > {limit}:\n{result.stdout}"


def test_sysusers_creates_the_service_account(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    assert tool is not None, MISSING
    (tmp_path / "etc").mkdir()
    result = subprocess.run([tool, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert users["tandem"][5:] == ["/var/lib/tandem", "/usr/sbin/nologin"]
    assert int(users["tandem"][2]) < 1000, "a system account"
    group_lines = (tmp_path / "etc/group").read_text().splitlines()
    groups = {line.split(":")[0]: line.split(":")[3].split(",") for line in group_lines}
    assert "tandem" in groups and "tandem" in groups["video"]


# -- the properties an operator relies on -------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "CapabilityBoundingSet": "", "AmbientCapabilities": "", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
    "ProtectClock": "yes", "ProtectHostname": "yes", "RestrictNamespaces": "yes", "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unit_properties(case: UnitCase) -> None:
    unit = parse_unit(UNIT_DIR / case.file)
    service = dict(unit["Service"])
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "NotifyAccess") == "main"
    assert value(unit, "Service", "User") == "tandem" and value(unit, "Service", "Group") == "tandem"
    assert "DynamicUser" not in service
    assert value(unit, "Service", "Restart") == "on-failure"
    assert seconds(value(unit, "Service", "RestartSec")) >= 5
    no_restart = {int(status) for status in value(unit, "Service", "RestartPreventExitStatus").split()}
    if case.settings == WORKER:
        # The worker's own constants: a bad setting, and a GPU another worker holds (claimed before loading).
        assert no_restart == set(NO_RESTART_EXIT_STATUSES), \
            f"{case.file}: RestartPreventExitStatus= must list worker.process's {NO_RESTART_EXIT_STATUSES}"
        assert {EXIT_BAD_SETTINGS, EXIT_GPU_CLAIMED} <= no_restart and EXIT_ENGINE_FAILED not in no_restart
    else:
        assert no_restart == {2}, "bad settings exit 2: do not loop on them"
    assert int(value(unit, "Unit", "StartLimitBurst")) >= 3
    assert seconds(value(unit, "Unit", "StartLimitIntervalSec")) >= 300
    assert value(unit, "Service", "KillSignal") == "SIGTERM"
    assert value(unit, "Service", "KillMode") == "mixed"
    assert int(value(unit, "Service", "LimitNOFILE")) >= 4096
    for key, expected in HARDENING.items():
        assert value(unit, "Service", key) == expected, f"{case.file}: {key}"

    after = " ".join(values(unit, "Unit", "After")).split()
    wants = " ".join(values(unit, "Unit", "Wants")).split()
    assert {"network-online.target", "etcd.service"} <= set(after)
    assert {"network-online.target", "etcd.service"} <= set(wants)
    assert not values(unit, "Unit", "Requires") and not values(unit, "Unit", "BindsTo"), "etcd may be remote"
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]

    env_files = values(unit, "Service", "EnvironmentFile")
    assert env_files[0] == "/etc/tandem/tandem.env"
    if case.file.endswith("@.service"):
        assert env_files[1:] == ["/etc/tandem/%i.env"], "a worker without its GPU file must not start"
        assert "TANDEM_WORKER_ID=%H-%i" in values(unit, "Service", "Environment")
        assert seconds(value(unit, "Service", "TimeoutStartSec")) >= 15 * 60, "model loading takes minutes"
        assert value(unit, "Service", "LimitMEMLOCK") == "infinity"
        assert "TANDEM_CACHE_DIR=%C/tandem" in values(unit, "Service", "Environment")
        assert value(unit, "Service", "CacheDirectory") == "tandem"
    else:
        assert env_files[1:] == [f"-/etc/tandem/{case.own_env}"]

    if case.gpu:
        assert value(unit, "Service", "PrivateDevices") == "no"
        assert value(unit, "Service", "DevicePolicy") == "closed"
        assert values(unit, "Service", "DeviceAllow") == ["char-nvidia* rw"]
    else:
        assert value(unit, "Service", "PrivateDevices") == "yes"
        assert values(unit, "Service", "SystemCallFilter") == ["@system-service", "~@privileged"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_memory_ipc_and_grpc_logging(case: UnitCase) -> None:
    """Plain units deny W+X memory and drop IPC; GPU units cannot (CUDA JITs, the shm KV transport)."""
    unit = parse_unit(UNIT_DIR / case.file)
    service = dict(unit["Service"])
    if case.gpu:
        assert "MemoryDenyWriteExecute" not in service, "CUDA, torch and Triton compile into executable memory"
        assert "RemoveIPC" not in service and "PrivateIPC" not in service, "the shm KV transport shares /dev/shm"
    else:
        assert value(unit, "Service", "MemoryDenyWriteExecute") == "yes"
        assert value(unit, "Service", "PrivateMounts") == "yes"
        assert value(unit, "Service", "RemoveIPC") == "yes"
    # gRPC's C core writes its own non-JSON lines to stderr otherwise, and `journalctl | jq` aborts on them.
    assert service_environment(case).get("GRPC_VERBOSITY") == "NONE"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exec_start_is_an_installed_console_script(case: UnitCase) -> None:
    unit = parse_unit(UNIT_DIR / case.file)
    program = value(unit, "Service", "ExecStart")
    assert program.startswith(VENV_BIN) and " " not in program, "settings come from the environment, not flags"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert program.removeprefix(VENV_BIN) in scripts, \
        f"{program} is not a console script in pyproject.toml [project.scripts]"


# -- the example settings, through the services' own loaders -----------------------------------------------------

def known_names(settings: type) -> set[str]:
    return {"TANDEM_" + f.name.upper() for f in fields(settings)} | {"TANDEM_CONFIG"}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_example_settings_load_and_stop_in_time(case: UnitCase) -> None:
    cls = settings_class(case)
    env = service_environment(case)
    settings: Any = load_config(cls, [], prog=case.name, section=case.section, env=env)
    if cls is AgentSettings:
        settings = resolve(settings)
        assert settings.node == env["TANDEM_NODE"]
    if cls is RouterSettings:
        assert parse_tokenizer_map(settings.tokenizer)
    if cls is WorkerSettings:
        assert settings.gpu_uuid_list() and len(settings.gpu_uuid_list()) == settings.gpu_count
        assert env["CUDA_VISIBLE_DEVICES"] == settings.gpu_uuids, "CUDA must see exactly the GPUs claimed"
        assert settings.worker_id == f"gpu-a-{case.instance}" and settings.cache_dir == "/var/cache/tandem"
    stop = seconds(value(parse_unit(UNIT_DIR / case.file), "Service", "TimeoutStopSec"))
    assert settings.shutdown_grace + STOP_MARGIN_S <= stop, \
        f"shutdown grace {settings.shutdown_grace}s leaves under {STOP_MARGIN_S}s before SIGKILL at {stop}s"


def test_every_example_variable_is_a_setting_of_a_service_reading_it() -> None:
    """A misspelt TANDEM_* variable would be silently ignored by the services."""
    readers: dict[str, set[str]] = {}
    for case in CASES:
        names = known_names(settings_class(case))
        readers.setdefault("tandem.env", set()).update(names)
        readers.setdefault(case.own_env, set()).update(names)
    for path in sorted(ETC_DIR.glob("*.env")):
        assert path.name in readers, f"{path.name} is read by no unit"
        unknown = sorted(k for k in parse_env_file(path) if k.startswith("TANDEM_") and k not in readers[path.name])
        assert not unknown, f"{path.name}: no service reading it has the setting(s) {unknown}"


# -- readiness, the way systemd sees it --------------------------------------------------------------------------

def test_a_service_tells_systemd_it_is_ready_from_its_main_pid(processes: object, etcd: EtcdServer) -> None:
    """Started with $NOTIFY_SOCKET as under Type=notify, the agent sends READY=1 once registered."""
    stage = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))  # AF_UNIX paths are limited to 108 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(stage / "notify"))
        sock.settimeout(60.0)  # a bound on the wait, not a pause: recvmsg returns when the datagram lands
        agent = processes.start(  # type: ignore[attr-defined]
            "agent-notify", "controlplane.agent", "--etcd", etcd.endpoint, "--node", "sd-1",
            "--simulate-gpus", "H100-SXM:2", env={"NOTIFY_SOCKET": str(stage / "notify")}, wait=False)
        creds = struct.calcsize("3i")
        data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(creds))
        pids = [struct.unpack("3i", payload[:creds])[0] for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        assert pids == [agent.pid], "systemd (NotifyAccess=main) accepts only the main process"
        lines = data.decode().splitlines()
        assert lines[0] == "READY=1"
        assert lines[1].startswith("STATUS=serving node=sd-1 gpus=2")
        assert agent.ready_path is not None and agent.ready_path.exists(), "the ready file comes first"
        assert agent.stop() == 0, "SIGTERM is a clean stop"
    finally:
        sock.close()
        shutil.rmtree(stage, ignore_errors=True)
