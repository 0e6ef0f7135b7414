"""The processor's records applied (connectd.appliers.inbound) by the profiler's real Consumer
from a real processor.events stream to real customer and report DBs (SQLite and PostgreSQL):
bounces hard and soft (threshold, window, reset by a person's open, never undoing a later
re-subscription), complaints, subscribe requests, replies, attributes, events, the report
facts of processed messages, and exactly once across a consumer restart."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from test_execution import NOW, seed
from test_tracking_appliers import Tracked, at

from connectd import settings as settings_mod
from connectd.appliers import inbound
from connectd.consumer import Consumer
from connectd.conversations import import_subscriptions
from connectd.daemons.profiler import Profiler, consumer_name
from connectd.db.customer import (
    AttributeDef,
    Bounce,
    Customer,
    CustomerEvent,
    CustomerReply,
    CustomerStats,
    Subscription,
)
from connectd.db.report import (
    EventTotal,
    InboundMessage,
    InboundTotal,
    MessageFact,
    TriggerCount,
)
from connectd.spool import SHUNT

STREAM = "processor.events"
DAY = 86400


class Inbound(Tracked):
    """A Tracked world (targets sent at NOW, subscribed 30 days before) with a second
    conversation, fed processor records."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with self.customer.connect() as conn:
            self.conv = conn.execute(select(Subscription.conversation_id)).scalars().first()
        self.other = seed(self.customer, 0, name="autumn")["conversation"]

    def emit(self, kind: str, records: list[dict[str, Any]], stream: str = STREAM) -> None:
        self.track(kind, records, stream)

    def consumer(self, db: str, stream: str = STREAM, batch_size: int = 1000) -> Consumer:
        engine = self.customer if db == "customer" else self.report
        c = Consumer(self.spool, stream, consumer_name(db), db, engine,  # type: ignore[arg-type]
                     batch_size)
        c.cache["settings"] = self.settings  # what the profiler does
        return c

    def apply(self, db: str = "customer", stream: str = STREAM,  # type: ignore[override]
              batch_size: int = 1000) -> int:
        consumer = self.consumer(db, stream, batch_size)
        try:
            total = 0
            while n := consumer.poll():
                total += n
            return total
        finally:
            consumer.close()

    def apply_both(self, stream: str = STREAM, batch_size: int = 1000) -> None:
        self.apply("customer", stream, batch_size)
        self.apply("report", stream, batch_size)

    def statuses(self, customer: int) -> dict[int, tuple[str, str | None]]:
        with self.customer.connect() as conn:
            return {r.conversation_id: (r.status, r.source) for r in conn.execute(
                select(Subscription).where(Subscription.customer_id == customer))}

    def stats(self, customer: int) -> Any:
        with self.customer.connect() as conn:
            return conn.execute(select(CustomerStats)
                                .where(CustomerStats.customer_id == customer)).first()

    def shunted(self) -> list[dict[str, Any]]:
        if SHUNT not in list(self.spool.streams()):
            return []
        return [rec for _, rec, _ in self.spool.reader(SHUNT).records()]


@pytest.fixture
def inbound_world(tmp_path: Path, migrated_customer_url: str,
                  migrated_report_url: str) -> Iterator[Any]:
    made: list[Inbound] = []

    def make(customers: int = 3, extra: str = "") -> Inbound:
        made.append(Inbound(tmp_path, migrated_customer_url, migrated_report_url, customers,
                            extra))
        return made[-1]

    yield make
    for w in made:
        w.close()


SOFT_3_IN_10 = "[processor]\nsoft_bounce_limit = 3\nsoft_bounce_days = 10\n"


def bounce(w: Inbound, customer: int | None, ts: str, hard: bool = True,
           **extra: Any) -> dict[str, Any]:
    return {"customer": customer, "instance": w.instance, "hard": hard,
            "reason": "userunknown" if hard else "mailboxfull",
            "status": "5.1.1" if hard else "4.2.2", "message": f"m-{ts}", "ts": ts, **extra}


# --- bounces --------------------------------------------------------------------------------

