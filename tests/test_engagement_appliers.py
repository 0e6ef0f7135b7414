"""The message.opened, customer.unsubscribed and conversion.recorded appliers
(connectd.appliers.engagement), applied by the profiler's real Consumer from a real tracker
stream to real customer and report DBs (SQLite and PostgreSQL): opens by people and by
proxies side by side, an unsubscribe that keeps the customer out of the conversation's next
launch and never undoes a later re-subscription, conversions counted once per order."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from test_execution import NOW, launch, seed
from test_tracking_appliers import Tracked, at

from connectd.appliers import hits
from connectd.db.customer import (
    Campaign,
    Conversation,
    CustomerStats,
    Message,
    Subscription,
    Target,
)
from connectd.db.engine import writer
from connectd.db.report import (
    ConversionOrder,
    EventTotal,
    HourlyCount,
    LinkCount,
    MessageFact,
    OpenFact,
)
from connectd.preparation import prepare

OPENED = "message.opened"
UNSUBSCRIBED = "customer.unsubscribed"
CONVERTED = "conversion.recorded"


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


def opened(w: Tracked, customer: int, ts: str, **extra: Any) -> dict[str, Any]:
    return {"instance": w.instance, "customer": customer, "ts": ts, "ua": "Mozilla/5.0",
            **extra}


def subscriptions(w: Tracked) -> dict[tuple[int, int], tuple[str, str | None]]:
    with w.customer.connect() as conn:
        return {(r.customer_id, r.conversation_id): (r.status, r.source)
                for r in conn.execute(select(Subscription))}


def conversation_of(w: Tracked) -> int:
    with w.customer.connect() as conn:
        return conn.execute(select(Subscription.conversation_id)).scalars().first()


# --- opens ----------------------------------------------------------------------------------

def test_opens_people_and_proxies_side_by_side(tracked: Any) -> None:
    """A person's opens count in the profile and as people in the report; Apple MPP (marked by
    the tracker) and an open 2 s after the send count as machines, with their reason."""
    w = tracked(3)
    a, b, c = w.customers
    w.send_all(segment=5)
    w.track(OPENED, [opened(w, a, at(300)), opened(w, a, at(400)),
                     opened(w, b, at(500), machine=True, why="proxy:apple-mpp"),
                     opened(w, c, at(2))])
    w.apply_both()
    assert w.totals(OPENED) == {5: (2, 2, 1, 2)}
    with w.customer.connect() as conn:
        stats = {r.customer_id: r.open_count for r in conn.execute(select(CustomerStats))
                 if r.open_count}
    assert stats == {a: 2}
    with w.report.connect() as conn:
        facts = {r.customer_id: (r.open_count, r.machine_open_count, r.first_open_at)
                 for r in conn.execute(select(MessageFact))}
        whys = [r.why for r in conn.execute(select(OpenFact).order_by(OpenFact.id))]
        hourly = conn.execute(select(HourlyCount.total, HourlyCount.machine, HourlyCount.uniques,
                                     HourlyCount.machine_uniques)
                              .where(HourlyCount.event == OPENED)).one()
    assert facts[a][:2] == (2, 0) and facts[a][2] is not None
    assert facts[b][:2] == (0, 1) and facts[c][:2] == (0, 1) and facts[b][2] is None
    assert whys == [None, None, "proxy:apple-mpp", hits.SOON]
    assert hourly == (2, 2, 1, 2)


def test_opens_exactly_once_across_runs(tracked: Any) -> None:
    """The same customer's opens spread over many small batches and a second pass: one
    unique, every open counted once."""
    w = tracked(2)
    a, b = w.customers
    w.send_all()
    w.track(OPENED, [opened(w, a if k % 3 else b, at(100 + k)) for k in range(30)])
    w.apply_both(batch_size=4)
    w.apply_both(batch_size=4)
    assert w.totals(OPENED) == {0: (30, 0, 2, 0)}


# --- unsubscribes ---------------------------------------------------------------------------

def test_unsubscribe_keeps_customer_out_of_the_next_launch(tracked: Any) -> None:
    """A one-click unsubscribe from a mail opts the customer out of that mail's conversation
    (found from the instance); preparing the campaign's next launch leaves them out."""
    w = tracked(3)
    a, b, c = w.customers
    conv = conversation_of(w)
    w.send_all()
    w.track(UNSUBSCRIBED, [{"customer": b, "instance": w.instance, "via": "one-click",
                            "ts": at(90)}])
    w.apply_both()
    assert subscriptions(w)[(b, conv)] == ("opted_out", "tracker")
    assert subscriptions(w)[(a, conv)][0] == "active"
    with w.customer.begin() as conn:  # the conversation's next campaign
        camp = conn.execute(insert(Campaign).values(
            name="summer", conversation_id=conv, status="running", created_at=NOW,
            updated_at=NOW).returning(Campaign.id)).scalar_one()
        msg = conn.execute(insert(Message).values(campaign_id=camp, name="main")
                           .returning(Message.id)).scalar_one()
    nxt = launch(w.customer, msg, at=NOW, run_key="2")
    with writer(w.customer).connect() as conn:
        prepare(conn, nxt, NOW)
        conn.commit()
    with w.customer.connect() as conn:
        targeted = set(conn.execute(select(Target.customer_id)
                                    .where(Target.instance_id == nxt)).scalars())
    assert b not in targeted and {a, c} <= targeted
    with w.report.connect() as conn:
        assert conn.execute(select(MessageFact.unsubscribed_at)
                            .where(MessageFact.customer_id == b)).scalar_one() is not None
        assert conn.execute(select(EventTotal.total, EventTotal.uniques)
                            .where(EventTotal.event == UNSUBSCRIBED)).one() == (1, 1)


