"""Every reply-handler action end to end: a real receiver process (SMTP on 127.0.0.1) ->
the processor -> the profiler (`connectd run profiler --once`) -> the customer and report
DBs; outgoing mail (forwards, replies, confirmations) at a real SMTP server."""

from __future__ import annotations

import email
import email.policy
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import seed_outbound, write_config
from helpers.inbound import CS, DOMAIN, dsn, human
from helpers.smtp_counter import CountingRelay, free_port
from sqlalchemy import create_engine, insert, text
from sqlalchemy.pool import NullPool

from connectd import settings as settings_mod
from connectd.core.tokens import sign_verp
from connectd.secrets import load_secrets
from connectd.spool import Spool

pytestmark = pytest.mark.slow

CHAIN = """
[[handler]]
name = "confirm"
verp = ["confirm"]
actions = ["confirm", "archive"]

[[handler]]
name = "complaint"
kind = ["feedback"]
actions = ["complaint", "archive"]

[[handler]]
name = "hard"
kind = ["bounce"]
hard = true
actions = [{ bounce = "hard" }, "archive"]

[[handler]]
name = "soft"
kind = ["bounce"]
actions = [{ bounce = "soft" }, { archive = "date" }]

[[handler]]
name = "subscribe"
kind = ["subscribe"]
actions = [{ subscribe = "news" }]

[[handler]]
name = "unsubscribe"
kind = ["unsubscribe"]
actions = [{ unsubscribe = "conversation" }]

[[handler]]
name = "price"
subject_keywords = ["price"]
actions = [{ reply = { text = "Our prices: {{ sender }}" } },
           { set_attribute = { name = "asked_price", value = true } },
           { event = "asked-price" }, { pipe = ["/bin/sh", "-c", "cat > PIPE_OUT"] }]

[[handler]]
name = "rest"
actions = ["forward", "archive"]
"""


