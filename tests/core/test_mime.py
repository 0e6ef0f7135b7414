"""connectd.core.mime: outgoing message bytes, parsed back with the stdlib email parser."""

from __future__ import annotations

import binascii
import re
import time
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectd.core import mime

DATE = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
HTML = ("<html><body>" + "<p>Hello <a href='https://x.example/p'>link</a> caf\u00e9</p>\n" * 120
        + "</body></html>")


def kwargs(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        from_addr="news@shop.example", from_name="Shop", to_addr="bob@example.org",
        subject="Your offer", html=HTML, text="Hello Bob\n", message_id=mime.message_id_for(
            12, 345, "shop.example"),
        return_path="abc234@bounce.shop.example", list_unsubscribe_mailto="u-abc@shop.example",
        list_unsubscribe_url="https://t.shop.example/u/abc", date=DATE)
    base.update(over)
    return base


def parse(**over: Any) -> tuple[bytes, EmailMessage]:
    raw = mime.build_message(**kwargs(**over))
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return raw, msg


def content(msg: EmailMessage, kind: str) -> str:
    part = msg.get_body((kind,))
    assert part is not None
    return part.get_content().replace("\r\n", "\n")


def test_headers_round_trip() -> None:
    """Every header reads back as given, in a multipart/alternative with text before html."""
    _, msg = parse()
    assert msg["From"] == "Shop <news@shop.example>"
    assert msg["To"] == "bob@example.org"
    assert msg["Subject"] == "Your offer"
    assert msg["Date"].datetime == DATE
    assert msg["Message-ID"] == "<i12.c345@shop.example>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["List-Unsubscribe"] == ("<mailto:u-abc@shop.example>, "
                                       "<https://t.shop.example/u/abc>")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Return-Path"] is None
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert content(msg, "plain") == "Hello Bob\n"
    assert content(msg, "html") == HTML


def test_wire_format() -> None:
    """CRLF only, no line over 78 characters, 7-bit clean."""
    raw, _ = parse(subject="word " * 60, text="long " * 500)
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


@pytest.mark.parametrize("subject", [
    "Caf\u00e9 \u2713 \u65e5\u672c\u8a9e", "\U0001f600" * 40, "x" * 300, "=?utf-8?q?Bcc:?=",
    "a  b\tc", "word " * 40 + "end",
])
def test_subject_round_trip(subject: str) -> None:
    """Non-ASCII, very long and encoded-word-looking subjects read back as written."""
    _, msg = parse(subject=subject)
    assert msg["Subject"] == mime.header_value(subject)


@pytest.mark.parametrize("text", [
    "", "no newline at the end", "From the start\nFrom here\n", ".\n..\n.x\n", "trailing  \n\t\n",
    "x" * 5000 + "\n", "\u041f\u0440\u0438\u0432\u0435\u0442 " * 400, "a\r\nb\rc\n",
    "=?utf-8?b?x?= = =3D\n", "F" * 75 + "\nFrom " + "y" * 71 + "\n",
])
def test_text_part_round_trip(text: str) -> None:
    """Text reads back exactly (line breaks as LF), whatever lines it has."""
    raw, msg = parse(text=text)
    assert content(msg, "plain") == text.replace("\r\n", "\n").replace("\r", "\n")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert b"\r\nFrom " not in raw


QP_PIECES = ["a", "b", " ", "  ", "=", "\t", "\n", ".", "\u00e9", "From ", "x" * 70, "\x01",
             "\x00", "\x7f", "\r", "=3D", "y" * 30, "\u65e5"]


@given(parts=st.lists(st.sampled_from(QP_PIECES), max_size=40))
def test_quoted_printable_is_valid(parts: list[str]) -> None:
    """Our encoder decodes back exactly and keeps RFC 2045's rules: lines of at most 76,
    none ending in white space, no bare CR or LF, nothing but printable ASCII, no lone dot."""
    data = "".join(parts).encode()
    out = mime.quoted_printable(data)
    assert binascii.a2b_qp(out).replace(b"\r\n", b"\n") == data
    for line in out.split(b"\r\n"):
        assert len(line) <= 76
        assert not line.endswith((b" ", b"\t"))
        assert line != b"."
        assert all(32 <= c < 127 or c == 9 for c in line)


@given(parts=st.lists(st.sampled_from(["a", " ", "=", "\n", ".", "\u00e9", "x" * 70, "\x01",
                                       "y" * 30]), max_size=40))
