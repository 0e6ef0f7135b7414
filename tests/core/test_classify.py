"""classify_reply on messages written here: VERP and Message-ID context, auto-replies in several
languages, (un)subscribe keywords, human replies, DSNs, and hostile input (hypothesis)."""

from __future__ import annotations

import time
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectd.core.classify import KINDS, classify_reply
from connectd.core.mime import message_id_for
from connectd.core.tokens import sign_verp

KEY = "k" * 32
DOMAIN = "reply.example.com"


def mail(subject: str = "Hello", body: str = "Hi there,\nthanks.\n", sender: str =
         "anna@example.org", to: str = "news@shop.example", **headers: str) -> bytes:
    """A small RFC 5322 message as bytes."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes()


def dsn(recipient: str, status: str, diagnostic: str, action: str = "failed",
        original_headers: str = "") -> bytes:
    """An RFC 3464 multipart/report as Postfix writes it."""
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        "To: b-xxx@reply.example.com\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
        ' boundary="B"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n'
        f"<{recipient}>: host mx said: {diagnostic}\r\n\r\n--B\r\n"
        "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n\r\n--B\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
        f"From: shop@shop.example\r\nTo: {recipient}\r\n{original_headers}Subject: Offer\r\n"
        "\r\n--B--\r\n").encode()


# -- bounces and context --------------------------------------------------------------------

@pytest.mark.parametrize(("status", "diagnostic", "reason", "hard"), [
    ("5.1.1", "550 5.1.1 <x@example.net>: Recipient address rejected: User unknown", "userunknown",
     True),
    ("5.2.2", "552 5.2.2 Mailbox full", "mailboxfull", False),
    ("5.1.2", "550 5.1.2 Host or domain name not found", "hostunknown", True),
    ("4.4.7", "Delivery time expired", "expired", False),
    ("5.7.1", "554 5.7.1 Service unavailable; client host blocked using zen.spamhaus.org",
     "blocked", False),
    ("5.7.1", "550 5.7.1 Message rejected as spam", "spamdetected", False),
])
def test_dsn_reason_and_hardness(status: str, diagnostic: str, reason: str, hard: bool) -> None:
    """A DSN gives its recipient, the reason in sisimai's words and hard/soft."""
    c = classify_reply(dsn("p.jones@example.net", status, diagnostic))
    assert (c.kind, c.recipients, c.reason, c.hard) == (
        "bounce", ("p.jones@example.net",), reason, hard)
    assert c.status == status


def test_verp_context_from_the_envelope_recipient() -> None:
    """A bounce to b-<signed token>@ reply domain yields instance and customer, via verp."""
    token = sign_verp(KEY, 4711, 123456)
    c = classify_reply(dsn("p@example.net", "5.1.1", "550 user unknown"),
                       rcpt=[f"b-{token}@{DOMAIN}"], verp_keys=[KEY], reply_domains=[DOMAIN])
    assert (c.instance, c.customer, c.context_via, c.verp_kind) == (4711, 123456, "verp", "b")


def test_verp_context_from_the_returned_original() -> None:
    """The original's Return-Path carries the token when the envelope does not."""
    token = sign_verp(KEY, 9, 77)
    raw = dsn("p@example.net", "5.1.1", "550 user unknown",
              original_headers=f"Return-Path: <b-{token}@{DOMAIN}>\r\n")
    c = classify_reply(raw, verp_keys=[KEY], reply_domains=[DOMAIN])
    assert (c.instance, c.customer, c.context_via) == (9, 77, "verp")


def test_forged_verp_token_gives_no_context() -> None:
    """A token signed with another key is not trusted."""
    token = sign_verp("other-key-" * 4, 1, 2)
    c = classify_reply(dsn("p@example.net", "5.1.1", "550 user unknown"),
                       rcpt=[f"b-{token}@{DOMAIN}"], verp_keys=[KEY], reply_domains=[DOMAIN])
    assert (c.customer, c.instance, c.context_via) == (None, None, None)


def test_unsubscribe_verp_address_is_an_unsubscribe() -> None:
    """Mail to the List-Unsubscribe mailto address (unsubscribe-<token>@) is an unsubscribe."""
    token = sign_verp(KEY, 5, 6)
    c = classify_reply(mail("anything", "whatever"), rcpt=[f"unsubscribe-{token}@{DOMAIN}"],
                       verp_keys=[KEY], reply_domains=[DOMAIN])
    assert (c.kind, c.customer, c.instance, c.verp_kind) == ("unsubscribe", 6, 5, "unsubscribe")


