"""The composer against a real aiosmtpd relay and a real HTTP content server on loopback:
delivery once each, DKIM verified by dkimpy, merge tags, header injection, sandbox refusal,
4xx/5xx outcomes, and a real `connectd run composer` killed with SIGKILL mid-batch."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dkim as dkimpy
import pytest
from aiosmtpd.controller import Controller
from conftest import seed_outbound, write_config
from sqlalchemy import select

from connectd import settings as settings_mod
from connectd.core.dkim import generate_key
from connectd.daemons.composer import Composer
from connectd.db import migrate
from connectd.db.customer import ComposerHeartbeat, MailBatch, MessageInstance, Target
from connectd.db.engine import make_engine
from connectd.secrets import create_secrets

HTML = (b"<html><head><style>p { color: red }</style></head><body><p>Dear [First Name|friend],"
        b" {{ city | default('nowhere') }}</p><a href='https://shop.example/a'>A</a> "
        b"<a href='https://shop.example/b'>B</a></body></html>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """aiosmtpd handler storing every message; domains defer.example -> 451,
    reject.example -> 550; `delay` seconds before each 250 (to kill mid-batch)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.messages: list[tuple[str, str, bytes]] = []

    async def handle_RCPT(self, server, session, envelope, address, options):
        domain = address.rpartition("@")[2]
        if domain == "defer.example":
            return "451 4.7.1 greylisted"
        if domain == "reject.example":
            return "550 5.1.1 unknown user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        self.messages.append((envelope.mail_from, envelope.rcpt_tos[0], envelope.content))
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"


class Tree:
    def __init__(self, root: Path, relay_port: int, content_base: str, extra: str = "") -> None:
        self.root = root
        self.cfg = write_config(root, extra=(
            f'[relay]\nhosts = ["127.0.0.1:{relay_port}"]\nconnections = 3\n'
            '[tracker]\npublic_url = "https://t.example"\n'
            '[composer]\ndkim_dir = "dkim"\nwindow = 5\nlease = 2.0\n' + extra))
        self.settings = settings_mod.load(self.cfg, environ={})
        create_secrets(self.settings.paths.secrets)
        eng = make_engine(self.settings.database.customer_url)
        migrate.upgrade(eng, "customer")
        eng.dispose()
        self.url = self.settings.database.customer_url
        self.content_base = content_base

    def records(self, stream: str) -> list[dict]:
        d = self.settings.paths.spool / "streams" / stream
        return [json.loads(line) for seg in sorted(d.glob("*.jsonl"))
                for line in seg.read_bytes().splitlines() if line.endswith(b"}")]

    def query(self, stmt):
        eng = make_engine(self.url)
        try:
            with eng.connect() as conn:
                return conn.execute(stmt).all()
        finally:
            eng.dispose()


@pytest.fixture
def content_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    pages = {"/page.html": HTML}

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = pages.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", pages
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def relay() -> Iterator[tuple[Relay, int]]:
    handler = Relay()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    yield handler, port
    ctl.stop()


@pytest.fixture
def tree(tmp_path, relay, content_server) -> Tree:
    return Tree(tmp_path, relay[1], content_server[0])


def _attrs(i: int) -> dict:
    return {"first_name": "" if i == 3 else f"Ann{i}", "city": "Lyon"}


