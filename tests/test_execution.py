"""The manager's execution logic (connectd.execution) on real SQLite and PostgreSQL: due
instances prepared, batches sized by composer throughput and backlog, pause/resume, quiet
hours, retries, completion, recurring campaigns, every_n_days, and concurrent managers.

The helpers at the top (a world of customers, launching, a stand-in composer that claims a
batch, marks its targets sending and applies the outcomes with the real composer.sent
applier) are shared with tests/daemons/test_manager.py and tests/test_outbound_appliers.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from connectd.appliers.outbound import sent_to_targets
from connectd.db.customer import (
    Campaign,
    ComposerHeartbeat,
    Conversation,
    Customer,
    MailBatch,
    Message,
    MessageInstance,
    Subscription,
    Target,
)
from connectd.db.engine import make_engine, writer
from connectd.execution import (
    ExecutionConfig,
    complete_campaigns,
    complete_instances,
    create_batches,
    create_recurring,
    due_instances,
    instance_counts,
    occurrence_due,
    parse_quiet_hours,
    prepare_instance,
    schedule_retries,
)
from connectd.records import ComposerSent
from connectd.settings import ManagerSettings, SettingsError

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday, noon UTC
CFG = ExecutionConfig(batch_min=10, batch_max=1000, backlog=2, batch_seconds=5.0)


# --- helpers (shared) ------------------------------------------------------------------------

def seed(engine: Engine, customers: int, *, kind: str = "normal", status: str = "running",
         cron: str | None = None, every_n_days: int | None = None,
         starts_at: datetime | None = None, name: str = "spring") -> dict[str, Any]:
    """`customers` active subscribers of a conversation and a campaign with one main
    message; returns ids: campaign, message, conversation, customers (list)."""
    with engine.begin() as conn:
        existing = conn.execute(select(func.count()).select_from(Customer)).scalar_one()
        ids = []
        if customers:
            conn.execute(insert(Customer), [
                {"email": f"c{i}@example{i % 7}.com", "email_key": f"c{i}@example{i % 7}.com",
                 "attributes": {}, "created_at": NOW, "updated_at": NOW}
                for i in range(existing, existing + customers)])
            ids = [r[0] for r in conn.execute(select(Customer.id).order_by(Customer.id)
                                              .offset(existing))]
        conv = conn.execute(insert(Conversation).values(name=f"conv-{name}")
                            .returning(Conversation.id)).scalar_one()
        if ids:
            conn.execute(insert(Subscription), [
                {"customer_id": c, "conversation_id": conv, "status": "active"} for c in ids])
        camp = conn.execute(insert(Campaign).values(
            name=name, conversation_id=conv, kind=kind, status=status, cron=cron,
            every_n_days=every_n_days, starts_at=starts_at, created_at=NOW - timedelta(days=30),
            updated_at=NOW).returning(Campaign.id)).scalar_one()
        msg = conn.execute(insert(Message).values(campaign_id=camp, name="main")
                           .returning(Message.id)).scalar_one()
    return {"campaign": camp, "message": msg, "conversation": conv, "customers": ids}


def launch(engine: Engine, message_id: int, at: datetime = NOW, run_key: str = "1") -> int:
    with engine.begin() as conn:
        return conn.execute(insert(MessageInstance).values(
            message_id=message_id, run_key=run_key, status="ready", scheduled_at=at,
            created_at=at).returning(MessageInstance.id)).scalar_one()


def heartbeat(engine: Engine, name: str, throughput: float, seen: datetime = NOW,
              backlog: int = 0) -> None:
    with engine.begin() as conn:
        conn.execute(insert(ComposerHeartbeat).values(
            name=name, host="h", pid=1, started_at=seen, last_seen=seen,
            throughput=throughput, backlog=backlog))


def step(engine: Engine, now: datetime = NOW, cfg: ExecutionConfig = CFG) -> dict[str, Any]:
    """One manager poll through the execution functions (what Manager.poll does)."""
    out: dict[str, Any] = {}
    with writer(engine).begin() as conn:
        out["recurring"] = create_recurring(conn, now, cfg.tz)
    out["prepared"] = []
    for instance_id in _due(engine, now):
        with writer(engine).begin() as conn:
            out["prepared"].append(prepare_instance(conn, instance_id, now))
    with writer(engine).begin() as conn:
        out["retries"] = schedule_retries(conn, now, cfg.retry)
    with writer(engine).begin() as conn:
        out["batches"] = create_batches(conn, now, cfg)
    with writer(engine).begin() as conn:
        out["completed"] = complete_instances(conn, now)
        out["campaigns_done"] = [c for c, _ in complete_campaigns(conn, now)]
    return out


def _due(engine: Engine, now: datetime) -> list[int]:
    with engine.connect() as conn:
        return due_instances(conn, now)


def sent_record(instance: int, customer: int, batch: int, attempt: int, outcome: str,
                ts: datetime = NOW, rid: str | None = None) -> ComposerSent:
    return ComposerSent(id=rid or f"r-{instance}-{customer}-{attempt}-{outcome}",
                        ts=ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), instance=instance,
                        customer=customer, batch=batch, attempt=attempt, outcome=outcome,
                        reply="250 ok" if outcome == "sent" else f"{outcome} reply")


def compose(engine: Engine, outcome: Callable[[int], str] | str = "sent",
            now: datetime = NOW, batch_id: int | None = None) -> list[ComposerSent]:
    """A stand-in composer: claim one pending batch (of an executing instance), mark its
    batched targets sending (attempts + 1), apply one composer.sent per target with the real
    applier, finish the batch. Returns the records ([] when no batch was pending)."""
    pick = outcome if callable(outcome) else (lambda _c: outcome)
    with writer(engine).begin() as conn:
        q = (select(MailBatch.id, MailBatch.instance_id).join(
            MessageInstance, MessageInstance.id == MailBatch.instance_id)
            .where(MailBatch.status == "pending", MessageInstance.status == "executing")
            .order_by(MailBatch.id).limit(1))
        if batch_id is not None:
            q = q.where(MailBatch.id == batch_id)
        row = conn.execute(q).first()
        if row is None:
            return []
        batch, instance = row
        conn.execute(update(MailBatch).where(MailBatch.id == batch).values(
            status="claimed", claimed_by="test", claimed_at=now, attempts=MailBatch.attempts + 1,
            lease_expires_at=now + timedelta(seconds=60)))
        handed = conn.execute(update(Target).where(
            Target.batch_id == batch, Target.status == "batched")
            .values(status="sending", attempts=Target.attempts + 1, updated_at=now)
            .returning(Target.customer_id, Target.attempts)).all()
    records = [sent_record(instance, c, batch, a, pick(c), now) for c, a in handed]
    with writer(engine).begin() as conn:
        if records:
            sent_to_targets(conn, records, {})
        conn.execute(update(MailBatch).where(MailBatch.id == batch).values(
            status="done", finished_at=now))
    return records


def statuses(engine: Engine, instance_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        return {k: v for k, v in instance_counts(conn, instance_id).items()
                if v and not k.startswith("batches") and k != "targets"}


def value(engine: Engine, column: Any, where: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(column).where(where)).scalar_one()


@pytest.fixture
def engine(migrated_customer_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_customer_url)
    yield engine
    engine.dispose()


# --- preparation -----------------------------------------------------------------------------

def test_due_ready_instance_is_prepared_and_future_one_waits(engine: Engine) -> None:
    """A ready instance due now gets pending targets and goes executing; a later one waits."""
    w = seed(engine, 5)
    now_inst = launch(engine, w["message"])
    later = launch(engine, w["message"], at=NOW + timedelta(hours=1), run_key="2")
    out = step(engine)
    assert [r.instance_id for r in out["prepared"]] == [now_inst]
    assert value(engine, MessageInstance.status, MessageInstance.id == now_inst) == "executing"
    assert value(engine, MessageInstance.status, MessageInstance.id == later) == "ready"
    assert statuses(engine, now_inst) == {"batched": 5}  # all in the first batch (min 10)


def test_prepare_instance_claims_once(engine: Engine) -> None:
    """A second prepare_instance on the same instance (another manager) does nothing."""
    w = seed(engine, 3)
    inst = launch(engine, w["message"])
    with writer(engine).begin() as conn:
        first = prepare_instance(conn, inst, NOW)
    with writer(engine).begin() as conn:
        second = prepare_instance(conn, inst, NOW)
    assert first is not None and first.added == 3
    assert second is None


def test_paused_campaign_is_not_prepared(engine: Engine) -> None:
    """A ready instance of a paused campaign stays ready until the campaign resumes."""
    w = seed(engine, 3, status="paused")
    inst = launch(engine, w["message"])
    assert step(engine)["prepared"] == []
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(status="running"))
    assert [r.instance_id for r in step(engine)["prepared"]] == [inst]


# --- batches ---------------------------------------------------------------------------------

def test_batches_without_composers_use_batch_min_and_backlog(engine: Engine) -> None:
    """No live composer: backlog x 1 batches of batch_min targets, oldest targets first."""
    w = seed(engine, 55)
    inst = launch(engine, w["message"])
    out = step(engine)
    assert (out["batches"].batches, out["batches"].targets, out["batches"].size) == (2, 20, 10)
    with engine.connect() as conn:
        rows = conn.execute(select(Target.customer_id, Target.batch_id)
                            .where(Target.status == "batched").order_by(Target.id)).all()
    assert [c for c, _ in rows] == w["customers"][:20]
    assert len({b for _, b in rows[:10]}) == 1 and len({b for _, b in rows}) == 2
    # nothing claimed yet: the backlog is full, no more batches
    assert step(engine)["batches"].batches == 0
    assert statuses(engine, inst) == {"pending": 35, "batched": 20}


def test_batch_size_follows_live_composers_throughput(engine: Engine) -> None:
    """Three live composers at 4 and 8 msg/s (a dead one ignored): 6 batches of 5 s x 6/s."""
    w = seed(engine, 300)
    launch(engine, w["message"])
    heartbeat(engine, "composer-1@h", 4.0)
    heartbeat(engine, "composer-2@h", 8.0)
    heartbeat(engine, "composer-3@h", 0.0)  # live, nothing measured yet
    heartbeat(engine, "composer-9@h", 500.0, seen=NOW - timedelta(minutes=5))  # gone
    out = step(engine)
    assert out["batches"].live == 3
    assert out["batches"].size == 30  # 5 s x average(4, 8)
    assert out["batches"].batches == 6 and out["batches"].targets == 180


def test_batch_size_is_clamped(engine: Engine) -> None:
    """A very fast composer still gets at most batch_max per batch."""
    w = seed(engine, 50)
    launch(engine, w["message"])
    heartbeat(engine, "composer-1@h", 10_000.0)
    cfg = ExecutionConfig(batch_min=5, batch_max=20, backlog=1)
    assert step(engine, cfg=cfg)["batches"].size == 20


def test_batch_sizes_match_their_targets(engine: Engine) -> None:
    """Each batch's size is the number of targets it holds; no target is in two batches."""
    w = seed(engine, 45)
    launch(engine, w["message"])
    while compose(engine) or step(engine)["batches"].batches:
        pass
    with engine.connect() as conn:
        sizes = dict(conn.execute(select(MailBatch.id, MailBatch.size)).all())
        held = dict(conn.execute(select(Target.batch_id, func.count())
                                 .group_by(Target.batch_id)).all())
    assert sizes == held and sum(sizes.values()) == 45


