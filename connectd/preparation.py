"""The manager's preparation step: a message instance -> its target list, in set-based SQL.

Inputs: a Connection to the customer DB, a message instance id, `now` (for `within` filters
and row timestamps). Outputs: rows in `targets` (one per instance and customer, status
pending) and a PrepResult with the rows added per segment (and per random-split part) and the
customers left out, by reason.

Who is targeted (DESIGN.md): the ACTIVE subscribers of the campaign's conversation -> the
campaign's audience filter (if any) -> the FIRST segment, by position, whose filter matches (a
Leftovers segment, always taken last whatever its position, catches everyone the others did
not; without one, customers matching no segment are not targeted; a campaign without segments
targets its whole audience, segment_id NULL) -> minus suppressed addresses (email_key equal to
an entry of kind "address"), suppressed domains (the part of email_key after the first "@"
equal to an entry of kind "domain"; subdomains are not included), customers this instance
already targets (so a second run adds nothing), and, when the campaign is kind "normal" (sent
once), customers holding a target of ANOTHER instance of the same message in any status but
"failed" (recurring, event and subscription campaigns mail again on every occurrence), and,
for a recurring campaign with `every_n_days`, customers holding a target (not failed) of
another instance of this campaign scheduled less than N days before this one (to the
nearest day; "recently_mailed"). Trial sends (messages of kind "trial") count for neither:
a test copy is not the campaign's mail; and a trial's instance is never prepared.
Suppression values are compared lower-cased, so entries in any case match.

A message with `segment_id` goes to that segment's customers only (first-match still decides
who belongs to it).

The SQL: one INSERT INTO targets ... SELECT per segment, in position order; segment i's SELECT
is "filter i and not (filter 1 or ... or filter i-1)", so a customer matching an earlier
segment but excluded there (suppressed, already mailed) never falls through to a later one.
All filters are compiled by connectd.segments (bound parameters, no SQL text).

Random splits (Segment.split, JSON): {"parts": 3} (equal thirds), {"percent": [50, 30, 20]},
{"percent": 10} (= [10, 90]: a 10% test group and the rest), or the strings "equal:3" and
"50,30,20"; optional "seed". A customer's part is a pure function of (customer id, seed), the
seed defaulting to the instance id: bucket = ((id mod P) * A + B) mod P mod 10,000, P the
prime 1,000,003, A (>= 100,000) and B derived from the seed by CRC-32: for each seed a
different permutation of the ids modulo P, spread evenly over the buckets, in integer
arithmetic that SQLite and PostgreSQL do alike (no hash function exists in both). It is
pseudo-random, not unpredictable: fine for A/B splits, not for anything adversarial. `targets` has no column for the part, so prepare
reports the counts per part and `split_part()` recomputes a customer's part for whoever needs
it (same formula, in Python).

Status: the instance goes ready -> preparing -> executing in the same transaction as the
inserts (the first UPDATE also locks the instance row on PostgreSQL, so two managers preparing
the same instance take turns); an instance already executing is prepared again idempotently.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    String,
    and_,
    case,
    exists,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from connectd import log
from connectd.core import filters as f
from connectd.db.customer import (
    Campaign,
    Customer,
    Message,
    MessageInstance,
    Segment,
    Subscription,
    SuppressionEntry,
    Target,
)
from connectd.db.types import UtcDateTime
from connectd.segments import compile_filter, load_types, source

PRIME = 1_000_003          # ids are taken modulo this prime; (id mod P) * A stays below 2**40
BUCKETS = 10_000           # split resolution: percentages to 0.01
PREPARABLE = ("ready", "preparing", "executing")
REPEATING_KINDS = ("recurring", "event", "subscribe", "unsubscribe")


@dataclass(frozen=True)
class PrepResult:
    """What one prepare() run did. `segments`: segment name -> rows added ("(all)" when the
    campaign has no segments); `splits`: segment name -> rows added per part; `excluded`:
    reason -> customers of the conversation left out this run (each counted once, under the
    first reason that applies, in the order of EXCLUSION_REASONS)."""

    instance_id: int
    segments: dict[str, int] = field(default_factory=dict)
    splits: dict[str, list[int]] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    total_targets: int = 0  # rows the instance has now, this run's and earlier ones
    seconds: float = 0.0

    @property
    def added(self) -> int:
        return sum(self.segments.values())


EXCLUSION_REASONS = ("opting_in", "opted_out", "bounced_out", "audience", "no_segment",
                     "other_segment", "suppressed_address", "suppressed_domain",
                     "already_targeted", "already_mailed", "recently_mailed")


# --- random splits ---------------------------------------------------------------------------

def split_parts(spec: Any) -> list[float] | None:
    """A split spec -> the parts' percentages (summing to 100), or None for no split."""
    if spec in (None, {}, ""):
        return None
    if isinstance(spec, str):
        spec = {"parts": int(spec.split(":", 1)[1])} if spec.startswith("equal:") \
            else {"percent": [float(p) for p in spec.split(",")]}
    if not isinstance(spec, dict):
        raise ValueError(f"bad split spec {spec!r}")
    if "parts" in spec:
        n = int(spec["parts"])
        if n < 1:
            raise ValueError(f"bad split spec {spec!r}: parts must be >= 1")
        return [100 / n] * n
    percent = spec.get("percent")
    if isinstance(percent, int | float):
        percent = [percent, 100 - percent]
    if not isinstance(percent, list) or not percent or any(p < 0 for p in percent) \
            or abs(sum(percent) - 100) > 1e-6:
        raise ValueError(f"bad split spec {spec!r}: percentages must add up to 100")
    return [float(p) for p in percent]


