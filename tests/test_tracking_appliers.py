"""The link.clicked appliers (connectd.appliers.tracking, machine rules in
connectd.appliers.hits), applied by the profiler's real Consumer from a real tracker stream to
real customer and report DBs (SQLite and PostgreSQL): people and machines counted side by
side, the profile driven by people only, unique and total counts exactly once across a
restart of the consumer in the middle."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from test_execution import NOW
from test_outbound_appliers import World

from connectd.appliers import hits
from connectd.appliers.tracking import link_uniques
from connectd.consumer import Consumer
from connectd.daemons.profiler import consumer_name
from connectd.db.customer import (
    CustomerInterest,
    CustomerStats,
    Link,
    Message,
    Subscription,
    Target,
)
from connectd.db.report import ClickFact, EventTotal, HourlyCount, LinkCount

STREAM = "tracker.events.1"
CLICKED = "link.clicked"


def at(seconds: float) -> str:
    """A record ts `seconds` after NOW (when the composer records say the mail was sent)."""
    return (NOW + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Tracked(World):
    """A World whose targets were sent at NOW (both DBs know it), with three labelled links."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with self.customer.begin() as conn:
            # they subscribed before the campaign (seed() leaves the wall clock's now)
            conn.execute(update(Subscription).values(changed_at=NOW - timedelta(days=30)))
            self.links = [conn.execute(insert(Link).values(url=f"https://shop.example/{n}",
                                                           labels=[n]).returning(Link.id))
                          .scalar_one() for n in ("shoes", "sale", "news")]

    def send_all(self, segment: int | None = None) -> None:
        self.write([self.sent(c) for c in self.customers])
        if segment is not None:
            self.write([self.content(c, segment) for c in self.customers])
        self.apply("customer")
        self.apply("report")

    def click(self, customer: int, link: int, ts: str, **extra: Any) -> dict[str, Any]:
        return {"instance": self.instance, "customer": customer, "link": link, "ts": ts,
                "ua": "Mozilla/5.0", **extra}

    def track(self, kind: str, records: list[dict[str, Any]], stream: str = STREAM) -> None:
        w = self.spool.writer(stream)
        try:
            for rec in records:
                rec = dict(rec)
                w.append(kind, rec, ts=rec.pop("ts"))
        finally:
            w.close()

    def apply_both(self, stream: str = STREAM, batch_size: int = 1000) -> None:
        self.apply("customer", stream, batch_size)
        self.apply("report", stream, batch_size)

    def totals(self, event: str = CLICKED) -> dict[int, tuple[int, int, int, int]]:
        """segment -> (people, machines, unique people, unique machines)."""
        with self.report.connect() as conn:
            return {r.segment_id: (r.total, r.machine, r.uniques, r.machine_uniques)
                    for r in conn.execute(select(EventTotal).where(EventTotal.event == event))}

    def profile(self) -> dict[int, tuple[int, Any]]:
        with self.customer.connect() as conn:
            return {r.customer_id: (r.click_count, r.last_click_at)
                    for r in conn.execute(select(CustomerStats)) if r.click_count}

    def interests(self) -> dict[tuple[int, str], int]:
        with self.customer.connect() as conn:
            return {(r.customer_id, r.label): r.count
                    for r in conn.execute(select(CustomerInterest))}

    def facts(self) -> list[tuple[int, int, bool, str | None]]:
        with self.report.connect() as conn:
            return [(r.customer_id, r.link_id, r.machine, r.why) for r in conn.execute(
                select(ClickFact).order_by(ClickFact.id))]


@pytest.fixture
def tracked(tmp_path: Path, migrated_customer_url: str,
            migrated_report_url: str) -> Iterator[Any]:
    made: list[Tracked] = []

    def make(customers: int = 4) -> Tracked:
        made.append(Tracked(tmp_path, migrated_customer_url, migrated_report_url, customers))
        return made[-1]

    yield make
    for w in made:
        w.close()