def connectd(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "connectd", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"connectd {args}: {done.stdout}\n{done.stderr}"
    return done


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def relay() -> Iterator[CountingRelay]:
    with CountingRelay(keep_bytes=True) as r:
        yield r


@pytest.fixture
def world(tmp_path: Path, relay: CountingRelay, db_backend: str,
          request: pytest.FixtureRequest) -> Iterator[dict]:
    port = free_port()
    urls: dict[str, str] = {}
    if db_backend == "postgresql":
        make_db = request.getfixturevalue("pg_url_factory")
        urls = {"customer_url": make_db(), "report_url": make_db()}
    cfg = write_config(tmp_path, **urls, extra=(
        f'[relay]\nhosts = ["127.0.0.1:{relay.port}"]\n'
        f'[receiver]\nport = {port}\ndomain = "{DOMAIN}"\n'
        f'[processor]\ncustomer_service = "{CS}"\nfrom_address = "connectd@{DOMAIN}"\n'))
    (tmp_path / "etc" / "reply-handlers.toml").write_text(
        CHAIN.replace("PIPE_OUT", str(tmp_path / "pipe.eml")))
    connectd(cfg, "init")
    settings = settings_mod.load(cfg, environ={})
    url = settings.database.customer_url
    seeded = seed_outbound(url, customers=6)
    engine = create_engine(url, poolclass=NullPool)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conv = conn.execute(text("SELECT id FROM conversations WHERE name = 'news'")).scalar_one()
        from connectd.db.customer import AttributeDef, Subscription
        conn.execute(insert(Subscription), [
            {"customer_id": i, "conversation_id": conv, "status": "active", "changed_at": now,
             "source": "import"} for i in range(1, 7)])
        conn.execute(insert(AttributeDef).values(name="asked_price", type="boolean", created_at=now))
        if db_backend == "postgresql":  # the seed gave explicit ids: move the sequence past them
            conn.execute(text("SELECT setval(pg_get_serial_sequence('customers', 'id'), 1000)"))
    receiver = subprocess.Popen([sys.executable, "-m", "connectd", "--config", str(cfg), "run",
                                 "receiver"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield {"cfg": cfg, "settings": settings, "port": port, "engine": engine,
               "instance": seeded["instance"], "conv": conv, "root": tmp_path,
               "key": load_secrets(settings.paths.secrets).verp_keys[0]}
    finally:
        receiver.terminate()
        receiver.wait(20)
        engine.dispose()


def send(w: dict, raw: bytes, rcpt: str, mail_from: str = "") -> None:
    with smtplib.SMTP("127.0.0.1", w["port"], timeout=10) as s:
        s.sendmail(mail_from, [rcpt], raw)


def verp(w: dict, kind: str, customer: int) -> str:
    return f"{kind}-{sign_verp(w['key'], w['instance'], customer)}@{DOMAIN}"


def process_and_apply(w: dict) -> None:
    # the receiver's records are durable before its 250, so one pass of each finds them all
    connectd(w["cfg"], "run", "processor", "--once")
    connectd(w["cfg"], "run", "profiler", "--once")


def status(w: dict, customer: int) -> str:
    with w["engine"].connect() as conn:
        return conn.execute(text("SELECT status FROM subscriptions WHERE customer_id = :c AND "
                                 "conversation_id = :v"), {"c": customer, "v": w["conv"]}).scalar_one()


def arf(w: dict, customer: int) -> bytes:
    return (b"From: feedback@isp.example\r\nTo: abuse@reply.example\r\nSubject: Abuse report\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; "
            b"boundary=\"A\"\r\n\r\n--A\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n--A\r\n"
            b"Content-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
            b"User-Agent: isp/1.0\r\nVersion: 1\r\n\r\n--A\r\nContent-Type: message/rfc822\r\n\r\n"
            b"Return-Path: <" + verp(w, "b", customer).encode() + b">\r\nFrom: news@shop.example\r\n"
            b"To: c" + str(customer).encode() + b"@example.com\r\nSubject: Spring\r\n\r\nhi\r\n--A--\r\n")


def test_every_action_end_to_end(world: dict, relay: CountingRelay) -> None:
    """Bounces, complaint, unsubscribe, subscribe + confirm, reply/attribute/event/pipe and a
    forwarded reply each reach the customer DB (and the report DB) through the real daemons."""
    w = world
    send(w, dsn("c1@example.com", "5.1.1"), verp(w, "b", 1))
    send(w, dsn("c6@example.com", "4.2.2", "452 4.2.2 Mailbox full"), verp(w, "b", 6))
    send(w, arf(w, 3), f"abuse@{DOMAIN}")
    send(w, human("c2@example.com", "unsubscribe", "unsubscribe\n", to=verp(w, "unsubscribe", 2)),
         verp(w, "unsubscribe", 2), "c2@example.com")
    send(w, human("new@example.org", "subscribe", "subscribe\n", to=f"subscribe@{DOMAIN}"),
         f"subscribe@{DOMAIN}", "new@example.org")
    send(w, human("c4@example.com", "What is the price?", "tell me\n"), f"reply@{DOMAIN}",
         "c4@example.com")
    send(w, human("c5@example.com", "My order", "never came\n"), f"reply@{DOMAIN}", "c5@example.com")
    process_and_apply(w)

    assert status(w, 1) == "bounced_out"
    assert status(w, 6) == "active"  # one soft bounce is counted, not enough to bounce out
    assert status(w, 2) == "opted_out"
    assert status(w, 3) == "opted_out"
    with w["engine"].connect() as conn:
        attrs = conn.execute(text("SELECT attributes FROM customers WHERE id = 4")).scalar_one()
        assert (attrs if isinstance(attrs, dict) else __import__("json").loads(attrs))["asked_price"] is True
        assert conn.execute(text("SELECT count(*) FROM customer_events WHERE customer_id = 4")).scalar_one() == 1
        assert conn.execute(text("SELECT count(*) FROM customer_replies WHERE customer_id = 5")).scalar_one() == 1
        new = conn.execute(text("SELECT id FROM customers WHERE email_key = 'new@example.org'")).scalar_one()
    assert status(w, new) == "opting_in"
    assert (w["root"] / "pipe.eml").read_bytes().startswith(b"From:") or \
        b"What is the price?" in (w["root"] / "pipe.eml").read_bytes()
    assert len([d for d in relay.deliveries if d.rcpt == "c4@example.com"]) == 1  # the reply
    assert len([d for d in relay.deliveries if d.rcpt == CS]) == 1  # c5's reply forwarded

    # the confirmation mail's Reply-To, answered by the subscriber, makes it active
    (conf,) = [d for d in relay.deliveries if d.rcpt == "new@example.org"]
    reply_to = str(email.message_from_bytes(conf.data, policy=email.policy.default)["Reply-To"])
    send(w, human("new@example.org", "Re: Please confirm", "yes\n", to=reply_to), reply_to,
         "new@example.org")
    process_and_apply(w)
    assert status(w, new) == "active"
    spool = Spool(w["settings"].paths.spool)
    assert "shunt" not in spool.streams()  # no record refused (mail.received included)
    report = create_engine(w["settings"].database.report_url, poolclass=NullPool)
    try:
        with report.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM inbound_messages")).scalar_one() == 8
    finally:
        report.dispose()