def test_hard_bounce_bounces_out_of_every_conversation(inbound_world: Any) -> None:
    """A hard bounce makes the customer bounced_out in their conversation and in every other
    one (inserted), counts it with its time and reason, and a later subscriber import does
    not bring them back; another customer is untouched."""
    w = inbound_world(2)
    a, b = w.customers
    w.emit("mail.bounced", [bounce(w, a, at(600))])
    w.apply_both()
    assert w.statuses(a) == {w.conv: ("bounced_out", "bounce"), w.other: ("bounced_out", "bounce")}
    assert w.statuses(b) == {w.conv: ("active", None)}
    s = w.stats(a)
    assert (s.hard_bounce_count, s.soft_bounce_count, s.last_bounce_reason) == (1, 0, "userunknown")
    assert s.last_bounce_at == NOW + timedelta(seconds=600) == s.bounced_out_at
    with w.customer.connect() as conn:
        email = conn.execute(select(Customer.email).where(Customer.id == a)).scalar_one()
    summary = import_subscriptions(w.customer, io.BytesIO(f"email\n{email}\n".encode()),
                                   "conv-autumn", "active")
    assert summary.kept == 1
    assert w.statuses(a)[w.other][0] == "bounced_out"
    with w.report.connect() as conn:
        fact = conn.execute(select(MessageFact.bounced_at, MessageFact.bounce_kind)
                            .where(MessageFact.customer_id == a)).one()
        total = conn.execute(select(EventTotal.total, EventTotal.uniques)
                             .where(EventTotal.event == "mail.bounced")).one()
    assert fact == (NOW + timedelta(seconds=600), "hard") and total == (1, 1)


def test_bounce_found_by_address_and_unknown_address_counted(inbound_world: Any) -> None:
    """A bounce without a customer is matched by its address in any case; one for an address
    nobody has changes no profile, is not shunted, and its message still counts in the
    report."""
    w = inbound_world(2)
    a, b = w.customers
    with w.customer.connect() as conn:
        email = conn.execute(select(Customer.email).where(Customer.id == b)).scalar_one()
    w.emit("mail.bounced", [bounce(w, None, at(60), address=email.upper()),
                            bounce(w, None, at(70), address="nobody@nowhere.example")])
    w.emit("mail.processed", [{"message": "m-x", "received": "r1", "kind": "bounce",
                               "handler": "persistent bounce", "actions": ["bounce"],
                               "hard": True, "recipients": ["nobody@nowhere.example"],
                               "ts": at(71)}])
    w.apply_both()
    assert w.statuses(b)[w.conv][0] == "bounced_out"
    assert w.statuses(a)[w.conv][0] == "active"
    with w.customer.connect() as conn:
        assert conn.execute(select(Bounce.customer_id)).scalars().all() == [b]
    with w.report.connect() as conn:
        assert conn.execute(select(InboundTotal.instance_id, InboundTotal.total,
                                   InboundTotal.hard)).all() == [(0, 1, 1)]
    assert w.shunted() == []


def test_soft_bounces_reach_the_threshold(inbound_world: Any) -> None:
    """soft_bounce_limit (3) soft bounces within soft_bounce_days (10): bounced out at the
    third; two were not enough; after a confirmed re-subscription the count starts again."""
    w = inbound_world(1, SOFT_3_IN_10)
    (a,) = w.customers
    w.emit("mail.bounced", [bounce(w, a, at(DAY * d), hard=False) for d in (1, 2)])
    w.apply_both()
    assert w.statuses(a)[w.conv][0] == "active"
    assert w.stats(a).soft_bounce_count == 2
    w.emit("mail.bounced", [bounce(w, a, at(DAY * 3), hard=False)])
    w.apply_both()
    assert w.statuses(a) == {w.conv: ("bounced_out", "bounce"), w.other: ("bounced_out", "bounce")}
    s = w.stats(a)
    assert (s.soft_bounce_count, s.hard_bounce_count) == (3, 0)
    assert s.bounced_out_at == NOW + timedelta(days=3)
    with w.report.connect() as conn:
        assert conn.execute(select(MessageFact.bounce_kind)).scalar_one() == "soft"
    # confirmed back in: the bounces before the bounce-out no longer count
    w.emit("customer.subscribed", [{"customer": a, "conversation": w.conv, "confirmed": True,
                                    "ts": at(DAY * 4)}])
    w.emit("mail.bounced", [bounce(w, a, at(DAY * 5), hard=False)])
    w.apply_both()
    assert w.statuses(a)[w.conv] == ("active", "reply")


