"""`connectd up`'s Supervisor with real child processes: start, restart with back-off, stop.

The supervisor runs in its own process (signal handling needs a main thread, and the tests
signal it like a terminal or systemd would); its JSON log lines on stderr tell the tests which
pids it started. The children are a small Python script that records what happens to it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connectd.supervisor import (
    backoff_delay,
    daemon_command,
    describe_status,
    expand_instances,
    select_daemons,
)

# A child that records its start, the signals it gets and whether it saw NOTIFY_SOCKET in
# <record>/<name>.events, then behaves as the MODE argument says.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    name, record, mode = sys.argv[1], sys.argv[2], sys.argv[3]

    def note(text):
        with open(os.path.join(record, name + ".events"), "a") as f:
            f.write(text + "\\n")

    def on_signal(signum, frame):
        note("signal " + signal.Signals(signum).name)
        if signum in (signal.SIGTERM, signal.SIGINT) and mode != "ignore-term":
            sys.exit(0)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(s, on_signal)
    note("start %d %f notify=%s" % (os.getpid(), time.time(), os.environ.get("NOTIFY_SOCKET", "")))
    print("hello from " + name, flush=True)
    if mode == "fail":
        sys.exit(1)
    if mode == "bad-config":
        sys.exit(78)
    if mode.startswith("fail-after-"):
        time.sleep(float(mode[len("fail-after-"):]))
        sys.exit(1)
    while True:
        if mode == "chatty":
            print("tick", flush=True)
        time.sleep(0.05)
""")

RUNNER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from connectd import log
    from connectd.supervisor import Supervisor
    spec = json.loads(sys.argv[1])
    log.configure("debug", "json")
    sys.exit(Supervisor(spec["commands"], Path(spec["logs"]), **spec["options"]).run())
