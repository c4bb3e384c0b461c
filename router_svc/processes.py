"""`--processes N`: one tandem-router supervisor, N child routers serving the same gRPC and HTTP ports.

A Python router saturates one core; a host with many cores runs N of them
behind one address. The supervisor (`supervise`) serves no request itself:

1. It resolves the gRPC and HTTP ports (port 0: a free one) by binding a
   socket with SO_REUSEPORT to each and keeping it bound, never listening,
   until it exits: the port stays reserved across child restarts, and the
   kernel hands new connections only to the children's listening sockets.
2. It starts N children: the same program with the caller's arguments plus
   `--processes 1 --reuse-port`, the concrete ports, router id `<id>-<i>`
   (demand reports for the planner stay apart and add up), and metrics port
   P+i for `--metrics-listen HOST:P` (each its own free one for port 0).
   Each child has its own registry view and connections to workers.
3. Once every child wrote its ready file it writes its own (`endpoint`,
   `http_port`, `metrics_port` = child 0's, `metrics_ports`, `children`) and
   tells systemd READY=1; children are kept off $NOTIFY_SOCKET (systemd's
   NotifyAccess=main would refuse them anyway).
4. A child that dies is restarted after a backoff (`RestartBudget`); more
   than MAX_RESTARTS within RESTART_WINDOW_S and it stops every child and
   exits 1, so the service manager restarts the whole router.
5. SIGTERM or SIGINT: forwarded as SIGTERM to every child, each drains with
   its --shutdown-grace; it exits once all did: 0 when every child exited 0.
   A child still running STOP_MARGIN_S after its grace is killed.

Children die with the supervisor: PR_SET_PDEATHSIG delivers SIGKILL to a
child whose supervisor is gone, however it went (a supervisor killed with
SIGKILL cannot forward anything). Each child runs in its own process group,
so a Ctrl-C in a terminal reaches the supervisor alone and the children get
one SIGTERM from it, not a SIGINT and then a SIGTERM (a second signal skips
the drain).

The decisions (how many children, what each is told, when to restart) are
plain functions and `RestartBudget`, unit-tested without processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.keys import check_name
from router_svc.settings import RouterSettings
from runtime import sdnotify
from runtime.server import announce_ready

log = logging.getLogger(__name__)

# Restarts allowed within the window, all children together; one more and the supervisor gives up.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# Backoff before restart k (1-based) within the window: 0.5 s, 1, 2, 4, 8 s.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
# A child still running this long after its shutdown grace is killed.
STOP_MARGIN_S = 10.0
POLL_S = 0.1

_PR_SET_PDEATHSIG = 1


# -- pure decisions -----------------------------------------------------------------------------------------------

def process_count(requested: int, available_cpus: int) -> int:
    """How many routers to run: `requested`, or one per available CPU for 0 (at least one)."""
    return requested if requested > 0 else max(1, available_cpus)


def with_port(listen: str, port: int) -> str:
    """`listen` (HOST:PORT, [V6]:PORT) with its port replaced."""
    host, _, _ = listen.rpartition(":")
    return f"{host}:{port}"


def listen_port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def child_metrics_listen(metrics_listen: str, index: int) -> str:
    """Child `index`'s --metrics-listen: HOST:P+index for a fixed P, HOST:0 stays 0, empty stays off."""
    if not metrics_listen:
        return ""
    port = listen_port(metrics_listen)
    return with_port(metrics_listen, port + index) if port else metrics_listen


def child_router_ids(router_id: str, count: int) -> list[str]:
    """`<router_id>-<i>` for each child; ValueError when one cannot be a registry key segment."""
    return [check_name(f"{router_id}-{i}", "router_id") for i in range(count)]


@dataclass(frozen=True)
class ChildPlan:
    """What child `index` is told, on top of the supervisor's own arguments."""

    index: int
    router_id: str
    listen: str
    http_listen: str
    metrics_listen: str
    ready_file: Path

    def argv(self, base: Sequence[str]) -> list[str]:
        """`base` (the supervisor's arguments) with this child's settings after it: the last flag wins."""
        extra = ["--processes", "1", "--reuse-port", "--listen", self.listen, "--router-id", self.router_id,
                 "--ready-file", str(self.ready_file)]
        if self.http_listen:
            extra += ["--http-listen", self.http_listen]
        if self.metrics_listen:
            extra += ["--metrics-listen", self.metrics_listen]
        return [*base, *extra]