def test_two_instances_share_the_backlog(engine: Engine) -> None:
    """Batches alternate between executing instances instead of draining the oldest first."""
    a = seed(engine, 40, name="a")
    b = seed(engine, 40, name="b")
    ia = launch(engine, a["message"])
    ib = launch(engine, b["message"], at=NOW - timedelta(seconds=1))
    cfg = ExecutionConfig(batch_min=10, batch_max=10, backlog=4)
    step(engine, cfg=cfg)
    assert statuses(engine, ia)["batched"] == 20 and statuses(engine, ib)["batched"] == 20


def test_pause_stops_new_batches_and_resume_continues(engine: Engine) -> None:
    """Paused campaign or instance: no new batches; resumed: batching goes on to the end."""
    w = seed(engine, 60)
    inst = launch(engine, w["message"])
    step(engine)
    compose(engine)
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(status="paused"))
    compose(engine)  # the batch already made may still go (the composer stops after it)
    assert step(engine)["batches"].batches == 0
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(status="running"))
        conn.execute(update(MessageInstance).values(status="paused"))
    assert step(engine)["batches"].batches == 0
    assert statuses(engine, inst)["pending"] == 40
    with engine.begin() as conn:
        conn.execute(update(MessageInstance).values(status="executing"))
    while compose(engine) or step(engine)["batches"].batches:
        pass
    assert statuses(engine, inst) == {"sent": 60}