""")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alive(pid: int) -> bool:
    """True while `pid` is a live process (a zombie nobody reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Run:
    """One supervisor process over children in MODEs, and what it and they reported."""

    def __init__(self, tmp_path: Path, modes: dict[str, str], env: dict[str, str] | None = None,
                 **options: Any) -> None:
        self.tmp = tmp_path
        self.record = tmp_path / "record"
        self.record.mkdir(exist_ok=True)
        self.logs = tmp_path / "logs"
        child = tmp_path / "child.py"
        child.write_text(CHILD)
        commands = {name: [sys.executable, str(child), name, str(self.record), mode]
                    for name, mode in modes.items()}
        options = {"backoff_base": 0.2, "backoff_max": 0.8, "stop_timeout": 2.0, **options}
        spec = json.dumps({"commands": commands, "logs": str(self.logs), "options": options})
        self.stderr_path = tmp_path / "supervisor.err"
        self.stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        # A session of its own, like a shell job: the tests can signal "the terminal's
        # foreground group" without hitting pytest.
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, spec], stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def lines(self) -> list[dict[str, Any]]:
        """The supervisor's log lines so far, parsed."""
        out = []
        for line in self.stderr_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": line})
        return out

    def events(self, event: str, daemon: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.lines()
                if e.get("event") == event and (daemon is None or e.get("daemon") == daemon)]

    def pids(self, daemon: str) -> list[int]:
        """Every pid the supervisor started for `daemon`, in order."""
        return [e["pid"] for e in self.events("daemon started", daemon)]

    def child_events(self, daemon: str) -> list[str]:
        path = self.record / f"{daemon}.events"
        return path.read_text().splitlines() if path.exists() else []

    def wait_started(self, daemon: str, count: int = 1) -> list[int]:
        """Wait until `daemon` has been started `count` times and has run its first line."""
        wait_for(lambda: len(self.pids(daemon)) >= count, what=f"{daemon} started x{count}")
        wait_for(lambda: sum(e.startswith("start ") for e in self.child_events(daemon)) >= count,
                 what=f"{daemon} running x{count}")
        return self.pids(daemon)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self.stderr.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start supervisors; kill any still running (and their children) at the end."""
    runs: list[Run] = []

    def start(modes: dict[str, str], **options: Any) -> Run:
        r = Run(tmp_path, modes, **options)
        runs.append(r)
        return r

    yield start
    for r in runs:
        pids = [e["pid"] for e in r.events("daemon started")]
        r.close()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_starts_every_child_and_logs_its_output(run) -> None:
    """Every command starts once, in order, with its output appended to logs/NAME.log."""
    r = run({"a": "sleep", "b": "sleep"})
    pid_a, = r.wait_started("a")
    pid_b, = r.wait_started("b")
    assert alive(pid_a) and alive(pid_b)
    assert [e["daemon"] for e in r.events("daemon started")] == ["a", "b"]
    wait_for(lambda: (r.logs / "a.log").exists() and "hello from a" in (r.logs / "a.log").read_text(),
             what="a.log")
    assert r.stop() == 0


def test_sigterm_stops_every_child_and_exits_zero(run) -> None:
    """SIGTERM to the supervisor: each child gets exactly one TERM, none is left, status 0."""
    r = run({"a": "sleep", "b": "sleep", "c": "sleep"})
    pids = [r.wait_started(name)[0] for name in "abc"]
    assert r.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in pids)
    for name in "abc":
        assert [e for e in r.child_events(name) if e.startswith("signal")] == ["signal SIGTERM"]
    assert sorted(e["daemon"] for e in r.events("daemon stopped")) == ["a", "b", "c"]


def test_ctrl_c_reaches_children_only_as_one_term(run) -> None:
    """A terminal's SIGINT to the foreground group: children see one TERM, never the INT."""
    r = run({"a": "sleep", "b": "sleep"})
    pids = [r.wait_started(name)[0] for name in "ab"]
    os.killpg(r.proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    assert r.proc.wait(15) == 0
    r.stderr.close()
    assert not any(alive(pid) for pid in pids)
    for name in "ab":
        assert [e for e in r.child_events(name) if e.startswith("signal")] == ["signal SIGTERM"]
    assert r.events("stopping")[0]["signal"] == "SIGINT"


def test_killed_child_is_restarted_with_a_new_pid(run) -> None:
    """A child killed with SIGKILL comes back after the back-off, as a new process."""
    r = run({"a": "sleep", "b": "sleep"})
    first, = r.wait_started("a")
    pid_b, = r.wait_started("b")
    os.kill(first, signal.SIGKILL)
    pids = r.wait_started("a", count=2)
    assert pids[0] == first and pids[1] != first and alive(pids[1])
    exited = r.events("daemon exited", "a")
    assert exited[0]["status"] == "killed by SIGKILL"
    assert r.events("restarting daemon", "a")[0]["delay"] == 0.2
    assert r.pids("b") == [pid_b]  # the others are left alone
    assert r.stop() == 0


def test_child_dying_at_once_gets_growing_delays(run) -> None:
    """1x, 2x, 4x the base delay, then the cap: restarts of a crashing child slow down."""
    r = run({"crash": "fail"})
    r.wait_started("crash", count=5)
    assert r.stop() == 0
    delays = [e["delay"] for e in r.events("restarting daemon", "crash")]
    assert delays[:4] == [0.2, 0.4, 0.8, 0.8]
    starts = [float(e.split()[2]) for e in r.child_events("crash") if e.startswith("start ")]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # Loosely: each gap is at least its delay, and the later gaps are clearly longer.
    for gap, delay in zip(gaps, delays, strict=False):
        assert gap >= delay - 0.01
    assert gaps[2] > gaps[0] + 0.3


def test_backoff_starts_over_after_a_stable_run(run) -> None:
    """A child that stayed up longer than stable_after is restarted after the base delay again."""
    r = run({"slow": "fail-after-0.5"}, stable_after=0.3)
    r.wait_started("slow", count=3)
    assert r.stop() == 0
    delays = [e["delay"] for e in r.events("restarting daemon", "slow")]
    assert delays[:2] == [0.2, 0.2]


def test_bad_config_stops_everything_with_78(run) -> None:
    """A child exiting 78 is not restarted; the others are stopped and the supervisor exits 78."""
    r = run({"good": "sleep", "bad": "bad-config"})
    # Only the supervisor's word: "good" may be stopped before its first line runs.
    pid_good, = wait_for(lambda: r.pids("good"), what="good started")
    assert r.proc.wait(15) == 78
    r.stderr.close()
    assert not alive(pid_good)
    assert r.events("restarting daemon", "bad") == []
    assert len(r.pids("bad")) == 1
    assert [e["daemon"] for e in r.events("bad configuration: not restarting, stopping everything")] == ["bad"]


def test_child_ignoring_term_is_killed_after_the_timeout(run) -> None:
    """A child that ignores TERM is SIGKILLed once stop_timeout has passed."""
    r = run({"stubborn": "ignore-term", "polite": "sleep"}, stop_timeout=0.5)
    stubborn, = r.wait_started("stubborn")
    polite, = r.wait_started("polite")
    began = time.monotonic()
    assert r.stop() == 0
    took = time.monotonic() - began
    assert not alive(stubborn) and not alive(polite)
    assert 0.5 <= took < 5
    assert "signal SIGTERM" in r.child_events("stubborn")
    stopped = {e["daemon"]: e["status"] for e in r.events("daemon stopped")}
    assert stopped == {"stubborn": "killed by SIGKILL", "polite": "0"}


def test_second_term_while_stopping_kills_at_once(run) -> None:
    """Asked twice, the supervisor does not wait out stop_timeout."""
    r = run({"stubborn": "ignore-term"}, stop_timeout=30)
    stubborn, = r.wait_started("stubborn")
    began = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "signal SIGTERM" in r.child_events("stubborn"), what="TERM delivered")
    assert r.stop(signal.SIGTERM) == 0
    assert time.monotonic() - began < 10
    assert not alive(stubborn)