def test_soft_bounces_outside_the_window_do_not_add_up(inbound_world: Any) -> None:
    """Three soft bounces 11 days apart never make 3 within 10 days: still active."""
    w = inbound_world(1, SOFT_3_IN_10)
    (a,) = w.customers
    w.emit("mail.bounced", [bounce(w, a, at(DAY * d), hard=False) for d in (1, 12, 23)])
    w.apply_both(batch_size=1)
    assert w.statuses(a)[w.conv][0] == "active"
    assert w.stats(a).soft_bounce_count == 3


def test_a_persons_open_resets_the_soft_bounce_count(inbound_world: Any) -> None:
    """Two soft bounces, then the customer opens a mail (a person: the tracker stream), then
    one more: not out (one since the open); two more after that make three: out."""
    w = inbound_world(1, SOFT_3_IN_10)
    (a,) = w.customers
    w.emit("mail.bounced", [bounce(w, a, at(DAY * d), hard=False) for d in (1, 2)])
    w.apply_both()
    w.track("message.opened", [{"instance": w.instance, "customer": a, "ts": at(DAY * 2.5),
                                "ua": "Mozilla/5.0"}], stream="tracker.events.1")
    w.apply_both(stream="tracker.events.1")
    assert w.stats(a).last_open_at == NOW + timedelta(days=2.5)
    w.emit("mail.bounced", [bounce(w, a, at(DAY * 3), hard=False)])
    w.apply_both()
    assert w.statuses(a)[w.conv][0] == "active"
    w.emit("mail.bounced", [bounce(w, a, at(DAY * d), hard=False) for d in (4, 5)])
    w.apply_both()
    assert w.statuses(a)[w.conv][0] == "bounced_out"
    assert w.stats(a).soft_bounce_count == 5


def test_a_machine_open_does_not_reset_the_count(inbound_world: Any) -> None:
    """An open by an image proxy says nothing about the mailbox: three soft bounces around
    it still bounce the customer out."""
    w = inbound_world(1, SOFT_3_IN_10)
    (a,) = w.customers
    w.track("message.opened", [{"instance": w.instance, "customer": a, "ts": at(DAY * 1.5),
                                "machine": True, "why": "proxy:apple-mpp"}],
            stream="tracker.events.1")
    w.apply_both(stream="tracker.events.1")
    w.emit("mail.bounced", [bounce(w, a, at(DAY * d), hard=False) for d in (1, 2, 3)])
    w.apply_both()
    assert w.statuses(a)[w.conv][0] == "bounced_out"


def test_old_bounce_does_not_undo_a_later_resubscription(inbound_world: Any) -> None:
    """A hard bounce applied late (another processor stream read after the customer
    re-subscribed) leaves the later subscription active; an opted-out subscription stays
    opted out (the customer's own word beats the mail system's)."""
    w = inbound_world(2)
    a, b = w.customers
    w.emit("mail.bounced", [bounce(w, a, at(10)), bounce(w, b, at(10))], stream="processor.2")
    with w.customer.begin() as conn:
        conn.execute(update(Subscription).where(Subscription.customer_id == a)
                     .values(status="active", source="web", changed_at=NOW + timedelta(hours=1)))
        conn.execute(update(Subscription).where(Subscription.customer_id == b)
                     .values(status="opted_out", source="tracker"))
    w.apply("customer", "processor.2")
    assert w.statuses(a)[w.conv] == ("active", "web")
    assert w.statuses(a)[w.other][0] == "bounced_out"  # no later change there
    assert w.statuses(b)[w.conv] == ("opted_out", "tracker")
    assert w.stats(a).hard_bounce_count == 1