def split_seed(spec: Any, instance_id: int) -> tuple[int, int]:
    """The split's (multiplier, offset), derived from its "seed" (any JSON value), else from
    the instance id (a fresh random split per run). The multiplier changes with the seed, so
    two seeds give different permutations, not one permutation shifted."""
    seed = spec["seed"] if isinstance(spec, dict) and "seed" in spec else f"instance:{instance_id}"
    text = str(seed).encode()
    # at least 100,000: a small multiplier would leave consecutive ids in consecutive buckets
    multiplier = 100_000 + zlib.crc32(text) % (PRIME - 100_000)
    return multiplier, zlib.crc32(text + b"/offset") % PRIME


def _bounds(parts: Sequence[float]) -> list[int]:
    """Cumulative bucket upper bounds of the parts (the last one is BUCKETS)."""
    bounds, total = [], 0.0
    for p in parts:
        total += p
        bounds.append(round(total * BUCKETS / 100))
    bounds[-1] = BUCKETS
    return bounds


def split_part(customer_id: int, spec: Any, instance_id: int) -> int | None:
    """The 0-based split part of a customer, exactly as prepare() computes it in SQL."""
    parts = split_parts(spec)
    if parts is None:
        return None
    multiplier, offset = split_seed(spec, instance_id)
    bucket = ((customer_id % PRIME) * multiplier + offset) % PRIME % BUCKETS
    return next(i for i, bound in enumerate(_bounds(parts)) if bucket < bound)


def _part_expr(customer_id: Any, parts: Sequence[float],
               seed: tuple[int, int]) -> ColumnElement[int]:
    big = BigInteger()
    multiplier, offset = seed
    bucket = ((customer_id % literal(PRIME, big)) * literal(multiplier, big)
              + literal(offset, big)) % literal(PRIME, big) % literal(BUCKETS, big)
    bounds = _bounds(parts)
    return case(*((bucket < bound, i) for i, bound in enumerate(bounds[:-1])),
                else_=len(bounds) - 1)


# --- the conditions --------------------------------------------------------------------------

def _domain(email_key: Any, dialect: str) -> ColumnElement[str]:
    """The part of an address after its first '@' (instr on SQLite, strpos on PostgreSQL)."""
    position = func.strpos if dialect == "postgresql" else func.instr
    return func.substr(email_key, position(email_key, "@") + 1)


