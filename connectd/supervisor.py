"""`connectd up`: every daemon of this build as a supervised child, in the foreground.

Inputs: the settings (the file children get with --config, logs/, the restart back-off cap,
where the web UI and the sink listen) and connectd.daemons.DAEMONS (the daemons that exist,
in start order). Outputs: one child per daemon, `python -m connectd --config FILE run NAME`,
with its stdout and stderr appended to logs/NAME.log; the supervisor's own lines on the
terminal (started, exited, restarting, stopped); sd_notify READY/STOPPING so `connectd up` can
itself be a systemd unit; exit status 0 after a clean stop, 78 (EX_CONFIG) when a daemon
reported a bad configuration.

The shape is Gunicorn's arbiter: signal handlers do nothing but wake the loop (the signal
numbers arrive through signal.set_wakeup_fd's self-pipe), and the loop reaps, restarts with
back-off, and stops. No pidfiles, no daemonising: production uses the systemd units in
etc/systemd/, this is for a laptop and for tests.

Decisions:
- Each child runs in its own process group, so a terminal's Ctrl-C (SIGINT to the foreground
  group) reaches only the supervisor, which then sends exactly one SIGTERM to each child in
  reverse start order; a child never sees both the terminal's INT and our TERM.
- Children get PR_SET_PDEATHSIG=SIGTERM (Linux), so a supervisor killed with SIGKILL leaves no
  orphans behind.
- A child that exits 78 is not restarted (its configuration will not fix itself): the
  supervisor stops every other daemon and exits 78, so the message is not lost in a restart loop
  and a systemd unit around `connectd up` does not loop either.
- Any other exit (even 0: daemons run until told to stop) is restarted after 1 s, 2 s, 4 s ...
  capped at daemon.restart_backoff_max; a child that stayed up `stable_after` seconds starts
  again from the shortest delay.
- SIGHUP (reload) and SIGUSR1 (reopen files) are forwarded to every child.
- A second Ctrl-C or TERM while stopping kills the stragglers at once.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from connectd import log as log_mod
from connectd import sdnotify

EX_CONFIG = 78
BACKOFF_BASE = 1.0     # first restart delay; doubles per consecutive quick death
STABLE_AFTER = 30.0    # a child up this long is healthy again: its back-off starts over
STOP_TIMEOUT = 10.0    # how long stopping children may finish their current item before SIGKILL
TICK = 5.0             # longest sleep of the loop; signals and deadlines wake it earlier

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORWARD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
HANDLED_SIGNALS = (*STOP_SIGNALS, *FORWARD_SIGNALS, signal.SIGCHLD)

# systemd's per-service variables belong to the supervisor: a child that inherited them would
# send its READY=1 to our manager (rejected with NotifyAccess=main, or worse, believed).
CHILD_ENV_DROP = (*sdnotify.ENVIRONMENT, "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


@dataclass
class Child:
    """One supervised daemon: its command and where it is in its life."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0           # time.monotonic() of the last start
    failures: int = 0                 # consecutive quick deaths, for the back-off
    restart_at: float | None = None   # monotonic time of the pending restart, if any


