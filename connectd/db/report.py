"""Report DB models: per-message facts (one row per message instance and customer, and per
link) and the aggregates that reports read. Written only by the profiler's report consumer.

Unique counts are counted from the fact rows (a customer who clicked twice has one row with
click_count 2); totals per hour are kept as aggregates.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from connectd.db.common import ConsumerPositionMixin


class ReportBase(DeclarativeBase):
    pass


class ConsumerPosition(ConsumerPositionMixin, ReportBase):
    pass


class MessageFact(ReportBase):
    """What happened to one message instance for one customer."""

    __tablename__ = "message_facts"

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    segment_id: Mapped[int | None] = mapped_column(BigInteger)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    open_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    first_open_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_open_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    click_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    first_click_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_click_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LinkFact(ReportBase):
    """Clicks of one customer on one link of one message instance."""

    __tablename__ = "link_facts"

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    link_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    click_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    first_click_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_click_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class HourlyCount(ReportBase):
    """Total events of one kind (`link.clicked`, ...) per message instance and hour (UTC)."""

    __tablename__ = "hourly_counts"

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    hour: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    event: Mapped[str] = mapped_column(String(64), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