def _suppressed(kind: str) -> Any:
    # uncorrelated: both databases build the set once (an ephemeral index, a hashed subplan)
    # instead of probing suppression_entries once per customer
    return select(func.lower(SuppressionEntry.value)).where(SuppressionEntry.kind == kind)


@dataclass(frozen=True)
class _Plan:
    instance: Any
    message: Any
    campaign: Any
    segments: list[Any]  # in evaluation order: positions ascending, Leftovers last
    conditions: list[ColumnElement[bool]]  # each segment's own filter
    audience: ColumnElement[bool]


def _load(conn: Connection, instance_id: int, now: datetime) -> _Plan:
    instance = conn.execute(select(MessageInstance).where(
        MessageInstance.id == instance_id)).one_or_none()
    if instance is None:
        raise ValueError(f"no message instance {instance_id}")
    if instance.status not in PREPARABLE:
        raise ValueError(f"message instance {instance_id} is {instance.status}; only "
                         f"{', '.join(PREPARABLE)} instances are prepared")
    message = conn.execute(select(Message).where(Message.id == instance.message_id)).one()
    if message.kind == "trial":
        # its targets are exactly the addresses the trial named; preparing it would add the
        # whole audience to a test send
        raise ValueError(f"message instance {instance_id} is a trial send; trials are not "
                         "prepared")
    campaign = conn.execute(select(Campaign).where(Campaign.id == message.campaign_id)).one()
    if campaign.conversation_id is None:
        raise ValueError(f"campaign {campaign.name!r} has no conversation: nobody to target")
    types = load_types(conn)
    audience = compile_filter(f.parse(campaign.audience_filter), types, now) \
        if campaign.audience_filter else true()
    rows = conn.execute(select(Segment).where(Segment.campaign_id == campaign.id)
                        .order_by(Segment.is_leftovers, Segment.position)).all()
    conditions: list[ColumnElement[bool]] = []
    for seg in rows:
        if seg.is_leftovers:
            conditions.append(true())
        elif seg.filter_expr and seg.filter_expr.strip():
            conditions.append(compile_filter(f.parse(seg.filter_expr), types, now))
        else:
            conditions.append(true())  # a segment without a filter takes everyone left
    return _Plan(instance, message, campaign, list(rows), conditions, audience)


def _first_match(plan: _Plan, i: int) -> ColumnElement[bool]:
    """Segment i's customers: its filter and none of the earlier ones (first match wins)."""
    earlier = plan.conditions[:i]
    return and_(plan.conditions[i], not_(or_(*earlier))) if earlier else plan.conditions[i]


def _in_any_segment(plan: _Plan) -> ColumnElement[bool]:
    return or_(*plan.conditions) if plan.conditions else true()


def _in_message_segment(plan: _Plan) -> ColumnElement[bool]:
    """Belongs to the segment the message is limited to (true when it is not limited)."""
    if plan.message.segment_id is None or not plan.segments:
        return true()
    for i, seg in enumerate(plan.segments):
        if seg.id == plan.message.segment_id:
            return _first_match(plan, i)
    return false()


def _exclusions(plan: _Plan, dialect: str) -> list[tuple[str, ColumnElement[bool]]]:
    """(reason, condition) in the order they are counted; a target must meet none."""
    instance_id = plan.instance.id
    found = [
        ("suppressed_address", Customer.email_key.in_(_suppressed("address"))),
        ("suppressed_domain", _domain(Customer.email_key, dialect).in_(_suppressed("domain"))),
        # correlated on purpose: one probe of the (instance_id, customer_id) unique index
        ("already_targeted", exists().where(Target.instance_id == instance_id,
                                            Target.customer_id == Customer.id)),
    ]
    if plan.campaign.kind not in REPEATING_KINDS:
        mailed = (select(Target.customer_id)
                  .join(MessageInstance, MessageInstance.id == Target.instance_id)
                  .where(MessageInstance.message_id == plan.message.id,
                         MessageInstance.id != instance_id, Target.status != "failed"))
        found.append(("already_mailed", Customer.id.in_(mailed)))
    if plan.campaign.kind == "recurring" and plan.campaign.every_n_days:
        found.append(("recently_mailed", Customer.id.in_(_recently_mailed(plan))))
    return found


