"""Customer DB models (SQLAlchemy 2): customers and their profile, and everything that decides
who gets what (conversations, campaigns, messages, instances, targets, batches) plus users.

Inputs: none (declarations). Outputs: `CustomerBase.metadata`, the ORM classes, and the
enumerations (tuples of short strings) that CHECK constraints enforce.

The flow these tables carry (DESIGN.md): a Campaign (in a Conversation) has ordered Segments
and Messages (main, trial, follow-up) with Content; launching creates a MessageInstance; the
manager prepares it into Targets (unique per instance and customer), packages them into
MailBatches that composers claim under a lease, and composers report via their heartbeats.

Migrations live in connectd/db/migrations/customer; change a model, add a migration.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from connectd.db.common import ConsumerPositionMixin
from connectd.db.types import BigId, Json, UtcDateTime, metadata, one_of, utcnow

# --- enumerations (stored as short strings, checked by CHECK constraints) -------------------
SUBSCRIPTION_STATUSES = ("active", "opting_in", "opted_out", "bounced_out")
SUPPRESSION_KINDS = ("address", "domain")
CAMPAIGN_KINDS = ("normal", "recurring", "event", "subscribe", "unsubscribe")
CAMPAIGN_STATUSES = ("draft", "ready", "approved", "running", "paused", "done", "cancelled",
                     "archived")
MESSAGE_KINDS = ("main", "trial", "followup")
# what fires a follow-up, relative to its parent message's send to the same customer
TRIGGER_EVENTS = ("sent", "opened", "clicked", "not_opened", "not_clicked", "replied",
                  "bounced")
INSTANCE_STATUSES = ("ready", "preparing", "executing", "paused", "done", "failed")
# pending -> batched (manager put it in a batch) -> sending (a composer's in-flight window,
# committed before the hand-off) -> sent | deferred | failed (the composer.sent applier);
# sending -> unknown when the batch is taken over after its composer died (never resent);
# deferred -> batched again when its retry is due.
TARGET_STATUSES = ("pending", "batched", "sending", "sent", "deferred", "failed", "unknown")
BATCH_STATUSES = ("pending", "claimed", "done", "failed")
ROLE_NAMES = ("admin", "marketer", "approver", "viewer")

# What each seeded role may do (the migration that seeds `roles` holds its own copy; a test
# keeps the two equal). "*" = everything.
ROLE_PERMISSIONS: dict[str, list[str]] = {
    "admin": ["*"],
    "marketer": ["campaign.view", "campaign.edit", "content.edit", "audience.edit",
                 "conversation.edit", "customer.view", "customer.import", "report.view",
                 "test.send"],
    "approver": ["campaign.view", "campaign.approve", "campaign.launch", "report.view"],
    "viewer": ["campaign.view", "report.view"],
}


class CustomerBase(DeclarativeBase):
    metadata = metadata()


class ConsumerPosition(ConsumerPositionMixin, CustomerBase):
    pass


# --- customers and their profile -------------------------------------------------------------

class Customer(CustomerBase):
    """One person we may mail. `email_key` is the lower-cased address: unique, so the same
    address in another case is the same customer. Attributes are typed by AttributeDef."""

    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320), nullable=False)
    email_key: Mapped[str] = mapped_column(String(320), nullable=False, unique=True)
    attributes: Mapped[dict] = mapped_column(Json, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class AttributeDef(CustomerBase):
    """The declared type of a customer attribute: string, integer, number, boolean, date,
    datetime. Imports infer it on first sight (or take it declared) and then enforce it."""

    __tablename__ = "attribute_defs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class CustomerStats(CustomerBase):
    """Profile statistics the profiler keeps and segments filter on."""

    __tablename__ = "customer_stats"

    # INTEGER PRIMARY KEY on SQLite: the row id itself, so the profiler's per-customer upsert
    # is one B-tree lookup instead of an index lookup plus a table lookup
    customer_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True,
        autoincrement=False)
    sent_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    open_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    click_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    reply_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    soft_bounce_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    last_sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_open_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_click_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_reply_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # inbound (connectd.appliers.inbound): bounces and complaints; last_bounce_* derive from
    # the `bounces` table; bounced_out_at is when the customer was last bounced out of every
    # conversation (hard bounce or the soft-bounce rule): soft bounces count from then on
    hard_bounce_count: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0")
    complaint_count: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0")
    last_bounce_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_bounce_reason: Mapped[str | None] = mapped_column(String(64))
    bounced_out_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_complaint_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Bounce(CustomerBase):
    """One bounce of one customer's address (a mail.bounced record, keyed by its id, so a
    record applied twice is one bounce). The soft-bounce rule counts these: soft ones in the
    window, after the customer's last open, click or bounce-out."""

    __tablename__ = "bounces"
    __table_args__ = (Index("ix_bounces_customer_id_bounced_at", "customer_id", "bounced_at"),)

    record_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False)
    bounced_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    hard: Mapped[bool] = mapped_column(Boolean, nullable=False)
    reason: Mapped[str] = mapped_column(String(64), nullable=False, default="", server_default="")
    status: Mapped[str | None] = mapped_column(String(16))  # DSN status, e.g. 5.1.1
    # no foreign keys to instances: a bounce is history, kept when the campaign is deleted
    instance_id: Mapped[int | None] = mapped_column(BigInteger)
    message: Mapped[str] = mapped_column(String(255), nullable=False, default="", server_default="")


