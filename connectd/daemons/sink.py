"""The sink: the local development mail farm. It accepts every message on loopback and
stores it in a maildir, so a new user (and a test) sees the mail that was sent.

Inputs: SMTP on settings.sink.host:settings.sink.port (any sender, any recipients; SMTPUTF8
and 8BITMIME as aiosmtpd does them; at most MAX_MESSAGE_SIZE bytes, else 552).
Outputs: one file per message in the maildir <settings.paths.spool>/sink/new/ (Maildir
layout: tmp/ new/ cur/), holding the message bytes exactly as received (CRLF line ends),
with a Return-Path header (the envelope sender) and one X-Connectd-Sink-Rcpt header per
envelope recipient prepended; one log line per message (size and recipient count, never
the body).

A message is answered 250 only once its file is on disk and its name in new/ is durable; a
disk that fails (full, read-only, I/O error) is answered 451 (try later) and leaves nothing
in new/. aiosmtpd's Controller runs the server in its own thread and event loop, so the
daemon's run loop has nothing to poll: step() returns 0 and the loop just waits for signals.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from connectd.daemon import Daemon
from connectd.settings import Settings
from connectd.spool import fsync_dir, write_synced

MAX_MESSAGE_SIZE = 50 * 1024 * 1024  # bytes; larger messages are refused with 552
RCPT_HEADER = "X-Connectd-Sink-Rcpt"
_SUBDIRS = ("tmp", "new", "cur")


def maildir_path(settings: Settings) -> Path:
    """Where the sink stores mail (the supervisor prints this path too)."""
    return settings.paths.spool / "sink"


def _header_value(text: str) -> bytes:
    # Envelope addresses arrive on one SMTP line, but a header must never be split by one.
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8", "surrogateescape")


def envelope_headers(mail_from: str | None, rcpt_tos: list[str]) -> bytes:
    """The header lines prepended to a stored message: Return-Path (the envelope sender, <>
    for a bounce) and one X-Connectd-Sink-Rcpt per envelope recipient, in order."""
    sender = mail_from or ""
    if sender == "<>":  # aiosmtpd spells the null sender (a bounce's) <>
        sender = ""
    lines = [b"Return-Path: <" + _header_value(sender) + b">\r\n"]
    lines += [RCPT_HEADER.encode() + b": " + _header_value(rcpt) + b"\r\n" for rcpt in rcpt_tos]
    return b"".join(lines)


class Maildir:
    """Writes messages into a maildir the way qmail specified it: tmp/, fsync, rename into
    new/. Thread-safe: the server delivers from a thread pool."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        # '/' and ':' may not appear in a maildir file name (':' starts the info part)
        self._host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")

    def create(self) -> None:
        """Make tmp/ new/ cur/ (idempotent)."""
        for sub in _SUBDIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)  # the subdirectories survive a crash before the first message

    def _unique_name(self) -> str:
        with self._lock:
            n = next(self._counter)
        now = time.time()
        # time, microseconds, pid and a per-process counter: unique across threads and processes
        return f"{int(now)}.M{int(now % 1 * 1e6):06d}P{os.getpid()}Q{n}.{self._host}"

    def deliver(self, data: bytes) -> str:
        """Store one message; return its file name in new/. Raises OSError (and leaves
        nothing behind in tmp/ or new/) when the disk fails."""
        name = self._unique_name()
        tmp, new = self.root / "tmp" / name, self.root / "new" / name
        try:
            write_synced(tmp, data)
            # rename is atomic: a reader of new/ (or a crash) sees the whole message or nothing
            os.rename(tmp, new)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            fsync_dir(new.parent)  # the name in new/ survives a crash once we have said 250
        except BaseException:
            # We are about to answer 451 and the client will send it again: no second copy.
            new.unlink(missing_ok=True)
            raise
        return name


class SinkHandler:
    """aiosmtpd handler: every recipient is accepted; DATA stores the message, then answers."""

    def __init__(self, maildir: Maildir, log: Any) -> None:
        self.maildir = maildir
        self.log = log
        self.deliver = maildir.deliver  # the write step (a test may swap in a failing one)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):  # only if someone turns decode_data on
            content = content.encode("utf-8", "surrogateescape")
        data = envelope_headers(envelope.mail_from, envelope.rcpt_tos) + content
        loop = asyncio.get_running_loop()
        try:
            # fsync blocks: in a thread, so one slow disk write does not stall other sessions
            name = await loop.run_in_executor(None, self.deliver, data)
        except OSError as exc:
            self.log.warning("message not stored", size=len(content),
                             recipients=len(envelope.rcpt_tos), error=str(exc))
            return "451 4.3.0 Could not store the message, try again later"
        self.log.info("message stored", size=len(content), recipients=len(envelope.rcpt_tos),
                      file=name)
        return f"250 2.0.0 Ok: stored as {name}"


class Sink(Daemon):
    name = "sink"

    def __init__(self, settings: Settings, max_size: int = MAX_MESSAGE_SIZE) -> None:
        super().__init__(settings)
        self.max_size = max_size
        self.maildir = Maildir(maildir_path(settings))
        self.handler = SinkHandler(self.maildir, self.log)
        self._controller: Controller | None = None

    def setup(self) -> None:
        self.maildir.create()
        s = self.settings.sink
        controller = Controller(
            self.handler, hostname=s.host, port=s.port,
            data_size_limit=self.max_size, enable_SMTPUTF8=True,
            # no reverse-DNS lookup (aiosmtpd's default getfqdn() can hang without a network)
            server_hostname=socket.gethostname(), ident="connectd sink")
        controller.start()  # raises if the port is taken: the daemon exits non-zero
        self._controller = controller
        self.log.info("listening", host=s.host, port=s.port, maildir=str(self.maildir.root))

    def step(self) -> int:
        return 0  # the server works in its own thread; the loop only waits for signals

    def teardown(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
