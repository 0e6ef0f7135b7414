"""The manager daemon (connectd.daemons.manager.Manager): run_until_idle over real SQLite and
PostgreSQL databases, and as real `connectd run manager` processes killed with SIGKILL mid-run
and restarted while a stand-in composer drains the batches: nobody is batched twice, nobody
is skipped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_config
from sqlalchemy import Engine, func, select, update
from test_execution import compose, launch, seed

from connectd import settings as settings_mod
from connectd.daemons.manager import Manager
from connectd.daemons.profiler import NotInitialised
from connectd.db.customer import Campaign, MailBatch, MessageInstance, Target
from connectd.db.engine import make_engine
from connectd.settings import EX_CONFIG, SettingsError

FAST = ('[manager]\npoll_interval = 0.05\nbatch_min = 50\nbatch_max = 50\nbacklog = 4\n'
        '[daemon]\nidle_sleep = 0.05\n[log]\nformat = "json"\n')


@pytest.fixture
def engine(migrated_customer_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_customer_url)
    yield engine
    engine.dispose()


def settings_for(tmp_path: Path, url: str, extra: str = FAST) -> tuple[Path, settings_mod.Settings]:
    cfg = write_config(tmp_path, customer_url=url, extra=extra)
    return cfg, settings_mod.load(cfg, environ={})


def instance_status(engine: Engine, instance_id: int) -> str:
    with engine.connect() as conn:
        return conn.execute(select(MessageInstance.status)
                            .where(MessageInstance.id == instance_id)).scalar_one()


def test_run_until_idle_prepares_batches_and_completes(engine: Engine, tmp_path: Path,
                                                       migrated_customer_url: str) -> None:
    """--once prepares the launch and fills the backlog; after the composer's outcomes the
    next run marks the instance and the campaign done; an idle run does nothing."""
    _, st = settings_for(tmp_path, migrated_customer_url)
    w = seed(engine, 250)
    inst = launch(engine, w["message"])
    assert Manager(st).run_until_idle() == 1 + 4  # prepared, 4 batches (backlog x 1)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(MailBatch)).scalar_one() == 4
    while compose(engine):
        Manager(st).run_until_idle()
    assert instance_status(engine, inst) == "done"
    with engine.connect() as conn:
        assert conn.execute(select(Campaign.status)).scalar_one() == "done"
        assert conn.execute(select(MessageInstance.sent_count)).scalar_one() == 250
    assert Manager(st).run_until_idle() == 0


def test_step_waits_poll_interval_when_idle(engine: Engine, tmp_path: Path,
                                            migrated_customer_url: str) -> None:
    """An idle poll is not repeated before poll_interval; work found earlier is."""
    _, st = settings_for(tmp_path, migrated_customer_url,
                         '[manager]\npoll_interval = 30.0\n')
    manager = Manager(st)
    manager.setup()
    try:
        assert manager.step() == 0
        w = seed(engine, 3)
        launch(engine, w["message"])
        assert manager.step() == 0  # the next poll is 30 s away
        manager._next_poll = 0.0
        assert manager.step() == 2  # prepared + one batch
    finally:
        manager.teardown()


def test_failed_preparation_marks_the_instance(engine: Engine, tmp_path: Path,
                                               migrated_customer_url: str) -> None:
    """A campaign whose audience filter does not parse fails its instance with the reason;
    the manager goes on."""
    _, st = settings_for(tmp_path, migrated_customer_url)
    w = seed(engine, 3)
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(audience_filter="age >>> 3"))
    inst = launch(engine, w["message"])
    Manager(st).run_until_idle()
    with engine.connect() as conn:
        status, error = conn.execute(select(MessageInstance.status, MessageInstance.error)
                                     .where(MessageInstance.id == inst)).one()
    assert status == "failed" and "preparation failed" in error


def test_uninitialised_database_exits_78(tmp_path: Path) -> None:
    """A customer DB without the schema: NotInitialised, and `connectd run manager` exits 78."""
    cfg, st = settings_for(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(NotInitialised):
        Manager(st).run_until_idle()
    done = subprocess.run([sys.executable, "-m", "connectd", "--config", str(cfg), "run",
                           "manager", "--once"], capture_output=True, text=True, timeout=60)
    assert done.returncode == EX_CONFIG and "connectd init" in done.stderr


def test_bad_quiet_hours_refused_at_start(tmp_path: Path) -> None:
    """manager.quiet_hours that does not parse stops the manager before it does anything."""
    _, st = settings_for(tmp_path, f"sqlite:///{tmp_path / 'c.db'}",
                         '[manager]\nquiet_hours = "10pm-7am"\n')
    with pytest.raises(SettingsError, match="manager.quiet_hours"):
        Manager(st)


class Drain(threading.Thread):
    """A stand-in composer: claims and "sends" batches until told to stop, remembering every
    customer it handed off."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.handed: Counter[int] = Counter()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                records = compose(self.engine)
                self.handed.update(r.customer for r in records)
                if not records:
                    time.sleep(0.02)
        except BaseException as exc:  # reported by the test
            self.error = exc


class Proc:
    """A `connectd run manager` child; its stderr (JSON log lines) read as it comes, so a
    full pipe never blocks it."""

    def __init__(self, cfg: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connectd", "--config", str(cfg), "run", "manager"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode("utf-8", "replace"))
            if '"started"' in self.lines[-1]:
                self.started.set()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """TERM once it has started (a TERM during start-up, before the handlers are in
        place, would just kill it); its exit status."""
        self.started.wait(30)
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        self._reader.join(5)
        return rc


@pytest.mark.slow
def test_managers_killed_with_sigkill_batch_nobody_twice(engine: Engine, tmp_path: Path,
                                                          migrated_customer_url: str) -> None:
    """Two `connectd run manager` processes, each killed with SIGKILL at random instants and
    restarted, while a composer drains batches: every target handed off exactly once, every
    batch's size equal to its targets, the instance done."""
    cfg, _ = settings_for(tmp_path, migrated_customer_url)
    w = seed(engine, 6000)
    inst = launch(engine, w["message"])
    drain = Drain(engine)
    drain.start()
    rnd = random.Random(7)
    procs = [Proc(cfg), Proc(cfg)]
    kills = 0
    deadline = time.monotonic() + 120
    try:
        while instance_status(engine, inst) != "done":
            assert time.monotonic() < deadline, "the instance did not finish"
            assert drain.error is None, drain.error
            time.sleep(rnd.uniform(0.2, 0.8))
            if kills < 8:
                victim = kills % 2
                procs[victim].kill()
                kills += 1
                procs[victim] = Proc(cfg)
    finally:
        drain.stop.set()
        drain.join(10)
        for p in procs:
            assert p.stop() == 0, "".join(p.lines)[-2000:]
    assert kills == 8, "the run ended before the kills were done: make it longer"
    assert drain.error is None
    assert set(drain.handed) == set(w["customers"])
    assert max(drain.handed.values()) == 1
    with engine.connect() as conn:
        sizes = dict(conn.execute(select(MailBatch.id, MailBatch.size)).all())
        held = dict(conn.execute(select(Target.batch_id, func.count())
                                 .group_by(Target.batch_id)).all())
        sent = conn.execute(select(MessageInstance.sent_count)).scalar_one()
    assert sizes == held and sent == 6000
