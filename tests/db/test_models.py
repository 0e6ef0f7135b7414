"""Customer/report models on a migrated database: the constraints that keep the data honest."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connectd.db.customer import (
    ROLE_PERMISSIONS,
    Campaign,
    Conversation,
    Customer,
    Message,
    MessageInstance,
    Role,
    Subscription,
    SuppressionEntry,
    SuppressionList,
    Target,
)
from connectd.db.engine import make_engine
from connectd.db.report import EventTotal, MessageFact

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def customer_db(migrated_customer_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_customer_url)
    yield engine
    engine.dispose()


@pytest.fixture
def report_db(migrated_report_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_report_url)
    yield engine
    engine.dispose()


def add_customer(session: Session, email: str) -> Customer:
    c = Customer(email=email, email_key=email.lower(), attributes={}, created_at=NOW,
                 updated_at=NOW)
    session.add(c)
    session.flush()
    return c


def add_instance(session: Session) -> MessageInstance:
    campaign = Campaign(name="June deals")
    session.add(campaign)
    session.flush()
    message = Message(campaign_id=campaign.id, name="main")
    session.add(message)
    session.flush()
    instance = MessageInstance(message_id=message.id)
    session.add(instance)
    session.flush()
    return instance


def test_email_unique_regardless_of_case(customer_db: Engine) -> None:
    """A@x.com and a@X.com are the same customer: the second insert conflicts."""
    with Session(customer_db) as s:
        add_customer(s, "A@x.com")
        s.commit()
        with pytest.raises(IntegrityError):
            add_customer(s, "a@X.com")


def test_target_unique_per_instance_and_customer(customer_db: Engine) -> None:
    """A customer is targeted at most once per message instance."""
    with Session(customer_db) as s:
        instance = add_instance(s)
        cust = add_customer(s, "t@example.com")
        s.add(Target(instance_id=instance.id, customer_id=cust.id))
        s.commit()
        s.add(Target(instance_id=instance.id, customer_id=cust.id))
        with pytest.raises(IntegrityError):
            s.commit()


def test_target_in_another_instance_is_allowed(customer_db: Engine) -> None:
    """The same customer may be a target of two different instances of a message."""
    with Session(customer_db) as s:
        first = add_instance(s)
        second = MessageInstance(message_id=first.message_id, run_key="2024-06-02")
        s.add(second)
        cust = add_customer(s, "t@example.com")
        s.flush()
        s.add_all([Target(instance_id=first.id, customer_id=cust.id),
                   Target(instance_id=second.id, customer_id=cust.id)])
        s.commit()
        assert len(s.scalars(select(Target)).all()) == 2


def test_subscription_unique_per_customer_and_conversation(customer_db: Engine) -> None:
    """One subscription row per (customer, conversation)."""
    with Session(customer_db) as s:
        conv = Conversation(name="Weekly deals")
        s.add(conv)
        cust = add_customer(s, "s@example.com")
        s.flush()
        row = {"customer_id": cust.id, "conversation_id": conv.id, "status": "active",
               "changed_at": NOW}
        s.execute(insert(Subscription), [row])
        s.commit()
        with pytest.raises(IntegrityError):
            s.execute(insert(Subscription), [{**row, "status": "opted_out"}])


def test_subscription_status_is_checked(customer_db: Engine) -> None:
    """A status outside the enumeration is refused by the CHECK constraint."""
    with Session(customer_db) as s:
        conv = Conversation(name="News")
        s.add(conv)
        cust = add_customer(s, "c@example.com")
        s.flush()
        s.add(Subscription(customer_id=cust.id, conversation_id=conv.id, status="maybe"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_followup_needs_parent_and_trigger(customer_db: Engine) -> None:
    """A follow-up without a parent message is refused."""
    with Session(customer_db) as s:
        campaign = Campaign(name="c")
        s.add(campaign)
        s.flush()
        s.add(Message(campaign_id=campaign.id, name="f", kind="followup", trigger_event="opened"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_suppression_entry_unique_per_list(customer_db: Engine) -> None:
    """The same value twice in one list conflicts; in another list it is fine."""
    with Session(customer_db) as s:
        a, b = SuppressionList(name="global"), SuppressionList(name="partner")
        s.add_all([a, b])
        s.flush()
        s.add_all([SuppressionEntry(list_id=a.id, value="x@example.com"),
                   SuppressionEntry(list_id=b.id, value="x@example.com"),
                   SuppressionEntry(list_id=a.id, kind="domain", value="example.org")])
        s.commit()
        s.add(SuppressionEntry(list_id=a.id, value="x@example.com"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_roles_are_seeded(customer_db: Engine) -> None:
    """The migration seeds admin, marketer, approver and viewer with the models' permissions."""
    with Session(customer_db) as s:
        roles = {r.name: r.permissions for r in s.scalars(select(Role))}
    assert roles == ROLE_PERMISSIONS


def test_timestamps_come_back_aware_utc(customer_db: Engine) -> None:
    """A timestamp written with any offset reads back as the same instant, in UTC."""
    local = datetime(2024, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    with Session(customer_db) as s:
        s.add(Conversation(name="tz", created_at=local))
        s.commit()
    with Session(customer_db) as s:
        got = s.scalar(select(Conversation.created_at))
    assert got == NOW
    assert got.utcoffset() == timedelta(0)


def test_report_defaults_for_new_columns(report_db: Engine) -> None:
    """Rows inserted naming only the original fact columns get zero counts in the new ones."""
    with Session(report_db) as s:
        s.execute(insert(MessageFact), [{"instance_id": 1, "customer_id": 2, "open_count": 0,
                                         "click_count": 0}])
        s.execute(insert(EventTotal), [{"instance_id": 1, "event": "mail.sent", "total": 1}])
        s.commit()
        fact = s.scalars(select(MessageFact)).one()
        total = s.scalars(select(EventTotal)).one()
    assert (fact.reply_count, fact.bounced_at) == (0, None)
    assert (total.segment_id, total.uniques) == (0, 0)
