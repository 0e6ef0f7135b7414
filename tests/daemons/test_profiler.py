"""The profiler daemon as a real process (`python -m connectd run profiler`): exactly once
under SIGKILL, clean stop on SIGTERM, watchdog wake-ups, new streams, --once, bad config.
Database tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_config
from helpers.profiler_data import (
    STREAM,
    Applied,
    add_customers,
    add_links,
    applied,
    expected_per_customer,
    random_clicks,
    shunted,
    write_clicks,
)

from connectd import settings as settings_mod
from connectd.settings import EX_CONFIG

PYTHON = sys.executable
CUSTOMERS = 3000


class Daemon:
    """A `connectd run profiler` child process whose stderr (JSON log lines) is collected."""

    def __init__(self, cfg: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "connectd", "--config", str(cfg), "run", "profiler", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if '"started"' in line:
                self.started.set()

    def wait_started(self, timeout: float = 30.0) -> None:
        assert self.started.wait(timeout), f"profiler did not start:\n{self.output()}"

    def output(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.finish()


def make_tree(root: Path, customer_url: str, report_url: str, extra: str = "") -> tuple[
        Path, settings_mod.Settings]:
    """Settings file + customers 1..3000 + labelled links 1..20."""
    add_customers(customer_url, range(1, CUSTOMERS + 1))
    add_links(customer_url, {i: [["shoes", "sale", "news", "garden"][i % 4]] for i in range(1, 21)})
    cfg = write_config(root, customer_url=customer_url, report_url=report_url,
                       extra='[log]\nlevel = "info"\n' + extra)
    return cfg, settings_mod.load(cfg, environ={})


@pytest.fixture
def tree(tmp_path: Path, migrated_customer_url: str,
         migrated_report_url: str) -> Callable[[str], tuple[Path, settings_mod.Settings]]:
    """tree(extra_toml) -> (config path, settings) on fresh migrated DBs (db_backend)."""
    return lambda extra="": make_tree(tmp_path, migrated_customer_url, migrated_report_url, extra)


def records_done(st: settings_mod.Settings, stream: str = STREAM) -> tuple[int, int]:
    """(customer DB, report DB) records counts of the profiler's positions in `stream`."""
    pos = applied(st).positions
    return (pos.get(("customer", stream, "profiler.customer"), (0,))[0],
            pos.get(("report", stream, "profiler.report"), (0,))[0])


