"""Appliers of the tracker's records (the tracker issue adds the producer).

`link.clicked` {instance, customer, link, ua, [ip], [machine]}: the record's `ts` is the time
of the click.
- customer DB: per-customer click count and last click (customer_stats), and Connect's
  inferred interests: one count per label of the clicked link (customer_interests).
- report DB: message_facts (clicks, first and last click per instance and customer),
  link_facts (the same per link), hourly_counts (total clicks per instance and hour).
Everything is aggregated within the run first: one upsert row per customer / fact / hour.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from connectd.appliers import applies
from connectd.appliers.sql import upsert
from connectd.db.customer import CustomerInterest, CustomerStats, Link
from connectd.db.report import HourlyCount, LinkFact, MessageFact
from connectd.spool import BadRecord

_LABEL_TTL = 60.0  # seconds a link's labels are cached (the editor may change them)

_stats = CustomerStats.__table__
_interests = CustomerInterest.__table__
_links = Link.__table__
_msg = MessageFact.__table__
_linkf = LinkFact.__table__
_hourly = HourlyCount.__table__


def _ids(rec: dict[str, Any]) -> tuple[int, int, int]:
    i, c, link = rec.get("instance"), rec.get("customer"), rec.get("link")
    if type(i) is not int or type(c) is not int or type(link) is not int:
        raise BadRecord(f"link.clicked {rec.get('id')}: instance, customer and link must be "
                        f"integers, got {i!r}, {c!r}, {link!r}")
    return i, c, link


def _dt(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def _link_labels(conn: Connection, link_ids: set[int], cache: dict[str, Any]) -> dict[int, list]:
    labels: dict[int, tuple[float, list]] = cache.setdefault("link_labels", {})
    now = time.monotonic()
    missing = [lid for lid in link_ids if lid not in labels or now - labels[lid][0] > _LABEL_TTL]
    for start in range(0, len(missing), 500):
        chunk = missing[start:start + 500]
        found = dict(conn.execute(select(_links.c.id, _links.c.labels)
                                  .where(_links.c.id.in_(chunk))).all())
        for lid in chunk:
            labels[lid] = (now, list(found.get(lid) or [])[:4])
    return {lid: labels[lid][1] for lid in link_ids}


@applies("link.clicked", db="customer")
def clicks_to_profiles(conn: Connection, records: list[dict[str, Any]],
                       cache: dict[str, Any]) -> None:
    per_customer: dict[int, list] = {}
    per_customer_link: dict[tuple[int, int], int] = {}
    for rec in records:
        _, c, link = _ids(rec)
        ts = rec["ts"]
        entry = per_customer.get(c)
        if entry is None:
            per_customer[c] = [1, ts]
        else:
            entry[0] += 1
            if ts > entry[1]:
                entry[1] = ts
        per_customer_link[(c, link)] = per_customer_link.get((c, link), 0) + 1
    upsert(conn, _stats,
           [{"customer_id": c, "click_count": n, "last_click_at": _dt(ts)}
            for c, (n, ts) in per_customer.items()],
           keys=["customer_id"], add=["click_count"], greatest=["last_click_at"])
    labels = _link_labels(conn, {link for _, link in per_customer_link}, cache)
    interests: dict[tuple[int, str], int] = {}
    for (c, link), n in per_customer_link.items():
        for label in labels.get(link, ()):
            interests[(c, label)] = interests.get((c, label), 0) + n
    upsert(conn, _interests,
           [{"customer_id": c, "label": label, "count": n} for (c, label), n in interests.items()],
           keys=["customer_id", "label"], add=["count"])


@applies("link.clicked", db="report")
def clicks_to_facts(conn: Connection, records: list[dict[str, Any]],
                    cache: dict[str, Any]) -> None:
    per_message: dict[tuple[int, int], list] = {}
    per_link: dict[tuple[int, int, int], list] = {}
    per_hour: dict[tuple[int, str], int] = {}
    for rec in records:
        i, c, link = _ids(rec)
        ts = rec["ts"]
        for table, key in ((per_message, (i, c)), (per_link, (i, link, c))):
            entry = table.get(key)
            if entry is None:
                table[key] = [1, ts, ts]
            else:
                entry[0] += 1
                if ts < entry[1]:
                    entry[1] = ts
                if ts > entry[2]:
                    entry[2] = ts
        hour = (i, ts[:13])
        per_hour[hour] = per_hour.get(hour, 0) + 1
    upsert(conn, _msg,
           [{"instance_id": i, "customer_id": c, "click_count": n, "first_click_at": _dt(lo),
             "last_click_at": _dt(hi)} for (i, c), (n, lo, hi) in per_message.items()],
           keys=["instance_id", "customer_id"], add=["click_count"],
           least=["first_click_at"], greatest=["last_click_at"])
    upsert(conn, _linkf,
           [{"instance_id": i, "link_id": link, "customer_id": c, "click_count": n,
             "first_click_at": _dt(lo), "last_click_at": _dt(hi)}
            for (i, link, c), (n, lo, hi) in per_link.items()],
           keys=["instance_id", "link_id", "customer_id"], add=["click_count"],
           least=["first_click_at"], greatest=["last_click_at"])
    upsert(conn, _hourly,
           [{"instance_id": i, "hour": datetime.fromisoformat(h + ":00:00+00:00"),
             "event": "link.clicked", "total": n} for (i, h), n in per_hour.items()],
           keys=["instance_id", "hour", "event"], add=["total"])