# Days are counted between the runs' scheduled times, to the nearest day: daily runs of
# every_n_days drift by the poll delay and by an hour across a DST change, and a customer
# due after exactly N days must not be pushed to N+1 by that.
_DAY_SLACK = timedelta(hours=12)


def _recently_mailed(plan: _Plan) -> Any:
    """Customers holding a target (not failed) of another instance of this campaign that was
    scheduled less than every_n_days before this one: "every N days since this customer's
    last message" (a target's age is its instance's scheduled time)."""
    cutoff = (plan.instance.scheduled_at - timedelta(days=plan.campaign.every_n_days)
              + _DAY_SLACK)
    return (select(Target.customer_id)
            .join(MessageInstance, MessageInstance.id == Target.instance_id)
            .join(Message, Message.id == MessageInstance.message_id)
            .where(Message.campaign_id == plan.campaign.id, Message.kind != "trial",
                   MessageInstance.id != plan.instance.id, Target.status != "failed",
                   MessageInstance.scheduled_at > literal(cutoff, UtcDateTime())))


def _subscribers(plan: _Plan, status: str | None = "active") -> Any:
    """customers LEFT JOIN customer_stats JOIN their subscription to the conversation."""
    on = [Subscription.customer_id == Customer.id,
          Subscription.conversation_id == plan.campaign.conversation_id]
    if status is not None:
        on.append(Subscription.status == status)
    return source().join(Subscription.__table__, and_(*on))


# --- the steps -------------------------------------------------------------------------------

def _set_status(conn: Connection, instance_id: int, status: str, now: datetime) -> None:
    conn.execute(update(MessageInstance).where(MessageInstance.id == instance_id)
                 .values(status=status,
                         started_at=func.coalesce(MessageInstance.started_at,
                                                  literal(now, UtcDateTime()))))


def _count_excluded(conn: Connection, plan: _Plan,
                    exclusions: list[tuple[str, ColumnElement[bool]]]) -> dict[str, int]:
    """Customers of the conversation who will not be targeted this run, by first reason."""
    excluded: dict[str, int] = {}
    inactive = (select(Subscription.status, func.count())
                .where(Subscription.conversation_id == plan.campaign.conversation_id,
                       Subscription.status != "active")
                .group_by(Subscription.status))
    for status, n in conn.execute(inactive):
        excluded[status] = int(n)
    reason = case(
        (not_(plan.audience), literal("audience", String())),
        (not_(_in_any_segment(plan)), literal("no_segment", String())),
        (not_(_in_message_segment(plan)), literal("other_segment", String())),
        *((cond, literal(name, String())) for name, cond in exclusions),
        else_=literal("", String()))
    labelled = select(reason.label("reason")).select_from(_subscribers(plan)).subquery()
    query = select(labelled.c.reason, func.count()).group_by(labelled.c.reason)
    for name, n in conn.execute(query):
        if name:
            excluded[name] = int(n)
    return {name: excluded[name] for name in EXCLUSION_REASONS if excluded.get(name)}


def _insert(conn: Connection, plan: _Plan, segment_id: int | None,
            belongs: ColumnElement[bool], keep_out: ColumnElement[bool], now: datetime) -> None:
    """INSERT INTO targets SELECT the segment's customers."""
    rows = (select(literal(plan.instance.id, BigInteger()), Customer.id,
                   literal(segment_id, BigInteger()), literal("pending", String()),
                   literal(now, UtcDateTime()))
            .select_from(_subscribers(plan))
            .where(plan.audience, belongs, not_(keep_out)))
    stmt = insert(Target).from_select(
        ["instance_id", "customer_id", "segment_id", "status", "updated_at"], rows)
    conn.execute(stmt)


