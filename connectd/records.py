"""The record catalogue: the typed shape of each event-log record that an applier consumes.

Every record line is a JSON object with `v` (format version), `id` (globally unique), `ts`
(ISO 8601 UTC) and `type` (past-tense `noun.verb`), plus the fields below. Consumers decode
lines straight into these structs (msgspec: validated, and fields an applier does not need
are skipped without being built), so a record whose fields have the wrong type is refused
with the field's name and shunted. Producers may add fields; consumers ignore what they do
not know, which is how the format evolves without breaking old readers.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# The one timestamp spelling of the event logs (what connectd.spool.now_ts writes): UTC,
# microseconds, 'Z', 27 characters. Appliers rely on it (it sorts as text and converts by
# slicing); a record with another spelling is refused (Consumer checks the length and the
# 'T' and 'Z', cheaply, where a regular expression per record cost more than the decoding).
Timestamp = Annotated[str, msgspec.Meta(min_length=27, max_length=27)]


class Record(msgspec.Struct, kw_only=True, tag_field="type", frozen=True):
    """Common fields of every record."""

    id: str
    ts: Timestamp  # e.g. 2026-12-04T16:00:00.123456Z
    v: int = 1


class LinkClicked(Record, tag="link.clicked", frozen=True):
    """A customer followed a tracked link (the tracker writes these; `ts` = click time)."""

    instance: int  # message instance
    customer: int
    link: int
    ua: str = ""  # user agent
    ip: str | None = None  # possibly truncated for privacy
    machine: bool = False  # a scanner or pre-fetcher, not a person
    why: str | None = None  # what made it machine traffic (e.g. "ua:scanner", "head")


class MessageOpened(Record, tag="message.opened", frozen=True):
    """A message's open pixel was fetched (the tracker writes these; `ts` = fetch time)."""

    instance: int
    customer: int
    ua: str = ""
    ip: str | None = None
    machine: bool = False  # a proxy or scanner fetched it (Apple MPP, image proxies, ...)
    why: str | None = None


class CustomerUnsubscribed(Record, tag="customer.unsubscribed", frozen=True):
    """A customer asked to stop getting mail: from the message's conversation (`scope`
    "conversation", the conversation found from `instance` unless given) or from everything
    ("all"). Written by the tracker (unsubscribe page, RFC 8058 one-click) and the processor
    (unsubscribe replies)."""

    customer: int
    instance: int | None = None
    conversation: int | None = None
    scope: Literal["conversation", "all"] = "conversation"
    via: str = ""  # "one-click", "page", "mail", ...
    ua: str = ""
    ip: str | None = None


class ConversionRecorded(Record, tag="conversion.recorded", frozen=True):
    """A purchase (or other goal) attributed to the last message the customer clicked
    (the tracker's conversion call, with the click cookie)."""

    instance: int
    customer: int
    link: int | None = None
    amount: float | None = None
    currency: str | None = None
    order: str | None = None  # the shop's order id: conversions are counted once per order
    ua: str = ""
    ip: str | None = None


class ComposerSent(Record, tag="composer.sent", frozen=True):
    """The outcome of one hand-off of one target to the mail farm (the composer writes these;
    `ts` = when the relay answered). `attempt` counts hand-offs of this target from 1, which
    makes the applier idempotent: an outcome for an attempt already applied changes nothing.
    Failures before the hand-off (a render error, an unusable address) are outcome "failed"
    with the reason in `reply` and an empty `relay`. "unknown": the connection was lost after
    the message data was sent and before the relay's reply, so the relay may or may not have
    taken it (never resent automatically)."""

    instance: int  # message instance
    customer: int
    batch: int
    attempt: int
    outcome: Literal["sent", "deferred", "failed", "unknown"]
    reply: str = ""  # the relay's final reply, e.g. "250 2.0.0 Ok: queued as 4XyZ"
    queue_id: str | None = None  # the relay's queue id, parsed from the reply when it has one
    relay: str = ""  # host:port that answered
    composer: str = ""  # the composer's name


class ComposerContent(Record, tag="composer.content", frozen=True):
    """What was sent to whom, in the detail reports need (one per message handed off)."""

    instance: int
    customer: int
    message_id: str  # the Message-ID header, without angle brackets
    subject: str  # as rendered for this customer
    size: int  # bytes handed to the relay, DKIM signature included
    links: int  # tracked links in the message
    domain: str  # the recipient's domain, lower case
    content_hash: str  # the content this launch sent (sha256 hex of the fetched parts)
    segment: int | None = None


