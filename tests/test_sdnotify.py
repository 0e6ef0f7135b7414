"""connectd.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from connectd import sdnotify


@pytest.fixture
def listener(notify_socket: tuple[socket.socket, str]) -> tuple[socket.socket, str]:
    """systemd's side of NOTIFY_SOCKET (conftest.notify_socket)."""
    return notify_socket


def test_notify_sends_states_as_one_datagram(listener, monkeypatch) -> None:
    """READY=1 and STATUS arrive together, newline-separated, in a single datagram."""
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify("READY=1", "STATUS=running") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=running"


def test_notify_abstract_namespace(monkeypatch) -> None:
    """An '@name' NOTIFY_SOCKET reaches the abstract-namespace socket '\\0name'."""
    name = f"connectd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.stopping("bye") is True
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_notify_without_socket_is_a_noop(monkeypatch) -> None:
    """No NOTIFY_SOCKET: nothing is sent and notify returns False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog() is False


def test_notify_to_vanished_socket_returns_false(tmp_path, monkeypatch) -> None:
    """A NOTIFY_SOCKET path with nobody listening is reported, not raised."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.notify("READY=1") is False


def test_status_is_kept_on_one_line(listener, monkeypatch) -> None:
    """A multi-line status cannot inject a second assignment into the datagram."""
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.ready("two\nREADY=0") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=two READY=0"


def test_notify_from_a_child_process(listener) -> None:
    """A separate process (how daemons run under systemd) reaches the socket too."""
    sock, path = listener
    env = {**os.environ, "NOTIFY_SOCKET": path}
    code = "from connectd import sdnotify; raise SystemExit(0 if sdnotify.watchdog() else 1)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(environ, expected) -> None:
    """Half of WATCHDOG_USEC, and only for the process WATCHDOG_PID names."""
    assert sdnotify.watchdog_interval(environ) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@abstract", "\0abstract"),
    ("", None),
    ("vsock:2:1234", None),
])
def test_socket_address(value, expected) -> None:
    """Path and abstract forms are understood; anything else means 'no socket'."""
    assert sdnotify.socket_address({"NOTIFY_SOCKET": value}) == expected
