"""Customer DB models (SQLAlchemy 2): customers and their profile, and everything that decides
who gets what (conversations, campaigns, messages, instances, targets, batches) plus users.

Migrations live in connectd/db/migrations/customer; change a model, add a migration.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from connectd.db.common import ConsumerPositionMixin
from connectd.db.types import BigId, Json


class CustomerBase(DeclarativeBase):
    pass


class ConsumerPosition(ConsumerPositionMixin, CustomerBase):
    pass


class Customer(CustomerBase):
    """One person we may mail. `email_key` is the lower-cased address: unique, so the same
    address in another case is the same customer. Attributes are typed by AttributeDef."""

    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320), nullable=False)
    email_key: Mapped[str] = mapped_column(String(320), nullable=False, unique=True)
    attributes: Mapped[dict] = mapped_column(Json, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class AttributeDef(CustomerBase):
    """The declared type of a customer attribute: string, integer, number, boolean, date,
    datetime. Imports infer it on first sight (or take it declared) and then enforce it."""

    __tablename__ = "attribute_defs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class CustomerStats(CustomerBase):
    """Profile statistics the profiler keeps and segments filter on."""

    __tablename__ = "customer_stats"

    customer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)
    sent_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    open_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    click_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    reply_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    soft_bounce_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_open_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_click_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_reply_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class CustomerInterest(CustomerBase):
    """Connect's inferred interests: how often a customer clicked links carrying a label."""

    __tablename__ = "customer_interests"

    customer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class Link(CustomerBase):
    """A tracked link of a message: its URL and up to four interest labels."""

    __tablename__ = "links"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    url: Mapped[str] = mapped_column(String(2048), nullable=False)
    name: Mapped[str | None] = mapped_column(String(200))
    labels: Mapped[list] = mapped_column(Json, nullable=False, default=list)  # at most 4