def test_a_late_older_bounce_keeps_the_newest_reason(inbound_world: Any) -> None:
    """A bounce older than one already applied counts, but the last bounce's time and reason
    stay the newer one's."""
    w = inbound_world(1, SOFT_3_IN_10)
    (a,) = w.customers
    w.emit("mail.bounced", [bounce(w, a, at(DAY * 2), hard=False, reason="mailboxfull")])
    w.apply_both()
    w.emit("mail.bounced", [bounce(w, a, at(DAY), hard=False, reason="expired")],
           stream="processor.2")
    w.apply("customer", "processor.2")
    s = w.stats(a)
    assert (s.soft_bounce_count, s.last_bounce_reason) == (2, "mailboxfull")
    assert s.last_bounce_at == NOW + timedelta(days=2)


# --- complaints -----------------------------------------------------------------------------

def test_complaint_opts_out_everywhere(inbound_world: Any) -> None:
    """A complaint opts the customer out of every conversation, a bounced-out one included,
    counts it, and sets the message's complained_at."""
    w = inbound_world(2)
    a, b = w.customers
    w.emit("mail.bounced", [bounce(w, a, at(10))])
    w.emit("mail.complained", [{"customer": a, "instance": w.instance, "ts": at(20)},
                               {"customer": b, "instance": w.instance, "ts": at(30)}])
    w.apply_both()
    for c in (a, b):
        assert w.statuses(c) == {w.conv: ("opted_out", "complaint"),
                                 w.other: ("opted_out", "complaint")}
    assert (w.stats(b).complaint_count, w.stats(b).last_complaint_at) == (
        1, NOW + timedelta(seconds=30))
    with w.report.connect() as conn:
        assert conn.execute(select(EventTotal.total, EventTotal.uniques)
                            .where(EventTotal.event == "mail.complained")).one() == (2, 2)
        assert conn.execute(select(MessageFact.complained_at)
                            .where(MessageFact.customer_id == b)).scalar_one() \
            == NOW + timedelta(seconds=30)


# --- subscribe requests ---------------------------------------------------------------------

def test_subscribe_unconfirmed_then_confirmed(inbound_world: Any) -> None:
    """A request from an unknown address creates the customer, opting in to the named
    conversation; the confirmation makes it active. A request with no conversation takes the
    instance's campaign's."""
    w = inbound_world(1)
    (a,) = w.customers
    w.emit("customer.subscribed", [
        {"address": "New.Person@Example.org", "conversation": "conv-autumn", "ts": at(10)},
        {"customer": a, "instance": w.instance, "conversation": None, "ts": at(11)}])
    w.apply_both()
    with w.customer.connect() as conn:
        new = conn.execute(select(Customer.id, Customer.email).where(
            Customer.email_key == "new.person@example.org")).one()
    assert new.email == "New.Person@Example.org"
    assert w.statuses(new.id) == {w.other: ("opting_in", "reply")}
    assert w.statuses(a) == {w.conv: ("active", None)}  # active stays active
    w.emit("customer.subscribed", [{"address": "new.person@example.org",
                                    "conversation": w.other, "confirmed": True, "ts": at(99)}])
    w.apply_both()
    assert w.statuses(new.id) == {w.other: ("active", "reply")}


def test_bounced_out_customer_is_not_revived_unconfirmed(inbound_world: Any) -> None:
    """After a hard bounce an unconfirmed subscribe changes nothing; a confirmed one (from
    the customer's mailbox) makes that conversation active again."""
    w = inbound_world(1)
    (a,) = w.customers
    w.emit("mail.bounced", [bounce(w, a, at(10))])
    w.emit("customer.subscribed", [{"customer": a, "conversation": w.conv, "ts": at(20)}])
    w.apply_both()
    assert w.statuses(a)[w.conv][0] == "bounced_out"
    w.emit("customer.subscribed", [{"customer": a, "conversation": w.conv, "confirmed": True,
                                    "ts": at(30)}])
    w.apply_both()
    assert w.statuses(a) == {w.conv: ("active", "reply"), w.other: ("bounced_out", "bounce")}