def test_old_unsubscribe_does_not_undo_a_later_resubscription(tracked: Any) -> None:
    """A customer re-subscribed (by an import) after unsubscribing stays active when the old
    unsubscribe record is applied late (here: a second stream read after the import)."""
    w = tracked(1)
    (a,) = w.customers
    conv = conversation_of(w)
    w.track(UNSUBSCRIBED, [{"customer": a, "instance": w.instance, "via": "page",
                            "ts": at(10)}], stream="tracker.events.2")
    with w.customer.begin() as conn:
        conn.execute(update(Subscription).values(status="active", source="import",
                                                 changed_at=NOW + timedelta(seconds=60)))
    w.apply("customer", "tracker.events.2")
    assert subscriptions(w)[(a, conv)] == ("active", "import")


def test_unsubscribe_from_everything(tracked: Any) -> None:
    """scope "all" opts the customer out of every conversation they are in; another customer
    is untouched; a given conversation is used as it is."""
    w = tracked(2)
    a, b = w.customers
    conv = conversation_of(w)
    other = seed(w.customer, 0, name="autumn")["conversation"]
    with w.customer.begin() as conn:
        conn.execute(insert(Subscription), [
            {"customer_id": a, "conversation_id": other, "status": "active",
             "changed_at": NOW - timedelta(days=1)},
            {"customer_id": b, "conversation_id": other, "status": "active",
             "changed_at": NOW - timedelta(days=1)}])
    w.track(UNSUBSCRIBED, [{"customer": a, "scope": "all", "via": "mail", "ts": at(30)},
                           {"customer": b, "conversation": other, "ts": at(40)}])
    w.apply_both()
    got = subscriptions(w)
    assert got[(a, conv)] == ("opted_out", "reply") and got[(a, other)][0] == "opted_out"
    assert got[(b, conv)][0] == "active" and got[(b, other)][0] == "opted_out"
    with w.customer.connect() as conn:
        assert conn.execute(select(Conversation.id).where(Conversation.id == other)).scalar_one()


# --- conversions ----------------------------------------------------------------------------

def test_conversions_counted_once_per_order(tracked: Any) -> None:
    """The same order reported three times (reloads, and again in a later batch) counts
    once; calls without an order id all count; totals per instance and per link."""
    w = tracked(2)
    a, b = w.customers
    shoes = w.links[0]
    w.send_all()

    def conv(customer: int, ts: str, **kw: Any) -> dict[str, Any]:
        return {"instance": w.instance, "customer": customer, "ts": ts, **kw}

    w.track(CONVERTED, [conv(a, at(100), order="A-1", amount=30.0, link=shoes),
                        conv(a, at(101), order="A-1", amount=30.0, link=shoes),
                        conv(b, at(200), amount=5.0), conv(b, at(300), amount=7.5)])
    w.apply_both(batch_size=2)
    w.track(CONVERTED, [conv(a, at(400), order="A-1", amount=30.0, link=shoes)])
    w.apply_both()
    with w.report.connect() as conn:
        total = conn.execute(select(EventTotal.total, EventTotal.uniques, EventTotal.amount)
                             .where(EventTotal.event == CONVERTED)).one()
        link = conn.execute(select(LinkCount.conversions, LinkCount.amount)).one()
        orders = conn.execute(select(ConversionOrder.order_key)).scalars().all()
        facts = {r.customer_id: (r.conversion_count, r.conversion_amount)
                 for r in conn.execute(select(MessageFact))}
    assert total == (3, 2, 42.5)
    assert link == (1, 30.0)
    assert orders == ["A-1"]
    assert facts[a] == (1, 30.0) and facts[b] == (2, 12.5)
