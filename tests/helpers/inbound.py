"""Inbound test kit (processor engineer): a spool + customer DB + relay per test, messages
(human replies, DSNs), and writing mail.received the way the receiver does."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from connectd import settings as settings_mod
from connectd.core.tokens import sign_verp
from connectd.secrets import create_secrets, load_secrets
from connectd.spool import Spool, StreamReader, inbound_store

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HANDLERS = ROOT / "connectd" / "data" / "reply-handlers.toml"
DOMAIN = "reply.example"
CS = "cs@service.example"


@dataclass
class Env:
    root: Path
    settings: settings_mod.Settings

    @property
    def verp_key(self) -> str:
        return load_secrets(self.settings.paths.secrets).verp_keys[0]

    def verp(self, kind: str, instance: int, customer: int) -> str:
        return f"{kind}-{sign_verp(self.verp_key, instance, customer)}@{DOMAIN}"

    def deliver(self, raw: bytes, rcpt: list[str] | None = None, mail_from: str = "x@example.com") -> str:
        """Store `raw` and append its mail.received (as the receiver does); returns the id."""
        store = inbound_store(self.settings)
        store.create()
        name, digest = store.store(raw)
        spool = Spool(self.settings.paths.spool, self.settings.spool)
        spool.create()
        with spool.writer("receiver.events", wait=True) as w:
            rec = w.append("mail.received", {
                "message": name, "size": len(raw), "sha256": digest, "mail_from": mail_from,
                "rcpt": rcpt or [f"reply@{DOMAIN}"], "peer": "127.0.0.1", "helo": "test",
                "receiver": "test"}, sync=True)
        return rec["id"]

    def records(self, type_: str | None = None) -> list[dict[str, Any]]:
        spool = Spool(self.settings.paths.spool, self.settings.spool)
        with StreamReader(spool, "processor.events") as r:
            recs = [rec for _, rec, _ in r.records() if rec is not None]
        return [r for r in recs if type_ is None or r["type"] == type_]

    def processed(self) -> list[dict[str, Any]]:
        return self.records("mail.processed")


def make_env(root: Path, relay_port: int, template_db: str | None, handlers: str | None = None,
             extra: str = "") -> Env:
    from conftest import write_config  # the shared fixture module

    cfg = write_config(root, extra=(
        f'[relay]\nhosts = ["127.0.0.1:{relay_port}"]\ntimeout = 5.0\n'
        f'[receiver]\ndomain = "{DOMAIN}"\n'
        f'[processor]\ncustomer_service = "{CS}"\nfrom_address = "connectd@{DOMAIN}"\n'
        'pipe_timeout = 5.0\n' + extra))
    target = root / "etc" / "reply-handlers.toml"
    if handlers is None:
        shutil.copyfile(DEFAULT_HANDLERS, target)
    else:
        target.write_text(handlers, encoding="utf-8")
    settings = settings_mod.load(cfg, environ={})
    create_secrets(settings.paths.secrets)
    if template_db:
        shutil.copyfile(template_db, root / "spool" / "customer.db")
        seed_customers(settings.database.customer_url)
    return Env(root, settings)


def seed_customers(url: str) -> None:
    """Customers 1 ann@example.com, 2 bob@example.com; conversation 1 "news"."""
    from connectd.db import customer as m
    from connectd.db.engine import make_engine

    now = datetime.now(UTC)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(m.Customer), [
                {"id": i, "email": e, "email_key": e.lower(), "attributes": {},
                 "created_at": now, "updated_at": now}
                for i, e in ((1, "ann@example.com"), (2, "bob@example.com"))])
            conn.execute(insert(m.Conversation).values(id=1, name="news"))
    finally:
        engine.dispose()


def human(sender: str = "ann@example.com", subject: str = "Question", body: str = "Hello there.\n",
          to: str = f"reply@{DOMAIN}", headers: dict[str, str] | None = None) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Mon, 01 Jan 2024 10:00:00 +0000"
    msg["Message-ID"] = f"<m{abs(hash((sender, subject, body)))}@example.com>"
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(body)
    return bytes(msg)


def dsn(recipient: str = "ann@example.com", status: str = "5.1.1",
        diagnostic: str = "550 5.1.1 <ann@example.com>: Recipient address rejected: User unknown",
        to: str = f"bounce@{DOMAIN}", original_headers: str = "") -> bytes:
    action = "failed" if status.startswith("5") else "delayed"
    boundary = "BOUNDARY-1"
    return (
        f"From: MAILER-DAEMON@mx.example.com (Mail Delivery System)\r\n"
        f"To: {to}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <dsn.{abs(hash(recipient))}@mx.example.com>\r\n"
        f"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: multipart/report; report-type=delivery-status; boundary=\"{boundary}\"\r\n\r\n"
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you that your "
        f"message could not be delivered.\r\n\r\n"
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n\r\n"
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: news@shop.example\r\nTo: {recipient}\r\nSubject: Spring sale\r\n{original_headers}\r\n"
        f"--{boundary}--\r\n").encode()
