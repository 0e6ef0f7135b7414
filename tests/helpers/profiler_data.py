"""Shared data helpers for the profiler/consumer tests and bench/profiler_lag.py.

Inputs: a Settings (databases + spool) and click tuples.
Outputs: customers/links rows in the customer DB, link.clicked records in a stream, and
`Applied`, a snapshot of what the profiler's appliers and positions hold in both databases.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text

from connectd.db.engine import make_engine
from connectd.settings import Settings
from connectd.spool import Spool, encode, make_record

STREAM = "tracker.events"
UA = "Mozilla/5.0 (X11; Linux x86_64) test"


def _ph(engine: Engine, n: int) -> str:
    return ", ".join(["?" if engine.dialect.name == "sqlite" else "%s"] * n)


def add_customers(url: str, ids: range | list[int]) -> None:
    """Insert customers rows (the click records' FK targets) with these ids."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO customers (id, email, email_key, attributes, created_at, updated_at)"
                f" VALUES ({_ph(engine, 6)})",
                [(i, f"c{i}@example.com", f"c{i}@example.com", "{}", "2026-01-01 00:00:00",
                  "2026-01-01 00:00:00") for i in ids])
    finally:
        engine.dispose()


def add_links(url: str, labels: dict[int, list[str]]) -> None:
    """Insert links rows: link id -> its interest labels."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for lid, names in labels.items():
                conn.execute(text("INSERT INTO links (id, url, labels) VALUES (:i, :u, :l)"),
                             {"i": lid, "u": f"https://shop.example/{lid}",
                              "l": json.dumps(names)})
    finally:
        engine.dispose()


def click(customer: Any, link: int = 1, instance: int = 1) -> dict[str, Any]:
    """The fields of a link.clicked record."""
    return {"instance": instance, "customer": customer, "link": link, "ua": UA}


def random_clicks(n: int, customers: int, instances: int = 5, links: int = 20,
                  seed: int = 1) -> list[tuple[int, int, int]]:
    """n (customer, link, instance) tuples spread over customers 1..customers."""
    rnd = random.Random(seed)
    return [(rnd.randint(1, customers), rnd.randint(1, links), rnd.randint(1, instances))
            for _ in range(n)]


def write_clicks(settings: Settings, clicks: list[tuple[int, int, int]], stream: str = STREAM,
                 group: int = 2000, **writer_kw: Any) -> None:
    """Append one link.clicked record per (customer, link, instance), in groups of `group`
    lines per write (fast; each group lands whole)."""
    spool = Spool(settings.paths.spool, settings.spool)
    spool.create()
    with spool.writer(stream, **writer_kw) as w:
        for start in range(0, len(clicks), group):
            w.write_lines(b"".join(encode(make_record("link.clicked", click(c, lk, i)))
                                   for c, lk, i in clicks[start:start + group]))


def expected_per_customer(clicks: list[tuple[int, int, int]]) -> dict[int, int]:
    return dict(Counter(c for c, _, _ in clicks))


@dataclass
class Applied:
    """What both databases hold after the profiler ran."""

    per_customer: dict[int, int] = field(default_factory=dict)  # customer_stats.click_count
    interests: dict[tuple[int, str], int] = field(default_factory=dict)
    facts: int = 0  # count(click_facts)
    hourly: int = 0  # sum(hourly_counts.total)
    totals: int = 0  # sum(event_totals.total)
    # (db, stream, consumer) -> (records, segment, offset)
    positions: dict[tuple[str, str, str], tuple[int, int, int]] = field(default_factory=dict)

    @property
    def clicks(self) -> int:
        return sum(self.per_customer.values())


def applied(settings: Settings) -> Applied:
    """Read the appliers' effects and the stored positions from both databases."""
    out = Applied()
    ce = make_engine(settings.database.customer_url)
    re_ = make_engine(settings.database.report_url)
    try:
        with ce.connect() as conn:
            out.per_customer = {c: n for c, n in conn.execute(text(
                "SELECT customer_id, click_count FROM customer_stats")) if n}
            out.interests = {(c, lab): n for c, lab, n in conn.execute(text(
                "SELECT customer_id, label, count FROM customer_interests"))}
            _positions(conn, "customer", out.positions)
        with re_.connect() as conn:
            out.facts = conn.execute(text("SELECT count(*) FROM click_facts")).scalar_one()
            out.hourly = conn.execute(text(
                "SELECT coalesce(sum(total), 0) FROM hourly_counts")).scalar_one()
            out.totals = conn.execute(text(
                "SELECT coalesce(sum(total), 0) FROM event_totals")).scalar_one()
            _positions(conn, "report", out.positions)
    finally:
        ce.dispose()
        re_.dispose()
    return out


def _positions(conn: Any, db: str, into: dict) -> None:
    for stream, consumer, records, seg, off in conn.execute(text(
            'SELECT stream, consumer, records, segment, "offset" FROM consumer_positions')):
        into[(db, stream, consumer)] = (records, seg, off)


def shunted(settings: Settings) -> list[dict[str, Any]]:
    """The records on the shunt stream (record.shunted, with stream/position/reason/record)."""
    spool = Spool(settings.paths.spool, settings.spool)
    with spool.reader("shunt") as r:
        return [rec for _, rec, _ in r.records() if rec is not None]
