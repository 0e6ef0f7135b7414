"""The tracker (TS): `connectd run tracker`, the parent of tracker.processes HTTP workers.

Inputs: settings ([tracker], paths, spool), the secrets file (token keys), the customer DB's
links (read in the background only). Outputs: worker processes answering clicks, opens,
unsubscribes and conversions (connectd.tracker.app), each appending to its own stream
`tracker.events.<N>`; READY=1 to systemd once every worker listens.

How it runs (Gunicorn's arbiter, smaller):
- setup() holds the port (a bound socket that does not listen: port 0 becomes a real port the
  workers share, and a port in use fails the start with a clear error), loads the link map
  once (database, else the snapshot file), creates the shared memory for heartbeats and
  metrics, then forks the workers. Each worker binds its own SO_REUSEPORT socket on the port,
  so the kernel spreads connections evenly over them, and is killed by the kernel if the
  parent dies (PR_SET_PDEATHSIG), so no orphan keeps the port or a stream's lock.
- step() restarts a worker that died (SIGCHLD wakes the loop), as worker N again: it takes
  over stream tracker.events.<N> once the kernel has released the dead one's lock. More
  than MAX_RESTARTS deaths within RESTART_WINDOW seconds stop the tracker (exit 1).
- alive() pings systemd's watchdog only while every worker's heartbeat is fresh.
- HUP: every worker re-reads the token keys. TERM/INT: workers finish what they answer,
  fsync their streams, exit; then the parent.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import socket
import time
from typing import Any

from connectd import log
from connectd.daemon import (
    Daemon,
    DaemonFailed,
    reuseport_socket,
    signal_workers,
    stuck_workers,
)
from connectd.secrets import SecretsError, load_secrets
from connectd.settings import Settings, SettingsError
from connectd.spool import Spool
from connectd.tracker import metrics as metrics_mod
from connectd.tracker.links import LinkMap
from connectd.tracker.server import run_worker

STARTUP_TIMEOUT = 30.0  # seconds for every worker to listen
STOP_TIMEOUT = 10.0  # seconds workers get after TERM before they are killed
MAX_RESTARTS = 10
RESTART_WINDOW = 60.0


class TrackerFailed(DaemonFailed):
    """The tracker cannot serve (port in use, workers that keep dying)."""


def snapshot_path(settings: Settings) -> Any:
    return settings.paths.spool / "tracker" / "links.json"


class Tracker(Daemon):
    name = "tracker"
    periodic_interval = 5.0

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        t = settings.tracker
        if not t.public_url.lower().startswith(("http://", "https://")):
            raise SettingsError(f"tracker.public_url must be an http(s) URL, got {t.public_url!r}")
        try:
            load_secrets(settings.paths.secrets)  # a missing key file is a config error
        except SecretsError as exc:
            raise SettingsError(str(exc)) from None
        self.processes = t.processes if t.processes > 0 else (os.cpu_count() or 1)
        self.sock: socket.socket | None = None
        self.port = 0
        self.workers: dict[int, Any] = {}
        self.beats: dict[int, Any] = {}
        self.deaths: list[float] = []
        self._ctx = multiprocessing.get_context("fork")

    def setup(self) -> None:
        t = self.settings.tracker
        try:
            # hold the port without listening: connections only go to the workers' sockets
            self.sock = reuseport_socket(t.host, t.port, nodelay=True)
        except OSError as exc:
            raise TrackerFailed(f"cannot listen on {t.host}:{t.port}: {exc.strerror}") from None
        self.port = self.sock.getsockname()[1]
        Spool(self.settings.paths.spool, self.settings.spool).create()
        self.links = LinkMap(self.settings.database.customer_url, snapshot_path(self.settings),
                             t.link_refresh)
        source = self.links.load()
        self.links.close_db()  # no database connection crosses the fork
        self.memory = metrics_mod.shared_memory(self.processes)
        self.metrics = metrics_mod.Metrics(self.memory, 1)
        signal.signal(signal.SIGCHLD, lambda *_: self.wake())
        # what the parent has built (imports, link map) is never garbage: keep the collector
        # from walking it in every worker (full collections took tens of ms, and touching
        # the objects un-shares the pages the fork shared)
        gc.freeze()
        for number in range(1, self.processes + 1):
            self._start(number)
        self._wait_listening()
        self.log.info("listening", host=t.host, port=self.port, workers=self.processes,
                      links=len(self.links), links_from=source)

    def _start(self, number: int) -> None:
        beat = self._ctx.Value("d", 0.0, lock=False)
        proc = self._ctx.Process(target=_worker_main, name=f"tracker.{number}",
                                 args=(self.settings, number, self.port, self.links,
                                       self.memory, beat, os.getpid()), daemon=False)
        proc.start()
        self.workers[number] = proc
        self.beats[number] = beat

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(b.value > 0 for b in self.beats.values()):
            for number, proc in self.workers.items():
                if not proc.is_alive():
                    raise TrackerFailed(f"tracker worker {number} exited with status "
                                        f"{proc.exitcode} while starting")
            if time.monotonic() > deadline:
                raise TrackerFailed("tracker workers did not start listening in time")
            time.sleep(0.01)

    def step(self) -> int:
        for number, proc in list(self.workers.items()):
            if proc.is_alive() or self._stopping:
                continue
            proc.join()
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
            if len(self.deaths) > MAX_RESTARTS:
                raise TrackerFailed(f"{len(self.deaths)} tracker workers died within "
                                    f"{RESTART_WINDOW:.0f} s; stopping")
            self.log.warning("worker died; restarting it", worker=number,
                             status=proc.exitcode)
            self._start(number)
            return 1
        return 0

    def alive(self) -> bool:
        stuck = stuck_workers(self.beats, 3 * self.settings.daemon.watchdog_interval)
        if stuck:
            self.log.warning("worker not responding; not pinging the watchdog", workers=stuck)
        return not stuck

    def _signal_workers(self, signum: int) -> None:
        signal_workers(self.workers.values(), signum)

    def reload(self) -> None:
        self._signal_workers(signal.SIGHUP)

    def teardown(self) -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._signal_workers(signal.SIGTERM)  # each finishes its answers, fsyncs, exits 0
        deadline = time.monotonic() + STOP_TIMEOUT
        for number, proc in self.workers.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                self.log.warning("worker did not stop in time; killing it", worker=number)
                proc.kill()  # every answered hit is already in the kernel: nothing is lost
                proc.join()
        if self.sock is not None:
            self.sock.close()
        self.log.info("tracker stopped")

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """--once: a server has no 'idle'; load the links (refreshing the snapshot) and exit."""
        links = LinkMap(self.settings.database.customer_url, snapshot_path(self.settings),
                        self.settings.tracker.link_refresh)
        source = links.load()
        links.stop()
        self.log.info("links loaded", links=len(links), links_from=source)
        return len(links)

    def url(self, path: str = "") -> str:
        """http://host:port/path of this tracker (tests, log lines)."""
        host = self.settings.tracker.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{path}"


def _worker_main(settings: Settings, number: int, port: int, links: LinkMap, memory: Any,
                 beat: Any, parent: int) -> None:
    _die_with_parent(parent)
    os.environ.pop("NOTIFY_SOCKET", None)  # the parent talks to systemd, not us
    log.configure(settings.log.level, settings.log.format)
    raise SystemExit(run_worker(settings, number, port, links, memory, beat))


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when the parent dies: a tracker killed as a whole leaves
    no worker holding the port or a stream's lock. Everything a worker answered is already in
    the kernel (one write per hit), so nothing answered is lost."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the workers notice the parent at the next beat
        pass
    if os.getppid() != parent:  # the parent died before we could ask
        os._exit(0)
