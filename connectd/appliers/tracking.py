"""Appliers of the tracker's records (the tracker issue adds the producer).

`link.clicked` (connectd.records.LinkClicked; `ts` is the time of the click):
- customer DB: per-customer click count and last click (customer_stats), and Connect's
  inferred interests: one count per label of the clicked link (customer_interests).
- report DB: one click_facts row per click (the fact table reports count totals and unique
  clickers from, per message, link, segment and hour), hourly_counts (total per instance and
  hour) and event_totals (total, first and last per instance).
Customer updates are aggregated within the run first: one upsert row per customer.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, select

from connectd.appliers import applies
from connectd.appliers.sql import db_time, insert_many, upsert
from connectd.db.customer import CustomerInterest, CustomerStats, Link
from connectd.db.report import ClickFact, EventTotal, HourlyCount
from connectd.records import LinkClicked

_LABEL_TTL = 60.0  # seconds a link's labels are cached (the editor may change them)
CLICKED = "link.clicked"

_stats = CustomerStats.__table__
_interests = CustomerInterest.__table__
_links = Link.__table__
_clicks = ClickFact.__table__
_hourly = HourlyCount.__table__
_totals = EventTotal.__table__


def _link_labels(conn: Connection, link_ids: set[int], cache: dict[str, Any]) -> dict[int, list]:
    labels: dict[int, tuple[float, list]] = cache.setdefault("link_labels", {})
    now = time.monotonic()
    missing = [lid for lid in link_ids if lid not in labels or now - labels[lid][0] > _LABEL_TTL]
    for start in range(0, len(missing), 500):
        chunk = missing[start:start + 500]
        found = dict(conn.execute(select(_links.c.id, _links.c.labels)
                                  .where(_links.c.id.in_(chunk))).all())
        for lid in chunk:
            labels[lid] = (now, [str(x) for x in (found.get(lid) or [])][:4])
    return {lid: labels[lid][1] for lid in link_ids}


@applies(LinkClicked, db="customer")
def clicks_to_profiles(conn: Connection, records: list[LinkClicked],
                       cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    per_customer: dict[int, list] = {}
    per_customer_link: dict[tuple[int, int], int] = {}
    for rec in records:
        c, ts = rec.customer, rec.ts
        entry = per_customer.get(c)
        if entry is None:
            per_customer[c] = [1, ts]
        else:
            entry[0] += 1
            if ts > entry[1]:
                entry[1] = ts
        key = (c, rec.link)
        per_customer_link[key] = per_customer_link.get(key, 0) + 1
    upsert(conn, _stats, ("customer_id", "click_count", "last_click_at"),
           [(c, n, db_time(dialect, ts)) for c, (n, ts) in per_customer.items()],
           keys=("customer_id",), add=("click_count",), greatest=("last_click_at",))
    labels = _link_labels(conn, {link for _, link in per_customer_link}, cache)
    interests: dict[tuple[int, str], int] = {}
    for (c, link), n in per_customer_link.items():
        for label in labels.get(link, ()):
            interests[(c, label)] = interests.get((c, label), 0) + n
    upsert(conn, _interests, ("customer_id", "label", "count"),
           [(c, label, n) for (c, label), n in interests.items()],
           keys=("customer_id", "label"), add=("count",))


@applies(LinkClicked, db="report")
def clicks_to_facts(conn: Connection, records: list[LinkClicked],
                    cache: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    facts = []
    per_hour: dict[tuple[int, str], int] = {}
    per_instance: dict[int, list] = {}
    for rec in records:
        i, ts = rec.instance, db_time(dialect, rec.ts)
        facts.append((i, rec.customer, rec.link, ts, rec.machine))
        hour = (i, ts[:13])
        per_hour[hour] = per_hour.get(hour, 0) + 1
        entry = per_instance.get(i)
        if entry is None:
            per_instance[i] = [1, ts, ts]
        else:
            entry[0] += 1
            if ts < entry[1]:
                entry[1] = ts
            if ts > entry[2]:
                entry[2] = ts
    insert_many(conn, _clicks, ("instance_id", "customer_id", "link_id", "clicked_at", "machine"),
                facts)
    upsert(conn, _hourly, ("instance_id", "hour", "event", "total"),
           [(i, db_time(dialect, f"{h[:10]}T{h[11:13]}:00:00.000000Z"), CLICKED, n)
            for (i, h), n in per_hour.items()],
           keys=("instance_id", "hour", "event"), add=("total",))
    upsert(conn, _totals, ("instance_id", "segment_id", "event", "total", "first_at", "last_at"),
           [(i, 0, CLICKED, n, lo, hi) for i, (n, lo, hi) in per_instance.items()],
           keys=("instance_id", "segment_id", "event"), add=("total",), least=("first_at",),
           greatest=("last_at",))