# --- quiet hours -----------------------------------------------------------------------------

@pytest.mark.parametrize(("window", "local", "quiet"), [
    ("22:00-07:00", "23:30", True), ("22:00-07:00", "06:59", True),
    ("22:00-07:00", "07:00", False), ("22:00-07:00", "12:00", False),
    ("12:00-13:00", "12:00", True), ("12:00-13:00", "13:00", False), ("", "03:00", False)])
def test_quiet_hours_window(window: str, local: str, quiet: bool) -> None:
    """The window is [start, end) in local time and may wrap past midnight."""
    tz = ExecutionConfig.from_settings(ManagerSettings(quiet_hours=window,
                                                       timezone="Europe/Berlin"))
    h, m = map(int, local.split(":"))
    at = datetime(2026, 7, 1, h, m, tzinfo=tz.tz)
    assert tz.in_quiet_hours(at.astimezone(UTC)) is quiet


@pytest.mark.parametrize(("window", "tz", "key"), [
    ("22-07", "UTC", "manager.quiet_hours"), ("25:00-07:00", "UTC", "manager.quiet_hours"),
    ("07:00-07:00", "UTC", "manager.quiet_hours"), ("", "Mars/Olympus", "manager.timezone")])
def test_bad_quiet_hours_or_timezone_refused(window: str, tz: str, key: str) -> None:
    """A bad window or zone is a SettingsError naming the key."""
    with pytest.raises(SettingsError) as err:
        ExecutionConfig.from_settings(ManagerSettings(quiet_hours=window, timezone=tz))
    assert err.value.key == key and key in str(err.value)