def test_each_customer_gets_one_signed_personalised_message(tree, relay):
    """Twelve customers: one message each, DKIM (RSA and Ed25519) verified by dkimpy, merge
    tags and fallbacks applied, links tracked, unsubscribe headers, VERP sender, records."""
    handler, _ = relay
    dkim_dir = tree.settings.composer.dkim_dir
    dkim_dir.mkdir()
    records = {}
    for kind, sel in (("rsa", "connectd"), ("ed25519", "connectd-ed")):
        pem, rec = generate_key(kind)
        (dkim_dir / f"example.com.{kind}.pem").write_bytes(pem)
        records[f"{sel}._domainkey.example.com."] = rec.encode()
    seed = seed_outbound(tree.url, 12, html_url=f"{tree.content_base}/page.html",
                         subject="Hi [First Name|friend]", attributes=_attrs,
                         from_address="Shop <news@example.com>")
    done = Composer(tree.settings, instance=1).run_until_idle()
    assert done >= 12
    by_rcpt = Counter(r for _, r, _ in handler.messages)
    assert by_rcpt == Counter({f"c{i}@example.com": 1 for i in range(1, 13)})
    for sender, rcpt, raw in handler.messages:
        d = dkimpy.DKIM(raw)
        assert d.verify(idx=0, dnsfunc=lambda n, timeout=5: records.get(n.decode()))
        assert d.verify(idx=1, dnsfunc=lambda n, timeout=5: records.get(n.decode()))
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        i = int(rcpt[1:].split("@")[0])
        assert msg["Subject"] == ("Hi friend" if i == 3 else f"Hi Ann{i}")
        html = msg.get_body(("html",)).get_content()
        assert ("Dear friend" if i == 3 else f"Dear Ann{i}") in html and "Lyon" in html
        assert "https://shop.example/a" not in html and html.count("https://t.example/c/") == 2
        assert "https://t.example/o/" in html and 'style="color: red;"' in html
        plain = msg.get_body(("plain",)).get_content()
        assert "friend" in plain or i != 3
        # the text part's links go through the tracker too
        assert "https://shop.example/" not in plain and "https://t.example/c/" in plain
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert "https://t.example/u/" in msg["List-Unsubscribe"]
        assert sender.startswith("b-") and sender.endswith("@reply.localhost")
        assert msg["Message-ID"] == f"<i{seed['instance']}.c{i}@example.com>"
    sent = tree.records("composer.sent.1")
    assert Counter(r["outcome"] for r in sent) == Counter(sent=12)
    assert all(r["queue_id"].startswith("Q") and r["attempt"] == 1 for r in sent)
    assert len(tree.records("composer.content.1")) == 12
    assert tree.query(select(MailBatch.status)) == [("done",)]
    (beat,) = tree.query(select(ComposerHeartbeat.name, ComposerHeartbeat.pid))
    assert beat == (f"composer-1@{socket.gethostname()}", os.getpid())


def test_header_injection_is_neutralised(tree, relay):
    """CR/LF in a merge value used in the subject cannot add a header."""
    handler, _ = relay
    seed_outbound(tree.url, 1, html_url=f"{tree.content_base}/page.html",
                  subject="Hi [First Name]",
                  attributes=lambda i: {"first_name": "Bob\r\nBcc: victim@evil.example"})
    Composer(tree.settings, instance=1).run_until_idle()
    (_, _, raw), = handler.messages
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Bcc"] is None and msg["Subject"] == "Hi Bob Bcc: victim@evil.example"


def test_sandbox_escape_fails_the_instance_without_sending(tree, relay, content_server):
    """A template reaching for internals: instance failed with the reason, nothing sent."""
    handler, _ = relay
    base, pages = content_server
    pages["/evil.html"] = b"<p>{{ ''.__class__.__mro__[1].__subclasses__() }}</p>"
    seed = seed_outbound(tree.url, 3, html_url=f"{base}/evil.html")
    Composer(tree.settings, instance=1).run_until_idle()
    assert handler.messages == []
    ((status, error),) = tree.query(select(MessageInstance.status, MessageInstance.error)
                                    .where(MessageInstance.id == seed["instance"]))
    assert status == "failed" and "template refused" in error
    assert tree.query(select(MailBatch.status)) == [("pending",)]  # released, not done
    assert tree.records("composer.sent.1") == []


def test_content_404_fails_the_instance(tree, relay):
    """Content URL answering 404: instance failed naming the URL and status; nothing sent."""
    handler, _ = relay
    seed_outbound(tree.url, 2, html_url=f"{tree.content_base}/gone.html")
    Composer(tree.settings, instance=1).run_until_idle()
    ((status, error),) = tree.query(select(MessageInstance.status, MessageInstance.error))
    assert status == "failed" and "HTTP 404" in error and "/gone.html" in error
    assert handler.messages == []