def test_quoted_printable_as_b2a_qp(parts: list[str]) -> None:
    """Where binascii.b2a_qp keeps the rules itself (no white space ending a line, no line
    of 76 ending in an escape), ours gives the very same bytes."""
    data = "".join(parts).encode()
    ref = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    escaped = re.sub(rb"[^\t\n -<>-~]", lambda m: b"=%02X" % m.group()[0], data)  # "=", controls
    if any(line.endswith((b" ", b"\t")) for line in data.split(b"\n")) or any(
            len(line) == 76 and line[-3:-2] == b"=" for line in
            escaped.split(b"\n")) or not data.isascii():
        return
    assert mime.quoted_printable(data) == ref.replace(b"\n", b"\r\n")


def _encode_body_general(text: str) -> tuple[bytes, bytes]:
    """What _encode_body gives without its as-is shortcut: quoted_printable, then "From "."""
    data = text.replace("\r\n", "\n").replace("\r", "\n").encode()
    qp = mime.quoted_printable(data)
    if qp.startswith(b"From ") or b"\nFrom " in qp:
        qp = re.sub(rb"(?m)^From ", b"=46rom ", qp)
    return b"quoted-printable", qp


@given(parts=st.lists(st.sampled_from(["a", "b", " ", "  ", "\t", "\n", ".", "From ", "x" * 70,
                                       "y" * 30, "=", "\x01", "F", "rom "]), max_size=40))
def test_encode_body_as_is_shortcut_is_exact(parts: list[str]) -> None:
    """ASCII text that quoted-printable would leave alone goes through as it is (CRLF); on
    any text the result is byte for byte the general path's."""
    text = "".join(parts)
    got = mime._encode_body(text)
    want = _encode_body_general(text)
    if any(len(line) > 76 for line in want[1].split(b"\r\n")):
        assert got[0] == b"base64"  # a "From " escape overflowed a line: base64 either way
        return
    assert got == want


def test_quoted_printable_cost() -> None:
    """An 8 KB HTML line and 6 KB of text lines encode in well under b2a_qp's ~100 us."""
    html = ("<p style=\"color: #333\">Hello <a href=\"https://x.example/c/AbCdEf\">"
            "see it</a> there.</p>" * 100).encode()[:8000]
    text = ("Our spring collection is here, Ann. Fresh colours and light fabrics. " * 9
            + "\n\n").encode() * 10
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            mime.quoted_printable(html)
            mime.quoted_printable(text)
        best = min(best, (time.perf_counter() - t0) / 200)
    print(f"quoted-printable of 8 KB + 6 KB: {best * 1e6:.0f} us")
    assert best < 80e-6  # b2a_qp: ~100 us here


def test_non_ascii_text_uses_base64() -> None:
    """Mostly non-ASCII text goes as base64, which is shorter than quoted-printable then."""
    _, msg = parse(text="\u65e5\u672c\u8a9e" * 100)
    part = msg.get_body(("plain",))
    assert part is not None and part["Content-Transfer-Encoding"] == "base64"


@pytest.mark.parametrize("html,text,kind", [
    (None, "only text\n", "text/plain"), ("<p>only html</p>", None, "text/html"),
    (None, "x" * 76, "text/plain"), (None, "x" * 70 + "\u00e9" * 3, "text/plain"),
    (None, "", "text/plain"), (None, "\u65e5" * 50, "text/plain")])
def test_single_part(html: str | None, text: str | None, kind: str) -> None:
    """With one body the message is that single part."""
    _, msg = parse(html=html, text=text)
    assert msg.get_content_type() == kind
    assert msg.get_content().replace("\r\n", "\n") == (html or text)


def test_no_body_refused() -> None:
    """Neither HTML nor text is a caller error."""
    with pytest.raises(ValueError):
        mime.build_message(**kwargs(html=None, text=None))


def test_boundary_never_in_parts() -> None:
    """A body quoting the boundary cannot end its part early."""
    raw = mime.build_message(**kwargs())
    boundary = raw.split(b'boundary="')[1].split(b'"')[0].decode()
    _, msg = parse(text=f"--{boundary}\n--{boundary}--\n", html=f"<p>--{boundary}</p>")
    assert content(msg, "plain") == f"--{boundary}\n--{boundary}--\n"
    assert len(list(msg.iter_parts())) == 2