def test_quiet_hours_hold_batches_in_local_time(engine: Engine) -> None:
    """22:00-07:00 Berlin: no batches at 23:00 Berlin (22:00 UTC), batches at 07:00 Berlin."""
    w = seed(engine, 10)
    inst = launch(engine, w["message"], at=NOW - timedelta(days=1))
    cfg = ExecutionConfig(batch_min=10, quiet=parse_quiet_hours("22:00-07:00"),
                          tz=ExecutionConfig.from_settings(
                              ManagerSettings(timezone="Europe/Berlin")).tz)
    night = datetime(2026, 3, 2, 22, 0, tzinfo=UTC)
    out = step(engine, night, cfg)
    assert out["batches"].quiet and out["batches"].batches == 0
    assert statuses(engine, inst) == {"pending": 10}  # prepared, not batched
    morning = datetime(2026, 3, 3, 6, 0, tzinfo=UTC)  # 07:00 in Berlin (CET)
    assert step(engine, morning, cfg)["batches"].batches == 1


# --- retries ---------------------------------------------------------------------------------

def test_deferred_is_retried_after_the_policy_delay_then_sent(engine: Engine) -> None:
    """Deferred -> next attempt 30 min later (not before) -> batched again -> sent."""
    w = seed(engine, 3)
    inst = launch(engine, w["message"])
    step(engine)
    compose(engine, lambda c: "deferred" if c == w["customers"][0] else "sent")
    step(engine)
    retry_at = value(engine, Target.next_attempt_at, Target.customer_id == w["customers"][0])
    assert retry_at == NOW + timedelta(minutes=30)
    early = step(engine, NOW + timedelta(minutes=29))
    assert early["retries"].due == 0 and statuses(engine, inst)["deferred"] == 1
    due = step(engine, NOW + timedelta(minutes=30))
    assert due["retries"].due == 1 and due["batches"].targets == 1
    assert compose(engine, "sent", NOW + timedelta(minutes=30))[0].attempt == 2
    done = step(engine, NOW + timedelta(minutes=31))["completed"]
    assert [c.instance_id for c in done] == [inst] and done[0].counts["sent"] == 3


def test_retry_waits_double_up_to_the_longest(engine: Engine) -> None:
    """Waits after deferrals 1, 2, 3: first, 2x first, capped at longest."""
    w = seed(engine, 1)
    launch(engine, w["message"])
    cfg = ExecutionConfig(batch_min=10, retry=ExecutionConfig.from_settings(ManagerSettings(
        retry_first=600, retry_longest=1500, retry_attempts=10)).retry)
    now, waits = NOW, []
    step(engine, now, cfg)
    for _ in range(3):
        compose(engine, "deferred", now)
        step(engine, now, cfg)
        at = value(engine, Target.next_attempt_at, Target.customer_id == w["customers"][0])
        waits.append((at - now).total_seconds())
        now = at
        step(engine, now, cfg)
    assert waits == [600, 1200, 1500]


