"""The composer.sent / composer.content appliers (connectd.appliers.outbound), applied by the
profiler's real Consumer from real spool streams to real customer and report DBs (SQLite and
PostgreSQL): outcomes land once, an old attempt changes nothing, an "unknown" target is
upgraded by its late record, a profiler killed with SIGKILL mid-stream applies nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config
from sqlalchemy import func, select, update
from test_execution import NOW, launch, seed, step

from connectd import settings as settings_mod
from connectd.consumer import Consumer, all_streams
from connectd.daemons.profiler import Profiler, consumer_name
from connectd.db.customer import CustomerStats, MailBatch, Message, MessageInstance, Target
from connectd.db.engine import make_engine
from connectd.db.report import EventTotal, HourlyCount, MessageFact
from connectd.spool import Spool

TS = NOW.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class World:
    """Settings on fresh DBs, an executing instance whose targets are all "sending"
    (attempt 1), and the spool the composer would write to."""

    def __init__(self, root: Path, customer_url: str, report_url: str, customers: int,
                 extra: str = "") -> None:
        self.cfg = write_config(root, customer_url=customer_url, report_url=report_url,
                                extra='[profiler]\nparallel = false\n' + extra)
        self.settings = settings_mod.load(self.cfg, environ={})
        self.customer = make_engine(customer_url)
        self.report = make_engine(report_url)
        w = seed(self.customer, customers)
        self.customers: list[int] = w["customers"]
        self.instance = launch(self.customer, w["message"])
        step(self.customer)
        with self.customer.begin() as conn:
            conn.execute(update(Target).values(status="sending", attempts=1))
            self.batch = conn.execute(select(func.min(MailBatch.id))).scalar_one()
        self.spool = Spool(self.settings.paths.spool, self.settings.spool)
        self.spool.create()

    def write(self, records: list[dict[str, Any]], stream: str = "composer.sent.1") -> None:
        w = self.spool.writer(stream)
        try:
            for rec in records:
                kind = "composer.content" if "message_id" in rec else "composer.sent"
                w.append(kind, rec, ts=rec.pop("ts", TS))
        finally:
            w.close()

    def sent(self, customer: int, outcome: str = "sent", attempt: int = 1,
             ts: str = TS) -> dict[str, Any]:
        return {"instance": self.instance, "customer": customer, "batch": self.batch,
                "attempt": attempt, "outcome": outcome, "reply": f"{outcome} reply",
                "relay": "127.0.0.1:25", "composer": "composer-1@h", "ts": ts}

    def content(self, customer: int, segment: int | None = 7) -> dict[str, Any]:
        return {"instance": self.instance, "customer": customer, "message_id": f"m{customer}@x",
                "subject": "Hi", "size": 1000, "links": 3, "domain": "example.com",
                "content_hash": "ab" * 32, "segment": segment}

    def apply(self, db: str = "customer", stream: str = "composer.sent.1",
              batch_size: int = 1000) -> int:
        """Everything in `stream` through the profiler's Consumer; lines consumed."""
        engine = self.customer if db == "customer" else self.report
        consumer = Consumer(self.spool, stream, consumer_name(db), db, engine,  # type: ignore[arg-type]
                            batch_size)
        try:
            total = 0
            while n := consumer.poll():
                total += n
            return total
        finally:
            consumer.close()

    def targets(self) -> dict[int, tuple[str, str | None, Any]]:
        with self.customer.connect() as conn:
            return {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
                select(Target.customer_id, Target.status, Target.last_reply, Target.sent_at))}

    def sent_counts(self) -> dict[int, int]:
        with self.customer.connect() as conn:
            return dict(conn.execute(select(CustomerStats.customer_id,
                                            CustomerStats.sent_count)).all())

    def close(self) -> None:
        self.customer.dispose()
        self.report.dispose()


