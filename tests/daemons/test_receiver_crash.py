"""The receiver killed with SIGKILL while clients are sending (a separate process, real SMTP
sessions, real files): every message that got 250 survives with its file and exactly one
mail.received record; no file in new/ is ever half-written or without its record."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
from test_receiver import receiver_settings

from connectd import settings as settings_mod
from connectd.daemons.receiver import STREAM
from connectd.records import MailReceived
from connectd.spool import InboundStore, Spool, inbound_store

ROUNDS = 6
SENDERS = 6
SIZES = (2_000, 60_000, 400_000, 1_200_000)  # the big ones keep most kills inside DATA

_LAUNCH = ("import sys\n"
           "from connectd import log, settings\n"
           "from connectd.daemons.receiver import Receiver\n"
           "s = settings.load(sys.argv[1])\n"
           "log.configure(s.log.level, 'json')\n"
           "sys.exit(Receiver(s, processes=int(sys.argv[2])).run())\n")


def launch(config: Path, notify: str, processes: int = 1) -> subprocess.Popen[bytes]:
    """`connectd run receiver` in a child process (a direct launcher of the class, with
    `processes` workers, while settings have no receiver.processes); the caller waits for
    READY=1."""
    from connectd.daemons import DAEMONS

    if "receiver" in DAEMONS and processes == 1:
        cmd = [sys.executable, "-m", "connectd", "--config", str(config), "run", "receiver"]
    else:
        cmd = [sys.executable, "-c", _LAUNCH, str(config), str(processes)]
    env = {**os.environ, "NOTIFY_SOCKET": notify}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(sock, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"receiver exited with {proc.returncode}"
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in data:
            return
    raise AssertionError("receiver never said READY=1")


def body(tag: str, size: int) -> bytes:
    head = (f"From: customer@example.com\r\nTo: reply@reply.localhost\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@example.com>\r\n\r\n").encode()
    line = (tag.encode() * 80)[:76] + b"\r\n"
    return head + line * max(1, size // 78)


class Sender(threading.Thread):
    """Sends messages in one session after another until the server goes away; keeps the
    name the server gave each message it answered 250."""

    def __init__(self, port: int, prefix: str, rnd: random.Random) -> None:
        super().__init__(daemon=True)
        self.port, self.prefix, self.rnd = port, prefix, rnd
        self.acked: dict[str, tuple[str, str]] = {}  # tag -> (stored name, sha256 sent)
        self.interrupted = 0
        self.unexpected: list[tuple[str, int, bytes]] = []  # replies other than 250 and 4xx

    def run(self) -> None:
        n = 0
        try:
            smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=20)
            smtp.ehlo()
        except OSError:
            return
        while True:
            tag = f"{self.prefix}-{n}"
            n += 1
            raw = body(tag, self.rnd.choice(SIZES))
            try:
                assert smtp.mail("customer@example.com")[0] == 250
                assert smtp.rcpt("reply@reply.localhost")[0] == 250
                code, text = smtp.data(raw)
            except (OSError, smtplib.SMTPException):
                self.interrupted += 1
                return
            if 400 <= code < 500:
                # the writer was killed under the worker answering: 451, nothing kept, and
                # the sender tries again later (an interruption, not an acknowledgement)
                self.interrupted += 1
                return
            if code != 250:
                self.unexpected.append((tag, code, text))
                return
            name = text.decode().rsplit(" ", 1)[-1]
            self.acked[tag] = (name, hashlib.sha256(raw).hexdigest())


def read_records(settings: settings_mod.Settings) -> list[MailReceived]:
    with Spool(settings.paths.spool).reader(STREAM) as rd:
        return [msgspec.json.decode(raw, type=MailReceived) for _, rec, raw in rd.records()
                if rec is not None]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_while_sending_loses_nothing_acknowledged(tmp_path: Path, notify_socket,
                                                          processes: int) -> None:
    """SIGKILL (of the parent, when there are workers) at random moments of 6 rounds of 6
    busy sessions: every 250 survives, once."""
    sock, notify = notify_socket
    rnd = random.Random(int.from_bytes(os.urandom(4), "big"))
    settings = receiver_settings(tmp_path, "max_size = 5000000\n")
    config = tmp_path / "etc" / "connectd.toml"  # written by receiver_settings
    port = settings.receiver.port
    acked: dict[str, tuple[str, str]] = {}
    interrupted = 0
    unexpected: list[tuple[str, int, bytes]] = []
    for round_ in range(ROUNDS):
        proc = launch(config, notify, processes)
        try:
            wait_ready(sock, proc)
            senders = [Sender(port, f"r{round_}s{i}", random.Random(rnd.random()))
                       for i in range(SENDERS)]
            for s in senders:
                s.start()
            time.sleep(rnd.uniform(0.2, 0.8))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        for s in senders:
            s.join(30)
            acked.update(s.acked)
            interrupted += s.interrupted
            unexpected += s.unexpected
    assert unexpected == []  # a kill cuts sessions off or gets 451, never anything else
    # a clean start reconciles what the last kill left; a TERM then stops it with status 0
    proc = launch(config, notify, processes)
    wait_ready(sock, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

    assert len(acked) > ROUNDS  # the kills happened with mail flowing
    assert interrupted >= ROUNDS  # and cut sessions off mid-transaction
    store, recs = inbound_store(settings), read_records(settings)
    print(f"acknowledged {len(acked)}, sessions cut {interrupted}, "
          f"stored {len(store.names())}, records {len(recs)}")
    check_store(store, recs, acked)


def check_store(store: InboundStore, recs: list[MailReceived],
                acked: dict[str, tuple[str, str]]) -> None:
    """Every acknowledged message has its file with the bytes sent and exactly one record;
    every record names a whole file; every file in new/ has exactly one record."""
    by_name: dict[str, list[MailReceived]] = {}
    for rec in recs:
        by_name.setdefault(rec.message, []).append(rec)
    assert len({r.id for r in recs}) == len(recs)
    for tag, (name, sha) in acked.items():
        assert len(by_name.get(name, [])) == 1, f"{tag} ({name}): {len(by_name.get(name, []))} records"
        assert hashlib.sha256(store.read(name)).hexdigest() == sha, tag
    files = set(store.names())
    assert files == set(by_name), "files without records, or records without files"
    for name, [rec] in by_name.items():
        data = store.read(name)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (rec.size, rec.sha256), name
    assert os.listdir(store.tmp_dir) == [] and store.pending() == []