def test_old_confirmation_does_not_undo_a_later_opt_out(inbound_world: Any) -> None:
    """A confirmation applied late (another stream) leaves a subscription the customer
    opted out of afterwards opted out."""
    w = inbound_world(1)
    (a,) = w.customers
    w.emit("customer.subscribed", [{"customer": a, "conversation": w.other, "confirmed": True,
                                    "ts": at(10)}], stream="processor.2")
    with w.customer.begin() as conn:
        conn.execute(insert(Subscription).values(
            customer_id=a, conversation_id=w.other, status="opted_out", source="tracker",
            changed_at=NOW + timedelta(hours=1)))
    w.apply("customer", "processor.2")
    assert w.statuses(a)[w.other] == ("opted_out", "tracker")


def test_subscribe_to_unknown_conversation_is_shunted(inbound_world: Any) -> None:
    """A conversation name nobody has shunts that record alone, with the reason; the record
    next to it is applied."""
    w = inbound_world(1)
    (a,) = w.customers
    w.emit("customer.subscribed", [
        {"customer": a, "conversation": "no-such-thing", "ts": at(10)},
        {"customer": a, "conversation": "conv-autumn", "ts": at(11)}])
    w.apply_both()
    assert w.statuses(a)[w.other][0] == "opting_in"
    shunted = w.shunted()
    assert [s["record"]["conversation"] for s in shunted] == ["no-such-thing"]
    assert "no conversation named" in shunted[0]["reason"]


# --- replies, attributes, events ------------------------------------------------------------

def test_replies_go_into_the_customers_history(inbound_world: Any) -> None:
    """Every reply is in the history; people's replies (not auto-replies) count in the
    profile and in the message's report row."""
    w = inbound_world(2)
    a, b = w.customers

    def replied(c: int, ts: str, kind: str = "human") -> dict[str, Any]:
        return {"customer": c, "instance": w.instance, "kind": kind, "subject": "Re: Hi",
                "handler": "customer service", "forwarded": True, "message": f"m{ts}",
                "ts": ts}

    w.emit("mail.replied", [replied(a, at(100)), replied(a, at(200)),
                            replied(b, at(300), "autoreply")])
    w.apply_both()
    with w.customer.connect() as conn:
        history = conn.execute(select(CustomerReply.customer_id, CustomerReply.kind,
                                      CustomerReply.forwarded)
                               .order_by(CustomerReply.replied_at)).all()
    assert history == [(a, "human", True), (a, "human", True), (b, "autoreply", True)]
    assert (w.stats(a).reply_count, w.stats(a).last_reply_at) == (2, NOW + timedelta(seconds=200))
    assert w.stats(b) is None or w.stats(b).reply_count == 0
    with w.report.connect() as conn:
        facts = {r.customer_id: r.reply_count for r in conn.execute(select(MessageFact))}
        total = conn.execute(select(EventTotal.total, EventTotal.uniques)
                             .where(EventTotal.event == "mail.replied")).one()
    assert facts == {a: 2} and total == (2, 1)


def test_attribute_set_and_a_bad_one_shunted(inbound_world: Any) -> None:
    """A defined attribute is set with its type (an integer from text); a null removes one;
    an undefined attribute and a value not of its type are shunted, alone."""
    w = inbound_world(2)
    a, b = w.customers
    with w.customer.begin() as conn:
        conn.execute(insert(AttributeDef), [
            {"name": "score", "type": "integer", "created_at": NOW},
            {"name": "vip", "type": "boolean", "created_at": NOW}])
        conn.execute(update(Customer).where(Customer.id == b)
                     .values(attributes={"vip": True, "score": 1}))
    w.emit("customer.attribute_set", [
        {"customer": a, "name": "score", "value": "42", "ts": at(1)},
        {"customer": a, "name": "nickname", "value": "Bob", "ts": at(2)},
        {"customer": a, "name": "vip", "value": True, "ts": at(3)},
        {"customer": b, "name": "vip", "value": None, "ts": at(4)},
        {"customer": b, "name": "score", "value": "lots", "ts": at(5)}])
    w.apply_both()
    with w.customer.connect() as conn:
        got = dict(conn.execute(select(Customer.id, Customer.attributes)).all())
    assert got[a] == {"score": 42, "vip": True}
    assert got[b] == {"score": 1}
    reasons = {s["record"]["name"]: s["reason"] for s in w.shunted()}
    assert set(reasons) == {"nickname", "score"}
    assert "nickname" in reasons["nickname"] and "integer" in reasons["score"]