class Supervisor:
    """Start `commands` ({name: argv}) in order, restart them with back-off, stop them all on
    SIGTERM/SIGINT. `run()` returns the exit status and must be called in the main thread."""

    def __init__(self, commands: Mapping[str, Sequence[str]], logs: Path, *,
                 backoff_base: float = BACKOFF_BASE, backoff_max: float = 30.0,
                 stable_after: float = STABLE_AFTER, stop_timeout: float = STOP_TIMEOUT,
                 env: Mapping[str, str] | None = None, logger: Any = None) -> None:
        self.children = [Child(name, list(argv)) for name, argv in commands.items()]
        self.logs = Path(logs)
        self.backoff_base = backoff_base
        self.backoff_max = max(backoff_max, backoff_base)
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.env = child_environment(os.environ if env is None else env)
        self.log = logger or log_mod.get(component="supervisor")
        self.exit_status = 0
        self._stopping = False
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup_fd = -1

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until told to stop (or a daemon reports a bad config); return exit status."""
        self._install_signals()  # first: a signal during the starts must not kill us half-way
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            for child in self.children:
                self._start(child)
            sdnotify.ready(f"supervising {len(self.children)} daemons")
            self._loop()
        finally:
            # Also on an unexpected exception: never leave children running behind us.
            self._stop_all()
            self._restore_signals()
        return self.exit_status

    def _loop(self) -> None:
        watchdog_every = sdnotify.watchdog_interval()
        next_ping = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            if watchdog_every is not None and now >= next_ping:
                sdnotify.watchdog()
                next_ping = now + watchdog_every
            deadlines = [c.restart_at for c in self.children if c.restart_at is not None]
            if watchdog_every is not None:
                deadlines.append(next_ping)
            timeout = min([TICK, *(d - now for d in deadlines)])
            for signum in self._wait_for_signals(max(timeout, 0.0)):
                self._on_signal(signum)
            if self._stopping:
                return
            self._reap()
            self._restart_due()

    def _on_signal(self, signum: int) -> None:
        if signum in STOP_SIGNALS:
            self._say("info", "stopping", signal=signal.Signals(signum).name)
            self._stopping = True
        elif signum in FORWARD_SIGNALS:
            for child in self._running():
                self._send(child, signum)
        # SIGCHLD only wakes the loop; _reap() finds out who died.

    # -- starting and restarting ------------------------------------------------------------

    def _start(self, child: Child) -> None:
        child.restart_at = None
        path = self.logs / f"{child.name}.log"
        # Append mode (O_APPEND): the file survives our restarts and logrotate's copytruncate,
        # since every write lands at the current end even after the file was truncated.
        with open(path, "ab") as out:
            child.process = subprocess.Popen(
                child.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, close_fds=True, process_group=0,
                preexec_fn=_die_with_parent(os.getpid()))
        child.started_at = time.monotonic()
        self._say("info", "daemon started", daemon=child.name, pid=child.process.pid,
                  log=str(path))

    def _reap(self) -> None:
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            status = child.process.returncode
            uptime = time.monotonic() - child.started_at
            child.process = None
            self._say("warning", "daemon exited", daemon=child.name, status=describe_status(status),
                      uptime=round(uptime, 1))
            if status == EX_CONFIG:
                self._say("error", "bad configuration: not restarting, stopping everything",
                          daemon=child.name, log=str(self.logs / f"{child.name}.log"))
                self.exit_status = EX_CONFIG
                self._stopping = True
                return
            self._schedule_restart(child, uptime)

    def _schedule_restart(self, child: Child, uptime: float) -> None:
        if uptime >= self.stable_after:
            child.failures = 0
        delay = backoff_delay(child.failures, self.backoff_base, self.backoff_max)
        child.failures += 1
        child.restart_at = time.monotonic() + delay
        self._say("info", "restarting daemon", daemon=child.name, delay=delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None and child.restart_at <= now:
                self._start(child)

    # -- stopping ---------------------------------------------------------------------------

    def _stop_all(self) -> None:
        self._stopping = True
        sdnotify.stopping("stopping daemons")
        for child in self.children:
            child.restart_at = None
        # Children that died on their own just now are reported here, not signalled.
        running = self._collect([c for c in self.children if c.process is not None])
        # Reverse start order: consumers started after their producers stop before them.
        for child in reversed(running):
            self._send(child, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while running and time.monotonic() < deadline:
            signals = self._wait_for_signals(min(deadline - time.monotonic(), 0.2))
            running = self._collect(running)
            if any(s in STOP_SIGNALS for s in signals):
                self._say("warning", "asked again: killing the remaining daemons")
                break
        for child in running:
            if child.process is not None and child.process.poll() is None:
                self._say("warning", "daemon did not stop in time: killing", daemon=child.name,
                          pid=child.process.pid)
                _killpg(child.process.pid)
        for child in running:
            if child.process is not None:
                child.process.wait()
        self._collect(running)

    def _collect(self, children: list[Child]) -> list[Child]:
        """Report the children that have exited; return those still running."""
        still = []
        for child in children:
            if child.process is None:
                continue
            if child.process.poll() is None:
                still.append(child)
                continue
            self._say("info", "daemon stopped", daemon=child.name,
                      status=describe_status(child.process.returncode))
            child.process = None
        return still

    def _running(self) -> list[Child]:
        return [c for c in self.children if c.process is not None and c.process.poll() is None]

    def _send(self, child: Child, signum: int) -> None:
        assert child.process is not None
        try:
            # The daemon itself, not its group: it coordinates its own helpers' shutdown.
            os.kill(child.process.pid, signum)
        except ProcessLookupError:
            pass  # died in the meantime; the next poll reports it

    # -- signals ----------------------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The C-level handler writes each signal number to the pipe; the Python handlers do
        # nothing, so no work ever runs inside a handler and no signal is missed between a
        # check and a sleep.
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, _ignore_in_handler)

    def _restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._old_wakeup_fd)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wait_for_signals(self, timeout: float) -> list[int]:
        """Sleep until a signal arrives or `timeout` passes; return the signals that arrived."""
        try:
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
            ready = [self._wake_r]
        if not ready:
            return []
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            return []
        return list(data)

    def _say(self, level: str, event: str, **fields: Any) -> None:
        """Log one supervisor line; a vanished terminal must not interrupt supervising."""
        try:
            getattr(self.log, level)(event, **fields)
        except (OSError, ValueError):
            pass


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Seconds before restart number `failures` + 1 of a quickly dying daemon: base * 2**n, capped."""
    return min(base * (2 ** min(failures, 32)), cap)


