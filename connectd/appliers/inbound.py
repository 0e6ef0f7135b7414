"""Appliers of the processor's records (issue 5, the way back): bounces, complaints, subscribe
requests, replies, attributes and events set by reply handlers, and one fact per processed
message. (Unsubscribe replies are customer.unsubscribed records with via "mail":
connectd.appliers.engagement applies them.)

Customer DB:
- `mail.bounced`: one `bounces` row per record (keyed by the record id: a record applied twice
  is one bounce); customer_stats hard/soft counters and the last bounce (time, reason: taken
  from `bounces`, so a late record never hides a newer one). A hard bounce bounces the
  customer out of every conversation: each existing conversation gets a bounced_out
  subscription (inserted where there was none, so a later subscriber import into any of them
  keeps the customer out: connectd.conversations.PROTECTED). Soft bounces bounce the customer
  out when processor.soft_bounce_limit of them fall within processor.soft_bounce_days, counting
  only those after the customer's last open or click by a person (customer_stats, kept by the
  tracker appliers) and after their last bounce-out. Judged at each new soft bounce's time,
  from stored history, so batch boundaries never change the verdict. An opted-out
  subscription stays opted out (the customer's own word). customer_stats.bounced_out_at says
  when. A bounce without a customer is looked up by its address (lower case); an address
  nobody has is skipped here (logged) and counted in the report DB (mail.processed).
- `mail.complained`: opted_out of every conversation (as above), complaint count and time.
- `customer.subscribed`: the customer (created from the address when unknown) and the
  conversation (an id, a name, or the instance's campaign's): unconfirmed -> opting_in, only
  where the customer has no subscription yet; confirmed -> active, whatever it was (the
  customer confirmed from their own mailbox), unless changed after the record's time.
- `mail.replied`: the customer's history (customer_replies) and, for replies by a person
  (not auto-replies), customer_stats reply_count and last_reply_at.
- `customer.attribute_set`: the attribute, typed by attribute_defs (connectd.core.attributes);
  an attribute that is not defined, or a value not of its type, is refused (the record is
  shunted); a null value removes the attribute.
- `event.triggered`: a customer_events row (what event-triggered campaigns look for).
Subscription changes carry the record's ts as changed_at and never overwrite a change made at
a later time (a re-subscription, an import with force): a record applied late never undoes a
later decision, as in connectd.appliers.engagement.

Report DB:
- `mail.processed`: inbound_messages (one row per message, keyed by its store name, so a
  message is counted once) and inbound_totals per instance (0: no context), kind and handler,
  bounces split hard/soft.
- `mail.bounced`, `mail.complained`, `mail.replied` (people's) with an instance and a
  customer: message_facts bounced_at/bounce_kind (hard wins), complained_at, reply_count/
  last_reply_at; event_totals per instance and segment (total, and uniques: customers whose
  fact had no such event yet) for mail.bounced, mail.complained, mail.replied.
- `event.triggered`: trigger_counts per name and instance.

Settings: the soft-bounce rule reads `cache["settings"]` (the profiler puts its Settings in
every consumer's cache); without it, Connect's defaults (5 in 30 days). Inbound volumes are
small next to clicks: these appliers favour clarity (SQLAlchemy Core statements, one per
table and run, executemany) over the hand-written driver SQL of the click path.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite

from connectd import log
from connectd.appliers import applies, hits
from connectd.appliers.engagement import SUBSCRIPTION_SOURCES, instance_conversations
from connectd.appliers.sql import db_time, upsert
from connectd.core import attributes as attrs
from connectd.db.customer import (
    AttributeDef,
    Bounce,
    Conversation,
    Customer,
    CustomerEvent,
    CustomerReply,
    CustomerStats,
    Subscription,
)
from connectd.db.report import (
    NO_SEGMENT,
    EventTotal,
    InboundMessage,
    InboundTotal,
    MessageFact,
    TriggerCount,
)
from connectd.records import (
    CustomerAttributeSet,
    CustomerSubscribed,
    EventTriggered,
    MailBounced,
    MailComplained,
    MailProcessed,
    MailReplied,
)

BOUNCED = "mail.bounced"
COMPLAINED = "mail.complained"
REPLIED = "mail.replied"
# defaults of processor.soft_bounce_limit / soft_bounce_days (Connect's: 5 in 30 days)
SOFT_BOUNCE_LIMIT = 5
SOFT_BOUNCE_DAYS = 30.0
# classifier kinds of a mail.replied that no person wrote: history, but not a reply
NOT_A_PERSON = frozenset({"autoreply", "delivered"})

_stats = CustomerStats.__table__
_subs = Subscription.__table__
_bounces = Bounce.__table__
_replies = CustomerReply.__table__
_events = CustomerEvent.__table__
_facts = MessageFact.__table__
_totals = EventTotal.__table__
_inbound = InboundMessage.__table__
_inbound_totals = InboundTotal.__table__
_triggers = TriggerCount.__table__

_log = log.get(daemon="profiler", applier="inbound")


# --- shared ---------------------------------------------------------------------------------

def _dt(ts: str) -> datetime:
    """A record ts (validated by the consumer) as an aware datetime."""
    return datetime.fromisoformat(ts)


def _insert(conn: Connection, table: Table) -> Any:
    """The dialect's INSERT (both have on_conflict_do_nothing/do_update)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def _insert_new(conn: Connection, table: Table, rows: list[dict[str, Any]], key: str) -> set:
    """Insert `rows`, skipping keys already stored; the keys actually inserted (what makes
    counters applied from them idempotent on the key)."""
    if not rows:
        return set()
    stmt = _insert(conn, table).on_conflict_do_nothing(index_elements=[key]) \
        .returning(table.c[key])
    return set(conn.execute(stmt, rows).scalars())


