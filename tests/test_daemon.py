"""connectd.daemon: the one run loop, driven by real processes, real signals, a real
NOTIFY_SOCKET and a real pty; plus in-process checks of wake(), run_until_idle() and errors."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connectd import settings as settings_mod
from connectd.daemon import Daemon

# A tiny daemon: each step is one slow item (0.3 s) noted in a file before and after, so a
# test can signal it mid-item and see whether the item was finished.
HELPER = r'''
import sys
import time
from pathlib import Path

from connectd import log, settings as settings_mod
from connectd.daemon import Daemon

config, out_path, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


def note(text):
    with open(out_path, "a") as f:
        f.write(text + "\n")


class Slow(Daemon):
    name = "slow"
    periodic_interval = 3600.0
    n = 0

    def setup(self):
        note("setup")

    def step(self):
        self.n += 1
        if mode == "idle":
            note(f"idle {self.n}")
            return 0
        if mode == "fail" and self.n == 2:
            raise RuntimeError("step failed on purpose")
        note(f"item {self.n} start")
        time.sleep(0.3)
        note(f"item {self.n} done")
        return 1

    def reload(self):
        note("reload")

    def reopen(self):
        note("reopen")

    def teardown(self):
        note("teardown")


st = settings_mod.load(config)
log.configure(st.log.level, st.log.format)
if mode == "once":
    note(f"total {Slow(st).run_until_idle(max_steps=50)}")
    sys.exit(0)
sys.exit(Slow(st).run())
'''


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Helper:
    """One helper daemon process and the lines it has noted."""

    def __init__(self, tmp_path: Path, config: Path) -> None:
        self.script = tmp_path / "slow_daemon.py"
        self.script.write_text(HELPER, encoding="utf-8")
        self.out = tmp_path / "notes.txt"
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, mode: str = "busy", stderr: int | None = subprocess.PIPE,
              **env: str) -> subprocess.Popen[bytes]:
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith("CONNECTD_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                                  "WATCHDOG_PID")}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), str(self.config), str(self.out), mode],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=full_env)
        return self.proc

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []

    def wait_line(self, line: str, timeout: float = 5.0) -> None:
        assert wait_for(lambda: line in self.lines(), timeout), (line, self.lines())

    def finish(self, timeout: float = 5.0) -> tuple[int, str]:
        assert self.proc is not None
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, (err or b"").decode()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def helper(tmp_path: Path, config_path: Path) -> Iterator[Helper]:
    """The helper daemon, killed at the end if a test left it running."""
    h = Helper(tmp_path, config_path)
    try:
        yield h
    finally:
        h.kill()


# --- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_signal_finishes_the_current_item_and_exits_0(helper: Helper, signum: int) -> None:
    """TERM/INT mid-item: that item completes, no new one starts, teardown runs, status 0."""
    helper.start()
    helper.wait_line("item 2 start")
    helper.proc.send_signal(signum)
    status, err = helper.finish()
    assert status == 0, err
    lines = helper.lines()
    started = [line.split()[1] for line in lines if line.endswith(" start")]
    done = [line.split()[1] for line in lines if line.endswith(" done")]
    assert started == done, "an item was left half done"
    # item 2 was running when the signal was sent (item 3 only on a badly delayed delivery)
    assert started[-1] in ("2", "3")
    assert lines[-1] == "teardown"
    assert "Traceback" not in err


def test_term_stops_run_until_idle_after_the_current_item(helper: Helper) -> None:
    """--once (run_until_idle) also finishes the current item on TERM, then tears down."""
    helper.start("once")
    helper.wait_line("item 2 start")
    helper.proc.terminate()
    status, err = helper.finish()
    assert status == 0, err
    lines = helper.lines()
    started = [line.split()[1] for line in lines if line.endswith(" start")]
    assert started == [line.split()[1] for line in lines if line.endswith(" done")]
    assert started[-1] in ("2", "3")
    assert lines[-2:] == ["teardown", f"total {started[-1]}"]


def test_hup_reloads_and_the_loop_goes_on(helper: Helper) -> None:
    """HUP calls reload() once, between items, and the daemon keeps working."""
    helper.start()
    helper.wait_line("item 1 start")
    helper.proc.send_signal(signal.SIGHUP)
    helper.wait_line("reload")
    lines = helper.lines()
    after = int(lines[lines.index("reload") - 1].split()[1]) + 1
    helper.wait_line(f"item {after} done")
    assert helper.proc.poll() is None
    helper.proc.terminate()
    status, _ = helper.finish()
    lines = helper.lines()
    assert status == 0
    assert lines.count("reload") == 1
    # between items: the line before "reload" ends an item
    assert lines[lines.index("reload") - 1].endswith("done")


def test_usr1_reopens_and_the_loop_goes_on(helper: Helper) -> None:
    """USR1 calls reopen() and the daemon keeps working."""
    helper.start()
    helper.wait_line("item 1 start")
    helper.proc.send_signal(signal.SIGUSR1)
    helper.wait_line("reopen")
    lines = helper.lines()
    after = int(lines[lines.index("reopen") - 1].split()[1]) + 1
    helper.wait_line(f"item {after} done")
    helper.proc.terminate()
    status, _ = helper.finish()
    assert status == 0
    assert helper.lines().count("reopen") == 1
    assert "reload" not in helper.lines()


def test_term_wakes_an_idle_daemon_promptly(helper: Helper) -> None:
    """An idle daemon sleeping for idle_sleep still stops at once on TERM."""
    helper.start("idle", CONNECTD_DAEMON_IDLE_SLEEP="30")
    helper.wait_line("idle 1")
    started = time.monotonic()
    helper.proc.terminate()
    status, err = helper.finish()
    assert status == 0, err
    assert time.monotonic() - started < 2.0
    assert helper.lines()[-1] == "teardown"


def test_error_in_step_exits_nonzero_after_teardown(helper: Helper) -> None:
    """An exception in step() escapes run(): traceback, status != 0, teardown() still ran."""
    helper.start("fail")
    status, err = helper.finish()
    assert status != 0
    assert "step failed on purpose" in err
    assert helper.lines() == ["setup", "item 1 start", "item 1 done", "teardown"]


# --- sd_notify ----------------------------------------------------------------------------


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def _recv_skipping_watchdog(sock: socket.socket) -> str:
    while (state := _recv(sock)) == "WATCHDOG=1":
        pass
    return state


@pytest.mark.parametrize("env", [
    {"WATCHDOG_USEC": "400000"},
    {"CONNECTD_DAEMON_WATCHDOG_INTERVAL": "0.2"},
], ids=["WATCHDOG_USEC", "watchdog_interval"])
def test_sd_notify_ready_watchdog_stopping(helper: Helper, notify_socket, env) -> None:
    """READY=1 after setup, WATCHDOG=1 every ~0.2 s even while idle, STOPPING=1 on TERM."""
    sock, path = notify_socket
    # idle_sleep far longer than the watchdog interval: an idle loop must still ping on time
    helper.start("idle", NOTIFY_SOCKET=path, CONNECTD_DAEMON_IDLE_SLEEP="30", **env)
    first = _recv(sock)
    assert first.splitlines()[0] == "READY=1"
    assert "STATUS=slow running" in first
    assert helper.lines()[0] == "setup"
    started = time.monotonic()
    pings = [_recv(sock) for _ in range(4)]
    elapsed = time.monotonic() - started
    assert pings == ["WATCHDOG=1"] * 4
    assert 0.4 < elapsed < 2.0, elapsed
    helper.proc.terminate()
    states = []
    while not states or states[-1] != "STOPPING=1":
        states.append(_recv(sock))
    status, err = helper.finish()
    assert status == 0, err
    assert set(states[:-1]) <= {"WATCHDOG=1"}


def test_sd_notify_reloading_then_ready_on_hup(helper: Helper, notify_socket) -> None:
    """HUP under systemd: RELOADING=1, then READY=1 again once reload() is done."""
    sock, path = notify_socket
    helper.start("idle", NOTIFY_SOCKET=path, CONNECTD_DAEMON_IDLE_SLEEP="30")
    assert _recv(sock).startswith("READY=1")
    helper.proc.send_signal(signal.SIGHUP)
    assert _recv_skipping_watchdog(sock) == "RELOADING=1"
    assert _recv_skipping_watchdog(sock).startswith("READY=1")
    assert "reload" in helper.lines()
    helper.proc.terminate()
    assert helper.finish()[0] == 0


def test_no_notify_socket_no_trouble(helper: Helper) -> None:
    """Without NOTIFY_SOCKET the daemon runs and stops the same way."""
    helper.start()
    helper.wait_line("item 1 done")
    helper.proc.terminate()
    status, err = helper.finish()
    assert status == 0, err


# --- logging ------------------------------------------------------------------------------


def test_logs_are_json_off_a_terminal(helper: Helper) -> None:
    """With stderr a pipe, every diagnostic line is a JSON object with event and daemon."""
    helper.start()
    helper.wait_line("item 1 done")
    helper.proc.terminate()
    status, err = helper.finish()
    assert status == 0
    records = [json.loads(line) for line in err.splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "started" and "stopped" in events
    assert all(r["daemon"] == "slow" for r in records)
    assert {r["level"] for r in records} <= {"info", "warning", "error"}
    assert next(r for r in records if r["event"] == "stopping")["signal"] == "SIGTERM"


def _read_pty(master: int, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    return data.decode(errors="replace")


def test_logs_are_readable_on_a_terminal(helper: Helper) -> None:
    """With stderr a terminal, lines are the console rendering (key=value), not JSON."""
    master, slave = pty.openpty()
    try:
        proc = helper.start(stderr=slave)
        os.close(slave)
        helper.wait_line("item 1 done")
        proc.terminate()
        text = _read_pty(master, proc)
        proc.wait(timeout=5)
    finally:
        os.close(master)
    assert proc.returncode == 0
    lines = [line for line in text.replace("\r", "").splitlines() if line.strip()]
    started = [line for line in lines if " started" in line]
    assert started, text
    assert "daemon=slow" in started[0]
    assert "[info" in started[0]
    assert not any(line.lstrip().startswith("{") for line in lines)


def test_log_level_filters_and_json_renders(tmp_path: Path) -> None:
    """log.configure(level="warning", fmt="json"): info is dropped, warning is one JSON line."""
    import logging

    import structlog

    from connectd import log

    saved_config, saved_handlers = structlog.get_config(), logging.root.handlers[:]
    saved_level = logging.root.level
    out = (tmp_path / "log.txt").open("w+")
    try:
        log.configure("warning", "json", stream=out)
        logger = log.get(daemon="x", stream="tracker.events")
        logger.info("dropped")
        logger.warning("kept", n=3)
        out.seek(0)
        lines = out.read().splitlines()
    finally:
        # leave logging as the rest of the session had it, not pointing at a closed file
        structlog.configure(**saved_config)
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
        out.close()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "kept" and record["level"] == "warning"
    assert record["daemon"] == "x" and record["stream"] == "tracker.events" and record["n"] == 3
    assert "timestamp" in record


# --- in process: wake(), periodic(), run_until_idle(), errors --------------------------------


class Recorder(Daemon):
    """Records calls; step() returns the next number of `plan` (then 0 forever)."""

    name = "recorder"

    def __init__(self, settings: settings_mod.Settings, plan: list[int] | None = None,
                 fail_on: int | None = None) -> None:
        super().__init__(settings)
        self.plan = list(plan or [])
        self.fail_on = fail_on
        self.calls: list[str] = []
        self.step_times: list[float] = []

    def setup(self) -> None:
        self.calls.append("setup")

    def step(self) -> int:
        self.step_times.append(time.monotonic())
        self.calls.append("step")
        if self.fail_on is not None and len(self.step_times) == self.fail_on:
            raise ValueError("boom")
        return self.plan.pop(0) if self.plan else 0

    def periodic(self) -> None:
        self.calls.append("periodic")

    def teardown(self) -> None:
        self.calls.append("teardown")


@pytest.fixture
def slow_idle(config_path: Path) -> settings_mod.Settings:
    """Settings whose idle sleep (30 s) is far longer than any test waits."""
    return settings_mod.load(config_path, environ={"CONNECTD_DAEMON_IDLE_SLEEP": "30"})


def _run_in_thread(daemon: Daemon) -> threading.Thread:
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    return thread


def test_wake_ends_an_idle_sleep_promptly(slow_idle) -> None:
    """An idle daemon sleeps, but wake() from another thread makes it step again at once."""
    daemon = Recorder(slow_idle)
    thread = _run_in_thread(daemon)
    try:
        assert wait_for(lambda: len(daemon.step_times) == 1)
        time.sleep(0.2)
        assert len(daemon.step_times) == 1, "an idle daemon did not sleep"
        woken = time.monotonic()
        daemon.wake()
        assert wait_for(lambda: len(daemon.step_times) == 2, timeout=1.0)
        assert daemon.step_times[1] - woken < 0.5
    finally:
        daemon.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert daemon.calls[-1] == "teardown"


def test_busy_daemon_does_not_sleep(slow_idle) -> None:
    """While step() reports work the loop steps again without sleeping."""
    daemon = Recorder(slow_idle, plan=[1] * 50)
    thread = _run_in_thread(daemon)
    try:
        assert wait_for(lambda: len(daemon.step_times) >= 51, timeout=2.0)
    finally:
        daemon.stop()
        thread.join(timeout=5)
    assert daemon.step_times[50] - daemon.step_times[0] < 1.0


def test_idle_daemon_still_runs_periodic_on_time(slow_idle) -> None:
    """periodic() comes every periodic_interval even when the idle sleep is longer."""
    daemon = Recorder(slow_idle)
    daemon.periodic_interval = 0.1
    thread = _run_in_thread(daemon)
    try:
        assert wait_for(lambda: daemon.calls.count("periodic") >= 3, timeout=2.0)
    finally:
        daemon.stop()
        thread.join(timeout=5)


def test_stop_from_another_thread_ends_run(slow_idle) -> None:
    """stop() ends run() with status 0 and teardown() called once."""
    daemon = Recorder(slow_idle)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run()), daemon=True)
    thread.start()
    assert wait_for(lambda: daemon.step_times)
    daemon.stop()
    thread.join(timeout=5)
    assert result == [0]
    assert daemon.calls.count("teardown") == 1 and daemon.calls[0] == "setup"


def test_run_until_idle_steps_until_nothing_is_left(settings) -> None:
    """run_until_idle(): setup, step until a step does nothing, periodic, teardown."""
    before = signal.getsignal(signal.SIGTERM)
    daemon = Recorder(settings, plan=[3, 2, 0, 5])
    assert daemon.run_until_idle() == 5
    assert daemon.calls == ["setup", "step", "step", "step", "periodic", "teardown"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_run_until_idle_max_steps(settings) -> None:
    """max_steps bounds run_until_idle() even while there is work."""
    daemon = Recorder(settings, plan=[1] * 10)
    assert daemon.run_until_idle(max_steps=4) == 4
    assert daemon.calls.count("step") == 4 and daemon.calls[-1] == "teardown"


def test_run_until_idle_tears_down_after_an_error(settings) -> None:
    """An exception in step() escapes run_until_idle(), after teardown()."""
    daemon = Recorder(settings, plan=[1, 1], fail_on=2)
    with pytest.raises(ValueError, match="boom"):
        daemon.run_until_idle()
    assert daemon.calls == ["setup", "step", "step", "teardown"]


def test_run_error_escapes_and_restores_signal_handlers(settings) -> None:
    """An exception in step() escapes run(); teardown() ran; signal handlers are restored."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    daemon = Recorder(settings, plan=[1], fail_on=2)
    with pytest.raises(ValueError, match="boom"):
        daemon.run()
    assert daemon.calls == ["setup", "step", "step", "teardown"]
    assert {s: signal.getsignal(s) for s in before} == before


def test_signal_storm_never_wedges_the_loop(helper: Helper) -> None:
    """Hundreds of HUPs and USR1s landing at any instant of the idle wait (signal handlers
    run in the main thread, wherever it is) never wedge the loop: TERM still stops it, 0.
    (A smoke test: the deadlock the pipe-based waker removed needs a signal inside a window
    of a few bytecodes, which this rarely hits.)"""
    helper.start("idle", stderr=subprocess.DEVNULL, CONNECTD_DAEMON_IDLE_SLEEP="0.001")
    helper.wait_line("setup")
    for i in range(400):
        helper.proc.send_signal(signal.SIGHUP if i % 2 else signal.SIGUSR1)
        time.sleep(0.0005)
    helper.proc.terminate()
    status, err = helper.finish()
    assert status == 0, err
