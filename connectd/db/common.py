"""Pieces both databases share: the consumer-position table (exactly-once bookkeeping)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from connectd.db.types import UtcDateTime


class ConsumerPositionMixin:
    """Where one consumer of one stream of one spool has got to. A consumer updates its row in
    the same transaction as the effects of the records it read, so a crash can never separate
    "applied" from "position advanced" (exactly once)."""

    __tablename__ = "consumer_positions"

    spool_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # which host's spool
    stream: Mapped[str] = mapped_column(String(128), primary_key=True)
    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    segment: Mapped[int] = mapped_column(Integer, nullable=False)
    offset: Mapped[int] = mapped_column(BigInteger, nullable=False)
    records: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)  # applied so far
    last_record_ts: Mapped[datetime | None] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