class MailReceived(Record, tag="mail.received", frozen=True):
    """The receiver stored one inbound message durably (before it answered 250); the processor
    consumes these. `message` names the file in the inbound store (connectd.spool.InboundStore),
    which holds the bytes exactly as received (CRLF line ends, no headers added)."""

    message: str  # the store's name for it, e.g. "1733330000.123456.a1b2c3.host"
    size: int  # bytes of the stored message
    sha256: str  # hex digest of the stored bytes
    mail_from: str = ""  # envelope sender; "" for the null sender <> (bounces)
    rcpt: list[str] = []  # envelope recipients, as given
    peer: str = ""  # the client's address
    helo: str = ""  # what the client said in HELO/EHLO
    receiver: str = ""  # host name of the receiver that took it


class MailProcessed(Record, tag="mail.processed", frozen=True):
    """The processor's outcome for one received message (one per message; the report fact).
    `received` is the id of the mail.received record it answers, which is how a restarted
    processor knows where it stopped."""

    message: str  # the inbound store name
    received: str  # id of the mail.received record
    kind: str  # bounce autoreply feedback delivered unsubscribe subscribe human unknown
    handler: str = ""  # name of the reply handler that accepted it ("" when none did)
    actions: list[str] = []  # the actions that ran, e.g. ["bounce", "archive"]
    customer: int | None = None
    instance: int | None = None
    context_via: str | None = None  # how the context was found: verp, message-id, address
    reason: str | None = None  # bounce reason (sisimai vocabulary)
    hard: bool | None = None
    status: str | None = None  # DSN status, e.g. "5.1.1"
    recipients: list[str] = []  # bounced addresses
    sender: str = ""  # the From address, lower case
    subject: str = ""  # at most 200 characters
    errors: list[str] = []  # actions that failed, with why (the message is kept; see archive)


class MailBounced(Record, tag="mail.bounced", frozen=True):
    """A bounce for one recipient (the processor's bounce actions). Hard: the customer is
    bounced out of every conversation. Soft: counted; processor.soft_bounce_limit of them within
    processor.soft_bounce_days, with no open or click since, bounce the customer out."""

    hard: bool
    customer: int | None = None  # None: found by `address`
    address: str = ""  # the bounced address, lower case
    instance: int | None = None
    reason: str = ""
    status: str | None = None
    message: str = ""  # inbound store name ("" for a bounce at send time)


class MailComplained(Record, tag="mail.complained", frozen=True):
    """A complaint (ARF feedback report, "this is spam"): the customer is opted out of
    everything."""

    customer: int | None = None  # None: found by `address`
    address: str = ""
    instance: int | None = None
    feedback_type: str = "abuse"  # RFC 5965 Feedback-Type
    message: str = ""


class CustomerSubscribed(Record, tag="customer.subscribed", frozen=True):
    """A subscribe request (double opt-in): `confirmed` false = a confirmation was sent and the
    customer is opting in; true = confirmed, active. A customer not yet known (customer None)
    is created from `address`."""

    customer: int | None = None
    address: str = ""
    conversation: int | str | None = None  # id or name; None: the instance's conversation
    instance: int | None = None
    confirmed: bool = False
    via: str = "mail"
    message: str = ""


class MailReplied(Record, tag="mail.replied", frozen=True):
    """A customer's reply (anything not handled as bounce, complaint, subscription): the
    customer's history."""

    customer: int
    instance: int | None = None
    message: str = ""  # inbound store name
    kind: str = "human"  # the classifier's kind (human, autoreply, ...)
    handler: str = ""
    subject: str = ""  # at most 200 characters
    forwarded: bool = False  # sent on to customer service


class CustomerAttributeSet(Record, tag="customer.attribute_set", frozen=True):
    """A reply handler set a customer attribute (connectd.core.attributes names and types)."""

    customer: int
    name: str
    value: str | int | float | bool | None = None
    via: str = "reply"
    message: str = ""


class EventTriggered(Record, tag="event.triggered", frozen=True):
    """A reply handler fired a named event (for event-triggered campaigns and reports)."""

    name: str
    customer: int | None = None
    instance: int | None = None
    message: str = ""


def record_type(cls: type[Record]) -> str:
    """The `type` tag of a record class."""
    return cls.__struct_config__.tag  # type: ignore[return-value]