def test_people_and_machines_side_by_side(tracked: Any) -> None:
    """A person's click counts for people (report and profile); a scanner the tracker
    marked and a click 3 s after the send count for machines only, with their reason."""
    w = tracked(3)
    a, b, c = w.customers
    shoes = w.links[0]
    w.send_all()
    w.track(CLICKED, [w.click(a, shoes, at(600)),
                      w.click(b, shoes, at(700), machine=True, why="ua:scanner"),
                      w.click(c, shoes, at(3))])
    w.apply_both()
    assert w.totals() == {0: (1, 2, 1, 2)}
    assert w.facts() == [(a, shoes, False, None), (b, shoes, True, "ua:scanner"),
                         (c, shoes, True, hits.SOON)]
    assert set(w.profile()) == {a}  # the profile is the person's
    assert w.interests() == {(a, "shoes"): 1}
    with w.report.connect() as conn:
        assert conn.execute(select(LinkCount.total, LinkCount.machine)).one() == (1, 2)
        assert link_uniques(conn, w.instance) == {shoes: (1, 2)}


def test_links_clicked_at_once_are_a_machine(tracked: Any) -> None:
    """Three links of the message clicked within a second: the first stays a person's, the
    other two are machine clicks ("links-at-once") in both DBs; the same link twice in a
    row is a person's double click."""
    w = tracked(2)
    a, b = w.customers
    shoes, sale, news = w.links
    w.send_all()
    w.track(CLICKED, [w.click(a, shoes, at(100)), w.click(a, sale, at(100.4)),
                      w.click(a, news, at(100.9)),
                      w.click(b, shoes, at(200)), w.click(b, shoes, at(200.5))])
    w.apply_both(batch_size=2)  # the walk crosses batches: history comes from the DBs
    assert [f[3] for f in w.facts()] == [None, hits.AT_ONCE_WHY, hits.AT_ONCE_WHY, None, None]
    assert w.interests() == {(a, "shoes"): 1, (b, "shoes"): 2}
    assert {c: n for c, (n, _) in w.profile().items()} == {a: 1, b: 2}
    assert w.totals() == {0: (3, 2, 2, 1)}
    with w.customer.connect() as conn:
        last = dict(conn.execute(select(Target.customer_id, Target.last_click_link)).all())
    assert last == {a: news, b: shoes}


def test_segment_and_hour(tracked: Any) -> None:
    """Clicks count under the customer's segment (composer.content) and the hour they came
    in; a customer's first click is where they count as a unique."""
    w = tracked(2)
    a, b = w.customers
    w.send_all(segment=7)
    w.track(CLICKED, [w.click(a, w.links[0], at(600)), w.click(a, w.links[1], at(4000)),
                      w.click(b, w.links[0], at(4100))])
    w.apply_both()
    assert w.totals() == {7: (3, 0, 2, 0)}
    with w.report.connect() as conn:
        hours = {r.hour.hour: (r.total, r.uniques) for r in conn.execute(
            select(HourlyCount).where(HourlyCount.event == CLICKED))}
    assert hours == {12: (1, 1), 13: (2, 1)}


def test_exactly_once_across_a_restart(tracked: Any) -> None:
    """400 clicks applied in small batches by a consumer that stops half-way and a new one
    (fresh process memory) that takes over, then one more pass that finds nothing: totals,
    uniques, profile and facts are what the records say, once."""
    w = tracked(20)
    rnd = random.Random(4)
    w.send_all()
    clicks = [w.click(rnd.choice(w.customers), rnd.choice(w.links), at(60 + 30 * k))
              for k in range(400)]
    w.track(CLICKED, clicks)
    for db in ("customer", "report"):
        engine = w.customer if db == "customer" else w.report
        first = Consumer(w.spool, STREAM, consumer_name(db), db, engine, 7)  # type: ignore[arg-type]
        for _ in range(25):  # 175 records, then the "process" is gone
            first.poll()
        first.close()
        assert w.apply(db, STREAM, 13) == 400 - 175
        assert w.apply(db, STREAM, 13) == 0
    people = {c["customer"] for c in clicks}
    assert w.totals() == {0: (400, 0, len(people), 0)}
    assert sum(n for n, _ in w.profile().values()) == 400
    assert len(w.facts()) == 400
    with w.report.connect() as conn:
        hourly = conn.execute(select(HourlyCount.total, HourlyCount.uniques)
                              .where(HourlyCount.event == CLICKED)).all()
        assert (sum(t for t, _ in hourly), sum(u for _, u in hourly)) == (400, len(people))
        per_link = link_uniques(conn, w.instance)
    assert per_link == {link: (len({c["customer"] for c in clicks if c["link"] == link}), 0)
                        for link in w.links}


