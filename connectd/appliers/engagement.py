"""Appliers of the tracker's other records: opens, unsubscribes, conversions.

`message.opened` (judged person or machine first: the tracker's mark, then "soon after the
send", connectd.appliers.hits):
- customer DB: people's opens only into customer_stats (open_count, last_open_at): Apple
  Mail Privacy Protection and image proxies open every mail and say nothing about the person;
  nor do opens of trial sends (test copies).
- report DB: one open_facts row per open (machine, why); message_facts open_count /
  machine_open_count and people's first/last open; hourly_counts and event_totals (per
  segment) with total and unique figures for people and for machines (a customer is a new
  unique when message_facts' count of that kind was 0 before the run).

`customer.unsubscribed`:
- customer DB: scope "conversation": the subscription of the customer to the conversation
  given, or else the conversation of the instance's campaign, becomes opted_out (inserted if
  there was none); scope "all", or a conversation that cannot be found (an instance of a
  campaign outside any conversation): every subscription of the customer becomes opted_out.
  changed_at takes the record's ts, and a subscription changed at or after that time (a
  re-subscription by import or in the web) is left alone: a record replayed late never
  undoes a later decision.
- report DB: message_facts.unsubscribed_at (the first) and event_totals (per segment; uniques:
  customers whose unsubscribed_at was unset).

`conversion.recorded`, counted once per order id (conversion_orders: an order seen before is
passed over; without an order id every call counts):
- report DB: message_facts conversion_count/amount, event_totals (count, amount, uniques: new
  converting customers per instance) and link_counts (conversions and amount per link, when
  the tracker knew the clicked link).
- customer DB: nothing yet (customer_stats has no conversion columns).
Amounts are summed as given, whatever the currency.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from sqlalchemy import Connection, select

from connectd.appliers import applies, hits
from connectd.appliers.sql import db_time, insert_many, upsert
from connectd.db.customer import Campaign, CustomerStats, Message, MessageInstance
from connectd.db.report import (
    NO_SEGMENT,
    ConversionOrder,
    EventTotal,
    HourlyCount,
    LinkCount,
    MessageFact,
    OpenFact,
)
from connectd.records import ConversionRecorded, CustomerUnsubscribed, MessageOpened

OPENED = "message.opened"
UNSUBSCRIBED = "customer.unsubscribed"
CONVERTED = "conversion.recorded"
SUBSCRIPTION_SOURCES = {"one-click": "tracker", "page": "tracker", "mail": "reply"}

_stats = CustomerStats.__table__
_facts = MessageFact.__table__
_opens = OpenFact.__table__
_hourly = HourlyCount.__table__
_totals = EventTotal.__table__
_links = LinkCount.__table__
_orders = ConversionOrder.__table__


# --- opens ----------------------------------------------------------------------------------

@applies(MessageOpened, db="customer")
def opens_to_profiles(conn: Connection, records: list[MessageOpened],
                      cache: dict[str, Any]) -> None:
    past, _ = hits.history(conn, "targets", {(r.instance, r.customer) for r in records},
                           clicks=False)
    verdicts, _ = hits.judge(records, past, clicks=False)
    people = hits.without_trials(
        conn, [r for r, v in zip(records, verdicts, strict=True) if not v.machine], cache)
    counts = Counter([r.customer for r in people])
    last: dict[int, str] = {}
    for r in people:
        last[r.customer] = max(last.get(r.customer, r.ts), r.ts)
    upsert(conn, _stats, ("customer_id", "open_count", "last_open_at"),
           [(c, n, last[c]) for c, n in counts.items()],
           keys=("customer_id",), add=("open_count",), greatest=("last_open_at",))


@applies(MessageOpened, db="report")
def opens_to_facts(conn: Connection, records: list[MessageOpened],
                   cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    past, known = hits.history(conn, "message_facts",
                               {(r.instance, r.customer) for r in records}, clicks=False)
    verdicts, _ = hits.judge(records, past, clicks=False)
    insert_many(conn, _opens, ("instance_id", "customer_id", "opened_at", "machine", "why"),
                [(r.instance, r.customer, r.ts, v.machine, v.why)
                 for r, v in zip(records, verdicts, strict=True)])
    rows: dict[tuple[int, int], list[Any]] = {}  # people, machines, first/last people's, first
    for r, v in zip(records, verdicts, strict=True):
        row = rows.setdefault((r.instance, r.customer), [0, 0, None, None, {}])
        if v.machine:
            row[1] += 1
            row[4].setdefault(True, r.ts)
        else:
            row[0] += 1
            row[2] = min(row[2] or r.ts, r.ts)
            row[3] = max(row[3] or r.ts, r.ts)
            row[4].setdefault(False, r.ts)
    upsert(conn, _facts, ("instance_id", "customer_id", "open_count", "machine_open_count",
                          "first_open_at", "last_open_at"),
           [(i, c, *row[:4]) for (i, c), row in rows.items()],
           keys=("instance_id", "customer_id"), add=("open_count", "machine_open_count"),
           least=("first_open_at",), greatest=("last_open_at",))
    segment = {k: (v[0] if v[0] is not None else NO_SEGMENT) for k, v in known.items()}
    hourly: dict[tuple[int, str], list[int]] = {}
    totals: dict[tuple[int, int], list[Any]] = {}
    for r, v in zip(records, verdicts, strict=True):
        m = 1 if v.machine else 0
        hourly.setdefault((r.instance, r.ts[:13]), [0, 0, 0, 0])[m] += 1
        t = totals.setdefault((r.instance, segment.get((r.instance, r.customer), NO_SEGMENT)),
                              [0, 0, 0, 0, r.ts, r.ts])
        t[m] += 1
        t[4], t[5] = min(t[4], r.ts), max(t[5], r.ts)
    for key, row in rows.items():
        before = known.get(key)
        for machine, ts in row[4].items():
            if before and before[2 if machine else 1]:
                continue  # counted already, in an earlier run
            hourly[(key[0], ts[:13])][3 if machine else 2] += 1
            totals[(key[0], segment.get(key, NO_SEGMENT))][3 if machine else 2] += 1
    upsert(conn, _hourly, ("instance_id", "hour", "event", "total", "machine", "uniques",
                           "machine_uniques"),
           [(i, hits.hour(dialect, h), OPENED, *n) for (i, h), n in hourly.items()],
           keys=("instance_id", "hour", "event"),
           add=("total", "machine", "uniques", "machine_uniques"))
    upsert(conn, _totals, ("instance_id", "segment_id", "event", "total", "machine", "uniques",
                           "machine_uniques", "first_at", "last_at"),
           [(i, seg, OPENED, *n) for (i, seg), n in totals.items()],
           keys=("instance_id", "segment_id", "event"),
           add=("total", "machine", "uniques", "machine_uniques"), least=("first_at",),
           greatest=("last_at",))


# --- unsubscribes ---------------------------------------------------------------------------

def instance_conversations(conn: Connection, instances: set[int],
                           cache: dict[str, Any]) -> dict[int, int]:
    """instance -> the conversation of its message's campaign (instances of a campaign outside
    any conversation are left out); remembered: an instance never changes campaign."""
    known: dict[int, int | None] = cache.setdefault("instance_conversation", {})
    unknown = [i for i in instances if i not in known]
    for start in range(0, len(unknown), 500):
        chunk = unknown[start:start + 500]
        found = dict(conn.execute(
            select(MessageInstance.id, Campaign.conversation_id)
            .join(Message, Message.id == MessageInstance.message_id)
            .join(Campaign, Campaign.id == Message.campaign_id)
            .where(MessageInstance.id.in_(chunk))).all())
        for i in chunk:
            if i in found:  # an instance not (yet) known is looked up again next time
                known[i] = found[i]
    return {i: known[i] for i in instances if known.get(i) is not None}  # type: ignore[misc]


_OPT_OUT_SQLITE = (
    "INSERT INTO subscriptions (customer_id, conversation_id, status, changed_at, source) "
    "VALUES (?, ?, 'opted_out', ?, ?) ON CONFLICT (customer_id, conversation_id) DO UPDATE "
    "SET status = 'opted_out', changed_at = excluded.changed_at, source = excluded.source "
    "WHERE subscriptions.changed_at <= excluded.changed_at")
_OPT_OUT_PG = (
    "INSERT INTO subscriptions (customer_id, conversation_id, status, changed_at, source) "
    "SELECT c, v, 'opted_out', t, s FROM unnest(%b::bigint[], %b::bigint[], %b::timestamptz[], "
    "%b::text[]) AS r(c, v, t, s) ON CONFLICT (customer_id, conversation_id) DO UPDATE "
    "SET status = 'opted_out', changed_at = excluded.changed_at, source = excluded.source "
    "WHERE subscriptions.changed_at <= excluded.changed_at")
_ALL_OUT_SQLITE = (
    "UPDATE subscriptions SET status = 'opted_out', changed_at = r.value ->> 1, "
    "source = r.value ->> 2 FROM json_each(?) AS r "
    "WHERE subscriptions.customer_id = r.value ->> 0 "
    "AND subscriptions.changed_at <= r.value ->> 1")
_ALL_OUT_PG = (
    "UPDATE subscriptions SET status = 'opted_out', changed_at = r.t, source = r.s "
    "FROM unnest(%b::bigint[], %b::timestamptz[], %b::text[]) AS r(c, t, s) "
    "WHERE subscriptions.customer_id = r.c AND subscriptions.changed_at <= r.t")


@applies(CustomerUnsubscribed, db="customer")
def unsubscribes_to_subscriptions(conn: Connection, records: list[CustomerUnsubscribed],
                                  cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    found = instance_conversations(conn, {r.instance for r in records if r.instance is not None
                                  and r.conversation is None and r.scope == "conversation"},
                           cache)
    one: dict[tuple[int, int], tuple[str, str]] = {}  # (customer, conversation) -> ts, source
    everything: dict[int, tuple[str, str]] = {}  # customer -> ts, source
    for r in records:
        source = SUBSCRIPTION_SOURCES.get(r.via, r.via or "tracker")[:32]
        conversation = r.conversation if r.conversation is not None else found.get(
            r.instance)  # type: ignore[arg-type]
        if r.scope == "all" or conversation is None:
            into: dict[Any, tuple[str, str]] = everything
            key: Any = r.customer
        else:
            into, key = one, (r.customer, conversation)
        if key not in into or into[key][0] <= r.ts:  # the latest decision wins
            into[key] = (db_time(dialect, r.ts), source)
    if one:
        rows = [(c, v, ts, s) for (c, v), (ts, s) in one.items()]
        if dialect == "postgresql":
            conn.exec_driver_sql(_OPT_OUT_PG, tuple(list(x) for x in zip(*rows, strict=True)))
        else:
            conn.exec_driver_sql(_OPT_OUT_SQLITE, rows)
    if everything:
        rows2 = [(c, ts, s) for c, (ts, s) in everything.items()]
        if dialect == "postgresql":
            conn.exec_driver_sql(_ALL_OUT_PG, tuple(list(x) for x in zip(*rows2, strict=True)))
        else:
            conn.exec_driver_sql(_ALL_OUT_SQLITE, (json.dumps(rows2),))


@applies(CustomerUnsubscribed, db="report")
def unsubscribes_to_facts(conn: Connection, records: list[CustomerUnsubscribed],
                          cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    mine = [r for r in records if r.instance is not None]
    if not mine:
        return
    known = hits.lookup(conn, "message_facts", ("segment_id", "unsubscribed_at"),
                        {(r.instance, r.customer) for r in mine})  # type: ignore[misc]
    first: dict[tuple[int, int], str] = {}
    for r in mine:
        key = (r.instance, r.customer)
        first[key] = min(first.get(key, r.ts), r.ts)  # type: ignore[index]
    upsert(conn, _facts, ("instance_id", "customer_id", "open_count", "unsubscribed_at"),
           [(i, c, 0, db_time(dialect, ts)) for (i, c), ts in first.items()],
           keys=("instance_id", "customer_id"), least=("unsubscribed_at",))
    totals: dict[tuple[int, int], list[Any]] = {}
    for r in mine:
        key = (r.instance, r.customer)
        seg = (known.get(key) or (None,))[0]  # type: ignore[arg-type]
        t = totals.setdefault((r.instance, NO_SEGMENT if seg is None else seg),
                              [0, 0, r.ts, r.ts])  # type: ignore[list-item]
        t[0] += 1
        t[2], t[3] = min(t[2], r.ts), max(t[3], r.ts)
    for key in first:
        before = known.get(key)
        if before is None or before[1] is None:
            seg = before[0] if before and before[0] is not None else NO_SEGMENT
            totals[(key[0], seg)][1] += 1
    upsert(conn, _totals, ("instance_id", "segment_id", "event", "total", "uniques", "first_at",
                           "last_at"),
           [(i, seg, UNSUBSCRIBED, n, u, db_time(dialect, f), db_time(dialect, la))
            for (i, seg), (n, u, f, la) in totals.items()],
           keys=("instance_id", "segment_id", "event"), add=("total", "uniques"),
           least=("first_at",), greatest=("last_at",))


# --- conversions ----------------------------------------------------------------------------

_ORDERS_SQLITE = ("INSERT INTO conversion_orders (order_key, instance_id, customer_id, "
                  "recorded_at) SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 "
                  "FROM json_each(?) WHERE true ON CONFLICT DO NOTHING RETURNING order_key")
_ORDERS_PG = ("INSERT INTO conversion_orders (order_key, instance_id, customer_id, recorded_at) "
              "SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::timestamptz[]) "
              "ON CONFLICT DO NOTHING RETURNING order_key")


def counted_conversions(conn: Connection,
                        records: list[ConversionRecorded]) -> list[ConversionRecorded]:
    """The records that count: the first of each order id never seen before (remembered in
    conversion_orders, one statement), and every record without an order id."""
    dialect = conn.dialect.name
    firsts: dict[str, ConversionRecorded] = {}
    for r in records:
        if r.order:
            firsts.setdefault(r.order[:200], r)
    new: set[str] = set()
    if firsts:
        rows = [(k, r.instance, r.customer, db_time(dialect, r.ts)) for k, r in firsts.items()]
        if dialect == "postgresql":
            got = conn.exec_driver_sql(_ORDERS_PG, tuple(list(x) for x in zip(*rows, strict=True)))
        else:
            got = conn.exec_driver_sql(_ORDERS_SQLITE, (json.dumps(rows),))
        new = {row[0] for row in got}
    return [r for r in records if not r.order or (r.order[:200] in new
                                                  and firsts[r.order[:200]] is r)]


@applies(ConversionRecorded, db="report")
def conversions_to_facts(conn: Connection, records: list[ConversionRecorded],
                         cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    counted = counted_conversions(conn, records)
    if not counted:
        return
    known = hits.lookup(conn, "message_facts", ("segment_id", "conversion_count"),
                        {(r.instance, r.customer) for r in counted})
    per_customer: dict[tuple[int, int], list[Any]] = {}
    totals: dict[tuple[int, int], list[Any]] = {}
    links: dict[tuple[int, int], list[Any]] = {}
    for r in counted:
        key = (r.instance, r.customer)
        amount = r.amount or 0.0
        pc = per_customer.setdefault(key, [0, 0.0])
        pc[0] += 1
        pc[1] += amount
        seg = (known.get(key) or (None,))[0]
        t = totals.setdefault((r.instance, NO_SEGMENT if seg is None else seg),
                              [0, 0, 0.0, r.ts, r.ts])
        t[0] += 1
        t[2] += amount
        t[3], t[4] = min(t[3], r.ts), max(t[4], r.ts)
        if r.link is not None:
            lk = links.setdefault((r.instance, r.link), [0, 0.0])
            lk[0] += 1
            lk[1] += amount
    for key in per_customer:
        before = known.get(key)
        if not (before and before[1]):
            seg = before[0] if before and before[0] is not None else NO_SEGMENT
            totals[(key[0], seg)][1] += 1
    upsert(conn, _facts, ("instance_id", "customer_id", "open_count", "conversion_count",
                          "conversion_amount"),
           [(i, c, 0, n, a) for (i, c), (n, a) in per_customer.items()],
           keys=("instance_id", "customer_id"), add=("conversion_count", "conversion_amount"))
    upsert(conn, _totals, ("instance_id", "segment_id", "event", "total", "uniques", "amount",
                           "first_at", "last_at"),
           [(i, seg, CONVERTED, n, u, a, db_time(dialect, f), db_time(dialect, la))
            for (i, seg), (n, u, a, f, la) in totals.items()],
           keys=("instance_id", "segment_id", "event"), add=("total", "uniques", "amount"),
           least=("first_at",), greatest=("last_at",))
    upsert(conn, _links, ("instance_id", "link_id", "conversions", "amount"),
           [(i, link, n, a) for (i, link), (n, a) in links.items()],
           keys=("instance_id", "link_id"), add=("conversions", "amount"))