def soft_bounce_rule(cache: dict[str, Any]) -> tuple[int, timedelta]:
    """(processor.soft_bounce_limit, processor.soft_bounce_days as a timedelta) from the
    Settings the profiler put in the consumer's cache, else the defaults."""
    settings = cache.get("settings")
    if settings is None:
        return SOFT_BOUNCE_LIMIT, timedelta(days=SOFT_BOUNCE_DAYS)
    p = settings.processor
    return max(1, p.soft_bounce_limit), timedelta(days=p.soft_bounce_days)


def _by_address(conn: Connection, addresses: Iterable[str]) -> dict[str, int]:
    """email_key -> customer id for the (lower-cased) addresses that have a customer."""
    keys = sorted({attrs.email_key(a) for a in addresses if a.strip()})
    found: dict[str, int] = {}
    for start in range(0, len(keys), 500):
        found.update(conn.execute(select(Customer.email_key, Customer.id)
                                  .where(Customer.email_key.in_(keys[start:start + 500]))).all())
    return found


def _resolve(conn: Connection, records: list[Any]) -> list[tuple[Any, int]]:
    """(record, customer id) for the records whose customer is given or found by address;
    the others (an address nobody has) are left out and logged."""
    found = _by_address(conn, [r.address for r in records if r.customer is None])
    out: list[tuple[Any, int]] = []
    unknown = 0
    for r in records:
        c = r.customer if r.customer is not None else found.get(attrs.email_key(r.address))
        if c is None:
            unknown += 1
            continue
        out.append((r, c))
    if unknown:
        _log.info("records for addresses of no customer skipped", type=type(records[0]).__name__,
                  count=unknown)
    return out


def _latest(rows: Iterable[tuple[int, str, str]]) -> dict[int, tuple[str, str]]:
    """customer -> (the latest ts, its source) of (customer, ts, source) rows."""
    out: dict[int, tuple[str, str]] = {}
    for c, ts, source in rows:
        if c not in out or out[c][0] <= ts:
            out[c] = (ts, source)
    return out


def set_everywhere(conn: Connection, who: dict[int, tuple[str, str]], status: str,
                   keep: tuple[str, ...] = ()) -> None:
    """Give each customer of `who` (customer -> (ts, source)) `status` in every conversation
    there is: inserted where they had no subscription, updated where they had one that was
    changed at or before ts and is not in `keep`."""
    if not who:
        return
    conversations = conn.execute(select(Conversation.id)).scalars().all()
    rows = [{"customer_id": c, "conversation_id": v, "status": status, "changed_at": _dt(ts),
             "source": source[:32]} for c, (ts, source) in who.items() for v in conversations]
    if not rows:
        return
    ins = _insert(conn, _subs)
    guard = _subs.c.changed_at <= ins.excluded.changed_at
    for status_kept in keep:  # literals: an expanding IN cannot go with executemany
        guard = guard & (_subs.c.status != literal_column(f"'{status_kept}'"))
    conn.execute(ins.on_conflict_do_update(
        index_elements=["customer_id", "conversation_id"],
        set_={"status": ins.excluded.status, "changed_at": ins.excluded.changed_at,
              "source": ins.excluded.source}, where=guard), rows)


