"""systemd's readiness protocol (sd_notify), spoken directly: no libsystemd, no new dependency.

    notify_ready("serving endpoint=10.0.0.5:50051")   # Type=notify units leave "activating"
    notify_status("draining 3 requests")               # shown by `systemctl status`
    notify_stopping("SIGTERM: draining")               # the unit shows "deactivating" at once

The service manager passes a datagram socket in $NOTIFY_SOCKET: a file-system
path, or an abstract-namespace name written with a leading '@'. Each
notification is one datagram of newline-separated KEY=VALUE assignments; the
kernel attaches the sender's credentials, which is how systemd checks
NotifyAccess=main.

Contract: every `notify_*` call is a no-op returning False when
$NOTIFY_SOCKET is unset (run by hand, by tests, by `tandemctl up`), never
raises for a socket that is missing or refuses the datagram (it logs a
warning and returns False: readiness reporting must not take a serving
process down), may be called any number of times, from any thread. Only a
malformed assignment (a programming error) raises ValueError.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV_VAR = "NOTIFY_SOCKET"
# A stuck receiver must not hold a stopping process for long; systemd drains
# its notify socket continuously, so this only bites when it is wedged.
SEND_TIMEOUT_S = 2.0
# systemd truncates STATUS= for display anyway; keep the datagram small.
MAX_STATUS_CHARS = 512

_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def socket_address(value: str | None) -> str | bytes | None:
    """The address to send to, from $NOTIFY_SOCKET's value; None when unset or unusable.

    '@name' is the abstract namespace (a leading NUL byte on the wire); an
    absolute path is a socket file. Anything else (a relative path, or the
    `vsock:` form newer systemd offers to virtual machines) is not a socket
    this process can reach, so notifications are skipped rather than sent
    somewhere wrong.
    """
    if not value:
        return None
    if value.startswith("@"):
        if len(value) < 2:
            return None
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def one_line(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    """`text` as a single line of at most `limit` characters (newlines would split the assignment)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def format_message(assignments: Mapping[str, str]) -> bytes:
    """The datagram for `assignments`, in order: b'READY=1\\nSTATUS=...\\n'.

    Raises ValueError naming the key for a key that is not upper-case
    KEY syntax or a value with a newline (it would forge another assignment).
    """
    if not assignments:
        raise ValueError("sd_notify message needs at least one assignment")
    lines = []
    for key, value in assignments.items():
        if not _KEY.match(key):
            raise ValueError(f"sd_notify key must match [A-Z][A-Z0-9_]*, got {key!r}")
        if "\n" in value:
            raise ValueError(f"sd_notify value of {key} must be one line, got {value!r}")
        lines.append(f"{key}={value}\n")
    return "".join(lines).encode()


def status_line(info: Mapping[str, object]) -> str:
    """A STATUS= text from a ready file's fields: 'serving endpoint=h:p worker_id=w'. Pure.

    Empty and None values are left out; `pid` is left out (systemd shows the main PID itself).
    """
    parts = [f"{key}={value}" for key, value in info.items()
             if key != "pid" and value is not None and value != ""]
    return one_line(" ".join(["serving", *parts]))


def notify(assignments: Mapping[str, str], *, env: Mapping[str, str] | None = None) -> bool:
    """Sends one notification; True if the datagram went out (see the module contract)."""
    environ = os.environ if env is None else env
    raw = environ.get(ENV_VAR)
    address = socket_address(raw)
    data = format_message(assignments)
    if address is None:
        if raw:
            log.warning("cannot notify the service manager: unsupported NOTIFY_SOCKET %r", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(data, address)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", raw, exc)
        return False
    return True


def notify_ready(status: str = "", *, env: Mapping[str, str] | None = None) -> bool:
    """READY=1 (plus STATUS=): a Type=notify unit becomes active. Safe to call twice."""
    assignments = {"READY": "1"}
    if status:
        assignments["STATUS"] = one_line(status)
    return notify(assignments, env=env)


def notify_stopping(status: str = "", *, env: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1 (plus STATUS=): the unit shows "deactivating" while in-flight work drains.

    Call it once shutdown begins (on SIGTERM/SIGINT), before draining; safe to call twice.
    """
    assignments = {"STOPPING": "1"}
    if status:
        assignments["STATUS"] = one_line(status)
    return notify(assignments, env=env)


def notify_status(status: str, *, env: Mapping[str, str] | None = None) -> bool:
    """STATUS= alone: free text `systemctl status` shows (draining, re-registering...)."""
    return notify({"STATUS": one_line(status)}, env=env)