def test_supervisor_killed_leaves_no_orphans(run) -> None:
    """SIGKILL to the supervisor: the kernel TERMs its children (PR_SET_PDEATHSIG)."""
    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    r = run({"a": "sleep", "b": "sleep"})
    pids = [r.wait_started(name)[0] for name in "ab"]
    r.proc.kill()
    r.proc.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in pids), what="orphans to die")
    assert all("signal SIGTERM" in r.child_events(name) for name in "ab")


def test_hup_and_usr1_are_forwarded(run) -> None:
    """SIGHUP (reload) and SIGUSR1 (reopen files) reach every child."""
    r = run({"a": "sleep", "b": "sleep"})
    for name in "ab":
        r.wait_started(name)
    r.proc.send_signal(signal.SIGHUP)
    r.proc.send_signal(signal.SIGUSR1)
    for name in "ab":
        wait_for(lambda n=name: {"signal SIGHUP", "signal SIGUSR1"} <= set(r.child_events(n)),
                 what=f"{name} got HUP and USR1")
    assert r.stop() == 0


def test_notifies_ready_and_hides_notify_socket_from_children(run) -> None:
    """The supervisor sends READY=1 and STOPPING=1; its children never see NOTIFY_SOCKET."""
    path = f"/tmp/connectd-sup-{os.getpid()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        try:
            r = run({"a": "sleep"}, env={"NOTIFY_SOCKET": path})
            r.wait_started("a")
            assert sock.recv(4096).startswith(b"READY=1\n")
            assert r.stop() == 0
            assert sock.recv(4096).startswith(b"STOPPING=1\n")
        finally:
            os.unlink(path)
    assert r.child_events("a")[0].endswith("notify=")


def test_example_logrotate_rotates_a_live_log(run, tmp_path: Path) -> None:
    """etc/logrotate/connectd (copytruncate) on a running daemon's log: old lines move to .1,
    new ones keep coming at the start of the truncated file (append mode: no hole)."""
    logrotate = shutil.which("logrotate") or ("/usr/sbin/logrotate" if Path("/usr/sbin/logrotate").exists() else None)
    if logrotate is None:
        pytest.skip("logrotate is not installed")
    r = run({"a": "chatty"})
    r.wait_started("a")
    log = r.logs / "a.log"
    wait_for(lambda: log.stat().st_size > 100, what="a.log to fill")
    example = (Path(__file__).resolve().parent.parent / "etc" / "logrotate" / "connectd").read_text()
    assert "/srv/connectd/logs/*.log" in example
    # The example's path and user are the production ones; point them at this test.
    conf = tmp_path / "logrotate.conf"
    conf.write_text("\n".join(line for line in example.replace("/srv/connectd/logs", str(r.logs))
                              .splitlines() if not line.strip().startswith("su ")) + "\n")
    subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(conf)],
                   check=True, capture_output=True, timeout=30)
    rotated = (r.logs / "a.log.1").read_bytes()
    assert rotated.startswith(b"hello from a\n")
    wait_for(lambda: log.read_bytes().count(b"tick\n") >= 3, what="new lines after rotation")
    assert not log.read_bytes().startswith(b"\0")
    assert r.stop() == 0


