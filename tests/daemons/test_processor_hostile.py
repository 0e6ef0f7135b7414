"""Hostile mail never crashes the processor and is never lost: hypothesis-made messages with
broken MIME boundaries, bad transfer encodings and charsets, non-UTF-8 headers, deep nesting,
random bytes, and a 10 MB attachment, each end with one mail.processed, forwarded to customer
service and archived."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from helpers.inbound import CS, Env, make_env
from helpers.smtp_counter import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectd.daemons.processor import Processor


class BigRelay:
    """An SMTP server on 127.0.0.1 that keeps what it gets (up to 64 MB a message)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: list[tuple[list[str], bytes]] = []
        self.port = free_port()
        self._c = Controller(self, hostname="127.0.0.1", port=self.port,
                             data_size_limit=64 * 1024 * 1024)

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        with self.lock:
            self.got.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK"

    def to_cs(self) -> int:
        with self.lock:
            return sum(CS in r for r, _ in self.got)


@pytest.fixture(scope="module")
def relay() -> Iterator[BigRelay]:
    r = BigRelay()
    r._c.start()
    yield r
    r._c.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, relay: BigRelay, migrated_templates) -> Env:  # noqa: ANN001
    return make_env(tmp_path_factory.mktemp("hostile"), relay.port,
                    migrated_templates("sqlite", "customer"))


@pytest.fixture(scope="module")
def processor(env: Env) -> Iterator[Processor]:
    proc = Processor(env.settings)
    proc.setup()
    yield proc
    proc.teardown()


def check_kept(env: Env, proc: Processor, relay: BigRelay, raw: bytes) -> dict:
    """Deliver `raw`, run the processor dry, and check it was processed once and kept."""
    before, forwards = len(env.processed()), relay.to_cs()
    rid = env.deliver(raw)
    while proc.step():
        pass
    done = env.processed()
    assert len(done) == before + 1 and done[-1]["received"] == rid
    last = done[-1]
    box = env.settings.paths.spool / "archive" / (last["handler"] or "unhandled") / "new"
    assert (box / f"{rid}.connectd").read_bytes() == raw  # kept, byte for byte
    if last["kind"] in ("human", "unknown"):
        assert "forward" in last["actions"] and relay.to_cs() == forwards + 1
    return last


header_bytes = st.binary(min_size=0, max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
boundary = st.text(alphabet="abcXYZ0123'()+_,-./:=? ", min_size=1, max_size=70)


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "boundary", "encoding", "headers", "nested"]))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=4000))
    head = (b"From: " + draw(header_bytes) + b" <someone@else.example>\r\nSubject: "
            + draw(header_bytes) + b"\r\nTo: reply@reply.example\r\nMIME-Version: 1.0\r\n")
    if kind == "headers":
        junk = b"".join(draw(header_bytes) + b": " + draw(header_bytes) + b"\r\n"
                        for _ in range(draw(st.integers(0, 10))))
        return head + junk + b"Content-Type: text/plain; charset=" + draw(header_bytes) + \
            b"\r\n\r\n" + draw(st.binary(max_size=500))
    if kind == "encoding":
        cte = draw(st.sampled_from([b"base64", b"quoted-printable", b"x-uuencode", b"8bit", b"bogus"]))
        charset = draw(st.sampled_from([b"utf-8", b"x-unknown", b"utf-7", b"iso-2022-jp", b"\xff"]))
        body = draw(st.binary(max_size=1000))
        return (head + b"Content-Type: text/plain; charset=\"" + charset + b"\"\r\n"
                + b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n" + body)
    if kind == "boundary":
        declared = draw(boundary).encode()
        used = draw(st.sampled_from([declared, declared + b"x", b"", declared[:1]]))
        parts = draw(st.integers(0, 4))
        body = b"".join(b"--" + used + b"\r\nContent-Type: text/plain\r\n\r\n"
                        + draw(st.binary(max_size=200)) + b"\r\n" for _ in range(parts))
        if draw(st.booleans()):
            body += b"--" + used + b"--\r\n"
        return head + b"Content-Type: multipart/mixed; boundary=\"" + declared + b"\"\r\n\r\n" + body
    depth = draw(st.integers(1, 300))
    msg = b"Content-Type: text/plain\r\n\r\nleaf\r\n"
    for i in range(depth):
        b = f"b{i}".encode()
        msg = (b"Content-Type: multipart/mixed; boundary=\"" + b + b"\"\r\n\r\n--" + b + b"\r\n"
               + msg + b"\r\n--" + b + b"--\r\n")
    return head + msg


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=hostile())
def test_hostile_messages_kept(env: Env, processor: Processor, relay: BigRelay, raw: bytes) -> None:
    """Any hostile message: one mail.processed, archived byte for byte, forwarded if a person's."""
    check_kept(env, processor, relay, raw)


def test_ten_megabyte_attachment(env: Env, processor: Processor, relay: BigRelay) -> None:
    """A reply with a 10 MB attachment is processed, forwarded whole and archived."""
    data = base64.encodebytes(os.urandom(10 * 1024 * 1024)).replace(b"\n", b"\r\n")
    raw = (b"From: stranger@else.example\r\nTo: reply@reply.example\r\nSubject: big\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n"
           b"--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--B\r\n"
           b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + data + b"--B--\r\n")
    last = check_kept(env, processor, relay, raw)
    assert last["kind"] in ("human", "unknown")
    with relay.lock:
        assert raw in relay.got[-1][1]


def test_classifier_crash_is_kept(env: Env, processor: Processor, relay: BigRelay,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """If the classifier itself raises, the message is kind unknown, forwarded and archived,
    with the error in mail.processed."""
    import connectd.daemons.processor as mod

    def boom(raw: bytes, **kw: object) -> None:
        raise RecursionError("too deep")

    monkeypatch.setattr(mod, "classify", boom)
    last = check_kept(env, processor, relay, b"From: a@b.example\r\n\r\nx\r\n")
    assert last["kind"] == "unknown" and any("RecursionError" in e for e in last["errors"])


def test_stored_message_missing(env: Env, processor: Processor, tmp_path: Path) -> None:
    """A mail.received whose file is gone still gets its mail.processed, with the error."""
    rid = env.deliver(b"From: a@b.example\r\n\r\ngone\r\n")
    last_rec = [r for r in _received(env) if r["id"] == rid][0]
    (env.settings.paths.spool / "inbound" / "new" / last_rec["message"]).unlink()
    while processor.step():
        pass
    last = env.processed()[-1]
    assert last["received"] == rid and "not found" in last["errors"][0]


def _received(env: Env) -> list[dict]:
    from connectd.spool import Spool, StreamReader
    with StreamReader(Spool(env.settings.paths.spool), "receiver.events") as r:
        return [rec for _, rec, _ in r.records() if rec]