def test_4xx_deferred_and_5xx_failed_records(tree, relay):
    """Recipients at a greylisting domain are deferred, at a rejecting one failed."""
    handler, _ = relay
    domains = {1: "ok.example", 2: "defer.example", 3: "reject.example"}
    seed_outbound(tree.url, 3, html_url=f"{tree.content_base}/page.html",
                  email=lambda i: f"c{i}@{domains[i]}")
    Composer(tree.settings, instance=1).run_until_idle()
    out = {r["customer"]: (r["outcome"], r["reply"][:3]) for r in tree.records("composer.sent.1")}
    assert out == {1: ("sent", "250"), 2: ("deferred", "451"), 3: ("failed", "550")}
    assert [r["customer"] for r in tree.records("composer.content.1")] == [1]


def test_unsendable_address_is_failed_before_hand_off(tree, relay):
    """A non-ASCII address cannot be handed off: outcome failed, empty relay, others go."""
    handler, _ = relay
    seed_outbound(tree.url, 2, html_url=f"{tree.content_base}/page.html",
                  email=lambda i: "jörg@example.com" if i == 1 else f"c{i}@example.com")
    Composer(tree.settings, instance=1).run_until_idle()
    out = {r["customer"]: r for r in tree.records("composer.sent.1")}
    assert out[1]["outcome"] == "failed" and out[1]["relay"] == ""
    assert out[2]["outcome"] == "sent" and len(handler.messages) == 1


def test_a_signing_failure_fails_that_message_alone(tree, relay, monkeypatch):
    """Messages are signed a group at a time: one whose signing raises is failed with the
    reason, and the others of its group go out signed."""
    from connectd.core import dkim

    handler, _ = relay
    dkim_dir = tree.settings.composer.dkim_dir
    dkim_dir.mkdir()
    pem, _ = generate_key("rsa")
    (dkim_dir / "example.com.rsa.pem").write_bytes(pem)
    real = dkim.DkimSigner.sign_fields

    def sign_fields(self, fields, body, now):  # type: ignore[no-untyped-def]
        if "To: c2@example.com" in fields:
            raise ValueError("no signature for c2")
        return real(self, fields, body, now)

    monkeypatch.setattr(dkim.DkimSigner, "sign_fields", sign_fields)
    seed_outbound(tree.url, 4, html_url=f"{tree.content_base}/page.html",
                  from_address="Shop <news@example.com>")
    Composer(tree.settings, instance=1).run_until_idle()
    out = {r["customer"]: r for r in tree.records("composer.sent.1")}
    assert out[2]["outcome"] == "failed" and "no signature for c2" in out[2]["reply"]
    assert {c: r["outcome"] for c, r in out.items() if c != 2} == {1: "sent", 3: "sent",
                                                                  4: "sent"}
    assert sorted(r for _, r, _ in handler.messages) == [
        "c1@example.com", "c3@example.com", "c4@example.com"]
    assert all(raw.startswith(b"DKIM-Signature:") for _, _, raw in handler.messages)