def _added(conn: Connection, instance_id: int, since_id: int) -> dict[int | None, int]:
    """segment id -> rows added this run (ids above since_id). Counted, not taken from the
    INSERTs' rowcount: psycopg reports -1 for INSERT ... SELECT through SQLAlchemy."""
    return {seg: int(n) for seg, n in conn.execute(
        select(Target.segment_id, func.count())
        .where(Target.instance_id == instance_id, Target.id > since_id)
        .group_by(Target.segment_id))}


def _split_counts(conn: Connection, instance_id: int, segment_id: int, parts: list[float],
                  seed: tuple[int, int], since_id: int) -> list[int]:
    """Rows added for the segment this run (ids above since_id), per split part."""
    part = _part_expr(Target.customer_id, parts, seed).label("part")
    found = dict(conn.execute(
        select(part, func.count()).where(Target.instance_id == instance_id,
                                         Target.segment_id == segment_id, Target.id > since_id)
        .group_by(part)).all())
    return [int(found.get(i, 0)) for i in range(len(parts))]


def prepare(conn: Connection, instance_id: int, now: datetime) -> PrepResult:
    """Write the target list of message instance `instance_id` (see the module docstring).

    Runs in the connection's open transaction if there is one (the caller commits), else in
    its own; on SQLite pass a connection of connectd.db.engine.writer(engine) so the write
    lock is taken up front. ValueError for an unknown instance, one not ready/preparing/
    executing, a campaign without a conversation, a bad split spec; FilterError for a bad
    audience or segment filter (nothing is written then)."""
    if conn.in_transaction():
        return _prepare(conn, instance_id, now)
    with conn.begin():
        return _prepare(conn, instance_id, now)


def _prepare(conn: Connection, instance_id: int, now: datetime) -> PrepResult:
    started = time.perf_counter()
    plan = _load(conn, instance_id, now)
    # always written (an executing instance passes through preparing again, unseen outside
    # this transaction): on PostgreSQL the row lock makes a second preparer wait here, before
    # it reads which targets exist
    _set_status(conn, instance_id, "preparing", now)
    dialect = conn.dialect.name
    exclusions = _exclusions(plan, dialect)
    keep_out = or_(*(cond for _, cond in exclusions))
    excluded = _count_excluded(conn, plan, exclusions)
    since_id = conn.execute(select(func.coalesce(func.max(Target.id), 0))).scalar_one()
    chosen = [(i, seg) for i, seg in enumerate(plan.segments)
              if plan.message.segment_id is None or seg.id == plan.message.segment_id]
    for _, seg in chosen:
        split_parts(seg.split)  # a bad spec refuses the whole run before anything is written
    if not plan.segments:
        _insert(conn, plan, None, true(), keep_out, now)
    for i, seg in chosen:
        _insert(conn, plan, seg.id, _first_match(plan, i), keep_out, now)
    added = _added(conn, instance_id, since_id)
    segments = {seg.name: added.get(seg.id, 0) for _, seg in chosen} if plan.segments \
        else {"(all)": added.get(None, 0)}
    splits: dict[str, list[int]] = {}
    for _, seg in chosen:
        parts = split_parts(seg.split)
        if parts is not None:
            splits[seg.name] = _split_counts(conn, instance_id, seg.id, parts,
                                             split_seed(seg.split, instance_id), since_id)
    total = conn.execute(select(func.count()).select_from(Target)
                         .where(Target.instance_id == instance_id)).scalar_one()
    conn.execute(update(MessageInstance).where(MessageInstance.id == instance_id)
                 .values(status="executing", target_count=total))
    result = PrepResult(instance_id, segments, splits, excluded, int(total),
                        round(time.perf_counter() - started, 3))
    log.get(campaign=plan.campaign.name).info(
        "instance.prepared", instance=instance_id, added=result.added, total=result.total_targets,
        segments=segments, excluded=excluded, seconds=result.seconds)
    return result
