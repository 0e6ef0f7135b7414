"""Report DB models: per-message facts (one row per message instance and customer, and per
link) and the aggregates that reports read. Written only by the profiler's report consumer.

Inputs: none (declarations). Outputs: `ReportBase.metadata` and the ORM classes.

Opens and clicks are counted twice, side by side: `total`/`uniques` for people and
`machine`/`machine_uniques` for machine traffic (scanners, pre-fetchers, image proxies: decided
by the tracker per request and by the profiler from history, connectd.appliers.hits). Uniques
are kept as the events arrive for each instance (first_hits for clicks, message_facts' open
counts for opens: a customer seen there for the first time bumps `uniques`); unique clickers
per link are counted from click_facts when asked. Totals per hour, per link and per segment are
aggregates, and `event_totals` holds the totals per message instance, segment and event kind
that the campaign summary reads without scanning facts. `report_instances` and
`report_segments` copy the names the reports show, so the report DB answers on its own (it
may live on another server than the customer DB).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, Float, Integer, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from connectd.db.common import ConsumerPositionMixin
from connectd.db.types import BigId, UtcDateTime, metadata, utcnow

NO_SEGMENT = 0  # event_totals.segment_id for events of customers outside any segment


class ReportBase(DeclarativeBase):
    metadata = metadata()


class ConsumerPosition(ConsumerPositionMixin, ReportBase):
    pass


class MessageFact(ReportBase):
    """What happened to one message instance for one customer."""

    __tablename__ = "message_facts"

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    segment_id: Mapped[int | None] = mapped_column(BigInteger)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    open_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)  # people
    first_open_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_open_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # each click is a fact of its own (click_facts: one row per click, appended), and
    # first_hits says who is new to the instance; the last click and its link are the history
    # the "links at once" machine rule needs (connectd.appliers.hits)
    machine_open_count: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0")
    last_click_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_click_link: Mapped[int | None] = mapped_column(BigInteger)
    conversion_count: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0")
    conversion_amount: Mapped[float] = mapped_column(
        Float, nullable=False, default=0.0, server_default=text("0"))
    # outcomes after sending (nullable or defaulted, so existing inserts need not name them)
    failed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # rejected at hand-off
    bounced_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    bounce_kind: Mapped[str | None] = mapped_column(String(8))  # hard | soft
    reply_count: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0")
    last_reply_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    complained_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ClickFact(ReportBase):
    """One click (append-only): the raw fact that unique counts per message, link, segment and
    hour can always be recomputed from. Appending keeps the profiler's click path at one plain
    insert per click (an upsert per customer and link cost several times more, and a
    secondary index on instance_id another 40%: see bench/profiler_ingest.py); reports read
    the aggregates (hourly_counts, event_totals), and whatever index or aggregate the report
    queries need comes with them."""

    __tablename__ = "click_facts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    customer_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    link_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    clicked_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    machine: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    why: Mapped[str | None] = mapped_column(String(64))  # what made it machine traffic


class OpenFact(ReportBase):
    """One open (append-only), people's and machines' alike: raw hits are never thrown away."""

    __tablename__ = "open_facts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    customer_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    machine: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    why: Mapped[str | None] = mapped_column(String(64))


class FirstHit(ReportBase):
    """The memory behind unique clickers of an instance: one row per (instance, people or
    machine, customer), inserted or ignored; a row that is inserted is a new unique clicker.
    Without a rowid on SQLite: the key is the whole row.

    Unique clickers per link are counted from click_facts when a report asks (see
    connectd.appliers.tracking.link_uniques), not kept here: nearly every click is a new
    (customer, link), so keeping them cost one more B-tree insert per click, 1.8x a bare
    insert of the click on SQLite, which the profiler's ingest budget does not have."""

    __tablename__ = "first_hits"
    __table_args__ = {"sqlite_with_rowid": False}

    # key order: the applier inserts sorted by (instance, machine), customer ascending
    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    machine: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class LinkCount(ReportBase):
    """Clicks and conversions per message instance and link, people and machines side by
    side (conversions are attributed to the link clicked last, when the tracker knows it).
    Unique clickers per link: connectd.appliers.tracking.link_uniques."""

    __tablename__ = "link_counts"

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    link_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    machine: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    conversions: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default="0")
    amount: Mapped[float] = mapped_column(Float, nullable=False, default=0.0,
                                          server_default=text("0"))


