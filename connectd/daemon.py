"""The one run loop every connectd daemon uses.

Inputs: a subclass's setup()/step()/periodic()/teardown(), signals, watchdog wake-ups.
Outputs: calls to those methods in the right order, sd_notify messages, one exit status.

- step() does one unit of work and returns how many items it handled; the loop sleeps only
  when it returned 0, and wakes early on wake() (watchdog events, other threads) or a signal.
- Signal handlers only put the signal on a queue (Gunicorn's arbiter idea). The loop reads it
  between steps: TERM/INT finish the current step (its commit included) and exit 0; HUP calls
  reload(); USR1 calls reopen().
- Under systemd (NOTIFY_SOCKET set): READY=1 after setup, WATCHDOG=1 from the loop (so a
  wedged loop gets restarted), STOPPING=1 on the way out.
- run_until_idle() (the CLI's --once, and what tests use) steps until a step does nothing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from connectd import log, sdnotify
from connectd.settings import Settings


class DaemonFailed(RuntimeError):
    """A daemon cannot go on and says why (a port in use, a worker that died): `connectd run`
    prints the message and exits 1, and the supervisor or systemd restarts it."""


def stuck_workers(beats: dict[Any, Any], stale_after: float) -> list[Any]:
    """The keys of `beats` (shared monotonic-time values each worker process refreshes as it
    makes progress) whose worker has been silent for more than `stale_after` seconds; a value
    of 0 means "not started yet" and is never stuck. A daemon with worker processes pings the
    watchdog only while this is empty, so a wedged worker gets the whole daemon restarted."""
    now = time.monotonic()
    return [key for key, beat in beats.items() if beat.value and now - beat.value > stale_after]


def reuseport_socket(host: str, port: int, *, nodelay: bool = False) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, not yet listening: daemons with
    worker processes (tracker, receiver) give each worker one, and the kernel spreads new
    connections over them; the parent holds one to keep the port. `nodelay`: TCP_NODELAY."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a restart must not wait for the old connections' TIME_WAIT to pass
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def signal_workers(processes: Any, signum: int) -> None:
    """Send `signum` to every live process of `processes` (multiprocessing Process objects)."""
    for proc in processes:
        if proc.is_alive():
            os.kill(proc.pid, signum)


class _Waker:
    """Ends the loop's idle sleep, from another thread or from a signal handler: one byte
    written to a pipe, which is safe anywhere. (threading.Event.set() from a signal handler
    can deadlock: the handler runs in the main thread, which may be holding the Event's own
    lock inside Event.wait() at that instant; found as a hung HUP in a test.)"""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def set(self) -> None:
        try:
            os.write(self._w, b"\0")
        except OSError:  # pipe full (a wake-up is pending anyway) or closed at exit
            pass

    def wait(self, timeout: float) -> None:
        select.select([self._r], [], [], timeout)

    def clear(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def __del__(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class Daemon:
    """Base class: subclass, set `name`, implement step()."""

    name = "daemon"
    periodic_interval = 10.0  # seconds between periodic() calls

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = log.get(daemon=self.name)
        self._wake = _Waker()
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._stopping = False

    # -- for subclasses -------------------------------------------------------------------
    def setup(self) -> None:
        """Open what the daemon needs (databases, streams, sockets)."""

    def step(self) -> int:
        """Do one unit of work; return the number of items handled (0 = idle)."""
        raise NotImplementedError

    def periodic(self) -> None:
        """Housekeeping every periodic_interval seconds (roll old segments, heartbeats)."""

    def teardown(self) -> None:
        """Close what setup() opened; called once, also after an error."""

    def alive(self) -> bool:
        """Whether to tell systemd's watchdog that all is well (a daemon whose work happens
        elsewhere, e.g. in worker processes, says False when that work is stuck, so systemd
        restarts it)."""
        return True

    def reload(self) -> None:
        """SIGHUP: re-read what is safe to re-read (rules, templates). Default: nothing."""
        self.log.info("reload", what="nothing to reload")

    def reopen(self) -> None:
        """SIGUSR1: reopen log files (after logrotate). Default: nothing to reopen."""

    # -- control --------------------------------------------------------------------------
    def wake(self) -> None:
        """Thread-safe: end the current idle sleep now."""
        self._wake.set()

    def stop(self) -> None:
        """Thread-safe: finish the current step and leave run()."""
        self._stopping = True
        self._wake.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.put(signum)  # no work in a signal handler: the loop handles it
        self._wake.set()

    def _handle_signals(self) -> None:
        while not self._signals.empty():
            signum = self._signals.get()
            if signum in (signal.SIGTERM, signal.SIGINT):
                if not self._stopping:
                    self.log.info("stopping", signal=signal.Signals(signum).name)
                self._stopping = True
            elif signum == signal.SIGHUP:
                sdnotify.reloading()
                self.reload()
                sdnotify.ready()
            elif signum == signal.SIGUSR1:
                self.reopen()

    @contextlib.contextmanager
    def _signals_queued(self) -> Iterator[None]:
        """Route TERM/INT/HUP/USR1 to the queue for the duration (main thread only: Python
        delivers signals there), then restore whatever handlers were there before."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in _HANDLED:
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self) -> int:
        """Run until TERM/INT (or stop()); returns the exit status (0)."""
        with self._signals_queued():
            self.setup()
            try:
                return self._loop()
            finally:
                sdnotify.stopping()
                self.teardown()

    def _loop(self) -> int:
        settings = self.settings.daemon
        wd = sdnotify.watchdog_interval()
        ping_every = min(wd, settings.watchdog_interval) if wd else settings.watchdog_interval
        next_periodic = time.monotonic() + self.periodic_interval
        next_ping = 0.0
        sdnotify.ready(f"{self.name} running")
        self.log.info("started")
        while True:
            self._handle_signals()
            if self._stopping:
                self.log.info("stopped")
                return 0
            done = self.step()
            now = time.monotonic()
            if now >= next_periodic:
                self.periodic()
                next_periodic = now + self.periodic_interval
            if now >= next_ping and self.alive():
                sdnotify.watchdog()
                next_ping = now + ping_every
            if done == 0 and self._signals.empty() and not self._stopping:
                # An idle daemon must still ping systemd's watchdog on time (idle_sleep may be
                # longer than WATCHDOG_USEC/2), and still run periodic() on time.
                wait = min(settings.idle_sleep, next_periodic - now, next_ping - now)
                self._wake.wait(max(0.0, wait))
                self._wake.clear()

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """setup(), step() until a step handles nothing (or max_steps, or TERM/INT/stop()),
        teardown(). Returns the number of items handled."""
        total = 0
        # --once from cron can be stopped too: TERM/INT finish the current item, as in run()
        with self._signals_queued():
            self.setup()
            try:
                steps = 0
                while max_steps is None or steps < max_steps:
                    self._handle_signals()
                    if self._stopping:
                        break
                    done = self.step()
                    steps += 1
                    total += done
                    if done == 0:
                        break
                self.periodic()
            finally:
                self.teardown()
        return total
