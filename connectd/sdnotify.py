"""The sd_notify protocol: state strings -> one datagram to systemd's $NOTIFY_SOCKET.

Inputs: the environment systemd gives a `Type=notify` service (NOTIFY_SOCKET, WATCHDOG_USEC,
WATCHDOG_PID). Outputs: "READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=..." datagrams, and the
interval at which to ping the watchdog. Without NOTIFY_SOCKET (a terminal, `connectd up`'s
children, tests) every call is a cheap no-op that returns False, so callers never branch on
"am I under systemd". Standard library only: a daemon must be able to say READY=1 even when
nothing else is installed right.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

# What systemd hands to the service it supervises; `connectd up` strips these from the
# environment of its own children so they do not talk to the supervisor's manager.
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The AF_UNIX address from $NOTIFY_SOCKET ('@name' -> abstract '\\0name'), or None."""
    environ = os.environ if environ is None else environ
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        # Abstract namespace: the kernel name starts with a NUL byte instead of '@'.
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    # Unset, empty, or a form we do not speak (systemd's vsock:CID:PORT for VMs).
    return None


def notify(*states: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=idle") as one datagram to $NOTIFY_SOCKET.

    Returns True when the datagram was sent, False when there is no socket or sending failed:
    losing a notification must never stop a daemon, and systemd's own timeouts cover the case.
    """
    address = socket_address(environ)
    if address is None or not states:
        return False
    message = "\n".join(states).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    """READY=1 (plus STATUS=status): startup is finished, systemd may start dependants."""
    return notify("READY=1", *_status(status))


def stopping(status: str | None = None) -> bool:
    """STOPPING=1: shutdown has begun (finishing the current item)."""
    return notify("STOPPING=1", *_status(status))


def reloading(status: str | None = None) -> bool:
    """RELOADING=1: a HUP reload has begun; send ready() when it is done."""
    return notify("RELOADING=1", *_status(status))


def watchdog() -> bool:
    """WATCHDOG=1: the main loop is alive; send at least every watchdog_interval() seconds."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """STATUS=text: a one-line state shown by `systemctl status`."""
    return notify(f"STATUS={text}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled advises),
    or None when the watchdog is off or meant for another process (WATCHDOG_PID)."""
    environ = os.environ if environ is None else environ
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _status(text: str | None) -> tuple[str, ...]:
    # STATUS is one line; a newline would start a new (bogus) assignment in the datagram.
    return (f"STATUS={' '.join(text.splitlines())}",) if text else ()
