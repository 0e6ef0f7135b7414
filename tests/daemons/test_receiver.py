"""The receiver (MR): a real aiosmtpd server on loopback, real smtplib clients, real files in
the inbound store and real records in receiver.events. Which recipients it takes, the size
limit, STARTTLS, and that 250 means "on disk" (failing disks answer 451 and keep nothing)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import signal
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from conftest import write_config
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from connectd import settings as settings_mod
from connectd import spool as sp
from connectd.core.tokens import sign_verp
from connectd.daemon import DaemonFailed
from connectd.daemons.receiver import STREAM, Receiver, SMTPFactory, reconcile
from connectd.records import MailReceived
from connectd.secrets import create_secrets, load_secrets, new_key
from connectd.spool import InboundStore, Spool, SpoolError, encode, make_record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receiver_settings(root: Path, extra: str = "") -> settings_mod.Settings:
    # in this process (processes = 1) unless a test asks for workers: the tests below reach
    # into the server's handler and store
    one = "" if "processes" in extra else "processes = 1\n"
    cfg = write_config(root, extra=f"[receiver]\nport = {free_port()}\n{one}{extra}")
    s = settings_mod.load(cfg, environ={})
    create_secrets(s.paths.secrets)
    return s


@pytest.fixture
def start_receiver(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """start_receiver(extra_toml) -> a Receiver set up on a free loopback port (torn down at
    the end)."""
    started: list[Receiver] = []

    def start(extra: str = "") -> Receiver:
        r = Receiver(receiver_settings(tmp_path, extra))
        r.setup()
        started.append(r)
        return r

    yield start
    for r in started:
        r.teardown()


def client(r: Receiver) -> smtplib.SMTP:
    return smtplib.SMTP(r.settings.receiver.host, r.settings.receiver.port, timeout=30)


def message(subject: str, body: str = "Hello.\r\n") -> bytes:
    return (f"From: someone@example.com\r\nTo: reply@reply.localhost\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.com>\r\n\r\n{body}").encode()


def stored(r: Receiver) -> list[str]:
    return sorted(r.store.names())


def records(r: Receiver) -> list[MailReceived]:
    spool = Spool(r.settings.paths.spool)
    with spool.reader(STREAM) as rd:
        return [msgspec.json.decode(raw, type=MailReceived) for _, rec, raw in rd.records()
                if rec is not None]


def lines(size: int) -> bytes:
    """About `size` bytes of message body in 78-byte lines (SMTP limits lines to 1000)."""
    return (b"x" * 76 + b"\r\n") * (size // 78 + 1)


def verp(r: Receiver, instance: int = 3, customer: int = 42) -> str:
    return sign_verp(load_secrets(r.settings.paths.secrets).verp_keys[0], instance, customer)


def rcpt_reply(r: Receiver, address: str) -> tuple[int, bytes]:
    with client(r) as smtp:
        smtp.ehlo()
        smtp.mail("someone@example.com")
        return smtp.rcpt(address)


# -- acceptance and the record -----------------------------------------------------------


def test_message_and_record_exist_when_250_returns(start_receiver: Callable[..., Receiver]) -> None:
    """When sendmail returns, the bytes are in new/ as sent and one mail.received names them."""
    r = start_receiver()
    raw = message("first", "line one\r\n.leading dot\r\nlast\r\n")
    with client(r) as smtp:
        smtp.ehlo("client.example.com")
        refused = smtp.sendmail("bounce@example.com", ["reply@reply.localhost"], raw)
    assert refused == {}
    [name] = stored(r)
    assert r.store.read(name) == raw  # CRLF kept, dot-unstuffed, no header added
    [rec] = records(r)
    assert rec.message == name and rec.size == len(raw)
    assert rec.sha256 == hashlib.sha256(raw).hexdigest()
    assert rec.mail_from == "bounce@example.com" and rec.rcpt == ["reply@reply.localhost"]
    assert rec.peer == "127.0.0.1" and rec.helo == "client.example.com"


def test_null_sender_recorded_as_empty(start_receiver: Callable[..., Receiver]) -> None:
    """A bounce's null sender <> is recorded as mail_from ""."""
    r = start_receiver()
    with client(r) as smtp:
        smtp.sendmail("<>", [f"b-{verp(r)}@reply.localhost"], message("dsn"))
    [rec] = records(r)
    assert rec.mail_from == ""


