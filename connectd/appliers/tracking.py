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
from collections import Counter
from operator import attrgetter, itemgetter
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
    counts = Counter([r.customer for r in records])
    # text timestamps sort in time order; the last of a customer's in ts order is the latest
    last = {r.customer: r.ts for r in sorted(records, key=_ts)}
    # record timestamps go into the columns as they are (connectd.appliers.sql.db_time)
    upsert(conn, _stats, ("customer_id", "click_count", "last_click_at"),
           [(c, n, last[c]) for c, n in counts.items()],
           keys=("customer_id",), add=("click_count",), greatest=("last_click_at",))
    labels = _link_labels(conn, {r.link for r in records}, cache)
    labelled = {link for link, names in labels.items() if names}
    if not labelled:
        return
    interests: Counter[tuple[int, str]] = Counter()
    for (c, link), n in Counter([(r.customer, r.link) for r in records
                                 if r.link in labelled]).items():
        for label in labels[link]:
            interests[(c, label)] += n
    upsert(conn, _interests, ("customer_id", "label", "count"),
           [(c, label, n) for (c, label), n in interests.items()],
           keys=("customer_id", "label"), add=("count",))


@applies(LinkClicked, db="report")
def clicks_to_facts(conn: Connection, records: list[LinkClicked],
                    cache: dict[str, Any]) -> None:
    facts = [(r.instance, r.customer, r.link, r.ts, r.machine) for r in records]
    insert_many(conn, _clicks, ("instance_id", "customer_id", "link_id", "clicked_at", "machine"),
                facts)
    per_hour = Counter([(f[0], f[3][:13]) for f in facts])
    upsert(conn, _hourly, ("instance_id", "hour", "event", "total"),
           [(i, _hour(conn.dialect.name, h), CLICKED, n) for (i, h), n in per_hour.items()],
           keys=("instance_id", "hour", "event"), add=("total",))
    ordered = sorted(facts, key=_fact_ts)
    first = {f[0]: f[3] for f in reversed(ordered)}
    last = {f[0]: f[3] for f in ordered}
    upsert(conn, _totals, ("instance_id", "segment_id", "event", "total", "first_at", "last_at"),
           [(i, 0, CLICKED, n, first[i], last[i])
            for i, n in Counter([f[0] for f in facts]).items()],
           keys=("instance_id", "segment_id", "event"), add=("total",), least=("first_at",),
           greatest=("last_at",))


_ts = attrgetter("ts")
_fact_ts = itemgetter(3)


def _hour(dialect: str, prefix: str) -> str:
    """'YYYY-MM-DD?HH' (either timestamp spelling) -> the start of that hour as the column's
    timestamp text."""
    return db_time(dialect, f"{prefix[:10]}T{prefix[11:13]}:00:00.000000Z")