def wait_for(cond: Callable[[], bool], timeout: float, every: float = 0.02) -> float:
    """Seconds until cond() held; fails after timeout."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(every)
    return time.monotonic() - t0


def assert_consistent(got: Applied) -> None:
    """Effects and positions agree in each DB (they are committed together)."""
    cust = got.positions.get(("customer", STREAM, "profiler.customer"), (0,))[0]
    rep = got.positions.get(("report", STREAM, "profiler.report"), (0,))[0]
    assert got.clicks == cust
    assert got.facts == got.hourly == got.totals == rep


@pytest.mark.slow
def test_sigkill_20_times_exactly_once(tree: Callable, tmp_path: Path) -> None:
    """A profiler killed with SIGKILL at 20 random instants while applying 100,000 records
    ends with every record applied exactly once (counts checked in the DB)."""
    cfg, st = tree('[profiler]\nbatch_size = 25\n[spool]\nsegment_max_bytes = 1000000\n')
    clicks = random_clicks(100_000, CUSTOMERS, instances=8, links=20, seed=20)
    write_clicks(st, clicks)
    segments = len(list((Path(st.paths.spool) / "streams" / STREAM).glob("*.jsonl")))
    assert segments >= 10  # roll-overs are crossed while applying
    rnd = random.Random(1234)
    progress = [records_done(st)]
    for kill in range(20):
        d = Daemon(cfg)
        if kill % 5 == 0:  # some kills land anywhere, start-up included
            time.sleep(rnd.uniform(0.05, 0.6))
        else:  # most land while batches are being applied: once this run has committed
            d.wait_started()  # something (a slow start on a loaded machine is no exception)
            deadline = time.monotonic() + 20
            while records_done(st) == progress[-1] and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rnd.uniform(0.0, 0.15))
        assert d.proc.poll() is None, f"profiler exited early:\n{d.output()}"
        d.kill()
        progress.append(records_done(st))
        assert_consistent(applied(st))  # a killed transaction left nothing half-applied
    # the kills really landed mid-stream: work was still left after the 20th
    assert 0 < min(progress[-1]) and max(progress[-1]) < 100_000, progress
    assert sum(1 for a, b in zip(progress, progress[1:], strict=False) if b > a) >= 10, progress
    final = Daemon(cfg, "--once", env={"CONNECTD_PROFILER_BATCH_SIZE": "5000"})
    assert final.finish(60) == 0, final.output()
    got = applied(st)
    assert got.clicks == 100_000
    assert got.per_customer == expected_per_customer(clicks)
    assert got.facts == got.hourly == got.totals == 100_000
    assert records_done(st) == (100_000, 100_000)
    assert shunted(st) == []


@pytest.mark.slow
def test_sigterm_mid_stream_exits_0_and_keeps_commits(tree: Callable) -> None:
    """SIGTERM mid-stream: exit 0 soon, what was committed stays, the rest follows later."""
    cfg, st = tree('[profiler]\nbatch_size = 50\n')
    clicks = random_clicks(50_000, CUSTOMERS, seed=21)
    write_clicks(st, clicks)
    d = Daemon(cfg)
    d.wait_started()
    wait_for(lambda: min(records_done(st)) > 0, 20)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish(10) == 0, d.output()
    assert time.monotonic() - t0 < 3
    assert '"stopped"' in d.output()
    got = applied(st)
    assert_consistent(got)
    done = records_done(st)
    assert 0 < min(done) and max(done) < 50_000, done
    assert Daemon(cfg, "--once").finish(60) == 0
    got = applied(st)
    assert got.per_customer == expected_per_customer(clicks)
    assert got.facts == 50_000


def test_appended_records_applied_within_2s(tree: Callable) -> None:
    """Records appended while the daemon idles are applied within 2 s (watchdog wake-up, not
    the idle sleep, which is set longer than that)."""
    cfg, st = tree('[daemon]\nidle_sleep = 30.0\n[spool]\npoll_interval = 30.0\n')
    write_clicks(st, random_clicks(10, CUSTOMERS, seed=22))
    d = Daemon(cfg)
    try:
        d.wait_started()
        wait_for(lambda: records_done(st) == (10, 10), 10)
        time.sleep(0.5)  # let it go idle
        for n in (20, 30):
            write_clicks(st, random_clicks(10, CUSTOMERS, seed=n))
            took = wait_for(lambda n=n: records_done(st) == (n, n), 10)
            assert took < 2.0, f"applied after {took:.2f} s"
            time.sleep(0.5)
    finally:
        d.proc.send_signal(signal.SIGTERM)
        assert d.finish() == 0, d.output()


def test_stream_created_after_start_is_followed(tree: Callable) -> None:
    """A stream that appears after the profiler started is picked up and applied."""
    cfg, st = tree()
    write_clicks(st, random_clicks(5, CUSTOMERS, seed=23))
    d = Daemon(cfg)
    try:
        d.wait_started()
        wait_for(lambda: records_done(st) == (5, 5), 10)
        clicks = random_clicks(7, CUSTOMERS, seed=24)
        write_clicks(st, clicks, stream="tracker2.events")
        took = wait_for(lambda: records_done(st, "tracker2.events") == (7, 7), 10)
        assert took < 3.0
    finally:
        d.proc.send_signal(signal.SIGTERM)
        assert d.finish() == 0, d.output()
    assert applied(st).facts == 12


def test_once_prints_count_and_exits_0(tree: Callable) -> None:
    """`connectd run profiler --once` applies everything, says how much, and exits 0."""
    cfg, st = tree()
    clicks = random_clicks(100, CUSTOMERS, seed=25)
    write_clicks(st, clicks)
    d = Daemon(cfg, "--once")
    assert d.finish(60) == 0, d.output()
    assert "profiler: 200 items done" in d.output()  # 100 records x 2 databases
    assert applied(st).per_customer == expected_per_customer(clicks)
    again = Daemon(cfg, "--once")
    assert again.finish(60) == 0
    assert "profiler: 0 items done" in again.output()


@pytest.mark.parametrize("extra", ['[profiler]\nbatch_size = "many"\n', "[nosuch]\nx = 1\n",
                                   "[profiler\n"])
def test_bad_config_exits_78(tmp_path: Path, extra: str) -> None:
    """A bad settings file makes `run profiler` exit 78 (EX_CONFIG) with a one-line reason."""
    cfg = write_config(tmp_path, extra=extra)
    done = subprocess.run([PYTHON, "-m", "connectd", "--config", str(cfg), "run", "profiler"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EX_CONFIG, done.stderr
    assert "bad configuration" in done.stderr
    assert done.stderr.count("\n") == 1


def _children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_one_worker_process_per_database(tree: Callable) -> None:
    """With profiler.parallel (the default) the daemon runs one worker per database, and a
    SIGKILLed profiler takes its workers with it (no orphan keeps applying)."""
    cfg, st = tree()
    d = Daemon(cfg)
    d.wait_started()
    wait_for(lambda: len(_children(d.proc.pid)) >= 2, 10)
    workers = _children(d.proc.pid)
    d.kill()
    def gone() -> bool:
        return all(not Path(f"/proc/{pid}").exists() or
                   Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                   for pid in workers)
    wait_for(gone, 5)


@pytest.mark.slow
def test_second_profiler_on_same_spool_waits(tree: Callable) -> None:
    """A second profiler on the same spool waits for the first's lock instead of applying the
    same records again; once the first is gone it carries on, and every record is applied
    exactly once."""
    cfg, st = tree('[profiler]\nbatch_size = 100\n')
    clicks = random_clicks(20_000, CUSTOMERS, instances=4, links=20, seed=3)
    write_clicks(st, clicks)
    first = Daemon(cfg)
    first.wait_started()
    second = Daemon(cfg)
    wait_for(lambda: "waiting for it" in second.output(), 15)
    assert first.proc.poll() is None
    first.kill()
    wait_for(lambda: records_done(st) == (20_000, 20_000), 60, every=0.1)
    second.proc.send_signal(signal.SIGTERM)
    assert second.finish() == 0
    got = applied(st)
    assert got.per_customer == expected_per_customer(clicks)
    assert got.facts == 20_000
    assert shunted(st) == []


def test_serial_mode_applies_everything(tree: Callable) -> None:
    """profiler.parallel = false: one process applies to both databases, same result."""
    cfg, st = tree('[profiler]\nparallel = false\n')
    clicks = random_clicks(3_000, CUSTOMERS, instances=3, links=20, seed=4)
    write_clicks(st, clicks)
    done = subprocess.run([PYTHON, "-m", "connectd", "--config", str(cfg), "run", "profiler",
                           "--once"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = applied(st)
    assert got.per_customer == expected_per_customer(clicks)
    assert got.facts == 3_000


def test_uninitialised_database_exits_78(tmp_path: Path) -> None:
    """A database `connectd init` never migrated stops the profiler with exit 78 and a
    message that says to run init (no restart loop under systemd, no traceback)."""
    cfg = write_config(tmp_path)
    for args in (["run", "profiler"], ["run", "profiler", "--once"]):
        done = subprocess.run([PYTHON, "-m", "connectd", "--config", str(cfg), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == EX_CONFIG
        assert "run `connectd init`" in done.stderr
        assert "Traceback" not in done.stderr


def test_stuck_worker_stops_watchdog_pings(tree: Callable, notify_socket) -> None:
    """The profiler pings systemd's watchdog only while both workers' loops go round: a
    worker frozen (SIGSTOP) stops the pings, so systemd would restart the profiler; pings
    resume when it runs again."""
    sock, path = notify_socket
    cfg, st = tree('[daemon]\nwatchdog_interval = 0.2\nidle_sleep = 0.1\n')
    d = Daemon(cfg, env={"NOTIFY_SOCKET": path})

    def pings(seconds: float) -> int:
        n, end = 0, time.monotonic() + seconds
        sock.settimeout(0.1)
        while time.monotonic() < end:
            try:
                n += sock.recv(4096).count(b"WATCHDOG=1")
            except TimeoutError:
                pass
        return n

    try:
        d.wait_started()
        wait_for(lambda: len(_children(d.proc.pid)) >= 2, 10)
        assert pings(1.5) >= 3
        worker = _children(d.proc.pid)[0]
        os.kill(worker, signal.SIGSTOP)
        try:
            pings(1.0)  # the worker's last beat ages past 3 intervals
            assert pings(1.5) == 0
        finally:
            os.kill(worker, signal.SIGCONT)
        assert pings(1.5) >= 3
    finally:
        d.proc.send_signal(signal.SIGTERM)
        assert d.finish() == 0