def test_sigkill_mid_batch_and_restart_sends_nobody_twice(tmp_path, content_server):
    """A real `connectd run composer` killed with SIGKILL mid-batch, then restarted: no
    message twice, everyone either received it or is among the few reported unknown."""
    handler = Relay(delay=0.02)
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        t = Tree(tmp_path, port, content_server[0])
        n = 120
        seed_outbound(t.url, n, html_url=f"{t.content_base}/page.html", batches=2)
        cmd = [sys.executable, "-m", "connectd", "--config", str(t.cfg), "run", "composer",
               "--instance", "1"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while len(handler.messages) < 30 and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = len(handler.messages)
        assert 30 <= killed_at < n
        subprocess.run(cmd + ["--once"], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.2)  # the last replies' handler calls
        received = Counter(r for _, r, _ in handler.messages)
        assert max(received.values()) == 1  # nobody twice
        journalled = {r["customer"] for r in t.records("composer.sent.1")
                      if r["outcome"] == "sent"}
        statuses = dict(t.query(select(Target.customer_id, Target.status)))
        unknown = {c for c, s in statuses.items() if s == "unknown"} - journalled
        got = {int(r[1:].split("@")[0]) for r in received}
        assert journalled <= got
        assert got | unknown == set(range(1, n + 1))  # nobody skipped
        assert len(unknown) <= t.settings.composer.window  # at most the in-flight window
        assert statuses and all(s in ("sending", "unknown") for s in statuses.values())
    finally:
        ctl.stop()


def test_heartbeat_throughput_is_the_working_rate(tree, relay):
    """The heartbeat's throughput is messages per second of work, not diluted by idle time:
    after a batch and a pause it still reports what the composer did while busy."""
    seed_outbound(tree.url, 30, html_url=f"{tree.content_base}/page.html")
    composer = Composer(tree.settings, instance=1)
    assert composer.run_until_idle() >= 30
    busy_rate = composer.throughput()
    assert busy_rate > 5  # 30 messages to a loopback server take well under 6 s of work
    time.sleep(1.5)  # idle: wall-clock averaging would now report less
    assert composer.throughput() == busy_rate
    composer._heartbeat()
    (rate,) = tree.query(select(ComposerHeartbeat.throughput))[0]
    assert rate == pytest.approx(busy_rate)


def test_full_disk_under_the_journal_loses_and_repeats_nothing(tmp_path, content_server,
                                                               mount_tmpfs):
    """The journal's disk fills mid-batch: the composer stops with an error (it never hands
    off mail it cannot journal), and once space is freed a restart sends nobody a second
    copy; the window whose outcomes could not be written is reported unknown."""
    from connectd.spool import SpoolError

    disk = mount_tmpfs("1m")
    handler = Relay()
    filled = threading.Event()

    async def fill_after_ten(server, session, envelope):  # the disk fills while mail flows
        reply = await Relay.handle_DATA(handler, server, session, envelope)
        if len(handler.messages) == 10 and not filled.is_set():
            filled.set()
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
        return reply

    handler.handle_DATA = fill_after_ten  # type: ignore[method-assign]
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        t = Tree(tmp_path, port, content_server[0])
        streams = t.settings.paths.spool / "streams"
        streams.mkdir(parents=True, exist_ok=True)
        streams.rmdir()
        (disk / "streams").mkdir()
        streams.symlink_to(disk / "streams")  # the journal lives on the small disk
        n = 30
        seed_outbound(t.url, n, html_url=f"{t.content_base}/page.html")
        with pytest.raises(SpoolError):
            Composer(t.settings, instance=1).run_until_idle()
        stopped_at = len(handler.messages)
        assert 10 <= stopped_at <= 10 + t.settings.composer.window
        (disk / "filler").unlink()
        Composer(t.settings, instance=1).run_until_idle()
        received = Counter(r for _, r, _ in handler.messages)
        assert max(received.values()) == 1  # nobody twice
        got = {int(r[1:].split("@")[0]) for r in received}
        statuses = dict(t.query(select(Target.customer_id, Target.status)))
        journalled = [r["customer"] for r in t.records("composer.sent.1")]
        assert len(journalled) == len(set(journalled))  # no outcome twice, no torn record
        # targets stay "sending" until the profiler applies the journal, so the restart marks
        # every one of them unknown; the journal then says which of those were sent
        unknown = {c for c, s in statuses.items() if s == "unknown"} - set(journalled)
        assert 0 < len(unknown) <= t.settings.composer.window
        assert got | unknown == set(range(1, n + 1))  # nobody skipped
        assert set(journalled) == got - unknown
    finally:
        ctl.stop()