# --- bounces --------------------------------------------------------------------------------

@applies(MailBounced, db="customer")
def bounces_to_profiles(conn: Connection, records: list[MailBounced],
                        cache: dict[str, Any]) -> None:
    found = _resolve(conn, records)
    new = _insert_new(conn, _bounces, [
        {"record_id": r.id, "customer_id": c, "bounced_at": _dt(r.ts), "hard": r.hard,
         "reason": r.reason[:64], "status": (r.status or None) and r.status[:16],
         "instance_id": r.instance, "message": r.message[:255]} for r, c in found], "record_id")
    fresh = [(r, c) for r, c in found if r.id in new]
    if not fresh:
        return
    counts: dict[int, list[int]] = {}
    for r, c in fresh:
        counts.setdefault(c, [0, 0])[0 if r.hard else 1] += 1
    upsert(conn, _stats, ("customer_id", "hard_bounce_count", "soft_bounce_count"),
           [(c, h, s) for c, (h, s) in counts.items()],
           keys=("customer_id",), add=("hard_bounce_count", "soft_bounce_count"))
    _last_bounces(conn, set(counts))
    # record timestamps (one spelling: text order is time order); a customer's latest counts
    hard = {c: r.ts for r, c in sorted(fresh, key=lambda x: x[0].ts) if r.hard}
    out = _soft_outs(conn, [(r, c) for r, c in fresh if not r.hard], hard, cache)
    for c, ts in hard.items():
        out[c] = max(out.get(c, ts), ts)
    if not out:
        return
    dialect = conn.dialect.name
    stamps = {c: db_time(dialect, ts) for c, ts in out.items()}
    set_everywhere(conn, {c: (ts, "bounce") for c, ts in stamps.items()}, "bounced_out",
                   keep=("opted_out",))
    upsert(conn, _stats, ("customer_id", "bounced_out_at"), list(stamps.items()),
           keys=("customer_id",), greatest=("bounced_out_at",))


def _last_bounces(conn: Connection, customers: set[int]) -> None:
    """customer_stats.last_bounce_at/reason from the customers' newest stored bounce (a late
    record never replaces a newer bounce's reason)."""
    b = _bounces.alias("b")
    newest = select(_bounces.c.record_id).where(_bounces.c.customer_id == _stats.c.customer_id) \
        .order_by(_bounces.c.bounced_at.desc(), _bounces.c.record_id.desc()).limit(1) \
        .scalar_subquery()
    ids = sorted(customers)
    for start in range(0, len(ids), 500):
        conn.execute(_stats.update().where(_stats.c.customer_id.in_(ids[start:start + 500]))
                     .values(last_bounce_at=select(b.c.bounced_at).where(
                                 b.c.record_id == newest).scalar_subquery(),
                             last_bounce_reason=select(b.c.reason).where(
                                 b.c.record_id == newest).scalar_subquery()))