def test_five_deferrals_with_five_attempts_fail(engine: Engine) -> None:
    """retry_attempts=5: the fifth deferral fails the target; the instance is then done."""
    w = seed(engine, 2)
    inst = launch(engine, w["message"])
    cfg = ExecutionConfig(batch_min=10, retry=ExecutionConfig.from_settings(ManagerSettings(
        retry_first=60, retry_longest=3600, retry_attempts=5)).retry)
    now = NOW
    step(engine, now, cfg)
    for attempt in range(1, 6):
        records = compose(engine, lambda c: "deferred" if c == w["customers"][0] else "sent", now)
        assert [r.attempt for r in records if r.customer == w["customers"][0]] == [attempt]
        step(engine, now, cfg)  # the wait is decided
        now += timedelta(days=2)  # past any wait
        step(engine, now, cfg)  # due: batched again
    assert compose(engine, "sent", now) == []
    assert statuses(engine, inst) == {"sent": 1, "failed": 1}
    assert value(engine, MessageInstance.status, MessageInstance.id == inst) == "done"
    assert value(engine, MessageInstance.failed_count, MessageInstance.id == inst) == 1


# --- completion ------------------------------------------------------------------------------

def test_instance_and_campaign_done_with_counts(engine: Engine) -> None:
    """All outcomes in: the instance is done with its counts and the campaign is done."""
    w = seed(engine, 12)
    inst = launch(engine, w["message"])
    outcomes = {w["customers"][0]: "failed", w["customers"][1]: "unknown"}
    done, campaigns = [], []
    while compose(engine, lambda c: outcomes.get(c, "sent")) or not done:
        out = step(engine)
        done += out["completed"]
        campaigns += out["campaigns_done"]
    assert [c.instance_id for c in done] == [inst] and campaigns == [w["campaign"]]
    with engine.connect() as conn:
        row = conn.execute(select(MessageInstance).where(MessageInstance.id == inst)).one()
        camp = conn.execute(select(Campaign.status)).scalar_one()
    assert (row.status, row.target_count, row.sent_count, row.failed_count, row.unknown_count,
            row.deferred_count) == ("done", 12, 10, 1, 1, 0)
    assert row.finished_at == NOW and camp == "done"


def test_campaign_paused_when_its_instance_finished_is_done_after_resume(
        engine: Engine) -> None:
    """The last outcome lands while the campaign is paused: done once it is resumed."""
    w = seed(engine, 3)
    launch(engine, w["message"])
    step(engine)
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(status="paused"))
    compose(engine)
    assert len(step(engine)["completed"]) == 1
    assert value(engine, Campaign.status, Campaign.id == w["campaign"]) == "paused"
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(status="running"))
    assert step(engine)["campaigns_done"] == [w["campaign"]]


def test_instance_not_done_while_a_target_is_sending(engine: Engine) -> None:
    """A target handed off but not yet reported keeps the instance executing."""
    w = seed(engine, 2)
    inst = launch(engine, w["message"])
    step(engine)
    with engine.begin() as conn:
        conn.execute(update(Target).values(status="sending"))
        conn.execute(update(MailBatch).values(status="done"))
    assert step(engine)["completed"] == []
    assert value(engine, MessageInstance.status, MessageInstance.id == inst) == "executing"


def test_instance_counts_keys(engine: Engine) -> None:
    """instance_counts gives every target status, the total and batches per status."""
    w = seed(engine, 25)
    inst = launch(engine, w["message"])
    step(engine)
    compose(engine)
    with engine.connect() as conn:
        counts = instance_counts(conn, inst)
    assert counts == {"pending": 5, "batched": 10, "sending": 0, "sent": 10, "deferred": 0,
                      "failed": 0, "unknown": 0, "targets": 25, "batches": 2,
                      "batches_pending": 1, "batches_claimed": 0, "batches_done": 1,
                      "batches_failed": 0}


# --- recurring campaigns ---------------------------------------------------------------------

@pytest.mark.parametrize(("anchor", "now", "expected"), [
    ("2026-03-01T09:00", "2026-03-02T08:59", "2026-03-02T08:00"),  # 09:00 Berlin = 08:00 UTC
    ("2026-03-02T08:00", "2026-03-02T12:00", None),  # today's ran already
    ("2026-02-20T08:00", "2026-03-02T12:00", "2026-03-02T08:00"),  # missed days: latest only
    ("2026-03-01T09:00", "2026-03-02T07:59", None),
])
def test_occurrence_due(anchor: str, now: str, expected: str | None) -> None:
    """The latest cron occurrence after the anchor and not after now, in the zone."""
    tz = ExecutionConfig.from_settings(ManagerSettings(timezone="Europe/Berlin")).tz
    got = occurrence_due("0 9 * * *", datetime.fromisoformat(anchor).replace(tzinfo=UTC),
                         datetime.fromisoformat(now).replace(tzinfo=UTC), tz)
    want = datetime.fromisoformat(expected).replace(tzinfo=UTC) if expected else None
    assert got == want