def child_plans(settings: RouterSettings, count: int, grpc_port: int, http_port: int, ready_dir: Path,
                router_id: str) -> list[ChildPlan]:
    """One plan per child: the shared (concrete) ports, its own id, metrics port and ready file."""
    ids = child_router_ids(router_id, count)
    return [ChildPlan(
        index=i, router_id=ids[i], listen=with_port(settings.listen, grpc_port),
        http_listen=with_port(settings.http_listen, http_port) if settings.http_listen else "",
        metrics_listen=child_metrics_listen(settings.metrics_listen, i),
        ready_file=ready_dir / f"router-{i}.ready.json") for i in range(count)]


def ready_info(children: Sequence[dict[str, Any]], pid: int) -> dict[str, Any]:
    """The supervisor's ready file from its children's (in index order): shared ports, every metrics port."""
    first = children[0]
    metrics_ports = [int(child.get("metrics_port", 0)) for child in children]
    return {"endpoint": first["endpoint"], "pid": pid, "metrics_port": metrics_ports[0],
            "http_port": int(first.get("http_port", 0)), "metrics_ports": metrics_ports,
            "processes": len(children), "children": [int(child["pid"]) for child in children]}


class RestartBudget:
    """When to restart a child that died: a backoff, and a cap of `limit` restarts per `window_s`.

    `next_delay(now)` records one restart and returns the seconds to wait
    before it, or None when the cap is spent (the supervisor gives up).
    Pure: the caller passes the time.
    """

    def __init__(self, limit: int = MAX_RESTARTS, window_s: float = RESTART_WINDOW_S,
                 first_backoff_s: float = FIRST_BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self._restarts: deque[float] = deque()

    def next_delay(self, now: float) -> float | None:
        while self._restarts and self._restarts[0] <= now - self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.limit:
            return None
        self._restarts.append(now)
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** (len(self._restarts) - 1))


# -- processes ----------------------------------------------------------------------------------------------------

def reserve_port(listen: str) -> socket.socket:
    """A socket bound (SO_REUSEPORT, not listening) to `listen`; OSError naming it when that cannot be.

    The children bind the same port with SO_REUSEPORT; this socket keeps a
    port-0 choice from being taken by anyone else between child restarts.
    """
    host = listen.rpartition(":")[0].strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or "0.0.0.0", listen_port(listen)))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    return sock


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: SIGKILL when the supervisor goes, even if it already went."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


class _Child:
    def __init__(self, plan: ChildPlan, base_argv: Sequence[str]) -> None:
        self.plan = plan
        self.argv = [sys.executable, "-m", "router_svc", *plan.argv(base_argv)]
        self.process: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.restart_at: float | None = None
        self.announced = False

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.plan.ready_file.unlink()
        env = {k: v for k, v in os.environ.items() if k != sdnotify.ENV_VAR}
        # subprocess, not multiprocessing's fork: grpc's C core must not be forked once it runs, and a fresh
        # interpreter with these arguments is exactly what an operator could start by hand (and sees in ps).
        parent = os.getpid()
        self.process = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, process_group=0,
                                        preexec_fn=lambda: _die_with_parent(parent))
        self.info = {}
        self.restart_at = None
        self.announced = False

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def ready(self) -> bool:
        """True once its ready file is there (read into `info`)."""
        if not self.info and self.plan.ready_file.exists():
            self.info = json.loads(self.plan.ready_file.read_text())
        return bool(self.info)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)


def _kill_all(children: Sequence[_Child]) -> None:
    for child in children:
        child.signal(signal.SIGKILL)
        if child.process is not None:
            child.process.wait()