def test_eight_bit_bytes_kept(start_receiver: Callable[..., Receiver]) -> None:
    """Non-UTF-8 8-bit bytes are stored untouched (the message is never decoded)."""
    r = start_receiver()
    raw = b"Subject: caf\xe9\r\n\r\n\xff\xfe latin-1 \xe9\r\n"
    with client(r) as smtp:
        smtp.sendmail("a@example.com", ["reply@reply.localhost"], raw, mail_options=["BODY=8BITMIME"])
    [name] = stored(r)
    assert r.store.read(name) == raw


# -- recipients ---------------------------------------------------------------------------


def test_relaying_refused(start_receiver: Callable[..., Receiver]) -> None:
    """Mail for another domain is refused at RCPT with 550 5.7.1 and nothing is stored."""
    r = start_receiver()
    assert rcpt_reply(r, "victim@example.com")[0] == 550
    assert rcpt_reply(r, "victim@example.com")[1].startswith(b"5.7.1")
    assert rcpt_reply(r, "postmaster@example.com")[0] == 550  # not even another's postmaster
    with client(r) as smtp, pytest.raises(smtplib.SMTPRecipientsRefused):
        smtp.sendmail("a@example.com", ["victim@example.com"], message("relay"))
    assert stored(r) == [] and records(r) == []


def test_unknown_local_part_refused(start_receiver: Callable[..., Receiver]) -> None:
    """A local part that is neither a mailbox nor signed is refused with 550 5.1.1."""
    r = start_receiver()
    code, text = rcpt_reply(r, "nobody@reply.localhost")
    assert (code, text[:5]) == (550, b"5.1.1")


@pytest.mark.parametrize("local", ["reply", "REPLY", "Subscribe", "unsubscribe", "abuse"])
def test_configured_mailboxes_accepted(start_receiver: Callable[..., Receiver], local: str) -> None:
    """receiver.mailboxes are accepted whatever their letter case."""
    r = start_receiver()
    assert rcpt_reply(r, f"{local}@reply.localhost")[0] == 250


@pytest.mark.parametrize("address", ["postmaster@reply.localhost", "PostMaster@REPLY.localhost",
                                     "Postmaster"])
def test_postmaster_always_accepted(start_receiver: Callable[..., Receiver], address: str) -> None:
    """postmaster is accepted even when receiver.mailboxes leaves it out (RFC 5321)."""
    r = start_receiver('mailboxes = ["reply"]\n')
    assert rcpt_reply(r, address)[0] == 250


def test_extra_domains_accepted(start_receiver: Callable[..., Receiver]) -> None:
    """receiver.domains are ours too, in any letter case."""
    r = start_receiver('domains = ["bounces.example.org"]\n')
    assert rcpt_reply(r, "reply@Bounces.Example.Org")[0] == 250
    assert rcpt_reply(r, "reply@example.org")[0] == 550


@pytest.mark.parametrize("prefix", ["b-", "unsubscribe-", "B-"])
def test_signed_verp_accepted(start_receiver: Callable[..., Receiver], prefix: str) -> None:
    """b-<token> and unsubscribe-<token> with a token signed by our VERP key are accepted."""
    r = start_receiver()
    assert rcpt_reply(r, f"{prefix}{verp(r)}@reply.localhost")[0] == 250
    assert rcpt_reply(r, f"{prefix}{verp(r).upper()}@reply.localhost")[0] == 250


def test_forged_verp_token_refused(start_receiver: Callable[..., Receiver]) -> None:
    """A VERP token signed with another key, garbled, or cut short is refused with 550 5.1.1."""
    r = start_receiver()
    good = verp(r)
    forged = sign_verp(new_key(), 3, 42)
    flipped = good[:-1] + ("a" if good[-1] != "a" else "b")
    for token in (forged, flipped, good[:-3], "", "0000", good + "a"):
        for prefix in ("b-", "unsubscribe-"):
            code, text = rcpt_reply(r, f"{prefix}{token}@reply.localhost")
            assert (code, text[:5]) == (550, b"5.1.1"), (prefix, token)


def test_confirm_tokens_accepted_when_well_formed(start_receiver: Callable[..., Receiver]) -> None:
    """confirm-<base32> is accepted (the processor verifies it); other confirm- parts are not."""
    r = start_receiver()
    assert rcpt_reply(r, "confirm-abcdefgh234567@reply.localhost")[0] == 250
    assert rcpt_reply(r, "confirm-@reply.localhost")[0] == 550
    assert rcpt_reply(r, "confirm-abc!1@reply.localhost")[0] == 550
    assert rcpt_reply(r, "confirm-" + "a" * 300 + "@reply.localhost")[0] == 550