def test_recurring_cron_creates_each_occurrence_once(engine: Engine) -> None:
    """Daily 09:00: one instance per day (run_key = local time), never a second one; the
    campaign stays running after its instance is done."""
    w = seed(engine, 3, kind="recurring", cron="0 9 * * *")
    day1 = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    out = step(engine, day1)
    assert len(out["recurring"]) == 1 and len(out["prepared"]) == 1
    assert step(engine, day1 + timedelta(hours=1))["recurring"] == []
    while compose(engine, "sent", day1) or step(engine, day1)["batches"].batches:
        pass
    step(engine, day1)
    day2 = step(engine, day1 + timedelta(days=1))
    assert len(day2["recurring"]) == 1
    with engine.connect() as conn:
        keys = [r[0] for r in conn.execute(select(MessageInstance.run_key)
                                           .order_by(MessageInstance.id))]
        camp = conn.execute(select(Campaign.status).where(Campaign.id == w["campaign"])).scalar()
    assert keys == ["2026-03-02T09:00", "2026-03-03T09:00"]
    assert camp == "running"


def test_two_managers_create_one_occurrence(engine: Engine) -> None:
    """The unique run_key: a second manager's create_recurring adds nothing."""
    seed(engine, 1, kind="recurring", cron="0 9 * * *")
    at = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    with writer(engine).begin() as conn:
        first = create_recurring(conn, at, UTC)
    with engine.begin() as conn:  # as if the other manager had not seen ours yet: run_key says no
        conn.execute(update(MessageInstance).values(scheduled_at=at - timedelta(days=2)))
    with writer(engine).begin() as conn:
        second = create_recurring(conn, at, UTC)
    assert len(first) == 1 and second == []


def test_every_n_days_mails_each_customer_at_most_every_n_days(engine: Engine) -> None:
    """every_n_days=3, daily runs: a customer mailed on day 0 is next mailed on day 3; a
    new subscriber is mailed the day they appear."""
    start = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    w = seed(engine, 2, kind="recurring", every_n_days=3, starts_at=start)
    mailed: dict[int, list[int]] = {}
    for day in range(7):
        now = start + timedelta(days=day, minutes=1)
        if day == 1:  # a new subscriber on day 1
            with engine.begin() as conn:
                cid = conn.execute(insert(Customer).values(
                    email="new@x.com", email_key="new@x.com", attributes={}, created_at=now,
                    updated_at=now).returning(Customer.id)).scalar_one()
                conn.execute(insert(Subscription).values(
                    customer_id=cid, conversation_id=w["conversation"], status="active"))
        out = step(engine, now)
        assert len(out["recurring"]) == 1, day
        while compose(engine, "sent", now) or step(engine, now)["batches"].batches:
            pass
        with engine.connect() as conn:
            for (c,) in conn.execute(select(Target.customer_id).where(
                    Target.instance_id == out["recurring"][0])):
                mailed.setdefault(c, []).append(day)
    assert mailed[w["customers"][0]] == [0, 3, 6]
    assert mailed[cid] == [1, 4]


# --- two managers at once ------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.parametrize("db_backend", ["postgresql"])
def test_two_managers_concurrently_create_no_overlapping_batches(engine: Engine) -> None:
    """Two threads creating batches at once on PostgreSQL: every batch's size equals the
    targets it holds, and every target is batched exactly once."""
    w = seed(engine, 3000)
    launch(engine, w["message"])
    step(engine, cfg=ExecutionConfig(backlog=1, batch_min=1, batch_max=1))
    cfg = ExecutionConfig(backlog=400, batch_min=7, batch_max=7)
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def manager() -> None:
        try:
            barrier.wait()
            for _ in range(30):
                with writer(engine).begin() as conn:
                    create_batches(conn, NOW, cfg)
                with engine.begin() as conn:  # a composer takes batches away meanwhile
                    conn.execute(update(MailBatch).where(MailBatch.status == "pending")
                                 .values(status="claimed"))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=manager) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with engine.connect() as conn:
        sizes = dict(conn.execute(select(MailBatch.id, MailBatch.size)).all())
        held = dict(conn.execute(select(Target.batch_id, func.count())
                                 .where(Target.batch_id.is_not(None)).group_by(Target.batch_id)).all())
        batched = conn.execute(select(func.count()).select_from(Target)
                               .where(Target.status == "batched")).scalar_one()
    assert sizes == held
    assert sum(sizes.values()) == batched == 3000
