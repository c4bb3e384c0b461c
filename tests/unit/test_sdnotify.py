"""sd_notify against a real AF_UNIX datagram socket, bound here the way systemd binds its notify socket."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import sdnotify
from runtime.server import announce_ready


class NotifyListener:
    """A bound datagram socket standing in for systemd's; reads datagrams with their sender's pid."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # systemd enables SO_PASSCRED to learn the sender's pid (NotifyAccess=main).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    def receive(self) -> tuple[bytes, int]:
        """The next datagram and the pid the kernel vouches for (waits at most 5 s)."""
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[: struct.calcsize("3i")])
        return data, pid

    def pending(self) -> bytes | None:
        """A datagram already queued, or None: never waits."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(4096)
        except BlockingIOError:
            return None
        finally:
            self.sock.settimeout(5.0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def listener(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    path = short_dir / "notify"
    listen = NotifyListener(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield listen
    listen.close()


def test_ready_reaches_a_path_socket_with_our_pid(listener: NotifyListener) -> None:
    assert sdnotify.notify_ready("serving endpoint=10.0.0.5:50051") is True
    data, pid = listener.receive()
    assert data == b"READY=1\nSTATUS=serving endpoint=10.0.0.5:50051\n"
    assert pid == os.getpid()


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tandem-sdnotify-test-{secrets.token_hex(6)}"
    listen = NotifyListener(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify_stopping("SIGTERM: draining") is True
        data, _pid = listen.receive()
        assert data == b"STOPPING=1\nSTATUS=SIGTERM: draining\n"
    finally:
        listen.close()


def test_announce_ready_notifies_without_a_ready_file(listener: NotifyListener) -> None:
    announce_ready(None, endpoint="10.0.0.5:50061", worker_id="gpu-a-h100-0", metrics="", pid=1234)
    data, _pid = listener.receive()
    assert data == b"READY=1\nSTATUS=serving endpoint=10.0.0.5:50061 worker_id=gpu-a-h100-0\n"


def test_announce_ready_writes_the_file_before_notifying(listener: NotifyListener, short_dir: Path) -> None:
    ready = short_dir / "ready.json"
    announce_ready(ready, endpoint="127.0.0.1:7070", replica_id="cp-1")
    data, _pid = listener.receive()
    assert data.startswith(b"READY=1\n")
    assert json.loads(ready.read_text()) == {"endpoint": "127.0.0.1:7070", "replica_id": "cp-1"}


def test_status_alone_and_repeated_calls(listener: NotifyListener) -> None:
    assert sdnotify.notify_status("draining\n3 requests") is True
    assert sdnotify.notify_ready() is True
    assert sdnotify.notify_ready() is True
    assert listener.receive()[0] == b"STATUS=draining 3 requests\n"
    assert listener.receive()[0] == b"READY=1\n"
    assert listener.receive()[0] == b"READY=1\n"


def test_unset_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify_ready("x") is False
    announce_ready(None, endpoint="127.0.0.1:1")  # must not raise
    assert not caplog.records


def test_missing_socket_warns_and_returns_false(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = {"NOTIFY_SOCKET": str(short_dir / "gone")}
    assert sdnotify.notify_ready("x", env=env) is False
    assert any("cannot notify the service manager" in r.getMessage() for r in caplog.records)


def test_unsupported_address_is_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    assert sdnotify.notify_ready(env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert any("unsupported NOTIFY_SOCKET" in r.getMessage() for r in caplog.records)


def test_a_socket_of_another_type_refuses_without_raising(short_dir: Path) -> None:
    path = short_dir / "stream"
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stream.bind(str(path))
        stream.listen(1)
        assert sdnotify.notify_ready(env={"NOTIFY_SOCKET": str(path)}) is False
    finally:
        stream.close()


def test_env_argument_overrides_the_process_environment(listener: NotifyListener, short_dir: Path) -> None:
    other = NotifyListener(str(short_dir / "other"))
    try:
        assert sdnotify.notify_ready(env={"NOTIFY_SOCKET": str(short_dir / "other")}) is True
        assert other.receive()[0] == b"READY=1\n"
        assert listener.pending() is None
    finally:
        other.close()


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ("", None),
    ("@", None),
    ("@/org/freedesktop/systemd1/notify", b"\0/org/freedesktop/systemd1/notify"),
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("run/systemd/notify", None),
    ("vsock:2:1234", None),
])
def test_socket_address(value: str | None, expected: str | bytes | None) -> None:
    assert sdnotify.socket_address(value) == expected


def test_format_message_rejects_forged_assignments() -> None:
    assert sdnotify.format_message({"READY": "1", "STATUS": "ok"}) == b"READY=1\nSTATUS=ok\n"
    with pytest.raises(ValueError, match="STATUS must be one line"):
        sdnotify.format_message({"STATUS": "ok\nREADY=1"})
    with pytest.raises(ValueError, match="key must match"):
        sdnotify.format_message({"ready": "1"})
    with pytest.raises(ValueError, match="at least one"):
        sdnotify.format_message({})


def test_status_line_leaves_out_pid_and_empty_values() -> None:
    line = sdnotify.status_line({"node": "gpu-a", "gpus": 8, "registered": True, "pid": 42, "metrics": ""})
    assert line == "serving node=gpu-a gpus=8 registered=True"


def test_one_line_flattens_and_bounds() -> None:
    assert sdnotify.one_line("a\n b\t c") == "a b c"
    long = sdnotify.one_line("x" * 1000)
    assert len(long) == sdnotify.MAX_STATUS_CHARS and long.endswith("...")