def test_mixed_recipients_keep_the_good_ones(start_receiver: Callable[..., Receiver]) -> None:
    """With one good and one refused recipient, the message is stored for the good one only."""
    r = start_receiver()
    with client(r) as smtp:
        refused = smtp.sendmail("a@example.com", ["reply@reply.localhost", "x@example.com"],
                                message("mixed"))
    assert list(refused) == ["x@example.com"]
    [rec] = records(r)
    assert rec.rcpt == ["reply@reply.localhost"]


# -- size ----------------------------------------------------------------------------------


def test_size_advertised(start_receiver: Callable[..., Receiver]) -> None:
    """EHLO advertises SIZE with receiver.max_size."""
    r = start_receiver("max_size = 10000\n")
    with client(r) as smtp:
        smtp.ehlo()
        assert smtp.esmtp_features["size"] == "10000"


def test_oversize_announced_refused(start_receiver: Callable[..., Receiver]) -> None:
    """MAIL FROM with SIZE= past the limit is refused with 552, before any data."""
    r = start_receiver("max_size = 10000\n")
    with client(r) as smtp:
        smtp.ehlo()
        code, _ = smtp.mail("a@example.com", ["SIZE=10001"])
        assert code == 552
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:
            smtp.sendmail("a@example.com", ["reply@reply.localhost"], b"x" * 20000)
        assert exc.value.smtp_code == 552
    assert stored(r) == [] and records(r) == []


def test_oversize_data_refused(start_receiver: Callable[..., Receiver]) -> None:
    """Data that runs past the limit without a SIZE= announcement is refused with 552."""
    r = start_receiver("max_size = 10000\n")
    with client(r) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@example.com")[0] == 250  # no SIZE= given
        assert smtp.rcpt("reply@reply.localhost")[0] == 250
        code, _ = smtp.data(b"Subject: big\r\n\r\n" + lines(20000))
        assert code == 552
    assert stored(r) == [] and records(r) == []


# -- 250 only once on disk ------------------------------------------------------------------


def test_write_failure_answers_451(start_receiver: Callable[..., Receiver]) -> None:
    """When the message cannot be written (fsync fails), the answer is 451 and nothing stays."""
    r = start_receiver()

    def broken(data: bytes) -> tuple[str, str]:
        raise OSError(5, "Input/output error")

    r.handler.write = broken  # type: ignore[union-attr]
    with client(r) as smtp, pytest.raises(smtplib.SMTPDataError) as exc:
        smtp.sendmail("a@example.com", ["reply@reply.localhost"], message("lost"))
    assert exc.value.smtp_code == 451
    assert stored(r) == [] and records(r) == []
    assert os.listdir(r.store.tmp_dir) == []