class CustomerReply(CustomerBase):
    """A customer's reply (mail.replied), in the customer's history: what came back to which
    mail, how the processor classified and handled it."""

    __tablename__ = "customer_replies"
    __table_args__ = (
        Index("ix_customer_replies_customer_id_replied_at", "customer_id", "replied_at"),)

    record_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False)
    replied_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    instance_id: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # human, autoreply, ...
    handler: Mapped[str] = mapped_column(String(64), nullable=False, default="", server_default="")
    subject: Mapped[str] = mapped_column(String(200), nullable=False, default="", server_default="")
    message: Mapped[str] = mapped_column(String(255), nullable=False, default="", server_default="")
    forwarded: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false())


class CustomerEvent(CustomerBase):
    """A named event a reply handler fired (event.triggered): what event-triggered campaigns
    look for, by name and time."""

    __tablename__ = "customer_events"
    __table_args__ = (Index("ix_customer_events_name_occurred_at", "name", "occurred_at"),)

    record_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    customer_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[int | None] = mapped_column(BigInteger)
    message: Mapped[str] = mapped_column(String(255), nullable=False, default="", server_default="")
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class CustomerInterest(CustomerBase):
    """Connect's inferred interests: how often a customer clicked links carrying a label."""

    __tablename__ = "customer_interests"
    # one B-tree keyed by (customer, label) on SQLite instead of a table plus its primary-key
    # index: the profiler's interest upserts cost half as much (bench/profiler_ingest.py)
    __table_args__ = {"sqlite_with_rowid": False}

    customer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")


# --- conversations, subscriptions, suppression -----------------------------------------------

class Conversation(CustomerBase):
    """An opt-in topic ("Weekly deals") with its own subscriber status per customer."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)


class Subscription(CustomerBase):
    """One customer's status in one conversation; the pair is the key, so it is unique.
    `source` says what last changed it (import, web, tracker, reply, bounce, api)."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        one_of("status", SUBSCRIPTION_STATUSES),
        # preparation reads "active subscribers of conversation C"
        Index("ix_subscriptions_conversation_id_status", "conversation_id", "status"),
    )

    customer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    source: Mapped[str | None] = mapped_column(String(32))


class SuppressionList(CustomerBase):
    """A named do-not-mail list (global opt-outs, complaints, a partner's exclusions)."""

    __tablename__ = "suppression_lists"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)