def test_events_are_stored_and_counted(inbound_world: Any) -> None:
    """Triggered events land in customer_events (for event campaigns) and are counted per
    name and instance in the report."""
    w = inbound_world(2)
    a, b = w.customers
    w.emit("event.triggered", [
        {"name": "asked-for-catalogue", "customer": a, "instance": w.instance, "ts": at(5)},
        {"name": "asked-for-catalogue", "customer": b, "instance": w.instance, "ts": at(6)},
        {"name": "callback", "customer": b, "ts": at(7)}])
    w.apply_both()
    with w.customer.connect() as conn:
        events = conn.execute(select(CustomerEvent.name, CustomerEvent.customer_id)
                              .order_by(CustomerEvent.occurred_at)).all()
    assert events == [("asked-for-catalogue", a), ("asked-for-catalogue", b), ("callback", b)]
    with w.report.connect() as conn:
        counts = {(r.name, r.instance_id): r.total for r in conn.execute(select(TriggerCount))}
    assert counts == {("asked-for-catalogue", w.instance): 2, ("callback", 0): 1}


# --- report facts of processed messages -----------------------------------------------------

def test_processed_messages_report_facts(inbound_world: Any) -> None:
    """One inbound_messages row per message (a repeated one counts once); totals per
    instance, kind and handler with bounces split hard/soft."""
    w = inbound_world(2)
    a, b = w.customers

    def processed(n: int, kind: str, handler: str, **kw: Any) -> dict[str, Any]:
        return {"message": f"msg{n}", "received": f"r{n}", "kind": kind, "handler": handler,
                "ts": at(n), **kw}

    recs = [processed(1, "bounce", "persistent bounce", hard=True, customer=a,
                      instance=w.instance, actions=["bounce"], recipients=["x@y"]),
            processed(2, "bounce", "temporary bounce", hard=False, customer=b,
                      instance=w.instance, actions=["bounce"]),
            processed(3, "autoreply", "auto-reply", customer=a, instance=w.instance),
            processed(4, "unsubscribe", "unsubscribe", customer=b, instance=w.instance),
            processed(5, "human", "customer service", actions=["forward", "archive"]),
            processed(6, "feedback", "complaint", customer=a, instance=w.instance)]
    w.emit("mail.processed", recs)
    w.emit("mail.processed", [recs[0]])  # the same message again
    w.apply_both()
    with w.report.connect() as conn:
        totals = {(r.instance_id, r.kind, r.handler): (r.total, r.hard, r.soft)
                  for r in conn.execute(select(InboundTotal))}
        rows = conn.execute(select(InboundMessage.message, InboundMessage.actions,
                                   InboundMessage.recipients)
                            .order_by(InboundMessage.processed_at)).all()
    i = w.instance
    assert totals == {(i, "bounce", "persistent bounce"): (1, 1, 0),
                      (i, "bounce", "temporary bounce"): (1, 0, 1),
                      (i, "autoreply", "auto-reply"): (1, 0, 0),
                      (i, "unsubscribe", "unsubscribe"): (1, 0, 0),
                      (0, "human", "customer service"): (1, 0, 0),
                      (i, "feedback", "complaint"): (1, 0, 0)}
    assert rows[0] == ("msg1", "bounce", 1) and rows[4] == ("msg5", "forward,archive", 0)
    assert len(rows) == 6


