"""The processor (MP): `connectd run processor`. Classifies every received message, finds its
context, runs the reply-handler chain, and logs the outcome.

Inputs: `receiver.events` (mail.received), the inbound store (the message bytes), the handler
file (processor.handlers), the VERP keys (connectd.secrets), the customer DB (read only: a
customer's address, a conversation's id).
Outputs: `processor.events`: per message the records of its handler's actions
(customer.unsubscribed, customer.subscribed, mail.bounced, mail.complained,
customer.attribute_set, event.triggered), mail.replied for a known customer's reply, and last
exactly one mail.processed; mail to the relay (forwards, replies, confirmations), archive
maildirs, pipe commands (connectd.replies). One log line per message, never the body.

Where it stopped: every mail.processed carries `received` (the mail.received id) and
`position` (the reader position just after that mail.received line). The records of one
message are written with one write, mail.processed last, so the stream's last complete line is
the last message fully done; setup() reads it and goes on from its position. A crash before
that write leaves the message undone, and it is processed again from the start:
- records: never twice (they were not written) and never skipped;
- outgoing mail, pipes: at least once. A forward, reply, confirmation or pipe done just before
  the crash is done again (the mail carries the same Message-ID, made from the received id).
  Sending twice is the side to err on: a customer's message never goes unanswered;
- archive: once (the maildir file is named after the received id).

Nothing is lost: a message the classifier chokes on is kind "unknown" and goes through the
chain (forwarded and archived by the default chain); an action that fails is recorded in
mail.processed's errors and the message is then forwarded to customer service and archived
unless that already happened. A customer DB that is down, or a relay that cannot be reached
(or answers 4xx), stops the processor at that message: it backs off (1 s doubling to 60 s,
logged once per outage) and tries the same message again; nothing is skipped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from connectd.core import tokens
from connectd.core.replyrules import Action, Facts, Handler, first_match, load_chain
from connectd.daemon import Daemon
from connectd.records import MailReceived
from connectd.replies import (
    ActionFailed,
    Context,
    Outbox,
    Transient,
    archive,
    archive_folder,
    build_confirmation,
    build_forward,
    build_reply,
    reply_refusal,
    run_pipe,
)
from connectd.secrets import SecretsError, load_secrets
from connectd.settings import Settings, SettingsError
from connectd.spool import (
    START,
    BadRecord,
    Position,
    Spool,
    encode,
    inbound_store,
    make_record,
)

INPUT = "receiver.events"
OUTPUT = "processor.events"
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
NO_HISTORY = frozenset(("bounce", "feedback", "delivered"))  # kinds that are not a reply
SUBSCRIPTION_ACTIONS = frozenset(("bounce", "complaint", "subscribe", "confirm"))
_CONFIRM = re.compile(r"^confirm[-+=]([a-z2-7]{8,200})$", re.IGNORECASE)
MAX_ERRORS = 20


def classify(raw: bytes, **kw: Any) -> Any:
    """connectd.core.classify.classify_reply (imported here so tests can see the seam)."""
    from connectd.core.classify import classify_reply
    return classify_reply(raw, **kw)


@dataclass(frozen=True)
class _Fallback:
    """What the processor uses when the classifier itself failed: an unknown message."""

    sender: str = ""
    subject: str = ""
    errors: tuple[str, ...] = ()
    kind: str = "unknown"
    recipients: tuple[str, ...] = ()
    hard: bool | None = None
    reason: str | None = None
    status: str | None = None
    per_recipient: tuple[Any, ...] = ()
    feedback_type: str | None = None
    customer: int | None = None
    instance: int | None = None
    context_via: str | None = None
    verp_kind: str | None = None
    message_id: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""


@dataclass
class Resolved:
    """The context of one message."""

    customer: int | None = None
    instance: int | None = None
    via: str | None = None
    verp_kind: str | None = None
    confirm: tuple[int | None, int | None, int | None] | None = None  # customer, instance, conv


@dataclass
class Outcome:
    """What running the chain on one message produced."""

    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed: bool = False  # an action failed: the safety net forwards and archives
    forwarded: bool = False
    archived: bool = False


class CustomerDB:
    """The processor's read-only look-ups in the customer DB; any database error is Transient
    (down, locked, not there yet): the message waits, it is never dropped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Any = None

    def _run(self, query: Any, **params: Any) -> Any:
        from connectd.db.engine import make_engine
        try:
            if self._engine is None:
                self._engine = make_engine(self.url)
            with self._engine.connect() as conn:
                return conn.execute(query, params).first()
        except SQLAlchemyError as exc:
            self.close()  # a fresh pool next time: the server may have restarted
            raise Transient(f"customer DB: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None

    def customer_by_address(self, address: str) -> int | None:
        row = self._run(sa.text("SELECT id FROM customers WHERE email_key = :a"), a=address.lower())
        return None if row is None else int(row[0])

    def address_of(self, customer: int) -> str | None:
        row = self._run(sa.text("SELECT email_key FROM customers WHERE id = :c"), c=customer)
        return None if row is None else str(row[0])

    def conversation_id(self, name: str) -> int | None:
        row = self._run(sa.text("SELECT id FROM conversations WHERE name = :n"), n=name)
        return None if row is None else int(row[0])

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


class Processor(Daemon):
    name = "processor"
    periodic_interval = 30.0

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.chain: tuple[Handler, ...] = load_chain(settings.processor.handlers)  # SettingsError
        try:
            self.verp_keys = load_secrets(settings.paths.secrets).verp_keys
        except SecretsError as exc:
            raise SettingsError(str(exc)) from None
        r = settings.receiver
        self.reply_domains = tuple(d.lower() for d in (r.domain, *r.domains))
        p = settings.processor
        self.archive_root = p.archive_dir or settings.paths.spool / "archive"
        self.own = (p.from_address.lower(), p.customer_service.lower(), *self.reply_domains)
        self.outbox = Outbox(settings.relay.hosts, settings.relay.timeout)
        self.db = CustomerDB(settings.database.customer_url)
        self.spool = Spool(settings.paths.spool, settings.spool)
        self.store = inbound_store(settings)
        self._decoder = msgspec.json.Decoder(MailReceived)
        self._retry_at = 0.0
        self._backoff = 0.0
        self._stop_watch: Callable[[], None] | None = None
        self.processed = 0

    # -- daemon ---------------------------------------------------------------------------
    def setup(self) -> None:
        self.spool.create()
        self.writer = self.spool.writer(OUTPUT)
        self.position = resume_position(self.spool)
        self.reader = self.spool.reader(INPUT, self.position)
        self.log.info("resuming", stream=INPUT, position=str(self.position),
                      handlers=len(self.chain))
        self._stop_watch = self.spool.watch(self.wake)

    def teardown(self) -> None:
        if self._stop_watch:
            self._stop_watch()
            self._stop_watch = None
        self.reader.close()
        self.writer.close()
        self.db.close()

    def reload(self) -> None:
        """HUP: re-read the handler file; a bad one keeps the chain that runs."""
        try:
            self.chain = load_chain(self.settings.processor.handlers)
        except SettingsError as exc:
            self.log.error("reload failed; keeping the old handlers", error=str(exc))
            return
        self.log.info("reload", handlers=len(self.chain))

    def periodic(self) -> None:
        self.writer.tick()

    def step(self) -> int:
        if time.monotonic() < self._retry_at:
            return 0
        batch = self.reader.read(1)
        if batch is None:
            return 0
        if batch.torn is not None:
            self.spool.shunt(INPUT, batch.start, self.name, "torn line", batch.torn)
            return 1
        line = batch.lines[0]
        try:
            rec = self._decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if b'"mail.received"' in line:
                self.spool.shunt(INPUT, batch.start, self.name, f"bad mail.received: {exc}", line)
            return 1  # other record types are not ours
        try:
            records = self.process(rec, batch.end)
        except Transient as exc:
            self.reader.position = batch.start  # the same message again, later
            self._pause(str(exc))
            return 0
        # one write, mail.processed last: all of this message's records or none of them
        self.writer.write_lines(b"".join(encode(make_record(t, f)) for t, f in records),
                                sync=True)
        self.position = batch.end
        self.processed += 1
        if self._backoff:
            self.log.info("resumed", after=f"{self._backoff:g}s backoff")
            self._backoff = 0.0
        return 1

    def _pause(self, why: str) -> None:
        if not self._backoff:
            self.log.warning("paused; will retry the message", reason=why)
        self._backoff = min(BACKOFF_MAX, self._backoff * 2 if self._backoff else BACKOFF_FIRST)
        self._retry_at = time.monotonic() + self._backoff

    # -- one message ----------------------------------------------------------------------
    def process(self, rec: MailReceived, end: Position) -> list[tuple[str, dict[str, Any]]]:
        """The records for one mail.received (mail.processed last). Raises Transient."""
        errors: list[str] = []
        try:
            raw = self.store.read(rec.message)
        except FileNotFoundError:
            self.log.error("stored message missing", message=rec.message, received=rec.id)
            return [_processed(rec, end, _Fallback(), Resolved(), None,
                               Outcome(errors=[f"stored message {rec.message} not found"]))]
        except (OSError, ValueError) as exc:
            raise Transient(f"inbound store: {exc}") from None
        cls = self._classify(raw, rec, errors)
        res = self.resolve(cls, rec)
        facts = Facts(kind=cls.kind, hard=cls.hard, customer=res.customer,
                      verp_kind=res.verp_kind, feedback_type=cls.feedback_type,
                      sender=cls.sender, subject=cls.subject,
                      headers=cls.headers, body=cls.body)
        handler = first_match(self.chain, facts)
        ctx = Context(received=rec.id, message=rec.message, kind=cls.kind,
                      handler=handler.name if handler else "", customer=res.customer,
                      instance=res.instance, sender=cls.sender, mail_from=rec.mail_from,
                      subject=cls.subject, message_id=cls.message_id, headers=cls.headers,
                      body=cls.body, ts=rec.ts)
        out = Outcome(errors=errors)
        actions = handler.actions if handler else (Action("forward"), Action("archive", "handler"))
        for action in actions:
            self._act(action, raw, cls, res, ctx, out)
        if out.failed or isinstance(cls, _Fallback):
            self._safety_net(raw, ctx, out)
        if (res.customer is not None and cls.kind not in NO_HISTORY
                and not SUBSCRIPTION_ACTIONS.intersection(out.actions)):
            out.records.append(("mail.replied", {
                "customer": res.customer, "instance": res.instance, "message": rec.message,
                "kind": cls.kind, "handler": ctx.handler, "subject": cls.subject[:200],
                "forwarded": out.forwarded}))
        out.records.append(_processed(rec, end, cls, res, handler, out))
        self.log.info("processed", message=rec.message, kind=cls.kind, handler=ctx.handler,
                      actions=out.actions, customer=res.customer, via=res.via,
                      errors=len(out.errors))
        return out.records

    def _classify(self, raw: bytes, rec: MailReceived, errors: list[str]) -> Any:
        try:
            cls = classify(raw, rcpt=rec.rcpt, verp_keys=self.verp_keys,
                           reply_domains=self.reply_domains)
        except Exception as exc:  # the per-item boundary: the message is kept and forwarded
            self.log.error("classifier failed", message=rec.message, error=repr(exc)[:300])
            errors.append(f"classify: {type(exc).__name__}: {str(exc)[:200]}")
            return _Fallback()
        errors.extend(f"classify: {e}"[:300] for e in cls.errors[:5])
        return cls

    def resolve(self, cls: Any, rec: MailReceived) -> Resolved:
        """Who and which message this is about. Signed VERP is trusted; an unsigned Message-ID
        only when the sender (or, for a bounce, a bounced address) is that customer's; else
        a person's reply is looked up by the sender's address."""
        res = Resolved(verp_kind=cls.verp_kind)
        confirm = self._confirmation(rec, cls.sender)
        if confirm is not None:
            res.confirm, res.verp_kind = confirm, "confirm"
            res.customer, res.instance = confirm[0], confirm[1]
            res.via = "verp" if confirm[0] is not None else None
        elif cls.customer is not None and cls.context_via == "verp":
            res.customer, res.instance, res.via = cls.customer, cls.instance, "verp"
        elif cls.customer is not None and cls.context_via == "message-id":
            address = self.db.address_of(cls.customer)
            owners = set(cls.recipients) if cls.kind in NO_HISTORY else {cls.sender}
            if address is not None and address in owners:
                res.customer, res.instance, res.via = cls.customer, cls.instance, "message-id"
        if res.customer is None and cls.kind not in NO_HISTORY and cls.sender:
            found = self.db.customer_by_address(cls.sender)
            if found is not None:
                res.customer, res.via = found, "address"
                res.instance = res.instance if res.confirm else None
        return res

    def _confirmation(self, rec: MailReceived, sender: str) -> tuple[Any, Any, Any] | None:
        for rcpt in rec.rcpt:
            local, _, domain = rcpt.strip("<>").rpartition("@")
            m = _CONFIRM.match(local)
            if m is None or domain.lower() not in self.reply_domains or not sender:
                continue
            try:
                return tokens.verify_confirm(self.verp_keys, m.group(1), sender)
            except tokens.BadToken:
                continue
        return None

    # -- actions --------------------------------------------------------------------------
    def _act(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
             out: Outcome) -> None:
        try:
            done = ACTIONS[action.name](self, action, raw, cls, res, ctx, out)
        except Transient:
            raise
        except ActionFailed as exc:
            out.errors.append(f"{action.name}: {exc}"[:500])
            out.failed = True
            return
        except Exception as exc:  # the per-item boundary: recorded, the message kept
            self.log.error("action failed", action=action.name, message=ctx.message,
                           error=repr(exc)[:300])
            out.errors.append(f"{action.name}: {type(exc).__name__}: {str(exc)[:200]}")
            out.failed = True
            return
        if done:
            out.actions.append(action.name)

    def _safety_net(self, raw: bytes, ctx: Context, out: Outcome) -> None:
        if not out.forwarded:
            self._act(Action("forward"), raw, None, Resolved(), ctx, out)
        if not out.archived:
            self._act(Action("archive", "handler"), raw, None, Resolved(), ctx, out)

    def do_forward(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
                   out: Outcome) -> bool:
        to = action.arg or self.settings.processor.customer_service
        data = build_forward(raw, ctx, to=to, from_addr=self.settings.processor.from_address,
                             errors=out.errors)
        self.outbox.send(self.settings.processor.from_address, to, data)
        out.forwarded = True
        return True

    def do_archive(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
                   out: Outcome) -> bool:
        archive(self.archive_root, archive_folder(ctx, action.arg or "handler"), ctx, raw)
        out.archived = True
        return True

    def do_reply(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
                 out: Outcome) -> bool:
        refusal = reply_refusal(ctx, self.own)
        if refusal:
            out.errors.append(f"reply: skipped: {refusal}")
            return False
        data = build_reply(ctx, action.arg, from_addr=self.settings.processor.from_address)
        self.outbox.send("", ctx.sender, data)  # null sender: bounces of replies never loop
        return True

    def do_pipe(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
                out: Outcome) -> bool:
        run_pipe(action.arg, raw, ctx, self.settings.processor.pipe_timeout)
        return True

    def do_unsubscribe(self, action: Action, raw: bytes, cls: Any, res: Resolved,
                       ctx: Context, out: Outcome) -> bool:
        _need_customer(res, "unsubscribe")
        out.records.append(("customer.unsubscribed", {
            "customer": res.customer, "instance": res.instance, "scope": action.arg,
            "via": "mail"}))
        return True

    def do_subscribe(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
                     out: Outcome) -> bool:
        conversation = action.arg
        conv_id: int | None = None
        if isinstance(conversation, str):
            conv_id = self.db.conversation_id(conversation)
            if conv_id is None:
                raise ActionFailed(f"no conversation named {conversation!r}")
        elif isinstance(conversation, int):
            conv_id = conversation
        elif res.instance is None:
            raise ActionFailed("no conversation to subscribe to (the message answers no "
                               "mailing; name one: { subscribe = \"name\" })")
        refusal = reply_refusal(ctx, self.own)
        if refusal:
            raise ActionFailed(f"no confirmation sent: {refusal}")
        token = tokens.sign_confirm(self.verp_keys[0], ctx.sender, res.customer, res.instance,
                                    conv_id)
        data = build_confirmation(ctx, address=ctx.sender,
                                  reply_to=f"confirm-{token}@{self.reply_domains[0]}",
                                  from_addr=self.settings.processor.from_address)
        self.outbox.send("", ctx.sender, data)
        out.records.append(("customer.subscribed", {
            "customer": res.customer, "address": ctx.sender, "conversation": conv_id,
            "instance": res.instance, "confirmed": False, "via": "mail",
            "message": ctx.message}))
        return True

    def do_confirm(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
                   out: Outcome) -> bool:
        if res.confirm is None:
            raise ActionFailed("not a reply to a confirmation address of this sender")
        customer, instance, conversation = res.confirm
        out.records.append(("customer.subscribed", {
            "customer": customer, "address": ctx.sender, "conversation": conversation,
            "instance": instance, "confirmed": True, "via": "mail", "message": ctx.message}))
        return True

    def do_bounce(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
                  out: Outcome) -> bool:
        bounced = list(cls.per_recipient) or [
            _Bounced(r, cls.hard, cls.reason or "", cls.status) for r in cls.recipients]
        if not bounced:
            if res.customer is None:
                raise ActionFailed("no bounced recipient and no customer")
            bounced = [_Bounced("", cls.hard, cls.reason or "", cls.status)]
        # one VERP address is one customer; a bounce naming several recipients (an alias or
        # forward expanded downstream) leaves the applier to find each by its address
        customer = res.customer if len(bounced) == 1 else None
        for b in bounced:
            hard = {"hard": True, "soft": False}.get(action.arg)
            if hard is None:
                hard = b.hard if b.hard is not None else bool(cls.hard)
            out.records.append(("mail.bounced", {
                "hard": hard, "customer": customer, "address": b.address.lower(),
                "instance": res.instance, "reason": b.reason or cls.reason or "",
                "status": b.status or cls.status, "message": ctx.message}))
        return True

    def do_complaint(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
                     out: Outcome) -> bool:
        # a feedback report names the complaining address per recipient, not as "recipients"
        addresses = [*cls.recipients, *(r.address for r in cls.per_recipient)]
        address = addresses[0].lower() if addresses else ""
        if res.customer is None and not address:
            raise ActionFailed("complaint names no customer and no address")
        out.records.append(("mail.complained", {
            "customer": res.customer, "address": address, "instance": res.instance,
            "feedback_type": cls.feedback_type or "abuse", "message": ctx.message}))
        return True

    def do_set_attribute(self, action: Action, raw: bytes, cls: Any, res: Resolved,
                         ctx: Context, out: Outcome) -> bool:
        _need_customer(res, "set_attribute")
        name, value = action.arg
        out.records.append(("customer.attribute_set", {
            "customer": res.customer, "name": name, "value": value, "via": "reply",
            "message": ctx.message}))
        return True

    def do_event(self, action: Action, raw: bytes, cls: Any, res: Resolved, ctx: Context,
                 out: Outcome) -> bool:
        out.records.append(("event.triggered", {
            "name": action.arg, "customer": res.customer, "instance": res.instance,
            "message": ctx.message}))
        return True


@dataclass(frozen=True)
class _Bounced:
    address: str
    hard: bool | None
    reason: str
    status: str | None


ACTIONS: dict[str, Callable[..., bool]] = {
    name: getattr(Processor, f"do_{name}") for name in (
        "forward", "archive", "reply", "pipe", "unsubscribe", "subscribe", "confirm", "bounce",
        "complaint", "set_attribute", "event")}


def _need_customer(res: Resolved, what: str) -> None:
    if res.customer is None:
        raise ActionFailed(f"{what} needs a known customer (context not found)")


def _processed(rec: MailReceived, end: Position, cls: Any, res: Resolved,
               handler: Handler | None, out: Outcome) -> tuple[str, dict[str, Any]]:
    return ("mail.processed", {
        "message": rec.message, "received": rec.id, "kind": cls.kind,
        "handler": handler.name if handler else "", "actions": out.actions,
        "customer": res.customer, "instance": res.instance, "context_via": res.via,
        "reason": cls.reason, "hard": cls.hard, "status": cls.status,
        "recipients": list(cls.recipients), "sender": cls.sender, "subject": cls.subject[:200],
        "errors": out.errors[:MAX_ERRORS],
        "position": str(end),  # where to go on after a restart (see the module docstring)
    })


def resume_position(spool: Spool) -> Position:
    """Where the processor stopped: the `position` of the last mail.processed of
    processor.events (START if there is none)."""
    newest = spool.info(OUTPUT).newest
    if newest is not None and newest.get("type") == "mail.processed":
        return _position_of(newest)
    # the last line is not a mail.processed (not written by this processor): scan for one
    last = START
    with spool.reader(OUTPUT) as reader:
        for _, rec, _ in reader.records():
            if rec is not None and rec.get("type") == "mail.processed":
                last = _position_of(rec)
    return last


def _position_of(rec: dict[str, Any]) -> Position:
    try:
        return Position.parse(str(rec["position"]))
    except (KeyError, ValueError) as exc:
        raise BadRecord(f"{OUTPUT}: mail.processed {rec.get('id')} has no usable position") from exc