def test_message_id_context_from_in_reply_to() -> None:
    """A human reply quoting our Message-ID gives the context, marked unsigned."""
    mid = message_id_for(31, 42, "shop.example")
    c = classify_reply(mail("Re: Offer", "Is this still available?", In_Reply_To=mid))
    assert (c.kind, c.instance, c.customer, c.context_via) == ("human", 31, 42, "message-id")


def test_message_id_context_from_the_returned_original() -> None:
    """A bounce without VERP still names its message by the original's Message-ID."""
    mid = message_id_for(8, 9, "shop.example")
    c = classify_reply(dsn("p@example.net", "5.1.1", "550 user unknown",
                           original_headers=f"Message-ID: {mid}\r\n"))
    assert (c.instance, c.customer, c.context_via) == (8, 9, "message-id")


def test_delivered_notice() -> None:
    """A DSN whose only recipient was delivered is kind delivered, with no bounced address."""
    c = classify_reply(dsn("p@example.net", "2.0.0", "250 2.0.0 Ok", action="delivered"))
    assert (c.kind, c.recipients) == ("delivered", ())


def test_plain_text_qmail_bounce() -> None:
    """A qmail text bounce names its recipient; the sender's own address is not one."""
    body = ("Hi. This is the qmail-send program at mx.example.net.\n"
            "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
            "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
            "<k.tanaka@example.net>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
            "--- Below this line is a copy of the message.\n\n"
            "From: shop@shop.example\nTo: k.tanaka@example.net\nSubject: x\n\nbody\n")
    c = classify_reply(mail("failure notice", body, sender="MAILER-DAEMON@mx.example.net",
                            to="shop@shop.example"))
    assert (c.kind, c.recipients, c.reason, c.hard) == (
        "bounce", ("k.tanaka@example.net",), "userunknown", True)


# -- auto-replies, requests, humans ---------------------------------------------------------

@pytest.mark.parametrize(("subject", "body", "headers"), [
    ("Out of Office: Offer", "I am out of the office until Monday.", {}),
    ("Abwesenheitsnotiz", "Ich bin bis zum 3. Mai nicht im Büro.", {}),
    ("Absence", "Je suis absent jusqu'au 12 mars.", {}),
    ("Fuera de la oficina", "Estoy fuera de la oficina hasta el lunes.", {}),
    ("不在のお知らせ", "ただいま不在にしております。", {}),
    ("Re: Offer", "Thanks, I read mail rarely.", {"Auto_Submitted": "auto-replied"}),
    ("Re: Offer", "Thanks.", {"X_Autoreply": "yes"}),
    ("Re: Offer", "Thanks.", {"Precedence": "auto_reply"}),
])
def test_auto_replies(subject: str, body: str, headers: dict[str, str]) -> None:
    """Out-of-office and other automatic answers, by header or words, in several languages."""
    assert classify_reply(mail(subject, body, **headers)).kind == "autoreply"


def test_challenge_response() -> None:
    """A challenge-response request is an auto-reply with reason challenge."""
    c = classify_reply(mail("Please verify your email", "My spam blocker held your message. "
                            "Please confirm that you are a human by clicking the link.",
                            Auto_Submitted="auto-replied"))
    assert (c.kind, c.reason) == ("autoreply", "challenge")


@pytest.mark.parametrize(("subject", "body", "kind"), [
    ("unsubscribe", "", "unsubscribe"),
    ("Re: Offer", "Unsubscribe me please\n\n> old text", "unsubscribe"),
    ("Abmelden", "", "unsubscribe"),
    ("subscribe", "", "subscribe"),
    ("Re: Offer", "subscribe\n", "subscribe"),
])
def test_subscribe_and_unsubscribe_keywords(subject: str, body: str, kind: str) -> None:
    """A keyword in the subject or the first body line is a (un)subscribe request."""
    assert classify_reply(mail(subject, body or "\n")).kind == kind


