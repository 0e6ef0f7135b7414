"""The sink (local development mail farm): real aiosmtpd servers on loopback, real smtplib
clients, real maildir files (and a real full tmpfs for the disk-failure case)."""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import write_config

from connectd import settings as settings_mod
from connectd.daemons.sink import RCPT_HEADER, Sink, maildir_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sink_settings(tmp_path: Path) -> settings_mod.Settings:
    cfg = write_config(tmp_path, extra=f"[sink]\nport = {free_port()}\n")
    return settings_mod.load(cfg, environ={})


@pytest.fixture
def start_sink(tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    """start_sink(**kwargs) -> a Sink listening on a free loopback port (stopped at the end)."""
    started: list[Sink] = []

    def start(**kwargs: object) -> Sink:
        sink = Sink(sink_settings(tmp_path), **kwargs)  # type: ignore[arg-type]
        sink.setup()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.teardown()


def client(sink: Sink) -> smtplib.SMTP:
    return smtplib.SMTP(sink.settings.sink.host, sink.settings.sink.port, timeout=30)


def message(subject: str, body: str = "Hello.\r\n", sender: str = "from@example.com") -> bytes:
    return (f"From: {sender}\r\nTo: to@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.com>\r\n\r\n{body}").encode()


def stored(sink: Sink, sub: str = "new") -> list[Path]:
    return sorted((maildir_path(sink.settings) / sub).iterdir())


def parse(path: Path) -> email.message.EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.SMTPUTF8)  # type: ignore[return-value]


def test_message_is_in_new_when_sendmail_returns(start_sink: Callable[..., Sink]) -> None:
    """A message is a file in new/ by the time the client has its 250, with the envelope."""
    sink = start_sink()
    raw = message("first")
    with client(sink) as smtp:
        refused = smtp.sendmail("bounce+x@example.com", ["to@example.com"], raw)
    assert refused == {}
    files = stored(sink)
    assert len(files) == 1
    assert stored(sink, "tmp") == []
    data = files[0].read_bytes()
    assert data.endswith(raw)  # the message exactly as received
    msg = parse(files[0])
    assert msg["Return-Path"] == "<bounce+x@example.com>"
    assert msg.get_all(RCPT_HEADER) == ["to@example.com"]
    assert msg["Subject"] == "first"


def test_stored_maildir_reads_with_the_standard_library(start_sink: Callable[..., Sink]) -> None:
    """The sink's directory is a maildir that mailbox.Maildir (and so mail clients) can read."""
    sink = start_sink()
    with client(sink) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], message("readable"))
    box = mailbox.Maildir(maildir_path(sink.settings), create=False)
    assert [m["Subject"] for m in box] == ["readable"]


def test_every_envelope_recipient_is_recorded(start_sink: Callable[..., Sink]) -> None:
    """One file per message, with one recipient header per envelope recipient, in order."""
    sink = start_sink()
    rcpts = ["one@example.com", "two@example.org", "three@example.net"]
    with client(sink) as smtp:
        assert smtp.sendmail("from@example.com", rcpts, message("many")) == {}
    files = stored(sink)
    assert len(files) == 1
    assert parse(files[0]).get_all(RCPT_HEADER) == rcpts


def test_null_sender_is_an_empty_return_path(start_sink: Callable[..., Sink]) -> None:
    """A bounce (MAIL FROM:<>) is stored with Return-Path: <>."""
    sink = start_sink()
    with client(sink) as smtp:
        smtp.sendmail("", ["to@example.com"], message("bounce"))
    assert parse(stored(sink)[0])["Return-Path"] == "<>"