def test_clicks_before_the_send_is_known_keep_the_trackers_mark(tracked: Any) -> None:
    """With no composer.sent applied yet, history rules do not apply: a click 1 s after
    "the send" is a person's unless the tracker said otherwise; the target still learns its
    last click."""
    w = tracked(1)
    (a,) = w.customers
    w.track(CLICKED, [w.click(a, w.links[0], at(1)),
                      w.click(a, w.links[1], at(1.2), machine=True, why="head")])
    w.apply_both()
    assert w.totals() == {0: (1, 1, 1, 1)}
    assert w.profile()[a][0] == 1
    with w.customer.connect() as conn:
        assert conn.execute(select(Target.last_click_link)).scalar_one() == w.links[1]


def test_clicks_on_trial_sends_stay_out_of_the_profile(tracked: Any) -> None:
    """A click on a trial send (a test copy) is counted in the report but not in the
    customer's profile or interests."""
    w = tracked(1)
    (a,) = w.customers
    with w.customer.begin() as conn:
        conn.execute(update(Message).values(kind="trial"))
    w.send_all()
    w.track(CLICKED, [w.click(a, w.links[0], at(600))])
    w.apply_both()
    assert w.profile() == {} and w.interests() == {}
    assert w.totals() == {0: (1, 0, 1, 0)}


def test_last_click_is_the_latest_even_out_of_order(tracked: Any) -> None:
    """Clicks that reach the stream out of time order (two tracker workers): the profile's
    last click is the latest one, not the last record, in one batch and across batches."""
    w = tracked(2)
    a, b = w.customers
    w.send_all()
    w.track(CLICKED, [w.click(a, w.links[0], at(900)), w.click(b, w.links[0], at(800)),
                      w.click(a, w.links[1], at(700))])
    w.apply_both()
    w.track(CLICKED, [w.click(b, w.links[1], at(750))])
    w.apply_both()
    got = {c: (n, t if isinstance(t, str) else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
           for c, (n, t) in w.profile().items()}
    assert got == {a: (2, at(900)), b: (2, at(800))}


def test_interests_count_every_label_of_a_link(tracked: Any) -> None:
    """A link with two labels counts a click for each; a link with none adds no interest;
    counts add up across batches."""
    w = tracked(2)
    a, b = w.customers
    with w.customer.begin() as conn:
        both = conn.execute(insert(Link).values(url="https://shop.example/both",
                                                labels=["shoes", "kids"]).returning(Link.id)
                            ).scalar_one()
        bare = conn.execute(insert(Link).values(url="https://shop.example/bare", labels=[])
                            .returning(Link.id)).scalar_one()
    w.send_all()
    w.track(CLICKED, [w.click(a, both, at(600)), w.click(a, w.links[0], at(900)),
                      w.click(b, bare, at(700)), w.click(b, both, at(1300))])
    w.apply_both(batch_size=3)
    assert w.interests() == {(a, "shoes"): 2, (a, "kids"): 1, (b, "shoes"): 1, (b, "kids"): 1}
    assert {c: n for c, (n, _) in w.profile().items()} == {a: 2, b: 2}


def test_insert_columns_lands_every_row_once(migrated_report_url: str) -> None:
    """sql.insert_columns: 450 rows given column by column (two full multi-row statements on
    SQLite and a remainder) land once each with their values; columns of unequal length are
    refused before anything is written."""
    from connectd.appliers.sql import insert_columns
    from connectd.db.engine import make_engine

    engine = make_engine(migrated_report_url)
    n = 450
    inst, cust, link = [3] * n, list(range(1, n + 1)), [k % 7 for k in range(n)]
    ts = [at(k) for k in range(n)]
    mach = [k % 3 == 0 for k in range(n)]
    why = ["head" if m else None for m in mach]
    try:
        with engine.begin() as conn:
            insert_columns(conn, ClickFact.__table__,
                           ("instance_id", "customer_id", "link_id", "clicked_at", "machine", "why"),
                           [inst, cust, link, ts, mach, why])
            with pytest.raises(ValueError):
                insert_columns(conn, ClickFact.__table__, ("instance_id", "customer_id"),
                               [inst, cust[:-1]])
        with engine.connect() as conn:
            got = conn.execute(select(ClickFact.customer_id, ClickFact.link_id,
                                      ClickFact.machine, ClickFact.why)
                               .order_by(ClickFact.customer_id)).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in got] == [(c, k, m, w) for c, k, m, w
                                      in zip(cust, link, mach, why, strict=True)]