class SuppressionEntry(CustomerBase):
    """One suppressed address (lower-cased, like customers.email_key) or a whole domain."""

    __tablename__ = "suppression_entries"
    __table_args__ = (
        UniqueConstraint("list_id", "value"),
        one_of("kind", SUPPRESSION_KINDS),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    list_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("suppression_lists.id", ondelete="CASCADE"), nullable=False)
    kind: Mapped[str] = mapped_column(String(8), nullable=False, default="address")
    value: Mapped[str] = mapped_column(String(320), nullable=False, index=True)
    reason: Mapped[str | None] = mapped_column(String(200))
    added_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)


# --- campaigns, segments, content, messages ----------------------------------------------------

class Campaign(CustomerBase):
    """A campaign in a conversation. `audience_filter` narrows the conversation's subscribers
    (segment filter language, connectd.core); schedule fields apply to recurring campaigns
    (`cron` or `every_n_days` from `starts_at`) and event campaigns (`event_name`)."""

    __tablename__ = "campaigns"
    __table_args__ = (
        one_of("kind", CAMPAIGN_KINDS),
        one_of("status", CAMPAIGN_STATUSES),
        CheckConstraint("every_n_days IS NULL OR every_n_days > 0", name="every_n_days_positive"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="normal")
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="draft", index=True)
    conversation_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("conversations.id", ondelete="RESTRICT"), index=True)
    audience_filter: Mapped[str | None] = mapped_column(Text)
    from_address: Mapped[str | None] = mapped_column(String(320))
    cron: Mapped[str | None] = mapped_column(String(100))
    every_n_days: Mapped[int | None] = mapped_column(Integer)
    event_name: Mapped[str | None] = mapped_column(String(64), index=True)
    starts_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    ends_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_by: Mapped[str | None] = mapped_column(String(64))  # a username
    approved_by: Mapped[str | None] = mapped_column(String(64))
    approved_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UtcDateTime, nullable=False, default=utcnow, onupdate=utcnow)


class Segment(CustomerBase):
    """An ordered slice of a campaign's audience: a customer belongs to the first segment (by
    `position`) whose filter matches; the leftovers segment (filter ignored) comes last.
    `split` is an optional random split spec, e.g. {"percent": 10, "seed": "launch-1"}."""

    __tablename__ = "segments"
    __table_args__ = (
        UniqueConstraint("campaign_id", "position"),
        UniqueConstraint("campaign_id", "name"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    campaign_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    filter_expr: Mapped[str | None] = mapped_column(Text)
    split: Mapped[dict | None] = mapped_column(Json)
    is_leftovers: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false())


class Content(CustomerBase):
    """A message's content: fetched by URL (html_url/text_url) or written inline in the editor
    (html/text, served by the built-in content server). `version` goes up on every change;
    `hash` identifies the exact bytes a launch used (composers cache per launch)."""

    __tablename__ = "contents"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(String(998), nullable=False)  # RFC 5322 line limit
    from_address: Mapped[str | None] = mapped_column(String(320))
    html_url: Mapped[str | None] = mapped_column(String(2048))
    text_url: Mapped[str | None] = mapped_column(String(2048))
    html: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default="1")
    hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UtcDateTime, nullable=False, default=utcnow, onupdate=utcnow)


class Message(CustomerBase):
    """One mail of a campaign: the main message, a trial (test send), or a follow-up of
    `parent_id` fired by `trigger_event` after `trigger_delay` seconds. `segment_id` limits it
    to one segment (NULL: every segment of the campaign)."""

    __tablename__ = "messages"
    __table_args__ = (
        one_of("kind", MESSAGE_KINDS),
        one_of("trigger_event", TRIGGER_EVENTS),
        CheckConstraint("kind <> 'followup' OR (parent_id IS NOT NULL AND trigger_event IS NOT NULL)",
                        name="followup_has_parent"),
        CheckConstraint("trigger_delay >= 0", name="trigger_delay_nonnegative"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    campaign_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="main")
    parent_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    trigger_event: Mapped[str | None] = mapped_column(String(16))
    trigger_delay: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0")
    content_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("contents.id", ondelete="RESTRICT"))
    segment_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("segments.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UtcDateTime, nullable=False, default=utcnow, onupdate=utcnow)


class Link(CustomerBase):
    """A tracked link of a message: its URL and up to four interest labels."""

    __tablename__ = "links"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048), nullable=False)
    name: Mapped[str | None] = mapped_column(String(200))
    labels: Mapped[list] = mapped_column(Json, nullable=False, default=list)  # at most 4