class ConversionOrder(ReportBase):
    """Orders already counted: a conversion call repeated for the same order (the shop's
    thank-you page reloaded) counts once."""

    __tablename__ = "conversion_orders"

    order_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    instance_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    customer_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class HourlyCount(ReportBase):
    """Total events of one kind (`link.clicked`, ...) per message instance and hour (UTC).
    Opens and clicks: `total` counts people's, `machine` machines'; `uniques` and
    `machine_uniques` count the customers whose first open/click of the instance fell in that
    hour (so they add up to the instance's uniques)."""

    __tablename__ = "hourly_counts"

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    hour: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    event: Mapped[str] = mapped_column(String(64), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    uniques: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    machine: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    machine_uniques: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default="0")


class EventTotal(ReportBase):
    """Totals per message instance, segment (NO_SEGMENT = none) and event kind (`mail.sent`,
    `link.clicked`, ...): `total` counts every event, `uniques` the customers with at least
    one (the applier bumps it when a fact row sees its first event of that kind). Opens and
    clicks: `total`/`uniques` are people's, `machine`/`machine_uniques` machines'.
    Conversions: `amount` sums their amounts (as given, whatever the currency)."""

    __tablename__ = "event_totals"

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    segment_id: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, default=NO_SEGMENT, server_default=text("0"))
    event: Mapped[str] = mapped_column(String(64), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    uniques: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    first_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    machine: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    machine_uniques: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default="0")
    amount: Mapped[float] = mapped_column(Float, nullable=False, default=0.0,
                                          server_default=text("0"))


class ReportInstance(ReportBase):
    """The names a report shows for a message instance (copied when it is launched)."""

    __tablename__ = "report_instances"

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    message_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    campaign_id: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    campaign_name: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    message_name: Mapped[str] = mapped_column(String(200), nullable=False)
    message_kind: Mapped[str] = mapped_column(String(16), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)


class ReportSegment(ReportBase):
    """The name and order of a segment, for reports broken down by segment."""

    __tablename__ = "report_segments"

    segment_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)


class InboundMessage(ReportBase):
    """One processed inbound message (mail.processed): how the processor classified and
    handled it. Keyed by the inbound store's name, so a message is counted once."""

    __tablename__ = "inbound_messages"

    message: Mapped[str] = mapped_column(String(255), primary_key=True)
    received_id: Mapped[str] = mapped_column(String(64), nullable=False)  # mail.received id
    processed_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    handler: Mapped[str] = mapped_column(String(64), nullable=False, default="",
                                         server_default="")
    actions: Mapped[str] = mapped_column(String(255), nullable=False, default="",
                                         server_default="")  # comma-separated, in order
    instance_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    customer_id: Mapped[int | None] = mapped_column(BigInteger)
    context_via: Mapped[str | None] = mapped_column(String(16))
    hard: Mapped[bool | None] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str | None] = mapped_column(String(16))
    recipients: Mapped[int] = mapped_column(Integer, nullable=False, default=0,
                                            server_default="0")  # bounced addresses
    errors: Mapped[int] = mapped_column(Integer, nullable=False, default=0,
                                        server_default="0")  # actions that failed


class InboundTotal(ReportBase):
    """Processed inbound messages per message instance (0: no context found), kind and
    handler ("" when none accepted it); `hard`/`soft` split the bounces."""

    __tablename__ = "inbound_totals"

    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    handler: Mapped[str] = mapped_column(String(64), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    hard: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    soft: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    first_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class TriggerCount(ReportBase):
    """Named events reply handlers fired (event.triggered), per name and message instance
    (0: none)."""

    __tablename__ = "trigger_counts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    first_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