def _soft_outs(conn: Connection, soft: list[tuple[MailBounced, int]],
               hard: dict[int, str], cache: dict[str, Any]) -> dict[int, str]:
    """customer -> the ts of the latest of these new soft bounces that completed the rule
    (limit soft bounces within the window, none before the customer's last person open or
    click or bounce-out, this run's hard bounce-outs included)."""
    if not soft:
        return {}
    limit, window = soft_bounce_rule(cache)
    customers = sorted({c for _, c in soft})
    since = min(_dt(r.ts) for r, _ in soft) - window
    history: dict[int, list[datetime]] = {}
    resets: dict[int, datetime] = {}
    for start in range(0, len(customers), 500):
        part = customers[start:start + 500]
        for c, t in conn.execute(select(_bounces.c.customer_id, _bounces.c.bounced_at).where(
                _bounces.c.customer_id.in_(part), _bounces.c.hard.is_(False),
                _bounces.c.bounced_at > since)):
            history.setdefault(c, []).append(t)
        for c, *stamps in conn.execute(select(
                _stats.c.customer_id, _stats.c.last_open_at, _stats.c.last_click_at,
                _stats.c.bounced_out_at).where(_stats.c.customer_id.in_(part))):
            known = [t for t in stamps if t is not None]
            if known:
                resets[c] = max(known)
    out: dict[int, str] = {}
    for r, c in sorted(soft, key=lambda x: x[0].ts):
        t = _dt(r.ts)
        # this run's hard bounce-out resets the count too, when it came first
        before = _dt(hard[c]) if c in hard and hard[c] <= r.ts else None
        earlier_out = _dt(out[c]) if c in out else None
        reset = max((x for x in (resets.get(c), earlier_out, before) if x is not None),
                    default=None)
        counted = [x for x in history.get(c, ()) if t - window < x <= t
                   and (reset is None or x > reset)]
        if len(counted) >= limit:
            out[c] = r.ts  # bounced out now: the count starts again after this
    return out