# --- execution: instances, targets, batches, composers -------------------------------------------

class MessageInstance(CustomerBase):
    """One run of a message (a launch, one occurrence of a recurring campaign, one event).
    The manager polls for status 'ready' with scheduled_at due. `run_key` names the
    occurrence (e.g. "2024-06-01") so a recurring run is never created twice."""

    __tablename__ = "message_instances"
    __table_args__ = (
        one_of("status", INSTANCE_STATUSES),
        UniqueConstraint("message_id", "run_key"),
        Index("ix_message_instances_status_scheduled_at", "status", "scheduled_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False)
    run_key: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="ready")
    content_hash: Mapped[str | None] = mapped_column(String(64))  # the content this run sends
    scheduled_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    error: Mapped[str | None] = mapped_column(Text)  # why it failed
    target_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    sent_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    deferred_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    failed_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    unknown_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")


class MailBatch(CustomerBase):
    """A batch of targets a composer claims (SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL).
    A claimed batch whose lease expired may be taken over by another composer."""

    __tablename__ = "mail_batches"
    __table_args__ = (
        one_of("status", BATCH_STATUSES),
        Index("ix_mail_batches_status_lease_expires_at", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("message_instances.id", ondelete="CASCADE"), nullable=False,
        index=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # composer name
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    size: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Target(CustomerBase):
    """One customer to mail in one message instance: unique per (instance, customer), the
    uniqueness that keeps anyone from getting the same message twice. `last_reply` is the
    last SMTP reply; 'unknown' means the outcome never reached the database (never resent)."""

    __tablename__ = "targets"
    __table_args__ = (
        UniqueConstraint("instance_id", "customer_id"),
        one_of("status", TARGET_STATUSES),
        # (.., id): the manager batches the oldest pending targets of an instance first; with
        # id in the index PostgreSQL reads them in order instead of sorting them all
        Index("ix_targets_instance_id_status", "instance_id", "status", "id"),
        Index("ix_targets_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("message_instances.id", ondelete="CASCADE"), nullable=False)
    customer_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False, index=True)
    segment_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("segments.id", ondelete="SET NULL"))
    batch_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("mail_batches.id", ondelete="SET NULL"), index=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_reply: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    # the customer's last click on this message (any, people's or machines'), kept by the
    # profiler: the history its "links clicked at once" machine rule needs (appliers.hits)
    last_click_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_click_link: Mapped[int | None] = mapped_column(BigInteger)


class ComposerHeartbeat(CustomerBase):
    """A composer's latest sign of life; the manager sizes and balances batches with it."""

    __tablename__ = "composer_heartbeats"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    throughput: Mapped[float] = mapped_column(
        Float, nullable=False, default=0.0, server_default=text("0"))  # messages per second
    backlog: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")


class RateBucket(CustomerBase):
    """A token bucket shared by every composer (on every host): key "global" or
    "domain:<recipient domain>". Composers take tokens in small chunks inside one short
    transaction; `tokens` refills at `rate` per second up to `burst`, as of `updated_at`
    (seconds since the epoch, a float so the arithmetic is plain SQL on both databases)."""

    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    rate: Mapped[float] = mapped_column(Float, nullable=False)
    burst: Mapped[float] = mapped_column(Float, nullable=False)
    tokens: Mapped[float] = mapped_column(Float, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)


# --- users ---------------------------------------------------------------------------------------

class Role(CustomerBase):
    """A role and its permissions (seeded: admin, marketer, approver, viewer)."""

    __tablename__ = "roles"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="", server_default="")
    permissions: Mapped[list] = mapped_column(Json, nullable=False, default=list)


class User(CustomerBase):
    """A person who logs in to the web editor. `password_hash` is argon2 (argon2-cffi)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(
        String(32), ForeignKey("roles.name", ondelete="RESTRICT"), nullable=False)
    disabled: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