def test_deterministic() -> None:
    """The same inputs give the same bytes; another Message-ID another boundary."""
    a = mime.build_message(**kwargs())
    assert a == mime.build_message(**kwargs())
    b = mime.build_message(**kwargs(message_id=mime.message_id_for(12, 346, "shop.example")))
    assert a.split(b"boundary=")[1][:40] != b.split(b"boundary=")[1][:40]


def test_message_id_stable_and_parsed() -> None:
    """message_id_for is a function of its inputs and parse_message_id reads it back."""
    mid = mime.message_id_for(7, 99, "shop.example")
    assert mid == mime.message_id_for(7, 99, "shop.example") == "<i7.c99@shop.example>"
    assert mime.message_id_for(7, 98, "shop.example") != mid
    assert mime.parse_message_id(mid) == (7, 99, "shop.example")
    assert mime.parse_message_id("<abc@x.example>") is None


@pytest.mark.parametrize("args", [(-1, 1, "a.example"), (1, True, "a.example"),
                                  (1, 1, "a.example>\r\nBcc: x"), (1, 1, "")])
def test_message_id_refuses_bad_input(args: tuple[Any, Any, str]) -> None:
    """Negative or non-int ids and unsafe domains raise ValueError."""
    with pytest.raises(ValueError):
        mime.message_id_for(*args)


def test_verp_address() -> None:
    """A VERP token and domain make an address; unsafe local parts are refused."""
    assert mime.verp_address("abc234", "bounce.shop.example") == "abc234@bounce.shop.example"
    for bad in ("a b", "a@b", "", "x\r\nRCPT", "a" * 65):
        with pytest.raises(ValueError):
            mime.verp_address(bad, "bounce.shop.example")


def test_header_injection_harmless() -> None:
    """CR/LF in the subject, display name or an extra header stay inside that one header."""
    evil = "Hi\r\nBcc: victim@evil.example\r\n\r\n<p>body</p>"
    _, msg = parse(subject=evil, from_name=evil, extra_headers=[("X-Campaign", evil)])
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Hi Bcc: victim@evil.example <p>body</p>"
    assert msg["X-Campaign"] == msg["Subject"]
    assert msg["From"].addresses[0].addr_spec == "news@shop.example"
    assert content(msg, "plain") == "Hello Bob\n"


@pytest.mark.parametrize("over", [
    {"to_addr": "bob@example.org\r\nBcc: x@y"}, {"to_addr": "B\u00f6b@example.org"},
    {"from_addr": "not an address"}, {"return_path": "x\r\n@y"},
    {"list_unsubscribe_url": "https://t.example/u> , <https://evil"},
    {"list_unsubscribe_url": "javascript:alert(1)"}, {"message_id": "no-brackets@x"},
    {"extra_headers": [("Bcc", "x@y")]}, {"extra_headers": [("X-A: b", "c")]},
])
def test_unsafe_values_refused(over: dict[str, Any]) -> None:
    """Addresses, URLs, ids and header names that could break the header raise ValueError."""
    with pytest.raises(ValueError):
        mime.build_message(**kwargs(**over))


def test_plain_http_unsubscribe_is_not_one_click() -> None:
    """RFC 8058 one-click is only announced for an HTTPS URL."""
    _, msg = parse(list_unsubscribe_url="http://localhost:8080/u/abc")
    assert msg["List-Unsubscribe"] == "<mailto:u-abc@shop.example>, <http://localhost:8080/u/abc>"
    assert msg["List-Unsubscribe-Post"] is None


def test_unicode_display_name() -> None:
    """A non-ASCII (and long) display name reads back."""
    for name in ("J\u00fcrgen's Shop", "\u00c9picerie " * 12):
        _, msg = parse(from_name=name)
        shown = msg["From"].addresses[0].display_name
        # Python's address parser shows the fold between encoded words as a space (RFC 2047
        # says to drop it); the words end after a space, so only spacing can differ there.
        assert " ".join(shown.split()) == mime.header_value(name)
        assert msg["From"].addresses[0].addr_spec == "news@shop.example"


def test_cost() -> None:
    """Prints µs per build_message of an 8 KB HTML message (informational; a loose bound)."""
    kw = kwargs()
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        mime.build_message(**kw)
    per = (time.perf_counter() - start) / n * 1e6
    print(f"\nbuild_message: {per:.0f} us per message")
    assert per < 2000  # EmailMessage territory would mean the fast path is gone