@applies(MailBounced, db="report")
def bounces_to_facts(conn: Connection, records: list[MailBounced],
                     cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    mine = [r for r in records if r.instance is not None]
    first: dict[tuple[int, int], list[str]] = {}  # (instance, customer) -> [ts, kind]
    for r in mine:
        if r.customer is None:
            continue
        kind = "hard" if r.hard else "soft"
        f = first.setdefault((r.instance, r.customer), [r.ts, kind])  # type: ignore[arg-type]
        f[0], f[1] = min(f[0], r.ts), min(f[1], kind)
    known = hits.lookup(conn, "message_facts", ("segment_id", "bounced_at"), set(first))
    # bounce_kind by least(): "hard" < "soft", so a hard bounce is never turned soft
    upsert(conn, _facts, ("instance_id", "customer_id", "open_count", "bounced_at", "bounce_kind"),
           [(i, c, 0, db_time(dialect, ts), kind) for (i, c), (ts, kind) in first.items()],
           keys=("instance_id", "customer_id"), least=("bounced_at", "bounce_kind"))
    _event_totals(conn, BOUNCED, [(r.instance, r.customer, r.ts) for r in mine], known)


def _event_totals(conn: Connection, event: str,
                  events: list[tuple[int, int | None, str]],
                  known: dict[tuple[int, int], tuple]) -> None:
    """event_totals of `event` per instance and segment from (instance, customer, ts):
    totals, and uniques for customers whose fact row had no such event before the run
    (`known`: (instance, customer) -> (segment_id, the event's column) as stored)."""
    if not events:
        return
    dialect = conn.dialect.name
    totals: dict[tuple[int, int], list[Any]] = {}
    seen: set[tuple[int, int]] = set()
    for i, c, ts in events:
        before = known.get((i, c)) if c is not None else None
        seg = before[0] if before and before[0] is not None else NO_SEGMENT
        t = totals.setdefault((i, seg), [0, 0, ts, ts])
        t[0] += 1
        t[2], t[3] = min(t[2], ts), max(t[3], ts)
        if c is not None and (i, c) not in seen and not (before and before[1]):
            seen.add((i, c))
            t[1] += 1
    upsert(conn, _totals, ("instance_id", "segment_id", "event", "total", "uniques", "first_at",
                           "last_at"),
           [(i, seg, event, n, u, db_time(dialect, f), db_time(dialect, la))
            for (i, seg), (n, u, f, la) in totals.items()],
           keys=("instance_id", "segment_id", "event"), add=("total", "uniques"),
           least=("first_at",), greatest=("last_at",))


# --- complaints -----------------------------------------------------------------------------

@applies(MailComplained, db="customer")
def complaints_to_profiles(conn: Connection, records: list[MailComplained],
                           cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    found = _resolve(conn, records)
    if not found:
        return
    counts: dict[int, int] = {}
    for _, c in found:
        counts[c] = counts.get(c, 0) + 1
    latest = _latest((c, db_time(dialect, r.ts), "complaint") for r, c in found)
    upsert(conn, _stats, ("customer_id", "complaint_count", "last_complaint_at"),
           [(c, n, latest[c][0]) for c, n in counts.items()],
           keys=("customer_id",), add=("complaint_count",), greatest=("last_complaint_at",))
    # "this is spam" outranks every status, bounced_out included
    set_everywhere(conn, latest, "opted_out")


@applies(MailComplained, db="report")
def complaints_to_facts(conn: Connection, records: list[MailComplained],
                        cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    mine = [r for r in records if r.instance is not None]
    first: dict[tuple[int, int], str] = {}
    for r in mine:
        if r.customer is not None:
            key = (r.instance, r.customer)
            first[key] = min(first.get(key, r.ts), r.ts)  # type: ignore[index]
    known = hits.lookup(conn, "message_facts", ("segment_id", "complained_at"), set(first))
    upsert(conn, _facts, ("instance_id", "customer_id", "open_count", "complained_at"),
           [(i, c, 0, db_time(dialect, ts)) for (i, c), ts in first.items()],
           keys=("instance_id", "customer_id"), least=("complained_at",))
    _event_totals(conn, COMPLAINED, [(r.instance, r.customer, r.ts) for r in mine], known)


# --- subscribe requests ---------------------------------------------------------------------

def _subscribers(conn: Connection, records: list[CustomerSubscribed]) -> dict[str, int]:
    """record id -> customer id; customers not known by their address are created."""
    wanted: dict[str, tuple[str, str]] = {}  # email_key -> (address as given, first ts)
    for r in records:
        if r.customer is not None:
            continue
        address = r.address.strip()
        if not attrs.is_plausible_email(address):
            raise ValueError(f"customer.subscribed without a customer and with no usable "
                             f"address: {r.address!r}")
        key = attrs.email_key(address)
        if key not in wanted or r.ts < wanted[key][1]:
            wanted[key] = (address, r.ts)
    found = _by_address(conn, wanted)
    missing = [{"email": a, "email_key": k, "attributes": {}, "created_at": _dt(ts),
                "updated_at": _dt(ts)} for k, (a, ts) in wanted.items() if k not in found]
    if missing:
        conn.execute(_insert(conn, Customer.__table__)
                     .on_conflict_do_nothing(index_elements=["email_key"]), missing)
        found = _by_address(conn, wanted)
    return {r.id: r.customer if r.customer is not None
            else found[attrs.email_key(r.address)] for r in records}


def _subscribe_conversations(conn: Connection, records: list[CustomerSubscribed],
                             cache: dict[str, Any]) -> dict[str, int]:
    """record id -> conversation id: given, by name, or the instance's campaign's."""
    names = sorted({r.conversation for r in records if isinstance(r.conversation, str)})
    by_name = dict(conn.execute(select(Conversation.name, Conversation.id)
                                .where(Conversation.name.in_(names))).all()) if names else {}
    by_instance = instance_conversations(
        conn, {r.instance for r in records if r.conversation is None and r.instance is not None},
        cache)
    out: dict[str, int] = {}
    for r in records:
        if isinstance(r.conversation, int):
            out[r.id] = r.conversation  # an id nobody has fails its foreign key: shunted
        elif isinstance(r.conversation, str):
            if r.conversation not in by_name:
                raise ValueError(f"no conversation named {r.conversation!r}")
            out[r.id] = by_name[r.conversation]
        elif r.instance is not None and r.instance in by_instance:
            out[r.id] = by_instance[r.instance]
        else:
            raise ValueError(f"customer.subscribed to no conversation (instance {r.instance} "
                             "has none)")
    return out


@applies(CustomerSubscribed, db="customer")
def subscribes_to_subscriptions(conn: Connection, records: list[CustomerSubscribed],
                                cache: dict[str, Any]) -> None:
    customers = _subscribers(conn, records)
    conversations = _subscribe_conversations(conn, records, cache)
    asked: dict[tuple[int, int], tuple[str, str]] = {}  # -> earliest (ts, source)
    confirmed: dict[tuple[int, int], tuple[str, str]] = {}  # -> latest (ts, source)
    for r in records:
        key = (customers[r.id], conversations[r.id])
        source = SUBSCRIPTION_SOURCES.get(r.via, r.via or "reply")[:32]
        if r.confirmed:
            if key not in confirmed or confirmed[key][0] <= r.ts:
                confirmed[key] = (r.ts, source)
        elif key not in asked or r.ts < asked[key][0]:
            asked[key] = (r.ts, source)
    if asked:  # opting in where there was nothing; any status there is stays
        conn.execute(_insert(conn, _subs).on_conflict_do_nothing(
            index_elements=["customer_id", "conversation_id"]),
            [{"customer_id": c, "conversation_id": v, "status": "opting_in",
              "changed_at": _dt(ts), "source": s} for (c, v), (ts, s) in asked.items()])
    if confirmed:
        ins = _insert(conn, _subs)
        conn.execute(ins.on_conflict_do_update(
            index_elements=["customer_id", "conversation_id"],
            set_={"status": ins.excluded.status, "changed_at": ins.excluded.changed_at,
                  "source": ins.excluded.source},
            where=_subs.c.changed_at <= ins.excluded.changed_at),
            [{"customer_id": c, "conversation_id": v, "status": "active",
              "changed_at": _dt(ts), "source": s} for (c, v), (ts, s) in confirmed.items()])


# --- replies --------------------------------------------------------------------------------

@applies(MailReplied, db="customer")
def replies_to_history(conn: Connection, records: list[MailReplied],
                       cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    new = _insert_new(conn, _replies, [
        {"record_id": r.id, "customer_id": r.customer, "replied_at": _dt(r.ts),
         "instance_id": r.instance, "kind": r.kind[:16], "handler": r.handler[:64],
         "subject": r.subject[:200], "message": r.message[:255], "forwarded": r.forwarded}
        for r in records], "record_id")
    people: dict[int, list[Any]] = {}
    for r in records:
        if r.id in new and r.kind not in NOT_A_PERSON:
            p = people.setdefault(r.customer, [0, r.ts])
            p[0] += 1
            p[1] = max(p[1], r.ts)
    upsert(conn, _stats, ("customer_id", "reply_count", "last_reply_at"),
           [(c, n, db_time(dialect, ts)) for c, (n, ts) in people.items()],
           keys=("customer_id",), add=("reply_count",), greatest=("last_reply_at",))


@applies(MailReplied, db="report")
def replies_to_facts(conn: Connection, records: list[MailReplied],
                     cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    mine = [r for r in records if r.instance is not None and r.kind not in NOT_A_PERSON]
    per: dict[tuple[int, int], list[Any]] = {}
    for r in mine:
        p = per.setdefault((r.instance, r.customer), [0, r.ts])  # type: ignore[arg-type]
        p[0] += 1
        p[1] = max(p[1], r.ts)
    known = hits.lookup(conn, "message_facts", ("segment_id", "reply_count"), set(per))
    upsert(conn, _facts, ("instance_id", "customer_id", "open_count", "reply_count",
                          "last_reply_at"),
           [(i, c, 0, n, db_time(dialect, ts)) for (i, c), (n, ts) in per.items()],
           keys=("instance_id", "customer_id"), add=("reply_count",),
           greatest=("last_reply_at",))
    _event_totals(conn, REPLIED, [(r.instance, r.customer, r.ts) for r in mine],  # type: ignore[misc]
                  known)


# --- attributes and events ------------------------------------------------------------------

_PATCH = {
    # a JSON merge patch: a null removes the attribute (RFC 7396 on SQLite; jsonb on PostgreSQL,
    # where stored attributes never hold nulls, so stripping them removes only the patched ones)
    "sqlite": "UPDATE customers SET attributes = json_patch(attributes, ?), updated_at = ? "
              "WHERE id = ?",
    "postgresql": "UPDATE customers SET attributes = jsonb_strip_nulls(attributes || "
                  "%s::jsonb), updated_at = %s::timestamptz WHERE id = %s",
}


@applies(CustomerAttributeSet, db="customer")
def attributes_to_profiles(conn: Connection, records: list[CustomerAttributeSet],
                           cache: dict[str, Any]) -> None:
    import orjson

    dialect = conn.dialect.name
    types = dict(conn.execute(select(AttributeDef.name, AttributeDef.type).where(
        AttributeDef.name.in_(sorted({r.name for r in records})))).all())
    ids = sorted({r.customer for r in records})
    known = set(conn.execute(select(Customer.id).where(Customer.id.in_(ids))).scalars())
    patches: dict[int, tuple[dict[str, Any], str]] = {}
    for r in records:  # stream order: a later value of the same attribute wins
        if r.name not in types:
            raise attrs.BadAttribute(f"no customer attribute {r.name!r} is defined")
        if r.customer not in known:
            raise ValueError(f"no customer {r.customer}")
        value = None if r.value is None else attrs.parse_value(
            types[r.name], attrs.format_value(r.value))  # BadAttribute: not of its type
        patch, ts = patches.setdefault(r.customer, ({}, r.ts))
        patch[r.name] = value
        patches[r.customer] = (patch, max(ts, r.ts))
    conn.exec_driver_sql(_PATCH[dialect], [
        (orjson.dumps(p).decode(), db_time(dialect, ts), c) for c, (p, ts) in patches.items()])


@applies(EventTriggered, db="customer")
def events_to_profiles(conn: Connection, records: list[EventTriggered],
                       cache: dict[str, Any]) -> None:
    for r in records:
        if not r.name or len(r.name) > 64:
            raise ValueError(f"event name must be 1 to 64 characters: {r.name!r}")
    _insert_new(conn, _events, [
        {"record_id": r.id, "name": r.name, "customer_id": r.customer,
         "instance_id": r.instance, "message": r.message[:255], "occurred_at": _dt(r.ts)}
        for r in records], "record_id")


@applies(EventTriggered, db="report")
def events_to_counts(conn: Connection, records: list[EventTriggered],
                     cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    counts: dict[tuple[str, int], list[Any]] = {}
    for r in records:
        if not r.name or len(r.name) > 64:
            raise ValueError(f"event name must be 1 to 64 characters: {r.name!r}")
        k = counts.setdefault((r.name, r.instance or 0), [0, r.ts, r.ts])
        k[0] += 1
        k[1], k[2] = min(k[1], r.ts), max(k[2], r.ts)
    upsert(conn, _triggers, ("name", "instance_id", "total", "first_at", "last_at"),
           [(n, i, t, db_time(dialect, f), db_time(dialect, la))
            for (n, i), (t, f, la) in counts.items()],
           keys=("name", "instance_id"), add=("total",), least=("first_at",),
           greatest=("last_at",))


# --- processed messages ---------------------------------------------------------------------

@applies(MailProcessed, db="report")
def processed_to_facts(conn: Connection, records: list[MailProcessed],
                       cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    new = _insert_new(conn, _inbound, [
        {"message": r.message[:255], "received_id": r.received[:64], "processed_at": _dt(r.ts),
         "kind": r.kind[:16], "handler": r.handler[:64], "actions": ",".join(r.actions)[:255],
         "instance_id": r.instance, "customer_id": r.customer,
         "context_via": (r.context_via or None) and r.context_via[:16], "hard": r.hard,
         "reason": (r.reason or None) and r.reason[:64],
         "status": (r.status or None) and r.status[:16], "recipients": len(r.recipients),
         "errors": len(r.errors)}
        for r in {r.message[:255]: r for r in reversed(records)}.values()], "message")
    totals: dict[tuple[int, str, str], list[Any]] = {}
    for r in records:
        if r.message[:255] not in new:
            continue  # a message processed twice (or a record applied again) counts once
        new.discard(r.message[:255])
        t = totals.setdefault((r.instance or 0, r.kind[:16], r.handler[:64]),
                              [0, 0, 0, r.ts, r.ts])
        t[0] += 1
        if r.kind == "bounce" and r.hard is not None:
            t[1 if r.hard else 2] += 1
        t[3], t[4] = min(t[3], r.ts), max(t[4], r.ts)
    upsert(conn, _inbound_totals, ("instance_id", "kind", "handler", "total", "hard", "soft",
                                   "first_at", "last_at"),
           [(i, k, h, n, hd, sf, db_time(dialect, f), db_time(dialect, la))
            for (i, k, h), (n, hd, sf, f, la) in totals.items()],
           keys=("instance_id", "kind", "handler"), add=("total", "hard", "soft"),
           least=("first_at",), greatest=("last_at",))

