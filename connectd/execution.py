"""The manager's execution logic: the customer DB's instances, targets and batches -> their next
state, one poll at a time.

Inputs: a Connection to the customer DB inside the caller's transaction (on SQLite a
connection of connectd.db.engine.writer(engine), so the write lock is taken up front), `now`
(timezone-aware UTC), and an ExecutionConfig built from settings.manager. Outputs: rows changed
in message_instances, targets, mail_batches and campaigns, and small summaries of what
changed (for the manager's log lines). Every function is set-based: a statement per instance,
per batch or per distinct attempt count, never per customer.

Lifecycle (the outbound contract):
- recurring campaigns (status "running", kind "recurring"): the latest due occurrence of
  `cron` (or, with `every_n_days`, a daily run at the local time of `starts_at`) becomes a
  "ready" instance of each main message; run_key names the occurrence (local time
  "YYYY-MM-DDTHH:MM" for cron, local date "YYYY-MM-DD" for every_n_days) and is unique per
  message, so two managers never create the same occurrence twice (INSERT ... ON CONFLICT DO
  NOTHING). Missed occurrences (manager down) are not caught up one by one: only the latest.
- due "ready" instances: claimed by a conditional UPDATE (ready -> preparing), then
  connectd.preparation.prepare() writes the targets (pending) and sets them "executing".
- retries: "deferred" targets get next_attempt_at from the RetryPolicy (or become "failed" when
  their attempts are used up); due ones become "pending" again and are batched like new ones.
- batches, just in time: about backlog x max(live composers, 1) batches are kept "pending";
  each takes up to N pending targets (oldest first), N = clamp(batch_seconds x the average
  measured throughput of live composers, batch_min, batch_max). Targets are taken with a
  conditional UPDATE (status still 'pending'), on PostgreSQL through SELECT ... FOR UPDATE
  SKIP LOCKED, so two managers never put one target into two batches. Nothing is batched
  for a paused instance or campaign, nor within the quiet hours.
- completion: an executing instance with no target pending/batched/sending/deferred and no
  batch pending/claimed is "done" (its counts written); a campaign whose instances are all
  done is "done", unless it repeats (recurring, event, subscription campaigns stay running).
- trial sends (messages of kind "trial", connectd.campaigns.trial): their instances are
  created "executing" with their targets, so they skip preparation and are batched, retried
  and completed like any other; they are batched while the campaign is paused too, and a
  campaign's completion ignores them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Connection, and_, delete, exists, func, insert, not_, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from connectd import log, preparation
from connectd.core.schedule import RetryPolicy, next_attempt
from connectd.db.customer import (
    BATCH_STATUSES,
    TARGET_STATUSES,
    Campaign,
    ComposerHeartbeat,
    MailBatch,
    Message,
    MessageInstance,
    Target,
)
from connectd.settings import ManagerSettings, SettingsError

# targets that still need the manager or a composer; an instance holding any is not done
OPEN_TARGETS = ("pending", "batched", "sending", "deferred")
OPEN_BATCHES = ("pending", "claimed")
# campaign statuses under which nothing new starts: no preparation, no new batches
HELD_CAMPAIGNS = ("paused", "cancelled", "archived")
# a trial (test send): its instance is created "executing" with its targets, never prepared
TRIAL_KIND = "trial"

_QUIET = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


# --- configuration ---------------------------------------------------------------------------

@dataclass(frozen=True)
class QuietHours:
    """A daily window in local time, [start, end); end <= start wraps past midnight."""

    start: time
    end: time

    def contains(self, local: time) -> bool:
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


def parse_quiet_hours(text: str) -> QuietHours | None:
    """"HH:MM-HH:MM" -> QuietHours ("" -> None); ValueError saying what is wrong."""
    if not text.strip():
        return None
    match = _QUIET.match(text)
    if not match:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM (e.g. \"22:00-07:00\")")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"{text!r}: hours are 00-23 and minutes 00-59")
    if (h1, m1) == (h2, m2):
        raise ValueError(f"{text!r}: start and end are equal (an empty or a 24-hour window?)")
    return QuietHours(time(h1, m1), time(h2, m2))


@dataclass(frozen=True)
class ExecutionConfig:
    """settings.manager, validated and turned into the objects the functions below use."""

    batch_seconds: float = 5.0
    batch_min: int = 50
    batch_max: int = 5000
    backlog: int = 2
    composer_timeout: float = 60.0
    quiet: QuietHours | None = None
    tz: tzinfo = UTC
    retry: RetryPolicy = RetryPolicy()

    @classmethod
    def from_settings(cls, s: ManagerSettings) -> ExecutionConfig:
        """Raise SettingsError (naming the key) for a bad quiet_hours, timezone, batch bounds
        or retry policy: caught at start, before the manager touches anything."""
        try:
            quiet = parse_quiet_hours(s.quiet_hours)
        except ValueError as exc:
            raise SettingsError(f"manager.quiet_hours: {exc}", key="manager.quiet_hours") from None
        try:
            tz = ZoneInfo(s.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise SettingsError(f"manager.timezone: {s.timezone!r} is not an IANA time zone "
                                "name such as \"Europe/Berlin\" or \"UTC\"",
                                key="manager.timezone") from None
        if s.batch_min < 1 or s.batch_max < s.batch_min:
            raise SettingsError(f"manager.batch_min/batch_max: need 1 <= batch_min <= batch_max, "
                                f"got {s.batch_min} and {s.batch_max}", key="manager.batch_min")
        try:
            retry = RetryPolicy(first=timedelta(seconds=s.retry_first),
                                longest=timedelta(seconds=s.retry_longest),
                                attempts=s.retry_attempts)
        except ValueError as exc:
            raise SettingsError(f"manager.retry_*: {exc}", key="manager.retry_first") from None
        return cls(batch_seconds=s.batch_seconds, batch_min=s.batch_min, batch_max=s.batch_max,
                   backlog=max(1, s.backlog), composer_timeout=s.composer_timeout, quiet=quiet,
                   tz=tz, retry=retry)

    def in_quiet_hours(self, now: datetime) -> bool:
        return self.quiet is not None and self.quiet.contains(now.astimezone(self.tz).time())


# --- preparation -----------------------------------------------------------------------------

def due_instances(conn: Connection, now: datetime) -> list[int]:
    """Ready instances whose time has come, of campaigns not paused or cancelled, oldest
    first."""
    rows = conn.execute(
        select(MessageInstance.id)
        .join(Message, Message.id == MessageInstance.message_id)
        .join(Campaign, Campaign.id == Message.campaign_id)
        .where(MessageInstance.status == "ready", MessageInstance.scheduled_at <= now,
               Campaign.status.notin_(HELD_CAMPAIGNS))
        .order_by(MessageInstance.scheduled_at, MessageInstance.id))
    return [r[0] for r in rows]


def prepare_instance(conn: Connection, instance_id: int,
                     now: datetime) -> preparation.PrepResult | None:
    """Claim a ready instance (ready -> preparing, conditionally) and prepare it, in the
    caller's transaction. None when another manager got it first: on PostgreSQL our UPDATE
    waits for its transaction and then finds the status changed. ValueError/FilterError from
    prepare() propagate (the caller rolls back and calls fail_instance)."""
    claimed = conn.execute(update(MessageInstance)
                           .where(MessageInstance.id == instance_id,
                                  MessageInstance.status == "ready")
                           .values(status="preparing"))
    if claimed.rowcount != 1:
        return None
    return preparation.prepare(conn, instance_id, now)


def fail_instance(conn: Connection, instance_id: int, error: str, now: datetime) -> bool:
    """Mark an instance that cannot be prepared "failed" with the reason (ready/preparing
    only: one executing already is left alone)."""
    done = conn.execute(update(MessageInstance)
                        .where(MessageInstance.id == instance_id,
                               MessageInstance.status.in_(("ready", "preparing")))
                        .values(status="failed", error=error[:2000], finished_at=now))
    return done.rowcount == 1


# --- retries ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryResult:
    scheduled: int = 0  # deferred targets given a next_attempt_at
    failed: int = 0  # deferred targets whose attempts were used up
    due: int = 0  # deferred targets made pending again

    @property
    def changed(self) -> int:
        return self.scheduled + self.failed + self.due


def schedule_retries(conn: Connection, now: datetime, policy: RetryPolicy) -> RetryResult:
    """Deferred targets: give each a next_attempt_at (one UPDATE per distinct attempt count:
    the wait depends only on it), fail those out of attempts, and make the due ones pending.
    The wait counts from the poll that saw the deferral (a poll interval after it)."""
    undecided = and_(Target.status == "deferred", Target.next_attempt_at.is_(None))
    counts = [r[0] for r in conn.execute(
        select(Target.attempts).where(undecided).group_by(Target.attempts))]
    scheduled = failed = 0
    for attempts in counts:
        when = next_attempt(policy, attempts, now)
        where = and_(undecided, Target.attempts == attempts)
        if when is None:
            failed += conn.execute(update(Target).where(where).values(
                status="failed", updated_at=now)).rowcount
        else:
            scheduled += conn.execute(update(Target).where(where).values(
                next_attempt_at=when, updated_at=now)).rowcount
    due = conn.execute(
        update(Target).where(Target.status == "deferred", Target.next_attempt_at <= now)
        .values(status="pending", batch_id=None, next_attempt_at=None, updated_at=now)).rowcount
    return RetryResult(scheduled, failed, due)


# --- batches ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComposerLoad:
    live: int  # composers seen within composer_timeout
    throughput: float  # average messages/s of the live composers that measured any
    backlog: int  # targets left in the live composers' claimed batches


def live_composer(now: datetime, timeout: float) -> ColumnElement[bool]:
    """The condition on composer_heartbeats of a live composer: seen within `timeout`
    seconds (manager.composer_timeout). One definition for batching and the preflight."""
    return ComposerHeartbeat.last_seen >= now - timedelta(seconds=timeout)


def composer_load(conn: Connection, now: datetime, timeout: float) -> ComposerLoad:
    """What the live composers reported in their latest heartbeats."""
    hb = ComposerHeartbeat
    live_now = live_composer(now, timeout)
    live, backlog = conn.execute(select(func.count(), func.coalesce(func.sum(hb.backlog), 0))
                                 .where(live_now)).one()
    rate = conn.execute(select(func.avg(hb.throughput))
                        .where(live_now, hb.throughput > 0)).scalar()
    return ComposerLoad(int(live), float(rate or 0.0), int(backlog))


def batch_size(cfg: ExecutionConfig, load: ComposerLoad) -> int:
    """batch_seconds of the average live composer's measured rate, within the bounds
    (batch_min while no composer has measured anything)."""
    if load.throughput <= 0:
        return cfg.batch_min
    return max(cfg.batch_min, min(cfg.batch_max, round(cfg.batch_seconds * load.throughput)))


def _sendable() -> Any:
    """Instances whose targets may be batched: executing, campaign not held. A trial's
    instance also while its campaign is paused: pausing to fix the content and then sending
    a trial of the fix is the usual way to work (pause() pauses a trial already in flight)."""
    trial_while_paused = and_(Message.kind == TRIAL_KIND, Campaign.status == "paused")
    return (select(MessageInstance.id)
            .join(Message, Message.id == MessageInstance.message_id)
            .join(Campaign, Campaign.id == Message.campaign_id)
            .where(MessageInstance.status == "executing",
                   or_(Campaign.status.notin_(HELD_CAMPAIGNS), trial_while_paused)))


def _pending_batches(conn: Connection) -> int:
    """Pending batches that a composer may claim now (those of paused instances do not
    count: they must not hold back other campaigns)."""
    return conn.execute(select(func.count()).select_from(MailBatch).where(
        MailBatch.status == "pending",
        MailBatch.instance_id.in_(_sendable().scalar_subquery()))).scalar_one()


def _instances_with_pending(conn: Connection) -> list[int]:
    has_pending = exists().where(Target.instance_id == MessageInstance.id,
                                 Target.status == "pending")
    return [r[0] for r in conn.execute(
        _sendable().where(has_pending).order_by(MessageInstance.scheduled_at, MessageInstance.id))]


def create_batch(conn: Connection, instance_id: int, size: int, now: datetime) -> tuple[int, int]:
    """One pending batch of up to `size` of the instance's pending targets, oldest first:
    (batch id, targets taken); (0, 0) when there were none left. The conditional UPDATE
    (still 'pending') and, on PostgreSQL, the SKIP LOCKED row locks keep a target out of two
    batches whatever other managers do at the same time."""
    batch_id = conn.execute(insert(MailBatch).values(
        instance_id=instance_id, status="pending", size=0, attempts=0, created_at=now)
        .returning(MailBatch.id)).scalar_one()
    pick = (select(Target.id).where(Target.instance_id == instance_id, Target.status == "pending")
            .order_by(Target.id).limit(size))
    if conn.dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    taken = conn.execute(
        update(Target).where(Target.id.in_(pick.scalar_subquery()), Target.status == "pending")
        .values(status="batched", batch_id=batch_id, updated_at=now)).rowcount
    if taken <= 0:
        conn.execute(delete(MailBatch).where(MailBatch.id == batch_id))
        return 0, 0
    conn.execute(update(MailBatch).where(MailBatch.id == batch_id).values(size=taken))
    return batch_id, taken


@dataclass(frozen=True)
class BatchResult:
    batches: int = 0
    targets: int = 0
    size: int = 0  # the size asked for
    live: int = 0
    quiet: bool = False


def create_batches(conn: Connection, now: datetime, cfg: ExecutionConfig) -> BatchResult:
    """Top the pending batches up to backlog x max(live composers, 1), taking instances in
    turn (oldest first), so a large launch does not starve a later small one."""
    if cfg.in_quiet_hours(now):
        return BatchResult(quiet=True)
    load = composer_load(conn, now, cfg.composer_timeout)
    size = batch_size(cfg, load)
    wanted = cfg.backlog * max(load.live, 1) - _pending_batches(conn)
    instances = _instances_with_pending(conn) if wanted > 0 else []
    batches = targets = 0
    turn = 0
    while batches < wanted and instances:
        instance_id = instances[turn % len(instances)]
        batch_id, taken = create_batch(conn, instance_id, size, now)
        if not batch_id:
            instances.remove(instance_id)
            continue
        batches += 1
        targets += taken
        turn += 1
    return BatchResult(batches, targets, size, load.live)


# --- completion ------------------------------------------------------------------------------

def target_counts(conn: Connection, instance_id: int) -> dict[str, int]:
    """Targets of an instance per status (every status, 0 when none)."""
    found = dict(conn.execute(select(Target.status, func.count())
                              .where(Target.instance_id == instance_id)
                              .group_by(Target.status)).all())
    return {status: int(found.get(status, 0)) for status in TARGET_STATUSES}


def instance_counts(conn: Connection, instance_id: int) -> dict[str, int]:
    """Where an instance's sending stands, for `connectd campaign status`.

    Keys (all present, 0 when none):
    - "pending", "batched", "sending", "sent", "deferred", "failed", "unknown": targets in
      each status ("unknown": in flight when its composer died; never resent);
    - "targets": all targets of the instance;
    - "batches": all batches of the instance, and "batches_pending", "batches_claimed",
      "batches_done", "batches_failed": batches per status."""
    counts = target_counts(conn, instance_id)
    counts["targets"] = sum(counts[s] for s in TARGET_STATUSES)
    found = dict(conn.execute(select(MailBatch.status, func.count())
                              .where(MailBatch.instance_id == instance_id)
                              .group_by(MailBatch.status)).all())
    counts["batches"] = int(sum(found.values()))
    for status in BATCH_STATUSES:
        counts[f"batches_{status}"] = int(found.get(status, 0))
    return counts


@dataclass(frozen=True)
class Completed:
    instance_id: int
    campaign_id: int
    campaign: str
    counts: dict[str, int]


def finished_instances(conn: Connection) -> list[int]:
    """Executing instances with nothing left to send or to hear back about."""
    mi = MessageInstance
    open_target = exists().where(Target.instance_id == mi.id, Target.status.in_(OPEN_TARGETS))
    open_batch = exists().where(MailBatch.instance_id == mi.id, MailBatch.status.in_(OPEN_BATCHES))
    return [r[0] for r in conn.execute(select(mi.id).where(
        mi.status == "executing", not_(open_target), not_(open_batch)).order_by(mi.id))]


def complete_instances(conn: Connection, now: datetime) -> list[Completed]:
    """Mark finished instances done with their counts (complete_campaigns, called next,
    finishes their campaigns)."""
    finished = []
    for instance_id in finished_instances(conn):
        counts = target_counts(conn, instance_id)
        done = conn.execute(update(MessageInstance).where(
            MessageInstance.id == instance_id, MessageInstance.status == "executing").values(
            status="done", finished_at=now, target_count=sum(counts.values()),
            sent_count=counts["sent"], deferred_count=counts["deferred"],
            failed_count=counts["failed"], unknown_count=counts["unknown"]))
        if done.rowcount != 1:
            continue  # another manager finished it
        campaign_id, name = conn.execute(
            select(Campaign.id, Campaign.name)
            .join(Message, Message.campaign_id == Campaign.id)
            .join(MessageInstance, MessageInstance.message_id == Message.id)
            .where(MessageInstance.id == instance_id)).one()
        finished.append((instance_id, campaign_id, name, counts))
    return [Completed(i, c, name, counts) for i, c, name, counts in finished]


def complete_campaigns(conn: Connection, now: datetime) -> list[tuple[int, str]]:
    """Running campaigns that do not repeat (recurring, event and subscription campaigns run
    again at their next occurrence or event) whose instances are all done -> "done". A
    sweep, not a consequence of the last instance finishing, so a campaign paused at that
    moment becomes done once it is resumed."""
    # trial sends are no part of a campaign's run: one still going (or failed) must not keep
    # it from being done, nor may a trial alone make it done
    has_instance = exists().where(MessageInstance.message_id == Message.id,
                                  Message.campaign_id == Campaign.id, Message.kind != TRIAL_KIND)
    unfinished = exists().where(MessageInstance.message_id == Message.id,
                                Message.campaign_id == Campaign.id, Message.kind != TRIAL_KIND,
                                MessageInstance.status != "done")
    found = [(r[0], r[1]) for r in conn.execute(select(Campaign.id, Campaign.name).where(
        Campaign.status == "running", Campaign.kind.notin_(preparation.REPEATING_KINDS),
        has_instance, not_(unfinished)))]
    done = []
    for campaign_id, name in found:  # conditional: another manager may have done it
        if conn.execute(update(Campaign).where(Campaign.id == campaign_id,
                                               Campaign.status == "running")
                        .values(status="done", updated_at=now)).rowcount == 1:
            done.append((campaign_id, name))
    return done


# --- recurring campaigns ---------------------------------------------------------------------

def _cron_of(campaign: Any, tz: tzinfo) -> tuple[str, str] | None:
    """(cron expression, run_key format) of a recurring campaign, or None if it has neither
    cron nor every_n_days. every_n_days runs daily at the local time of starts_at (00:00
    without one); preparation keeps out whoever was mailed less than N days ago."""
    if campaign.cron:
        return campaign.cron, "%Y-%m-%dT%H:%M"
    if campaign.every_n_days:
        at = campaign.starts_at.astimezone(tz) if campaign.starts_at else None
        return (f"{at.minute} {at.hour} * * *" if at else "0 0 * * *"), "%Y-%m-%d"
    return None


def occurrence_due(expr: str, anchor: datetime, now: datetime, tz: tzinfo) -> datetime | None:
    """The latest occurrence of cron `expr` (in `tz`) at or before `now` that comes after
    `anchor`, or None. Only the latest: runs missed while no manager ran are not sent in a
    burst. ValueError for a bad expression."""
    from croniter import croniter

    if not croniter.is_valid(expr):
        raise ValueError(f"{expr!r} is not a cron expression")
    following = croniter(expr, anchor.astimezone(tz)).get_next(datetime)
    if following > now:
        return None
    # get_prev from an instant that is itself an occurrence skips it: start just after now
    latest = croniter(expr, (now + timedelta(seconds=1)).astimezone(tz)).get_prev(datetime)
    return max(latest, following).astimezone(UTC)


def create_recurring(conn: Connection, now: datetime, tz: tzinfo) -> list[int]:
    """New ready instances for the due occurrences of running recurring campaigns (one per
    main message). Returns the ids created; an occurrence another manager created already
    is skipped by the unique (message_id, run_key)."""
    created: list[int] = []
    campaigns = conn.execute(select(Campaign).where(
        Campaign.kind == "recurring", Campaign.status == "running")).all()
    for campaign in campaigns:
        schedule = _cron_of(campaign, tz)
        if schedule is None or (campaign.starts_at and campaign.starts_at > now):
            continue
        expr, key_format = schedule
        for (message_id,) in conn.execute(select(Message.id).where(
                Message.campaign_id == campaign.id, Message.kind == "main")):
            last = conn.execute(select(func.max(MessageInstance.scheduled_at))
                                .where(MessageInstance.message_id == message_id)).scalar()
            # the first run may fall on starts_at itself; later ones come after the last run
            anchor = last or (campaign.starts_at or campaign.created_at) - timedelta(seconds=1)
            try:
                occurrence = occurrence_due(expr, anchor, now, tz)
            except ValueError as exc:
                _warn_once(campaign, str(exc))
                continue
            if occurrence is None or (campaign.ends_at and occurrence >= campaign.ends_at):
                continue
            instance_id = _insert_occurrence(conn, message_id,
                                             occurrence.astimezone(tz).strftime(key_format),
                                             occurrence, now)
            if instance_id:
                created.append(instance_id)
    return created


_WARNED: set[tuple[int, str]] = set()


def _warn_once(campaign: Any, error: str) -> None:
    """A bad schedule is logged once per process, not once per poll."""
    if (campaign.id, error) not in _WARNED:
        _WARNED.add((campaign.id, error))
        log.get(campaign=campaign.name).warning("recurring campaign not scheduled", error=error)


def _insert_occurrence(conn: Connection, message_id: int, run_key: str, at: datetime,
                       now: datetime) -> int | None:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
    stmt = (dialect_insert(MessageInstance)
            .values(message_id=message_id, run_key=run_key, status="ready", scheduled_at=at,
                    created_at=now)
            .on_conflict_do_nothing(index_elements=["message_id", "run_key"])
            .returning(MessageInstance.id))
    return conn.execute(stmt).scalar()