def test_publish_failure_answers_451(start_receiver: Callable[..., Receiver],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """When the rename into new/ fails, the answer is 451: nothing in new/, no record."""
    r = start_receiver()

    def broken(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sp.os, "rename", broken)
    with client(r) as smtp, pytest.raises(smtplib.SMTPDataError) as exc:
        smtp.sendmail("a@example.com", ["reply@reply.localhost"], message("lost"))
    assert exc.value.smtp_code == 451
    monkeypatch.undo()
    assert stored(r) == [] and records(r) == []
    assert os.listdir(r.store.tmp_dir) == []
    assert [data for _, data, _ in r.store.pending()] in ([], [b""])  # no batch left pending


def test_record_failure_answers_451(start_receiver: Callable[..., Receiver],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """When the record cannot be appended, the answer is 451 and the file is taken back out."""
    r = start_receiver()

    def broken(data: bytes, *, sync: bool = False) -> None:
        raise SpoolError("stream 'receiver.events': disk full; record not written")

    monkeypatch.setattr(r.writer, "write_lines", broken)
    with client(r) as smtp, pytest.raises(smtplib.SMTPDataError) as exc:
        smtp.sendmail("a@example.com", ["reply@reply.localhost"], message("lost"))
    assert exc.value.smtp_code == 451
    monkeypatch.undo()
    assert stored(r) == [] and records(r) == []
    # and the next message goes through: the failure left nothing wedged
    with client(r) as smtp:
        assert smtp.sendmail("a@example.com", ["reply@reply.localhost"], message("ok")) == {}
    assert len(stored(r)) == 1 and len(records(r)) == 1


def test_full_disk_answers_451(tmp_path: Path, mount_tmpfs: Callable[..., Path]) -> None:
    """With the spool on a full filesystem, a message is answered 451 and new/ stays empty."""
    s = receiver_settings(tmp_path, "max_size = 10000000\n")
    small = mount_tmpfs("256k")
    s = settings_mod.Settings(**{**s.__dict__,
                                 "paths": settings_mod.PathsSettings(**{**s.paths.__dict__,
                                                                        "spool": small})})
    r = Receiver(s)
    r.setup()
    try:
        with client(r) as smtp, pytest.raises(smtplib.SMTPDataError) as exc:
            smtp.sendmail("a@example.com", ["reply@reply.localhost"], lines(600_000))
        assert exc.value.smtp_code == 451
        assert stored(r) == [] and records(r) == []
        with client(r) as smtp:  # a message that fits still goes through
            assert smtp.sendmail("a@example.com", ["reply@reply.localhost"], message("fits")) == {}
        assert len(stored(r)) == 1 and len(records(r)) == 1
    finally:
        r.teardown()


# -- concurrency, start, logs -------------------------------------------------------------


def test_concurrent_sessions_each_stored_once(start_receiver: Callable[..., Receiver]) -> None:
    """20 sessions sending at once: every message has its file and exactly one record."""
    r = start_receiver()
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            with client(r) as smtp:
                for j in range(10):
                    smtp.sendmail("a@example.com", ["reply@reply.localhost"], message(f"m{i}-{j}"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    recs = records(r)
    assert len(recs) == 200 and len({x.message for x in recs}) == 200
    assert sorted(x.message for x in recs) == stored(r)
    assert {r.store.read(x.message) for x in recs} == {message(f"m{i}-{j}")
                                                       for i in range(20) for j in range(10)}


def test_records_follow_publication_order(start_receiver: Callable[..., Receiver],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With publishing and appending overlapped (a slow new/ fsync), every record is appended
    after its own file was published, in the order the batches were published."""
    r = start_receiver()
    published: list[str] = []
    real_fsync_dir = sp.fsync_dir

    def slow_fsync_dir(path: Path) -> None:
        time.sleep(0.02)
        real_fsync_dir(path)

    real_publish = r.store.publish

    def publish(names: list[str]) -> None:
        real_publish(names)
        published.extend(names)

    monkeypatch.setattr(sp, "fsync_dir", slow_fsync_dir)
    monkeypatch.setattr(r.store, "publish", publish)

    def send(k: int) -> None:
        for i in range(6):
            with client(r) as smtp:
                smtp.sendmail("a@example.com", ["reply@reply.localhost"], message(f"o{k}-{i}"))

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    names = [x.message for x in records(r)]
    assert len(names) == 48 and names == published
    assert r.committer is not None and r.committer.batches < 48  # batches were shared


def test_starttls(tmp_path: Path, start_receiver: Callable[..., Receiver]) -> None:
    """With a certificate configured, STARTTLS is offered and a message goes through over TLS."""
    cert, key = self_signed(tmp_path)
    r = start_receiver(f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    with client(r) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        smtp.starttls(context=ctx)
        assert smtp.sock.version() is not None  # type: ignore[union-attr]
        assert smtp.sendmail("a@example.com", ["reply@reply.localhost"], message("tls")) == {}
    assert len(records(r)) == 1


def test_no_starttls_without_certificate(start_receiver: Callable[..., Receiver]) -> None:
    """Without a certificate STARTTLS is not offered."""
    r = start_receiver()
    with client(r) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("starttls")


def test_half_tls_config_is_a_settings_error(tmp_path: Path) -> None:
    """A certificate without its key is a configuration error (exit 78), not a crash."""
    cert, _ = self_signed(tmp_path)
    with pytest.raises(settings_mod.SettingsError):
        Receiver(receiver_settings(tmp_path, f'tls_cert = "{cert}"\n'))


def test_second_receiver_on_the_spool_fails(start_receiver: Callable[..., Receiver]) -> None:
    """Only one receiver may write a spool's inbound store and stream."""
    r = start_receiver()
    other = Receiver(r.settings)
    with pytest.raises(DaemonFailed):
        other.setup()


def test_one_log_line_per_message_without_body(start_receiver: Callable[..., Receiver]) -> None:
    """Each message logs one line with its size, recipient count and name, never its body."""
    r = start_receiver()
    with structlog.testing.capture_logs() as logs:
        r.handler.log = structlog.get_logger()  # type: ignore[union-attr]
        with client(r) as smtp:
            smtp.sendmail("a@example.com", ["reply@reply.localhost", "abuse@reply.localhost"],
                          message("logged", "secret body words\r\n"))
    lines = [e for e in logs if e["event"] == "message received"]
    assert len(lines) == 1
    assert lines[0]["recipients"] == 2 and lines[0]["message"] == stored(r)[0]
    assert lines[0]["size"] == len(message("logged", "secret body words\r\n"))
    assert "secret" not in repr(logs)


# -- reconcile after a crash ----------------------------------------------------------------


def crashed_batch(store: InboundStore, raw: bytes, *, published: bool) -> dict:
    """What a receiver killed mid-commit leaves: a journal entry and (if published) the file."""
    store.create()
    name, digest = store.write_tmp(raw)
    rec = make_record("mail.received", {"message": name, "size": len(raw), "sha256": digest,
                                        "mail_from": "a@example.com", "rcpt": ["reply@reply.localhost"]})
    store.write_pending(rec["id"], encode(rec))
    if published:
        store.publish([name])
    return rec


def test_reconcile_appends_the_missing_record_once(tmp_path: Path) -> None:
    """A file in new/ whose record was never appended gets exactly one, kept across restarts."""
    s = receiver_settings(tmp_path)
    r = Receiver(s)
    rec = crashed_batch(r.store, message("orphan"), published=True)
    for _ in range(2):  # the second start must not append it again
        r = Receiver(s)
        r.setup()
        r.teardown()
    recs = records(r)
    assert [x.id for x in recs] == [rec["id"]]
    assert recs[0].rcpt == ["reply@reply.localhost"]
    assert r.store.pending() == [] and os.listdir(r.store.tmp_dir) == []


def test_reconcile_skips_records_already_written(tmp_path: Path) -> None:
    """A batch that was appended but whose journal entry survived is not appended twice."""
    s = receiver_settings(tmp_path)
    r = Receiver(s)
    rec = crashed_batch(r.store, message("done"), published=True)
    spool = Spool(s.paths.spool)
    spool.create()
    with spool.writer(STREAM) as w:
        w.write_lines(encode(rec), sync=True)
    with spool.writer(STREAM) as w:
        assert reconcile(r.store, spool, w) == 0
    assert [x.id for x in records(r)] == [rec["id"]]


def test_reconcile_drops_unpublished_messages(tmp_path: Path) -> None:
    """A message still in tmp/ at the crash (never answered) gets no record and is removed."""
    s = receiver_settings(tmp_path)
    r = Receiver(s)
    crashed_batch(r.store, message("half"), published=False)
    r.setup()
    r.teardown()
    assert records(r) == [] and stored(r) == []
    assert os.listdir(r.store.tmp_dir) == [] and r.store.pending() == []


# -- worker processes (receiver.processes > 1) ---------------------------------------------


@pytest.fixture
def workers_receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A Receiver with 2 worker processes, set up on a free port (torn down at the end)."""
    r = Receiver(receiver_settings(tmp_path), processes=2)
    r.setup()
    yield r
    r.teardown()


def send_many(r: Receiver, count: int, tag: str) -> list[str]:
    """`count` messages, one connection each, from 4 threads; the names answered 250."""
    names: list[str] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        with client(r) as smtp:
            smtp.ehlo()
            smtp.mail("a@example.com")
            smtp.rcpt("reply@reply.localhost")
            code, text = smtp.data(message(f"{tag}-{i}"))
        assert code == 250, text
        with lock:
            names.append(text.decode().rsplit(" ", 1)[-1])

    threads = [threading.Thread(target=lambda k=k: [send(i) for i in range(k, count, 4)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return names


def test_workers_store_and_record_each_message_once(workers_receiver: Receiver) -> None:
    """With worker processes every message answered 250 has its file and one record, written
    by the parent for messages that came through both workers."""
    r = workers_receiver
    names = send_many(r, 60, "w")
    assert len(names) == 60 and stored(r) == sorted(names)
    recs = records(r)
    assert sorted(x.message for x in recs) == sorted(names)
    assert all(x.sha256 == hashlib.sha256(r.store.read(x.message)).hexdigest() for x in recs)
    pids = {n.split(".")[2].split("q")[0] for n in names}  # the writing worker's pid (hex)
    assert len(pids) == 2  # SO_REUSEPORT spread the connections over both
    assert os.listdir(r.store.tmp_dir) == []


def test_workers_refuse_like_one_process(workers_receiver: Receiver) -> None:
    """A worker applies the recipient policy and the size limit itself."""
    r = workers_receiver
    assert rcpt_reply(r, "someone@elsewhere.example")[0] == 550
    assert rcpt_reply(r, "nobody-here@reply.localhost")[0] == 550
    assert rcpt_reply(r, "postmaster@reply.localhost")[0] == 250


def test_dead_worker_is_restarted(workers_receiver: Receiver) -> None:
    """A worker killed with SIGKILL is started again by step(); mail keeps flowing."""
    r = workers_receiver
    victim = r.workers[1]
    os.kill(victim.pid, 9)
    victim.wait(10)
    deadline = time.monotonic() + 30
    while r.step() == 0:
        assert time.monotonic() < deadline, "the dead worker was not restarted"
        time.sleep(0.01)
    assert r.workers[1].pid != victim.pid
    while len(r.broker.ready) < 2:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the new worker did not start listening"
        time.sleep(0.01)
    names = send_many(r, 20, "after")
    assert len(names) == 20 and len(records(r)) == 20
    pids = {n.split(".")[2].split("q")[0] for n in names}
    assert f"{r.workers[1].pid:x}" in pids


def test_wedged_worker_stops_the_watchdog(tmp_path: Path) -> None:
    """A worker stopped with SIGSTOP (alive, silent) makes alive() False, once its heartbeats
    are 3 x watchdog_interval late; after SIGCONT alive() is True again."""
    r = Receiver(receiver_settings(tmp_path, "[daemon]\nwatchdog_interval = 0.5\n"), processes=2)
    r.setup()
    victim = r.workers[2].pid
    try:
        deadline = time.monotonic() + 10
        while not r.alive():  # both beating (a loaded machine may be slow at first)
            assert time.monotonic() < deadline, "the workers' heartbeats never came"
            time.sleep(0.05)
        os.kill(victim, signal.SIGSTOP)
        time.sleep(2.0)  # 3 x 0.5 s of silence, and some
        with structlog.testing.capture_logs() as logs:
            r.log = structlog.get_logger()
            assert r.alive() is False
            assert r.alive() is False  # still stuck
        warned = [e for e in logs if e["log_level"] == "warning"]
        # named, and once per episode (the other worker, beating, is not expected here, but a
        # loaded machine could delay its beats: only the victim is asserted on)
        assert [e["worker"] for e in warned].count(2) == 1
        assert r.workers[2].poll() is None  # wedged, not dead: step() leaves it alone
        os.kill(victim, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not r.alive():
            assert time.monotonic() < deadline, "the resumed worker's heartbeats did not return"
            time.sleep(0.05)
        assert rcpt_reply(r, "postmaster@reply.localhost")[0] == 250
    finally:
        os.kill(victim, signal.SIGCONT)
        r.teardown()


def test_workers_stop_cleanly(tmp_path: Path) -> None:
    """TERM-like teardown stops the workers and leaves no pending batch or tmp/ file."""
    r = Receiver(receiver_settings(tmp_path), processes=2)
    r.setup()
    pids = [p.pid for p in r.workers.values()]
    send_many(r, 8, "stop")
    r.teardown()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert r.store.pending() == [] and os.listdir(r.store.tmp_dir) == []
    assert len(records(r)) == 8


# -- per-connection SMTP objects -----------------------------------------------------------


def test_smtp_copies_are_like_fresh_objects() -> None:
    """SMTPFactory's copies have a fresh SMTP's attributes, methods bound to themselves, and
    no mutable state shared with each other (besides what __init__ shares itself)."""
    from aiosmtpd.smtp import SMTP

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 OK"

    loop = asyncio.new_event_loop()
    try:
        kwargs = {"hostname": "mx.test", "loop": loop, "data_size_limit": 1000}
        make = SMTPFactory(Handler(), kwargs)
        a, b, fresh = make(), make(), SMTP(Handler(), **kwargs)
        assert set(a.__dict__) == set(fresh.__dict__) | {"command_size_limits"}
        assert a._smtp_methods["DATA"].__self__ is a and b._smtp_methods["DATA"].__self__ is b
        assert set(a._smtp_methods) == set(fresh._smtp_methods)
        assert {k: m.is_builtin for k, m in a._auth_methods.items()} == \
            {k: m.is_builtin for k, m in fresh._auth_methods.items()}
        assert all(m.method.__self__ is a for m in a._auth_methods.values() if m.is_builtin)
        shared_ok = {"event_handler", "loop", "_loop", "_handle_hooks", "_auth_callback"}
        for key, value in a.__dict__.items():
            if key not in shared_ok and not isinstance(value, (str, int, float, type(None))):
                assert value is not b.__dict__[key], key
        a.command_size_limits["MAIL"] += 26  # what EHLO does with SIZE
        assert b.command_size_limits["MAIL"] == SMTP.command_size_limit
    finally:
        loop.close()


_PATH_CHARS = "ab.Z09-_+@<>()\" \t[]:=é!{}"
_PATHS = ["<a@b.c>", "<a@b.c> SIZE=100", "<a@b.c>  BODY=8BITMIME SMTPUTF8", "<>", "<> SIZE=5",
          "<a@b.c>(comment) X", "<a@b.c>\tX", "<A.b+c@Ex-ample.COM> x", "<a..b@c>", "<a@b..c>",
          "<\"q u\"@b.c>", "<a@[1.2.3.4]>", " <a@b.c>", "<a@b.c>X", "<a@b.c>  ", "a@b.c",
          "<@relay:a@b.c>", "<é@b.c>", "<a@b.c> X(y)", "<a@-b.c>", "<a.@b.c>", "<.a@b.c>"]


@pytest.mark.parametrize("arg", _PATHS)
def test_fast_address_path_agrees_with_aiosmtpd(arg: str) -> None:
    """ReceiverSMTP._getaddr gives what aiosmtpd's parser gives, for plain and odd paths."""
    from aiosmtpd.smtp import SMTP

    from connectd.daemons.receiver import ReceiverSMTP

    fast = ReceiverSMTP.__new__(ReceiverSMTP)
    slow = SMTP.__new__(SMTP)
    assert fast._getaddr(arg) == slow._getaddr(arg)


@given(st.text(alphabet=_PATH_CHARS, max_size=30))
@hsettings(max_examples=400, deadline=None)
def test_fast_address_path_agrees_on_random_paths(arg: str) -> None:
    """ReceiverSMTP._getaddr agrees with aiosmtpd's parser on random strings of path
    characters (the fast path or the fallback, the answer must be the same)."""
    from aiosmtpd.smtp import SMTP

    from connectd.daemons.receiver import ReceiverSMTP

    fast = ReceiverSMTP.__new__(ReceiverSMTP)
    slow = SMTP.__new__(SMTP)
    try:
        expected = slow._getaddr(arg)
    except Exception as exc:  # aiosmtpd's own parser may raise on junk: so must we
        with pytest.raises(type(exc)):
            fast._getaddr(arg)
        return
    assert fast._getaddr(arg) == expected


@given(st.from_regex(r"<[a-zA-Z0-9+_-]{1,8}(\.[a-z0-9]{1,4}){0,2}@[a-z0-9-]{1,8}(\.[a-z]{2,4}){0,2}>"
                     r"( [A-Z]{4}=[0-9]{1,5})?", fullmatch=True))
@hsettings(max_examples=300, deadline=None)
def test_fast_address_path_agrees_on_plain_paths(arg: str) -> None:
    """On plain <local@domain> paths (the fast path's) the answers are aiosmtpd's too."""
    from aiosmtpd.smtp import SMTP

    from connectd.daemons.receiver import ReceiverSMTP

    assert ReceiverSMTP.__new__(ReceiverSMTP)._getaddr(arg) == SMTP.__new__(SMTP)._getaddr(arg)


class _Recorder:
    """A handler that keeps what DATA gave it."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        self.contents.append(envelope.original_content)
        return f"250 OK {len(envelope.original_content)}"


@pytest.fixture(scope="module")
def twin_servers() -> Iterator[tuple[tuple[int, _Recorder], tuple[int, _Recorder]]]:
    """aiosmtpd's own SMTP and the receiver's ReceiverSMTP, same settings, side by side."""
    from aiosmtpd.controller import Controller

    from connectd.daemons.receiver import ReceiverController

    servers = []
    for cls in (Controller, ReceiverController):
        handler = _Recorder()
        ctl = cls(handler, hostname="127.0.0.1", port=free_port(), data_size_limit=30_000,
                  enable_SMTPUTF8=True, decode_data=False, server_hostname="mx.test",
                  ident="twin")
        ctl.start()
        servers.append((ctl, handler))
    yield tuple((c.port, h) for c, h in servers)  # type: ignore[misc]
    for ctl, _ in servers:
        ctl.stop()


def transcript(port: int, chunks: list[bytes]) -> bytes:
    """Everything the server answers to a session that sends `chunks` after DATA's 354,
    then QUIT (pipelined after the data when the last chunk does not end the message)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        out = [f.readline()]
        for cmd in (b"EHLO client\r\n", b"MAIL FROM:<a@example.com>\r\n",
                    b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n"):
            s.sendall(cmd)
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
            out.append(line)
        for chunk in chunks:
            s.sendall(chunk)
            time.sleep(0.002)
        s.sendall(b"QUIT\r\n")
        out.extend(f.readlines())
    return b"".join(out)


_BODIES = {
    "plain": [b"Subject: x\r\n\r\nhello\r\n.\r\n"],
    "empty": [b".\r\n"],
    "one dot line": [b"..\r\n.\r\n"],
    "dots": [b".a\r\n..b\r\nc.\r\n.\r\n\r\n.\r\n"],
    "bare lf and cr": [b"a\nb\rc\r\n\n.\n\r\n.\r\n"],
    "split terminator": [b"abc\r\n", b".", b"\r", b"\n"],
    "split everywhere": [bytes([c]) for c in b"x\r\n.y\r\n.\r\n"],
    "pipelined": [b"hi\r\n.\r\nNOOP\r\n"],
    "line 999": [b"a" * 997 + b"\r\n.\r\n"],
    "line 1001": [b"a" * 999 + b"\r\n.\r\n"],
    "line 1002": [b"a" * 1000 + b"\r\n.\r\n"],
    "line 1004": [b"a" * 1002 + b"\r\n.\r\n"],
    "long line then more": [b"a" * 1500 + b"\r\nshort\r\n.\r\n"],
    "at size limit": [(b"x" * 98 + b"\r\n") * 300 + b".\r\n"],
    "over size limit": [(b"x" * 98 + b"\r\n") * 300 + b"y\r\n.\r\n"],
    "far over, in pieces": [(b"x" * 98 + b"\r\n") * 200] * 10 + [b".\r\n"],
    "8 bit": ["Subject: é\r\n\r\nÿ\x00\r\n.\r\n".encode("latin-1")],
}


@pytest.mark.parametrize("name", sorted(_BODIES))
def test_fast_data_answers_like_aiosmtpd(twin_servers: Any, name: str) -> None:
    """ReceiverSMTP's DATA gives the same replies and the same stored bytes as aiosmtpd's
    line-by-line loop (limits, dot-stuffing, split packets, pipelined commands)."""
    (stock_port, stock), (ours_port, ours) = twin_servers
    before = len(stock.contents), len(ours.contents)
    expected = transcript(stock_port, _BODIES[name])
    got = transcript(ours_port, _BODIES[name])
    assert got.replace(b"mx.test", b"") == expected.replace(b"mx.test", b"")
    assert stock.contents[before[0]:] == ours.contents[before[1]:]


@given(st.lists(st.sampled_from([b"a", b".", b"\r\n", b"\r", b"\n", b"..", b"x" * 700,
                                 b"\r\n.", b" ", b"\xff"]), max_size=40))
@hsettings(max_examples=60, deadline=None)
def test_fast_data_answers_like_aiosmtpd_on_random_bodies(twin_servers: Any,
                                                          parts: list[bytes]) -> None:
    """Random bodies made of the tricky pieces: replies and stored bytes agree."""
    (stock_port, stock), (ours_port, ours) = twin_servers
    body = [b"".join(parts) + b"\r\n.\r\n"]
    before = len(stock.contents), len(ours.contents)
    assert transcript(ours_port, body) == transcript(stock_port, body)
    assert stock.contents[before[0]:] == ours.contents[before[1]:]


def test_big_message_takes_aiosmtpd_path(start_receiver: Callable[..., Receiver]) -> None:
    """A message bigger than FAST_DATA is read by aiosmtpd's loop and stored byte for byte."""
    from connectd.daemons.receiver import FAST_DATA

    r = start_receiver("max_size = 5000000\n")
    raw = message("big", (b"y" * 76 + b"\r\n").decode() * (FAST_DATA // 78 + 100))
    with client(r) as smtp:
        assert smtp.sendmail("a@example.com", ["reply@reply.localhost"], raw) == {}
    [name] = stored(r)
    assert r.store.read(name) == raw


def test_many_connections_keep_command_limits(start_receiver: Callable[..., Receiver]) -> None:
    """After many EHLO sessions the MAIL command limit is still the one SIZE sets once."""
    r = start_receiver()
    for _ in range(30):
        with client(r) as smtp:
            smtp.ehlo()
    with client(r) as smtp:
        smtp.ehlo()
        code, _ = smtp.docmd("MAIL FROM:<a@example.com> SIZE=10 " + "X" * 600)
    assert code == 500  # too long: the limit did not grow by 36 per earlier EHLO


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and key for localhost, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