@pytest.mark.parametrize(("failures", "expected"), [(0, 1.0), (1, 2.0), (2, 4.0), (4, 16.0),
                                                    (5, 30.0), (500, 30.0)])
def test_backoff_delay(failures, expected) -> None:
    """1 s, 2 s, 4 s ... capped at the maximum."""
    assert backoff_delay(failures, 1.0, 30.0) == expected


@pytest.mark.parametrize(("code", "text"), [(0, "0"), (1, "1"), (78, "78 (bad configuration)"),
                                            (-9, "killed by SIGKILL")])
def test_describe_status(code, text) -> None:
    """Exit statuses read the way an operator thinks of them."""
    assert describe_status(code) == text


def test_select_daemons() -> None:
    """All in start order (sink only when enabled), or a validated --only subset."""
    available = ["profiler", "web", "sink"]
    assert select_daemons(available, None, True) == ["profiler", "web", "sink"]
    assert select_daemons(available, None, False) == ["profiler", "web"]
    assert select_daemons(available, "sink,profiler", False) == ["profiler", "sink"]
    with pytest.raises(Exception, match="no daemon nope"):
        select_daemons(available, "profiler,nope", True)


def test_composer_instances() -> None:
    """composer.processes = 3 starts composer-1..3, each `run composer --instance N`."""
    names = expand_instances(["sink", "profiler", "manager", "composer"], 3)
    assert names == ["sink", "profiler", "manager", "composer-1", "composer-2", "composer-3"]
    argv = daemon_command("composer-2", Path("/etc/c.toml"))
    assert argv[-4:] == ["run", "composer", "--instance", "2"]
    assert daemon_command("profiler", Path("/etc/c.toml"))[-2:] == ["run", "profiler"]


# -- the real command ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connectd_up_end_to_end(tmp_path: Path) -> None:
    """`connectd up` starts every daemon of this build, prints where things are, stops on TERM."""
    from conftest import write_config

    from connectd import daemons

    available = expand_instances(list(getattr(daemons, "DAEMONS", {})), 1)  # composer-1
    if not available:
        pytest.skip("connectd.daemons.DAEMONS does not exist yet in this build")
    extra = (f"[web]\nport = {(web := free_port())}\npublic_url = \"http://127.0.0.1:{web}\"\n"
             f"[tracker]\nport = {free_port()}\n[receiver]\nport = {free_port()}\n"
             f"[sink]\nport = {(sink := free_port())}\n[relay]\nhosts = [\"127.0.0.1:{sink}\"]\n")
    cfg = write_config(tmp_path, extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTD_")}
    connectd = [sys.executable, "-m", "connectd", "--config", str(cfg)]
    init = subprocess.run([*connectd, "init"], env=env, capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        pytest.skip(f"`connectd init` is not usable yet: {init.stderr.strip()[-200:]}")
    out_path, err_path = tmp_path / "up.out", tmp_path / "up.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([*connectd, "up"], stdout=out, stderr=err, env=env,
                                start_new_session=True)
        try:
            def started() -> dict[str, int]:
                found = {}
                for line in err_path.read_text().splitlines():
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if entry.get("event") == "daemon started":
                        found[entry["daemon"]] = entry["pid"]
                return found if set(available) <= set(found) else {}

            pids = wait_for(started, timeout=30, what=f"{available} started")
            time.sleep(1)  # long enough for a daemon that crashes at start to show it
            assert proc.poll() is None, err_path.read_text()
            assert "daemon exited" not in err_path.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, err_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not any(alive(pid) for pid in pids.values())
    printed = out_path.read_text()
    assert f"logs: {tmp_path / 'logs'}" in printed
    if "web" in available:
        assert f"web UI: http://127.0.0.1:{web}" in printed
    if "sink" in available:
        assert f"mail sink: 127.0.0.1:{sink}" in printed
    for name in available:
        assert (tmp_path / "logs" / f"{name}.log").exists()
    started_lines = [line for line in err_path.read_text().splitlines() if '"daemon started"' in line]
    assert len(started_lines) == len(available)  # nothing was restarted
