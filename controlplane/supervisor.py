"""Start Tandem services as child processes and know when they serve.

Used by `tandemctl up` and by the test suite, so both run the real
processes the same way. A child is started in its own process group, with
`--ready-file` pointing to a file it writes (JSON with its endpoint) once its
gRPC server is up; `wait_ready()` waits for that file, then for
`grpc.health.v1` to answer SERVING: polling with a deadline, never a fixed
sleep. Processes are stopped by PID: SIGTERM, then SIGKILL after a grace.
Both waits take an optional `threading.Event`: set, it cuts the wait short
(start-up aborted; stop without the grace), so a signal handler that only
sets an event gets a prompt answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.peers import PeerTls


class ProcessStartError(RuntimeError):
    """The child exited or never became SERVING; the message has its log tail."""


class StartAborted(Exception):
    """Waiting for a child was cut short on request (Ctrl-C during start-up)."""


def health_status(endpoint: str, service: str = "", timeout: float = 1.0,
                  tls: PeerTls | None = None) -> str:
    """The grpc.health.v1 status name at `endpoint` (over TLS with `tls`), or the RPC error code name."""
    channel = grpc.secure_channel(endpoint, tls.credentials(), options=tls.options()) if tls is not None \
        else grpc.insecure_channel(endpoint)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class ManagedProcess:
    """One child process: start, wait until it serves, signal, stop. `stop()` is safe twice."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        ready_file: bool = True,
    ) -> None:
        self.name = name
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tandem-proc-"))
        self.log_path = self.log_dir / f"{name}.log"
        self.ready_path: Path | None = self.log_dir / f"{name}.ready.json" if ready_file else None
        self.argv = list(argv) + (["--ready-file", str(self.ready_path)] if self.ready_path else [])
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} not started"
        return self.process.pid

    @property
    def endpoint(self) -> str:
        return str(self.info.get("endpoint", ""))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> ManagedProcess:
        if self.ready_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.ready_path.unlink()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ProcessStartError(
                f"{self.name} exited with status {self.process.returncode}; log {self.log_path}:\n"
                f"{self.log_tail()}"
            )

    def _check_abort(self, abort: threading.Event | None) -> None:
        if abort is not None and abort.is_set():
            raise StartAborted(f"start-up aborted while waiting for {self.name}")

    def wait_ready(self, timeout: float = 60.0, endpoint: str = "", tls: PeerTls | None = None,
                   abort: threading.Event | None = None) -> dict[str, Any]:
        """Wait for the ready file (if any), then health SERVING (checked over TLS with `tls`). Returns the info.

        StartAborted as soon as `abort` is set (within one poll, at most a second)."""
        deadline = time.monotonic() + timeout
        if self.ready_path is not None:
            while not self.ready_path.exists():
                self._check_abort(abort)
                self._check_alive()
                if time.monotonic() > deadline:
                    raise ProcessStartError(f"{self.name} wrote no ready file in {timeout}s:\n{self.log_tail()}")
                time.sleep(0.05)
            self.info = json.loads(self.ready_path.read_text())
        if endpoint:
            self.info.setdefault("endpoint", endpoint)
        if self.endpoint:
            status = ""
            while status != "SERVING":
                self._check_abort(abort)
                self._check_alive()
                if time.monotonic() > deadline:
                    raise ProcessStartError(
                        f"{self.name} at {self.endpoint} not SERVING after {timeout}s (last: {status}):\n"
                        f"{self.log_tail()}"
                    )
                status = health_status(self.endpoint, tls=tls)
                if status != "SERVING":
                    time.sleep(0.05)
        return self.info

    def send(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL, as a crash would; waits until the process is gone."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def stop(self, grace: float = 15.0, hurry: threading.Event | None = None) -> int | None:
        """SIGTERM, wait up to `grace` (cut short when `hurry` is set), then SIGKILL. Returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while True:
                try:
                    self.process.wait(0.05 if hurry is not None else grace)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.pid, signal.SIGKILL)
                        self.process.wait(10)
                        break
        return self.process.returncode