@pytest.fixture
def world(tmp_path: Path, migrated_customer_url: str,
          migrated_report_url: str) -> Iterator[Any]:
    made: list[World] = []

    def make(customers: int = 5, extra: str = "") -> World:
        made.append(World(tmp_path, migrated_customer_url, migrated_report_url, customers, extra))
        return made[-1]

    yield make
    for w in made:
        w.close()


def test_outcomes_update_targets_and_profiles(world: Any) -> None:
    """sent/deferred/failed/unknown become the targets' status; sent sets sent_at and the
    customer's sent_count and last_sent_at; deferred keeps next_attempt_at NULL."""
    w = world(4)
    a, b, c, d = w.customers
    w.write([w.sent(a), w.sent(b, "deferred"), w.sent(c, "failed"), w.sent(d, "unknown")])
    assert w.apply() == 4
    got = w.targets()
    assert got[a][0:2] == ("sent", "sent reply") and got[a][2] == NOW
    assert [got[x][0] for x in (b, c, d)] == ["deferred", "failed", "unknown"]
    assert all(got[x][2] is None for x in (b, c, d))
    assert w.sent_counts() == {a: 1}
    with w.customer.connect() as conn:
        assert conn.execute(select(CustomerStats.last_sent_at)).scalar_one() == NOW
        assert conn.execute(select(Target.next_attempt_at)
                            .where(Target.customer_id == b)).scalar_one() is None


def test_old_attempt_and_repeated_record_change_nothing(world: Any) -> None:
    """A record of an earlier attempt is ignored; the same outcome written twice (a
    re-written record with a new id) counts once in the profile."""
    w = world(2)
    a, b = w.customers
    with w.customer.begin() as conn:
        conn.execute(update(Target).where(Target.customer_id == b).values(attempts=2))
    w.write([w.sent(a), w.sent(a), w.sent(b, "deferred", attempt=1)])
    w.apply()
    got = w.targets()
    assert got[a][0] == "sent" and w.sent_counts() == {a: 1}
    assert got[b][0] == "sending"  # attempt 2 is in flight; attempt 1's news is stale


def test_run_keeps_the_latest_attempt(world: Any) -> None:
    """Within one run, a later attempt's outcome wins over an earlier one."""
    w = world(1)
    (a,) = w.customers
    with w.customer.begin() as conn:
        conn.execute(update(Target).values(attempts=2))
    w.write([w.sent(a, "sent", attempt=2), w.sent(a, "deferred", attempt=1)])
    w.apply()
    assert w.targets()[a][0] == "sent"


def test_unknown_target_upgraded_by_late_record(world: Any) -> None:
    """A target made "unknown" at a takeover becomes "sent" when the dead composer's
    record is applied after all; a sent target is not downgraded by a later "unknown"."""
    w = world(2)
    a, b = w.customers
    with w.customer.begin() as conn:
        conn.execute(update(Target).values(status="unknown"))
    w.write([w.sent(a), w.sent(b), w.sent(b, "unknown")])
    w.apply()
    got = w.targets()
    assert got[a][0] == "sent" and got[b][0] == "sent"
    assert w.sent_counts() == {a: 1, b: 1}


def test_target_not_sending_is_left_alone(world: Any) -> None:
    """A record for a target that is still batched (never marked sending) changes nothing."""
    w = world(1)
    (a,) = w.customers
    with w.customer.begin() as conn:
        conn.execute(update(Target).values(status="batched", attempts=0))
    w.write([w.sent(a)])
    w.apply()
    assert w.targets()[a][0] == "batched" and w.sent_counts() == {}