class Supervisor:
    """Runs N children until a stop signal or a spent restart budget. `run()` is called once."""

    def __init__(self, settings: RouterSettings, base_argv: Sequence[str], count: int) -> None:
        self.settings = settings
        self.base_argv = list(base_argv)
        self.count = count
        self.budget = RestartBudget()
        self._stop_signal: int | None = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
            sdnotify.notify_stopping(f"{signal.Signals(signum).name} received: draining {self.count} routers")

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        children: list[_Child] = []
        with contextlib.ExitStack() as cleanup:
            grpc_port = cleanup.enter_context(reserve_port(self.settings.listen)).getsockname()[1]
            http_port = cleanup.enter_context(reserve_port(self.settings.http_listen)).getsockname()[1] \
                if self.settings.http_listen else 0
            # Beside the supervisor's own ready file when it has one: what a SIGKILL leaves stays with it.
            ready_dir = Path(tempfile.mkdtemp(
                prefix="tandem-router-", dir=self.settings.ready_file.parent if self.settings.ready_file else None))
            cleanup.callback(shutil.rmtree, ready_dir, ignore_errors=True)
            # Last in, first out: on any way out, no child survives the ports or the ready files.
            cleanup.callback(_kill_all, children)
            plans = child_plans(self.settings, self.count, grpc_port, http_port, ready_dir,
                                self.settings.resolved_router_id())
            children += [_Child(plan, self.base_argv) for plan in plans]
            for child in children:
                child.start()
            log.info("router processes starting", extra={"processes": self.count, "port": grpc_port,
                                                         "http_port": http_port})
            failure = self._supervise(children)
            stopped = self._stop(children)
        return stopped if failure is None else failure

    def _supervise(self, children: list[_Child]) -> int | None:
        """Until a stop signal (None) or a failure (the exit status to return)."""
        announced = False
        while self._stop_signal is None:
            now = time.monotonic()
            for child in children:
                code = child.exit_code()
                if code is not None and child.restart_at is None:
                    if not announced:
                        log.error("router process exited during start-up",
                                  extra={"child": child.plan.index, "exit_code": code})
                        return code if code > 0 else 1
                    delay = self.budget.next_delay(now)
                    if delay is None:
                        log.error("router processes keep dying: stopping them all",
                                  extra={"child": child.plan.index, "exit_code": code,
                                         "restarts": MAX_RESTARTS, "window_s": RESTART_WINDOW_S})
                        return 1
                    log.warning("router process died: restarting it",
                                extra={"child": child.plan.index, "exit_code": code, "delay_s": delay})
                    child.restart_at = now + delay
                elif code is not None and child.restart_at is not None and now >= child.restart_at:
                    child.start()
                elif code is None and not child.announced and child.ready():
                    child.announced = True
                    if announced:
                        log.info("router process restarted", extra={"child": child.plan.index})
                        self._announce(children)
            if not announced and all(child.announced for child in children):
                announced = True
                self._announce(children)
            time.sleep(POLL_S)
        return None

    def _announce(self, children: list[_Child]) -> None:
        info = ready_info([child.info for child in children], os.getpid())
        announce_ready(self.settings.ready_file, **info)
        log.info("router ready", extra=info)

    def _stop(self, children: list[_Child]) -> int:
        """SIGTERM to every child, wait for all (SIGKILL past the grace); 0 when every one stopped cleanly.

        A child waiting for its restart is not counted (its death was logged); one stopped by the SIGTERM
        itself (before it installed its handler) stopped cleanly.
        """
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace + STOP_MARGIN_S
        codes: list[int] = []
        for child in children:
            if child.process is None or child.restart_at is not None:
                continue
            try:
                codes.append(child.process.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.warning("router process still running after its grace: killing it",
                            extra={"child": child.plan.index})
                child.signal(signal.SIGKILL)
                codes.append(child.process.wait())
        failed = [code for code in codes if code not in (0, -signal.SIGTERM)]
        if failed:
            log.warning("router processes exited with errors", extra={"exit_codes": codes})
        log.info("router processes stopped", extra={"processes": len(codes)})
        return 0 if not failed else 1


def supervise(settings: RouterSettings, argv: Sequence[str], count: int) -> int:
    """Runs `count` child routers with `argv` (the supervisor's own arguments) until stopped; the exit status."""
    return Supervisor(settings, argv, count).run()