def describe_status(returncode: int) -> str:
    """'0', '1', '78 (bad configuration)', 'killed by SIGKILL' for a Popen return code."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode == EX_CONFIG:
        return f"{returncode} (bad configuration)"
    return str(returncode)


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for children: ours minus systemd's per-service variables; unbuffered
    output so a crash's last lines reach logs/NAME.log."""
    env = {k: v for k, v in environ.items() if k not in CHILD_ENV_DROP}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _ignore_in_handler(signum: int, frame: Any) -> None:
    """Python-level handler: the wakeup fd already carried the signal number to the loop."""


def _killpg(pid: int) -> None:
    try:
        # The whole group: a daemon that ignored TERM may have helpers that did too.
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_PR_SET_PDEATHSIG = 1
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:  # pragma: no cover - no libc symbols visible
    _libc = None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to TERM the child when the supervisor dies (Linux)."""
    if _libc is None:
        return None

    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            # The supervisor died between fork and prctl: the signal would never come.
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


# -- the command ------------------------------------------------------------------------------

def select_daemons(available: Sequence[str], only: str | None, sink_enabled: bool) -> list[str]:
    """The daemons to start, in start order: all of them (the sink only when enabled), or the
    comma-separated `only` list. Raises click.BadParameter naming unknown daemons."""
    if not only:
        return [name for name in available if name != "sink" or sink_enabled]
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise click.BadParameter(f"no daemon {', '.join(unknown)} in this build "
                                 f"(available: {', '.join(available)})", param_hint="--only")
    return [name for name in available if name in wanted]


def daemon_command(name: str, config: Path) -> list[str]:
    """The argv of one child: the same interpreter and settings file as the supervisor.
    "composer-N" runs `connectd run composer --instance N`."""
    argv = [sys.executable, "-m", "connectd", "--config", str(config), "run"]
    daemon, _, instance = name.partition("-")
    if daemon == "composer" and instance:
        return [*argv, daemon, "--instance", instance]
    return [*argv, name]


def expand_instances(names: Sequence[str], composers: int) -> list[str]:
    """`names` with "composer" replaced by composer-1 ... composer-N (composer.processes)."""
    out: list[str] = []
    for name in names:
        if name == "composer":
            out.extend(f"composer-{i}" for i in range(1, composers + 1))
        else:
            out.append(name)
    return out


def banner(settings: Any, names: Sequence[str]) -> list[str]:
    """Where to look, for the daemons being started: web UI, mail sink, tracker, logs."""
    lines = [f"connectd up: {', '.join(names)}"]
    if "web" in names:
        lines.append(f"web UI: {settings.web.public_url}")
    if "tracker" in names:
        lines.append(f"tracker: {settings.tracker.public_url}")
    if "receiver" in names:
        lines.append(f"mail receiver: {settings.receiver.host}:{settings.receiver.port} "
                     f"(reply domain {settings.receiver.domain})")
    if "sink" in names:
        lines.append(f"mail sink: {settings.sink.host}:{settings.sink.port} "
                     f"(maildir: {settings.paths.spool / 'sink'})")
    lines.append(f"logs: {settings.paths.logs} (one NAME.log per daemon)")
    lines.append("Ctrl-C stops everything")
    return lines


@click.command("up")
@click.option("--only", metavar="NAMES",
              help="Comma-separated daemons to start instead of all, e.g. profiler,sink.")
@click.option("--stop-timeout", type=click.FloatRange(min=0), default=STOP_TIMEOUT,
              show_default=True, help="Seconds stopping daemons get before they are killed.")
def up_command(only: str | None, stop_timeout: float) -> None:
    """Every daemon (web, sink, ... as this build has them) in the foreground.

    Restarts a daemon that dies (1 s, 2 s, 4 s ... up to daemon.restart_backoff_max), writes
    each daemon's output to logs/NAME.log, stops them all on Ctrl-C or SIGTERM. Exits 78 when
    a daemon reports a bad configuration.
    """
    from connectd import daemons

    settings = click.get_current_context().obj.settings
    available = list(getattr(daemons, "DAEMONS", {}))
    if not available:
        raise click.ClickException("this build has no daemons to start")
    names = select_daemons(available, only, settings.sink.enabled)
    if not names:
        raise click.ClickException("nothing to start (the sink is disabled and nothing else exists)")
    config = settings.source
    if config is None:  # pragma: no cover - settings loaded by the CLI always have a source
        raise click.ClickException("settings have no source file to hand to the daemons")
    names = expand_instances(names, settings.composer.processes)
    for line in banner(settings, names):
        click.echo(line)
    supervisor = Supervisor({name: daemon_command(name, config) for name in names},
                            settings.paths.logs, backoff_max=settings.daemon.restart_backoff_max,
                            stop_timeout=stop_timeout)
    sys.exit(supervisor.run())