def test_report_facts_totals_and_hours(world: Any) -> None:
    """Report DB: message_facts sent_at/failed_at/segment, event_totals and hourly_counts
    per outcome."""
    w = world(3)
    a, b, c = w.customers
    later = (NOW + timedelta(hours=1, minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    w.write([w.sent(a), w.sent(b, "failed", ts=later), w.sent(c, "deferred"),
             w.sent(c, "sent", attempt=2, ts=later)])
    w.write([w.content(a), w.content(c, None)], stream="composer.content.1")
    assert w.apply("report") == 4
    assert w.apply("report", "composer.content.1") == 2
    with w.report.connect() as conn:
        facts = {r.customer_id: r for r in conn.execute(select(MessageFact))}
        totals = {r.event: (r.total, r.uniques) for r in conn.execute(select(EventTotal))}
        hours = {(r.event, r.hour.hour): r.total for r in conn.execute(select(HourlyCount))}
    assert facts[a].sent_at == NOW and facts[a].segment_id == 7 and facts[a].failed_at is None
    assert facts[b].failed_at is not None and facts[b].sent_at is None
    assert facts[c].sent_at is not None and facts[c].segment_id is None
    assert totals == {"sent": (2, 2), "failed": (1, 1), "deferred": (1, 0)}
    assert hours == {("sent", 12): 1, ("sent", 13): 1, ("failed", 13): 1, ("deferred", 12): 1}


def test_profiler_follows_composer_streams(world: Any) -> None:
    """The profiler picks up composer.sent.<N> and composer.content.<N> on its own."""
    w = world(2)
    a, b = w.customers
    w.write([w.sent(a)], stream="composer.sent.1")
    w.write([w.sent(b)], stream="composer.sent.2")
    w.write([w.content(a)], stream="composer.content.1")
    assert {"composer.sent.1", "composer.sent.2", "composer.content.1"} <= set(
        all_streams(w.spool))
    assert Profiler(w.settings).run_until_idle() == 2 * 2 + 1 * 2  # both DBs read each line
    assert w.sent_counts() == {a: 1, b: 1}
    with w.report.connect() as conn:
        assert conn.execute(select(func.count()).select_from(MessageFact)).scalar_one() == 2


def test_consumer_restarted_midway_applies_each_once(world: Any) -> None:
    """A consumer that stops after part of the stream and a new one from the stored
    position: every outcome applied once."""
    w = world(300)
    w.write([w.sent(c) for c in w.customers])
    first = Consumer(w.spool, "composer.sent.1", consumer_name("customer"), "customer",
                     w.customer, 70)
    assert first.poll() == 70 and first.poll() == 70
    first.close()  # as if the process died right after its second commit
    assert w.apply(batch_size=70) == 160
    assert w.sent_counts() == {c: 1 for c in w.customers}


@pytest.mark.slow
def test_profiler_killed_midway_applies_each_once(world: Any) -> None:
    """`connectd run profiler` killed with SIGKILL while applying 20,000 composer.sent
    records, then run again: every target sent once, every sent_count exactly 1."""
    w = world(20_000, extra="batch_size = 200\n")
    w.write([w.sent(c) for c in w.customers])
    cmd = [sys.executable, "-m", "connectd", "--config", str(w.cfg), "run", "profiler"]
    killed_at = None
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "CONNECTD_PROFILER_PARALLEL": "false"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = sum(w.sent_counts().values())
            if done > (killed_at or 0) + 2000:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = sum(w.sent_counts().values())
        if killed_at == len(w.customers):
            break
    assert killed_at is not None and killed_at < len(w.customers), "no kill landed midway"
    done = subprocess.run([*cmd, "--once"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert w.sent_counts() == {c: 1 for c in w.customers}
    assert {s for s, _, _ in w.targets().values()} == {"sent"}


def test_trial_sends_update_targets_but_not_profiles(world: Any) -> None:
    """A trial instance's "sent" marks its target sent but leaves customer_stats alone."""
    w = world(2)
    a, b = w.customers
    with w.customer.begin() as conn:
        message = conn.execute(select(MessageInstance.message_id)
                               .where(MessageInstance.id == w.instance)).scalar_one()
        conn.execute(update(Message).where(Message.id == message).values(kind="trial"))
    w.write([w.sent(a), w.sent(b)])
    assert w.apply() == 2
    assert {x[0] for x in w.targets().values()} == {"sent"}
    assert w.sent_counts() == {}