def test_mail_received_records_are_passed_over(inbound_world: Any) -> None:
    """The receiver's mail.received records have no applier: both consumers read past them
    (positions advance) and nothing is shunted."""
    w = inbound_world(1)
    w.emit("mail.received", [{"message": f"m{k}", "size": 100, "sha256": "ab" * 32,
                              "rcpt": ["b-x@reply.example"], "ts": at(k)} for k in range(5)],
           stream="receiver.events")
    assert w.apply("customer", "receiver.events") == 5
    assert w.apply("report", "receiver.events") == 5
    assert w.apply("customer", "receiver.events") == 0
    assert w.shunted() == []


# --- exactly once ---------------------------------------------------------------------------

def test_exactly_once_across_a_consumer_restart(inbound_world: Any) -> None:
    """A mix of 120 inbound records applied in small batches by a consumer that stops
    half-way and a new one that takes over, then a pass that finds nothing: every count is
    what the records say, once."""
    w = inbound_world(6, "[processor]\nsoft_bounce_limit = 1000\n")
    rnd = random.Random(5)
    kinds: list[tuple[str, dict[str, Any]]] = []
    for k in range(120):
        c = rnd.choice(w.customers)
        pick = k % 4
        if pick == 0:
            kinds.append(("mail.bounced", bounce(w, c, at(100 + k), hard=False)))
        elif pick == 1:
            kinds.append(("mail.replied", {"customer": c, "instance": w.instance,
                                           "ts": at(100 + k)}))
        elif pick == 2:
            kinds.append(("event.triggered", {"name": "e", "customer": c, "ts": at(100 + k)}))
        else:
            kinds.append(("mail.processed", {"message": f"msg{k}", "received": f"r{k}",
                                             "kind": "human", "ts": at(100 + k)}))
    writer = w.spool.writer(STREAM)
    for kind, rec in kinds:
        rec = dict(rec)
        writer.append(kind, rec, ts=rec.pop("ts"))
    writer.close()
    for db in ("customer", "report"):
        first = w.consumer(db, batch_size=7)
        for _ in range(9):  # 63 records, then the "process" is gone
            first.poll()
        first.close()
        assert w.apply(db, STREAM, 11) == 120 - 63
        assert w.apply(db, STREAM, 11) == 0
    soft = [r for k, r in kinds if k == "mail.bounced"]
    replies = [r for k, r in kinds if k == "mail.replied"]
    with w.customer.connect() as conn:
        stats = {r.customer_id: (r.soft_bounce_count, r.reply_count)
                 for r in conn.execute(select(CustomerStats))}
        events = len(conn.execute(select(CustomerEvent.record_id)).all())
    for c in w.customers:
        assert stats.get(c, (0, 0)) == (sum(r["customer"] == c for r in soft),
                                        sum(r["customer"] == c for r in replies))
    assert events == 30
    with w.report.connect() as conn:
        assert conn.execute(select(InboundTotal.total)).scalar_one() == 30
        assert conn.execute(select(EventTotal.total).where(
            EventTotal.event == "mail.replied")).scalar_one() == 30
        assert conn.execute(select(TriggerCount.total)).scalar_one() == 30
    assert w.shunted() == []


# --- through the profiler -------------------------------------------------------------------

def test_profiler_passes_the_soft_bounce_settings(inbound_world: Any) -> None:
    """The profiler daemon (run until idle) applies processor.events with the configured
    soft-bounce limit (2 here, not the default 5)."""
    w = inbound_world(1, "[processor]\nsoft_bounce_limit = 2\n")
    (a,) = w.customers
    w.emit("mail.bounced", [bounce(w, a, at(DAY * d), hard=False) for d in (1, 2)])
    settings = settings_mod.load(w.cfg, environ={})
    assert settings.processor.soft_bounce_limit == 2
    Profiler(settings).run_until_idle()
    assert w.statuses(a)[w.conv][0] == "bounced_out"


def test_soft_bounce_rule_defaults() -> None:
    """Without settings in the cache the rule is Connect's: 5 in 30 days."""
    assert inbound.soft_bounce_rule({}) == (5, timedelta(days=30))
    assert isinstance(NOW, datetime)