def test_five_megabyte_message_is_stored_whole(start_sink: Callable[..., Sink]) -> None:
    """A 5 MB message arrives byte for byte."""
    sink = start_sink()
    line = ("x" * 76 + "\r\n")
    body = line * (5 * 1024 * 1024 // len(line)) + "the end\r\n"
    raw = message("big", body)
    with client(sink) as smtp:
        smtp.sendmail("from@example.com", ["to@example.com"], raw)
    data = stored(sink)[0].read_bytes()
    assert len(raw) > 5 * 1024 * 1024
    assert data.endswith(raw)


def test_size_limit_is_refused_with_552(start_sink: Callable[..., Sink]) -> None:
    """A message over the size limit is refused with 552, and nothing is stored."""
    sink = start_sink(max_size=10_000)
    with client(sink) as smtp, pytest.raises(smtplib.SMTPResponseException) as refused:
        smtp.sendmail("from@example.com", ["to@example.com"], message("huge", "y" * 20_000))
    assert refused.value.smtp_code == 552
    assert stored(sink) == []


def test_smtputf8_and_8bit_body(start_sink: Callable[..., Sink]) -> None:
    """An internationalised address (SMTPUTF8) and an 8-bit body are stored as sent."""
    sink = start_sink()
    body = "Grüße, Jürgen — 日本語\r\n"
    raw = message("utf8", body).replace(b"To: to@example.com", "To: jürgen@bücher.example".encode())
    with client(sink) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("smtputf8") and smtp.has_extn("8bitmime")
        smtp.sendmail("Zoë@example.com", ["jürgen@bücher.example"], raw,
                      mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    data = stored(sink)[0].read_bytes()
    assert data.endswith(raw)
    assert "Return-Path: <Zoë@example.com>".encode() in data
    assert f"{RCPT_HEADER}: jürgen@bücher.example".encode() in data


def test_concurrent_clients_all_stored_in_unique_files(start_sink: Callable[..., Sink]) -> None:
    """20 messages from 4 client threads (each reusing its connection) make 20 distinct files."""
    sink = start_sink()
    errors: list[BaseException] = []

    def send(worker: int) -> None:
        try:
            with client(sink) as smtp:
                for i in range(5):
                    smtp.sendmail("from@example.com", [f"w{worker}@example.com"],
                                  message(f"w{worker}-m{i}"))
        except BaseException as exc:  # reported by the assert below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    files = stored(sink)
    assert len(files) == 20
    assert len({f.name for f in files}) == 20
    subjects = {parse(f)["Subject"] for f in files}
    assert subjects == {f"w{w}-m{i}" for w in range(4) for i in range(5)}


def test_disk_full_answers_451_and_leaves_nothing(tmp_path: Path,
                                                  mount_tmpfs: Callable[..., Path]) -> None:
    """On a full disk the sink answers 451 (try later), leaves no file behind, and stores the
    next message that fits."""
    settings = sink_settings(tmp_path)
    mnt = mount_tmpfs("64k")
    maildir_path(settings).symlink_to(mnt)  # the sink's maildir lives on the tiny disk
    sink = Sink(settings)
    sink.setup()
    try:
        with client(sink) as smtp:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("from@example.com", ["to@example.com"],
                              message("too-big-for-disk", ("z" * 98 + "\r\n") * 2_000))
            assert refused.value.smtp_code == 451
            assert stored(sink) == [] and stored(sink, "tmp") == []
            assert smtp.sendmail("from@example.com", ["to@example.com"], message("small")) == {}
    finally:
        sink.teardown()
    files = stored(sink)
    assert [parse(f)["Subject"] for f in files] == ["small"]


def test_failed_directory_fsync_leaves_no_copy(start_sink: Callable[..., Sink],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """If new/ cannot be made durable, the client gets 451 and no copy stays in new/ (so
    the client's retry does not make a duplicate)."""
    import connectd.daemons.sink as sink_mod

    sink = start_sink()

    def failing_fsync_dir(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sink_mod, "fsync_dir", failing_fsync_dir)
    with client(sink) as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail("from@example.com", ["to@example.com"], message("eio"))
    assert refused.value.smtp_code == 451
    assert stored(sink) == [] and stored(sink, "tmp") == []


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sink exited while starting"
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                smtp.noop()
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the sink did not listen on port {port} within {timeout}s")


def test_daemon_process_stores_mail_and_stops_on_term(tmp_path: Path) -> None:
    """`connectd run sink` accepts mail, logs one line per message without the body, and
    exits 0 on SIGTERM."""
    port = free_port()
    cfg = write_config(tmp_path, extra=f"[sink]\nport = {port}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTD_")}
    err_path = tmp_path / "sink.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "connectd", "--config", str(cfg),
                                 "run", "sink"], stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            _wait_listening(port, proc)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.sendmail("from@example.com", ["a@example.com", "b@example.com"],
                              message("daemon", "secret-body-text\r\n"))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, err_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    files = list((tmp_path / "spool" / "sink" / "new").iterdir())
    assert len(files) == 1
    log_text = err_path.read_text()
    assert "secret-body-text" not in log_text
    entries = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    stored_lines = [e for e in entries if e.get("event") == "message stored"]
    assert len(stored_lines) == 1
    assert stored_lines[0]["daemon"] == "sink"
    assert stored_lines[0]["recipients"] == 2
    assert stored_lines[0]["size"] == len(message("daemon", "secret-body-text\r\n"))


def test_connectd_up_only_sink_prints_the_maildir_and_stores_mail(tmp_path: Path) -> None:
    """`connectd up --only sink` starts the sink, says where the mail goes, and stops on TERM."""
    port = free_port()
    cfg = write_config(tmp_path, extra=f"[sink]\nport = {port}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTD_")}
    out_path = tmp_path / "up.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "connectd", "--config", str(cfg),
                                 "up", "--only", "sink"], stdout=out,
                                stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            _wait_listening(port, proc)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.sendmail("from@example.com", ["to@example.com"], message("via-up"))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    maildir = tmp_path / "spool" / "sink"
    assert f"mail sink: 127.0.0.1:{port} (maildir: {maildir})" in out_path.read_text()
    assert len(list((maildir / "new").iterdir())) == 1