@pytest.mark.parametrize(("subject", "body"), [
    ("Re: Offer", "Hello, does the jacket come in blue? Regards, Anna"),
    ("Question about my order", "My order 1234 has not arrived yet. Can you check?"),
    ("Re: Newsletter", "I would like to know more about the subscription options."),
])
def test_human_replies(subject: str, body: str) -> None:
    """A person writing back is kind human, with body and subject decoded."""
    c = classify_reply(mail(subject, body))
    assert (c.kind, c.subject) == ("human", subject)
    assert body in c.body
    assert c.sender == "anna@example.org"


def test_never_decides_from_the_local_part() -> None:
    """A human mail to an address spelled like a verdict stays human."""
    c = classify_reply(mail("Hello", "See you soon", to="userunknown@example.com",
                            sender="mailboxfull@example.org"))
    assert (c.kind, c.recipients) == ("human", ())


# -- hostile input --------------------------------------------------------------------------

def _timed(raw: bytes) -> tuple[str, float]:
    t = time.perf_counter()
    c = classify_reply(raw)
    return c.kind, time.perf_counter() - t


def test_ten_megabyte_attachment_is_quick() -> None:
    """A 10 MB attachment costs little: the message is bounded before the walk."""
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg["Subject"] = "big"
    msg.set_content("see attachment")
    msg.add_attachment(b"\x00" * (10 * 1024 * 1024), maintype="application",
                       subtype="octet-stream", filename="big.bin")
    kind, seconds = _timed(msg.as_bytes())
    assert kind == "human"
    assert seconds < 1.0


def test_deeply_nested_multiparts() -> None:
    """A thousand nested multiparts classify without recursion errors, with errors noted."""
    depth = 1000
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
                   for i in range(depth))
    raw = ("From: a@example.org\r\nSubject: nest\r\nMIME-Version: 1.0\r\n" + head
           + "Content-Type: text/plain\r\n\r\nhi\r\n").encode()
    t = time.perf_counter()
    c = classify_reply(raw)
    assert c.kind in ("human", "unknown")
    assert time.perf_counter() - t < 2.0


def test_broken_boundary_and_bad_charset() -> None:
    """A missing closing boundary and an unknown charset are errors, not exceptions."""
    raw = (b"From: a@example.org\r\nSubject: =?x-unknown?B?////?=\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n--zz\r\n'
           b"Content-Type: text/plain; charset=klingon\r\nContent-Transfer-Encoding: base64\r\n"
           b"\r\n!!!not base64!!!\r\n")
    c = classify_reply(raw)
    assert c.kind == "human"
    assert c.errors


def test_non_utf8_headers() -> None:
    """Raw 8-bit header bytes are decoded with replacement, never raising."""
    raw = b"From: \xff\xfe <a@example.org>\r\nSubject: caf\xe9 \xff\r\n\r\nbody\r\n"
    c = classify_reply(raw)
    assert c.kind == "human"
    assert "caf" in c.subject


_HEADER = st.sampled_from([b"From", b"To", b"Subject", b"Content-Type", b"MIME-Version",
                           b"Content-Transfer-Encoding", b"Auto-Submitted", b"X-Failed-Recipients",
                           b"Message-ID", b"In-Reply-To"])
_TOKENS = st.sampled_from([
    b"multipart/report; report-type=delivery-status; boundary=\"b\"", b"--b", b"--b--",
    b"message/delivery-status", b"Final-Recipient: rfc822; x@example.net", b"Action: failed",
    b"Status: 5.1.1", b"Content-Type: message/rfc822", b"=?utf-8?q?=ff=fe?=", b"base64",
    b"quoted-printable", b"\xff\xfe\x00", b"<a@b.c>", b"550 5.1.1 user unknown", b"\r\n",
    b"\n\n", b"=\r\n", b"charset=\"x-bogus\"", b"{\"notificationType\":\"Bounce\""])


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.tuples(_HEADER, st.binary(max_size=60) | _TOKENS), max_size=8))
    body = draw(st.lists(_TOKENS | st.binary(max_size=200), max_size=30))
    return b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + b"\r\n".join(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile())
def test_hostile_messages_never_raise(raw: bytes) -> None:
    """Generated hostile messages classify to a contract kind within 100 ms."""
    kind, seconds = _timed(raw)
    assert kind in KINDS
    assert seconds < 0.1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000))
def test_random_bytes_never_raise(raw: bytes) -> None:
    """Random bytes classify to a contract kind."""
    assert classify_reply(raw).kind in KINDS
