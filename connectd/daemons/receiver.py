"""The receiver (MR): the reply domain's SMTP server. It stores every message it accepts
durably, logs it, and never relays.

Inputs: SMTP on settings.receiver.host:port, for receiver.domain and receiver.domains only.
Outputs: one file per message in the inbound store (<spool>/inbound/new/, connectd.spool.
InboundStore: the bytes exactly as received, CRLF, no header added) and one `mail.received`
record (connectd.records.MailReceived: file name, size, sha256, envelope, peer, HELO) per
message on the stream `receiver.events`; one log line per message (size, recipient count,
name; never the body).

What it accepts (checked at RCPT, before any data is sent):
- a domain other than ours: 550 5.7.1 (no relaying, ever);
- local parts (case-insensitive): receiver.mailboxes, `postmaster` always (RFC 5321), and the
  signed ones: `b-<token>` and `unsubscribe-<token>` when the token verifies with a VERP key
  (the composer writes them), `confirm-<base32>` (the processor checks that token, against the
  sender); anything else 550 5.1.1;
- SIZE (RFC 1870) is advertised as receiver.max_size; larger is refused with 552, both when
  MAIL FROM announces it and when the data runs past it;
- STARTTLS is offered when receiver.tls_cert and tls_key are set.
The message is never parsed here: the processor does that from the store.

Durability and the answer. A message is answered 250 only when its file is fsynced under new/
AND its mail.received record is fsynced in receiver.events; when either fails the answer is
451 4.3.0 and nothing was acknowledged. The steps, per message and per batch:

1. DATA (thread pool): write tmp/<name>, fsync it.                       [per message]
2. The committer takes every message ready (group commit: one batch, however many sessions
   are waiting) and, for the batch, in two stages (threads) that overlap consecutive
   batches (see Committer):
   a. writes the batch's encoded records to its journal file pending/journal.<id> (the
      intent journal: one of JOURNALS files, rewritten in place per batch) and fdatasyncs it,
   b. renames each file into new/, fsyncs new/ once,
   c. appends the records with one write, fdatasyncs the stream once,
   d. empties the journal file, and answers 250 to every session of the batch.
The file is in new/ before its record can be read, so the processor never sees a record
whose message is not there yet.

What a crash leaves, and what the next start (reconcile(), before the port opens) does:
- killed in 1 or 2a: files in tmp/ only; none was acknowledged; tmp/ is emptied.
- killed in 2b/2c: files in new/ whose records may be missing (or partly written: a torn
  line is never read as a record). The journal holds the records: every one whose file
  is in new/ and whose id is not in the stream is appended (same id, so exactly one record
  per file), then the journal file is removed. Those messages were never acknowledged; they
  are kept rather than dropped, so a sender that does not retry loses nothing; one that does
  retry gives the processor a second copy of an unacknowledged message, never of one it
  answered 250.
- killed after 2c: the batch is complete; its journal, if not yet emptied, finds every id
  in the stream.
- a failure (not a crash) in 2c after some bytes reached the stream: the files stay (their
  records may be readable), the journal file stays for the next start, the answer is 451.
- power loss: everything acknowledged was fsynced, and so was the journal of every batch
  whose renames may have reached the disk (2a before 2b), so the same holds.
The id search reads only the stream segments modified since the oldest journal entry.

Speed (bench/receiver.py: smtp-source, a connection per message). receiver.processes > 1
runs that many worker processes on one SO_REUSEPORT port, each doing SMTP and step 1, and
the parent doing step 2 for all (see "worker processes" below); aiosmtpd's per-connection
set-up, address parsing and line-by-line DATA reading have faster equivalents here
(SMTPFactory, ReceiverSMTP), checked against aiosmtpd's own answers by the tests.

In one process (receiver.processes = 1), aiosmtpd's Controller runs the server in its own
thread and event loop; the daemon's loop has nothing to poll (step() returns 0) and only
waits for signals. With workers, step() restarts a worker that died, and alive() (the
systemd watchdog) is False while a live worker is wedged: each worker's SMTP event loop
sends the parent a heartbeat datagram every watchdog_interval / 2, so a blocked loop goes
silent, and after 3 x watchdog_interval of silence systemd restarts the whole receiver.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import os
import pickle
import queue
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, syntax
from aiosmtpd.smtp import log as smtp_log

from connectd.core.tokens import MAX_TOKEN_LEN, BadToken, verify_verp
from connectd.daemon import Daemon, DaemonFailed, reuseport_socket, stuck_workers
from connectd.secrets import SecretsError, load_secrets
from connectd.settings import Settings, SettingsError
from connectd.spool import (
    BadRecord,
    InboundStore,
    Spool,
    SpoolError,
    StreamLocked,
    StreamWriter,
    decode,
    encode,
    inbound_store,
    make_record,
)

STREAM = "receiver.events"
RECORD = "mail.received"
MAX_RECIPIENTS = 100  # RFC 5321 4.5.3.1.8: a server must take at least 100 per message
MAX_BATCH = 512  # messages per group commit, at most
JOURNALS = 3  # batches between publishing and appending, at most (one journal file each)
# Group commit under load: a batch that starts within BUSY_GAP of the previous one waits
# COMMIT_LINGER for more messages (bench: 2 workers, 20 sessions: ~2.3 -> ~8.7 messages a
# batch, the parent's CPU 0.25-0.27 -> 0.13-0.14 ms a message, 1,533-1,584 -> 1,768-1,804
# msgs/s; 5 ms left the CPU idle, waiting); an idle receiver commits a lone message at once.
COMMIT_LINGER = 0.003
BUSY_GAP = 0.05
_CONFIRM = re.compile(r"confirm-[a-z2-7]+\Z")
_SIGNED_PREFIXES = ("b-", "unsubscribe-")  # VERP-signed local parts (the composer's)
# Reconcile: segments modified this long before the oldest journal entry are searched too
# (file times are coarse, and written from another clock read than ours).
_MTIME_SLACK = 5.0

REFUSED_RELAY = "550 5.7.1 Relaying denied: this server only takes mail for its own domains"
REFUSED_USER = "550 5.1.1 No such mailbox here"
REFUSED_SYNTAX = "550 5.1.3 Bad recipient address syntax"
TOO_MANY = "452 4.5.3 Too many recipients"
NOT_STORED = "451 4.3.0 Could not store the message, try again later"


class RecipientPolicy:
    """Which envelope recipients this receiver takes: pure, no I/O (one HMAC for a signed one)."""

    def __init__(self, domains: Iterable[str], mailboxes: Iterable[str],
                 verp_keys: Sequence[str]) -> None:
        self.domains = frozenset(d.lower().rstrip(".") for d in domains if d)
        self.mailboxes = frozenset(m.lower() for m in mailboxes) | {"postmaster"}
        self.verp_keys = tuple(verp_keys)

    def check(self, address: str) -> str | None:
        """None when `address` is ours and known; else the SMTP reply that refuses it."""
        local, at, domain = address.rpartition("@")
        if not at:
            # RFC 5321 4.5.1: "Postmaster" without a domain must be accepted
            return None if address.lower() == "postmaster" else REFUSED_SYNTAX
        if domain.lower().rstrip(".") not in self.domains:
            return REFUSED_RELAY
        return None if self.known_local_part(local) else REFUSED_USER

    def known_local_part(self, local: str) -> bool:
        lower = local.lower()
        if lower in self.mailboxes:
            return True
        for prefix in _SIGNED_PREFIXES:
            if lower.startswith(prefix):
                try:
                    verify_verp(self.verp_keys, local[len(prefix):])
                except BadToken:
                    return False
                return True
        # confirm tokens bind the subscriber's address: the processor verifies them
        return len(lower) <= len("confirm-") + MAX_TOKEN_LEN and bool(_CONFIRM.match(lower))


def _settle(future: concurrent.futures.Future[Any], result: Any = None,
            error: BaseException | None = None) -> None:
    """Resolve a session's future; one already cancelled (its session was cut off) is left
    alone: the message is stored all the same, only never acknowledged."""
    if future.done():
        return
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by the session between the check and the set


@dataclass
class _Pending:
    """One message between its fsync in tmp/ and its answer."""

    name: str
    fields: dict[str, Any]
    future: concurrent.futures.Future[dict[str, Any]] = field(
        default_factory=concurrent.futures.Future)


@dataclass
class _Published:
    """A batch between its two stages: renamed into new/ (fsynced), records not appended."""

    batch: list[_Pending]
    recs: list[dict[str, Any]]
    data: bytes
    journal: Journal


class Committer:
    """The threads that publish messages and append their records (one writer per stream),
    a whole batch per pair of fsyncs: every session waiting when a commit starts shares the
    next one (group commit).

    Two stages, each its own thread, so that the two fsyncs of consecutive batches overlap:
    the publisher writes batch k+1's journal, renames its files and fsyncs new/ while the
    appender appends batch k's records and fsyncs the stream. A message's record is still
    appended only after its own rename is durable, and batches reach the stream in order.
    Up to JOURNALS batches are between the two (each has its own journal file)."""

    def __init__(self, store: InboundStore, writer: StreamWriter, log: Any) -> None:
        self.store = store
        self.writer = writer
        self.log = log
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._published: queue.SimpleQueue[_Published | None] = queue.SimpleQueue()
        self._journals: queue.SimpleQueue[Journal] = queue.SimpleQueue()
        self._all_journals = [Journal(store) for _ in range(JOURNALS)]
        for j in self._all_journals:
            self._journals.put(j)
        self._thread = threading.Thread(target=self._run, name="receiver-commit", daemon=True)
        self._appender = threading.Thread(target=self._append_loop, name="receiver-append",
                                          daemon=True)
        self.batches = 0
        self.messages = 0
        self._last_batch = 0.0

    def start(self) -> None:
        self._thread.start()
        self._appender.start()

    def stop(self) -> None:
        """Commit what is queued, then end the threads."""
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._appender.join(timeout=30)
        if not self._thread.is_alive() and not self._appender.is_alive():
            for j in self._all_journals:
                j.close(remove=True)

    def submit(self, name: str, fields: dict[str, Any],
               future: concurrent.futures.Future[dict[str, Any]] | None = None,
               ) -> concurrent.futures.Future[dict[str, Any]]:
        """Queue a message written to tmp/; the future gives its record once it is durable,
        or the OSError/SpoolError that kept it from being stored."""
        item = _Pending(name, fields) if future is None else _Pending(name, fields, future)
        self._queue.put(item)
        return item.future

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                now = time.monotonic()
                if now - self._last_batch < BUSY_GAP:
                    # under load: let a few more sessions join this batch; three fsyncs a
                    # batch cost the parent more CPU than 3 ms of waiting costs a session
                    time.sleep(COMMIT_LINGER)
                self._last_batch = now
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._publish(batch)
                if stop:
                    return
        finally:
            self._published.put(None)  # the appender ends after what was handed over

    def _fail(self, batch: list[_Pending], exc: BaseException) -> None:
        for item in batch:
            _settle(item.future, error=exc)
        if isinstance(exc, (OSError, SpoolError)):
            self.log.warning("batch not stored", messages=len(batch), error=str(exc))

    def _publish(self, batch: list[_Pending]) -> None:
        """Stage 1: journal, renames into new/, one fsync of new/; then to the appender."""
        journal = self._journals.get()  # waits while JOURNALS batches are ahead
        try:
            recs = [make_record(RECORD, item.fields) for item in batch]
            names = [item.name for item in batch]
            data = b"".join(encode(r) for r in recs)
            try:
                # the records, in case we die after the renames and before the append
                journal.write(data)
                self.store.publish(names)  # removes them all again if it fails
            except OSError:
                self.store.discard(names)
                with contextlib.suppress(OSError):
                    journal.clear()
                raise
        except BaseException as exc:  # a bug too: fail the sessions (451), never hang them
            self._journals.put(journal)
            self._fail(batch, exc)
            if not isinstance(exc, (OSError, SpoolError)):
                raise
            return
        self._published.put(_Published(batch, recs, data, journal))

    def _append_loop(self) -> None:
        while True:
            item = self._published.get()
            if item is None:
                return
            try:
                self._append(item)
            except (OSError, SpoolError) as exc:
                self._fail(item.batch, exc)
            except BaseException as exc:
                self._fail(item.batch, exc)
                raise
            else:
                self.batches += 1
                self.messages += len(item.batch)
                for pending, rec in zip(item.batch, item.recs, strict=True):
                    _settle(pending.future, rec)
            finally:
                self._journals.put(item.journal)

    def _append(self, item: _Published) -> None:
        """Stage 2: one write of the batch's records, one fsync of the stream."""
        before = self.writer.position
        try:
            self.writer.write_lines(item.data, sync=True)
        except (OSError, SpoolError):
            after = self.writer.position
            if after == before or after.offset == 0:
                # nothing of the batch reached the stream: take the files back, all 451
                self.store.discard([p.name for p in item.batch])
                with contextlib.suppress(OSError):
                    item.journal.clear()
            else:
                # some records may be readable: the files stay for them, and the journal
                # stays for the next start to append whatever is missing; later batches
                # must not overwrite it
                item.journal.keep()
            raise
        with contextlib.suppress(OSError):
            item.journal.clear()


class Journal:
    """One intent-journal file of the committer, pending/journal.<id>, rewritten in place
    (and fdatasynced) for every batch and emptied once the batch is committed. Reused rather than created and
    unlinked per batch: on ext4 without a journal every inode deleted in the last minute is
    skipped, one by one, by each following file creation in its group (recently_deleted()
    in the inode allocator), and a few hundred batches a second add up.

    The file is never shorter than the batch it holds: a torn rewrite leaves the new
    batch's head and the old batch's tail, whose records are all in the stream already
    (skipped by id at the next start). After a failed append the file is kept and a new
    one is used (keep()), so the next start still finds that batch."""

    def __init__(self, store: InboundStore) -> None:
        self.store = store
        self.path: Path | None = None
        self._fd = -1
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            self._open()
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(self._fd, view[offset:], offset)
        if self._size > len(data):
            os.ftruncate(self._fd, len(data))
        self._size = len(data)
        # durable before the renames: after a power cut every file in new/ without its
        # record has the record here (the next stage overlaps this fsync's cost)
        os.fdatasync(self._fd)

    def clear(self) -> None:
        if self._fd >= 0 and self._size:
            os.ftruncate(self._fd, 0)  # mostly never written back: no disk block is allocated
            self._size = 0

    def keep(self) -> None:
        """Leave the current file for reconcile(); the next batch starts another."""
        self.close()

    def close(self, *, remove: bool = False) -> None:
        """Close the file; with `remove`, unlink it too if it holds no batch (a clean stop)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if remove and self._size == 0 and self.path is not None:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._size = 0
            self.path = None

    def _open(self) -> None:
        # a fresh name per open: never one a kept (failed) batch still needs
        self.path = self.store.pending_dir / f"journal.{make_record(RECORD, {})['id']}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._size = 0


def reconcile(store: InboundStore, spool: Spool, writer: StreamWriter) -> int:
    """At start, before the port opens: finish what a killed receiver left (see the module
    docstring). Returns how many records it appended."""
    pending = store.pending()
    appended = 0
    if pending:
        since = min(mtime for _, _, mtime in pending) - _MTIME_SLACK
        seen = _ids_in_stream(spool, since)
        missing: list[bytes] = []
        for _, data, _ in pending:
            for line in data.split(b"\n"):
                rec = _decode_or_none(line)
                if rec is None or rec["id"] in seen or not _stored(store, rec.get("message")):
                    continue
                missing.append(line + b"\n")
                seen.add(rec["id"])
        if missing:
            writer.write_lines(b"".join(missing), sync=True)  # durable before the journal goes
            appended = len(missing)
        for batch, _, _ in pending:
            store.remove_pending(batch)
    store.clean_tmp()  # never acknowledged: their senders will retry
    return appended


def _decode_or_none(line: bytes) -> dict[str, Any] | None:
    if not line:
        return None
    try:
        return decode(line)
    except BadRecord:
        return None  # a journal line cut by the crash: its batch never reached new/


def _stored(store: InboundStore, name: Any) -> bool:
    try:
        return isinstance(name, str) and store.path(name).exists()
    except ValueError:
        return False


def _ids_in_stream(spool: Spool, since: float) -> set[str]:
    """Record ids in the segments of the receiver stream modified at or after `since`."""
    ids: set[str] = set()
    for seg in spool.segments(STREAM):
        if seg.mtime < since:
            continue
        with open(seg.path, "rb") as fh:
            for line in fh:
                if line.endswith(b"\n"):
                    rec = _decode_or_none(line[:-1])
                    if rec is not None:
                        ids.add(rec["id"])
    return ids


class ReceiverHandler:
    """aiosmtpd handler: RCPT checks the recipient, DATA stores the message, then answers."""

    def __init__(self, policy: RecipientPolicy, store: InboundStore, committer: Committer,
                 pool: concurrent.futures.Executor, log: Any) -> None:
        self.policy = policy
        self.store = store
        self.committer = committer
        self.pool = pool
        self.log = log
        self.hostname = socket.gethostname()
        self.write = store.write_tmp  # the write step (a test may swap in a failing one)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        refused = self.policy.check(address)
        if refused:
            self.log.info("recipient refused", reply=refused[:9], peer=_peer(session))
            return refused
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return TOO_MANY
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):  # only if someone turns decode_data on
            content = content.encode("utf-8", "surrogateescape")
        fields = self._fields(content, session, envelope)
        try:
            # fsync blocks: in a thread, so one slow disk write does not stall other sessions;
            # the thread hands the message straight to the committer, and the loop wakes once
            # per message, when its record is durable
            done: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
            self.pool.submit(self._store, content, fields, done)
            rec = await asyncio.wrap_future(done)
        except (OSError, SpoolError) as exc:
            self.log.warning("message not stored", size=len(content),
                             recipients=len(envelope.rcpt_tos), error=str(exc))
            return NOT_STORED
        name = rec["message"]
        self.log.info("message received", size=len(content), recipients=len(envelope.rcpt_tos),
                      message=name, id=rec["id"])
        return f"250 2.0.0 Ok: stored as {name}"

    def _store(self, content: bytes, fields: dict[str, Any],
               done: concurrent.futures.Future[dict[str, Any]]) -> None:
        """In a pool thread: write and fsync the file, queue it for the committer, which
        resolves `done` (with the record, or the error)."""
        try:
            name, digest = self.write(content)
        except BaseException as exc:  # handed to the session, which answers 451
            _settle(done, error=exc)
            return
        self.committer.submit(name, {"message": name, "size": len(content), "sha256": digest,
                                     **fields}, done)

    def _fields(self, content: bytes, session: Any, envelope: Any) -> dict[str, Any]:
        sender = envelope.mail_from or ""
        if sender == "<>":  # aiosmtpd spells the null sender (a bounce's) <>
            sender = ""
        return {"mail_from": sender, "rcpt": list(envelope.rcpt_tos), "peer": _peer(session),
                "helo": session.host_name or "", "receiver": self.hostname}


def _peer(session: Any) -> str:
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


FAST_DATA = 1 << 20  # messages up to this size are taken from the buffer in one piece
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# `<local@domain>` (dot-atom local part, LDH domain), then the end or blanks and the
# parameters (not a comment): everything else (`<>` too) goes to aiosmtpd's own parser
_SIMPLE_PATH = re.compile(
    rf"<((?:{_ATEXT}(?:\.{_ATEXT})*)@(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*))>"
    r"(?:[ \t]+(?=[^ \t(])|\Z)")


class ReceiverSMTP(SMTP):
    """aiosmtpd's SMTP with a fast path for the plain MAIL FROM / RCPT TO paths.

    SMTP._getaddr defines a typing.Protocol class (an ABCMeta class creation) and runs the
    email package's RFC 5322 header parser for every address: an eighth of a worker's
    Python time. A plain `<local@domain>` gives the same (address, parameters)
    with one regular expression; tests/daemons/test_receiver.py checks both agree."""

    _fallback_354 = False

    async def push(self, status: Any) -> None:
        if self._fallback_354:  # smtp_DATA's fallback: the client already has its 354
            self._fallback_354 = False
            if str(status).startswith("354"):
                return
        await super().push(status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA taken from the stream's buffer in one piece instead of line by line (aiosmtpd
        awaits readuntil(CRLF) per line: a fifth of a worker's Python). Only when the whole
        message and its end line are in the buffer within FAST_DATA bytes and no limit is
        passed; anything else (a size or line-length error, a bigger message, a lost
        connection, decode_data) is left in the buffer for aiosmtpd's own loop, so answers
        and stored bytes are aiosmtpd's in every case (tests/daemons/test_receiver.py
        compares both on the same input)."""
        reader = self._reader
        if self._decode_data or not isinstance(getattr(reader, "_buffer", None), bytearray):
            return await SMTP.smtp_DATA(self, arg)
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return None
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return None
        if arg:
            await self.push("501 Syntax: DATA")
            return None
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = await self._whole_data(reader)
        if data is None:  # aiosmtpd reads it (our 354 is not sent twice)
            self._fallback_354 = True
            return await SMTP.smtp_DATA(self, arg)
        if data.startswith(b".") or b"\r\n." in data:  # RFC 5321 4.5.2: remove the dot
            data = b"\r\n".join(line[1:] if line.startswith(b".") else line
                                 for line in data.split(b"\r\n"))
        self.envelope.content = self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)
        return None

    async def _whole_data(self, reader: Any) -> bytes | None:
        """The message's lines (end line excluded) taken from the buffer, or None, leaving
        the buffer as it was, when aiosmtpd's line loop must read it."""
        buf: bytearray = reader._buffer
        limit = self.data_size_limit
        saved = reader._limit
        reader._limit = max(saved, FAST_DATA)  # no pause of the transport below 2 x FAST_DATA
        try:
            while True:
                if buf.startswith(b".\r\n"):  # an empty message
                    del buf[:3]
                    return b""
                end = buf.find(b"\r\n.\r\n")
                if end >= 0:
                    data = bytes(buf[:end + 2])
                    if (limit and len(data) > limit) or max(
                            map(len, data.split(b"\r\n"))) + 2 > self.line_length_limit:
                        return None  # aiosmtpd's 552 / 500, after reading the rest its way
                    del buf[:end + 5]
                    return data
                if len(buf) > FAST_DATA or reader._eof or reader._exception is not None:
                    return None
                try:
                    await reader._wait_for_data("smtp_DATA")
                except asyncio.CancelledError:  # the connection was lost (as aiosmtpd does)
                    smtp_log.info("Connection lost during DATA")
                    self._writer.close()
                    raise
        finally:
            reader._limit = saved
            reader._maybe_resume_transport()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_PATH.match(arg) if arg else None
        if m is None:
            return super()._getaddr(arg)
        address = m.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg[m.end():]


# What StreamReaderProtocol.__init__ sets (done again per connection), and the attributes
# holding methods bound to the SMTP object (bound again to each copy).
_PROTOCOL_STATE = frozenset({
    "_loop", "_paused", "_drain_waiters", "_connection_lost", "_stream_reader_wr",
    "_source_traceback", "_strong_reader", "_reject_connection", "_stream_writer", "_task",
    "_transport", "_client_connected_cb", "_over_ssl", "_closed"})
_BOUND_STATE = frozenset({"_smtp_methods", "_auth_methods"})


class SMTPFactory:
    """Makes aiosmtpd's per-connection SMTP objects as copies of one built at start.

    SMTP.__init__ inspects the handler and itself (inspect.getmembers, dir(): a few hundred
    attribute reads) and logs the AUTH mechanisms on every connection: with a connection per
    message that was a sixth of the receiver's CPU. The copy keeps everything __init__
    computed from the (fixed) arguments, runs StreamReaderProtocol.__init__ again for fresh
    stream state, binds the command and AUTH methods to the copy, and gives it its own
    command size limits (aiosmtpd keeps them in one dict shared by every connection of the
    process). The behaviour is aiosmtpd's own: tests/daemons/test_receiver.py checks that a
    copy has the attributes a fresh SMTP has and no mutable state shared with another."""

    def __init__(self, handler: Any, kwargs: dict[str, Any]) -> None:
        self.handler = handler
        self.kwargs = kwargs
        self._state: dict[str, Any] | None = None
        self._functions: dict[str, Any] = {}

    def __call__(self) -> ReceiverSMTP:
        if self._state is None:
            self._learn(ReceiverSMTP(self.handler, **self.kwargs))
        assert self._state is not None
        smtp = ReceiverSMTP.__new__(ReceiverSMTP)
        smtp.__dict__.update(self._state)
        asyncio.StreamReaderProtocol.__init__(
            smtp, asyncio.StreamReader(loop=smtp.loop, limit=smtp.line_length_limit),
            client_connected_cb=smtp._cb_client_connected, loop=smtp.loop)
        smtp._smtp_methods = {k: f.__get__(smtp) for k, f in self._functions.items()}
        smtp._auth_methods = {
            k: type(m)(m.method.__func__.__get__(smtp), True) if m.is_builtin else m
            for k, m in self._auth_methods.items()}
        smtp.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        return smtp

    def _learn(self, proto: ReceiverSMTP) -> None:
        """Keep what __init__ computed, minus the per-connection stream state."""
        self._state = {k: v for k, v in proto.__dict__.items()
                       if k not in _PROTOCOL_STATE and k not in _BOUND_STATE}
        self._functions = {k: m.__func__ for k, m in proto._smtp_methods.items()}
        self._auth_methods = dict(proto._auth_methods)


class ReceiverController(Controller):
    """aiosmtpd's Controller with SMTPFactory making the per-connection objects, and, in a
    worker process, serving a listening socket it is given (SO_REUSEPORT, one per worker)."""

    def __init__(self, handler: Any, *, sock: socket.socket | None = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._make_smtp = SMTPFactory(handler, self.SMTP_kwargs)
        self._sock = sock

    def factory(self) -> SMTP:
        return self._make_smtp()

    def _create_server(self) -> Any:
        if self._sock is None:
            return super()._create_server()
        return self.loop.create_server(self._factory_invoker, sock=self._sock,
                                       ssl=self.ssl_context)

    def _trigger_server(self) -> None:
        if self._sock is None:
            super()._trigger_server()
        else:
            # aiosmtpd connects to itself to build a first SMTP object; with SO_REUSEPORT
            # that connection may reach a sibling worker: build it in our loop instead
            self.loop.call_soon_threadsafe(self._factory_invoker)


# -- worker processes (receiver.processes > 1) -------------------------------------------
#
# Each worker runs aiosmtpd on its own SO_REUSEPORT socket (the kernel spreads connections
# over them) and writes and fsyncs each message in tmp/ itself; it then sends the message's
# name and envelope to the parent over a SOCK_SEQPACKET socketpair (one datagram a message)
# and answers the session when the parent's reply comes. The parent's Committer is the
# in-process one: every message of every worker ready at a commit shares its journal write,
# renames, new/ fsync, append and stream fsync, so the stream keeps one writer.

_DATAGRAM = 1 << 18
WORKER_START_TIMEOUT = 30.0  # seconds for every worker to listen
WORKER_STOP_TIMEOUT = 35.0  # a worker waits up to 30 s for its last answers
MAX_RESTARTS = 10  # worker deaths within RESTART_WINDOW seconds that stop the receiver
RESTART_WINDOW = 60.0  # a request: the envelope (<= 100 recipients); a reply: a few dozen bytes


class RemoteCommitter:
    """A worker's stand-in for the Committer: submit() sends the message to the parent and
    resolves the future with the parent's answer (the record, or SpoolError -> 451). The
    answers are read by the SMTP event loop itself (attach()): no reader thread to wake."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._seq = itertools.count(1)
        self._waiting: dict[int, tuple[str, concurrent.futures.Future[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the answers in `loop` (call it from that loop's thread)."""
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def heartbeat(self, every: float) -> None:
        """Tell the parent this loop is running, now and every `every` seconds (call it from
        the loop's thread, after attach()): sent by the loop itself, so a blocked loop goes
        silent and the parent's alive() notices."""
        try:
            # never block the loop on a full socket: the parent is behind, not us
            self.sock.send(orjson.dumps({"beat": os.getpid()}), socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        except OSError:
            return  # the parent is gone; _on_readable fails what is waiting
        assert self._loop is not None
        self._loop.call_later(every, self.heartbeat, every)

    def submit(self, name: str, fields: dict[str, Any],
               future: concurrent.futures.Future[dict[str, Any]] | None = None,
               ) -> concurrent.futures.Future[dict[str, Any]]:
        future = concurrent.futures.Future() if future is None else future
        with self._lock:
            seq = next(self._seq)
            self._waiting[seq] = (name, future)
        try:
            self.sock.send(orjson.dumps([seq, name, fields]))  # blocking: one whole datagram
        except OSError as exc:
            with self._lock:
                self._waiting.pop(seq, None)
            _settle(future, error=SpoolError(f"receiver parent unreachable: {exc}"))
        return future

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def drain(self, timeout: float) -> None:
        """After the loop stopped: read the answers still due (their batches commit anyway;
        the sessions are gone), for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.waiting() and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not self._on_readable(block=True):
                return

    def _on_readable(self, block: bool = False) -> bool:
        """Resolve the answers that have come; False once the parent is gone."""
        while True:
            try:
                data = self.sock.recv(_DATAGRAM, 0 if block else socket.MSG_DONTWAIT)
            except (BlockingIOError, TimeoutError):
                return True
            except OSError:
                data = b""
            if not data:  # the parent is gone: nothing more will be committed
                if self._loop is not None and not self._loop.is_closed():
                    self._loop.remove_reader(self.sock.fileno())
                self._fail_all()
                return False
            block = False  # then take whatever else has come, without waiting
            seq, rec_id, error = orjson.loads(data)
            with self._lock:
                waiting = self._waiting.pop(seq, None)
            if waiting is None:
                continue
            name, future = waiting
            if error is None:
                _settle(future, {"id": rec_id, "message": name})
            else:
                _settle(future, error=SpoolError(error))

    def _fail_all(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for _, future in waiting.values():
            _settle(future, error=SpoolError("receiver parent gone"))


@dataclass
class _Beat:
    """A worker's last sign of life, in the shape connectd.daemon.stuck_workers reads."""

    value: float


class Broker:
    """The parent's thread that takes the workers' requests and hands them to the Committer;
    the Committer's thread sends each answer back when its batch is durable (or failed)."""

    def __init__(self, committer: Committer, log: Any) -> None:
        self.committer = committer
        self.log = log
        self.ready: dict[int, int] = {}  # worker number -> pid, once it listens
        # worker number -> its last heartbeat (monotonic; from its spawn until the first)
        self.beats: dict[int, _Beat] = {}
        self._selector = selectors.DefaultSelector()
        self._added: queue.SimpleQueue[tuple[int, socket.socket]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="receiver-broker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, number: int, sock: socket.socket) -> None:
        self.ready.pop(number, None)
        # counted from the spawn: a worker that hangs before its first beat is stuck too
        self.beats[number] = _Beat(time.monotonic())
        self._added.put((number, sock))
        os.write(self._wake_w, b"\0")

    def stop(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"\0")
        self._thread.join(timeout=30)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select():
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    self._register_added()
                else:
                    self._receive(key.fileobj, key.data)  # type: ignore[arg-type]

    def _register_added(self) -> None:
        while True:
            try:
                number, sock = self._added.get_nowait()
            except queue.Empty:
                return
            self._selector.register(sock, selectors.EVENT_READ, number)

    def _receive(self, sock: socket.socket, number: int) -> None:
        try:
            data = sock.recv(_DATAGRAM)
        except OSError:
            data = b""
        if not data:  # the worker died or stopped: its unanswered sessions retry elsewhere
            self._selector.unregister(sock)
            sock.close()
            return
        try:
            request = orjson.loads(data)
            if isinstance(request, dict):  # {"ready": pid} or {"beat": pid}
                if "beat" in request:
                    int(request["beat"])  # validated like the rest: malformed is dropped
                else:
                    self.ready[number] = int(request["ready"])
                self._beat(number)
                return
            seq, name, fields = request
        except (ValueError, TypeError, KeyError):  # never from our workers; never fatal
            self.log.error("bad request from a worker", worker=number, size=len(data))
            return
        try:
            InboundStore._checked(name)  # a worker names files in tmp/ only
        except ValueError:
            self._answer(sock, seq, None, f"bad message name {name!r}")
            return
        future = self.committer.submit(name, {"message": name, **fields})
        future.add_done_callback(functools.partial(self._done, sock, seq))

    def _beat(self, number: int) -> None:
        beat = self.beats.get(number)
        if beat is not None:
            beat.value = time.monotonic()

    def _done(self, sock: socket.socket, seq: int,
              future: concurrent.futures.Future[dict[str, Any]]) -> None:
        exc = future.exception()
        if exc is None:
            self._answer(sock, seq, future.result()["id"], None)
        else:
            self._answer(sock, seq, None, str(exc) or type(exc).__name__)

    def _answer(self, sock: socket.socket, seq: int, rec_id: str | None, error: str | None) -> None:
        try:
            sock.send(orjson.dumps([seq, rec_id, error]))
        except OSError:
            pass  # the worker is gone; its client got no 250 and will retry


def _worker_entry() -> None:
    """`python -c` entry of a worker process: argv = [fd of its socketpair end, parent pid,
    worker number]; the pickled Settings come on stdin."""
    fd, parent, number = (int(a) for a in sys.argv[1:4])
    _die_with_parent(parent)
    settings = pickle.loads(sys.stdin.buffer.read())
    os.environ.pop("NOTIFY_SOCKET", None)  # the parent talks to systemd
    from connectd import log as log_mod

    log_mod.configure(settings.log.level, settings.log.format)
    sys.exit(run_worker(settings, socket.socket(fileno=fd), number))


def run_worker(settings: Settings, link: socket.socket, number: int) -> int:
    """Serve SMTP on a SO_REUSEPORT socket until SIGTERM; each message is written in tmp/
    here and committed by the parent. Returns the exit status."""
    from connectd import log as log_mod

    logger = log_mod.get(daemon="receiver", worker=number)
    r = settings.receiver
    secrets = load_secrets(settings.paths.secrets)
    policy = RecipientPolicy((r.domain, *r.domains), r.mailboxes, secrets.verp_keys)
    store = inbound_store(settings)
    remote = RemoteCommitter(link)
    pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="receiver-write")
    handler = ReceiverHandler(policy, store, remote, pool, logger)  # type: ignore[arg-type]
    sock = reuseport_socket(r.host, r.port)
    sock.listen(1024)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    controller = ReceiverController(
        handler, sock=sock, loop=uvloop.new_event_loop(), data_size_limit=r.max_size,
        enable_SMTPUTF8=True, decode_data=False, tls_context=tls_context(settings),
        require_starttls=False, timeout=r.timeout, server_hostname=socket.gethostname(),
        ident="connectd receiver")
    controller.start()
    attached = concurrent.futures.Future()  # type: ignore[var-annotated]
    controller.loop.call_soon_threadsafe(
        lambda: (remote.attach(controller.loop), attached.set_result(None)))
    attached.result(10)
    link.send(orjson.dumps({"ready": os.getpid()}))
    every = settings.daemon.watchdog_interval / 2
    controller.loop.call_soon_threadsafe(remote.heartbeat, every)
    while not stop.wait(1.0):
        pass
    controller.stop()  # no new sessions; sessions still in DATA get no answer (they retry)
    pool.shutdown(wait=True)
    remote.drain(30.0)  # the parent commits what we handed over
    return 0


def _die_with_parent(parent: int) -> None:
    """SIGKILL from the kernel when the parent dies: no orphan keeps the port. A worker holds
    nothing that was acknowledged (the parent answers only once the batch is durable)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The STARTTLS context, or None when no certificate is configured (SettingsError when
    only half is, or the files do not load)."""
    r = settings.receiver
    if r.tls_cert is None and r.tls_key is None:
        return None
    if r.tls_cert is None or r.tls_key is None:
        raise SettingsError("receiver.tls_cert and receiver.tls_key must be set together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(r.tls_cert, r.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"receiver TLS certificate {r.tls_cert} / key {r.tls_key}: {exc}") from None
    return ctx


class Receiver(Daemon):
    name = "receiver"

    def __init__(self, settings: Settings, processes: int | None = None) -> None:
        super().__init__(settings)
        r = settings.receiver
        # receiver.processes: 1 serves SMTP in this process; more runs that many worker
        # processes, this one committing for all; 0 = one a core
        wanted = r.processes if processes is None else processes
        self.processes = wanted if wanted > 0 else (os.cpu_count() or 1)
        try:
            secrets = load_secrets(settings.paths.secrets)  # a missing key file is a config error
        except SecretsError as exc:
            raise SettingsError(str(exc)) from None
        self.policy = RecipientPolicy((r.domain, *r.domains), r.mailboxes, secrets.verp_keys)
        self.tls = tls_context(settings)
        self.spool = Spool(settings.paths.spool, settings.spool)
        self.store = inbound_store(settings)
        self.writer: StreamWriter | None = None
        self.committer: Committer | None = None
        self.handler: ReceiverHandler | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._controller: Controller | None = None
        self.broker: Broker | None = None
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.deaths: list[float] = []
        self._port: socket.socket | None = None
        self._stuck: set[int] = set()  # workers already reported as not responding

    def setup(self) -> None:
        r = self.settings.receiver
        self.spool.create()
        self.store.create()
        try:
            # the stream's lock is also the store's: one receiver per spool
            # durability "none": the committer fsyncs each batch itself (sync=True)
            self.writer = self.spool.writer(STREAM, durability="none")
        except StreamLocked as exc:
            raise DaemonFailed(str(exc)) from None
        appended = reconcile(self.store, self.spool, self.writer)
        if appended:
            self.log.warning("reconciled", records=appended)
        self.committer = Committer(self.store, self.writer, self.log)
        self.committer.start()
        if self.processes > 1:
            self._start_workers()
            return
        # enough threads that every session of a busy MX can have its fsync in flight
        self._pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="receiver-write")
        self.handler = ReceiverHandler(self.policy, self.store, self.committer, self._pool, self.log)
        controller = ReceiverController(
            self.handler, hostname=r.host, port=r.port, loop=uvloop.new_event_loop(),
            data_size_limit=r.max_size, enable_SMTPUTF8=True, decode_data=False,
            tls_context=self.tls, require_starttls=False, timeout=r.timeout,
            # no reverse-DNS lookup (aiosmtpd's default getfqdn() can hang without a network)
            server_hostname=socket.gethostname(), ident="connectd receiver")
        try:
            controller.start()
        except (OSError, RuntimeError) as exc:  # port taken, address not ours
            self.teardown()  # run() calls teardown() only once setup() has succeeded
            raise DaemonFailed(f"receiver cannot listen on {r.host}:{r.port}: {exc}") from None
        self._controller = controller
        self.log.info("listening", host=r.host, port=r.port, domains=sorted(self.policy.domains),
                      starttls=self.tls is not None, store=str(self.store.root))

    def _start_workers(self) -> None:
        r = self.settings.receiver
        try:
            # hold the port (bound, not listening): a port in use fails the start here
            self._port = reuseport_socket(r.host, r.port)
        except OSError as exc:
            self.teardown()
            raise DaemonFailed(f"receiver cannot listen on {r.host}:{r.port}: {exc}") from None
        assert self.committer is not None
        self.broker = Broker(self.committer, self.log)
        self.broker.start()
        signal.signal(signal.SIGCHLD, lambda *_: self.wake())
        for number in range(1, self.processes + 1):
            self._spawn(number)
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while len(self.broker.ready) < self.processes:
            dead = [n for n, p in self.workers.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.teardown()
                raise DaemonFailed(f"receiver workers {dead or 'all'} did not start")
            time.sleep(0.01)
        self.log.info("listening", host=r.host, port=r.port, domains=sorted(self.policy.domains),
                      starttls=self.tls is not None, store=str(self.store.root),
                      workers=self.processes)

    def _spawn(self, number: int) -> None:
        """Start worker `number`: a fresh interpreter (no fork of a process with threads)."""
        assert self.broker is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from connectd.daemons.receiver import _worker_entry; "
                 "_worker_entry()", str(theirs.fileno()), str(os.getpid()), str(number)],
                stdin=subprocess.PIPE, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self.settings))
        proc.stdin.close()
        self.workers[number] = proc
        self.broker.add(number, ours)

    def step(self) -> int:
        """Restart a worker that died (SIGCHLD wakes the loop); in one process, nothing to do:
        the server works in its own thread and the loop only waits for signals."""
        for number, proc in list(self.workers.items()):
            if proc.poll() is None or self._stopping:
                continue
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
            if len(self.deaths) > MAX_RESTARTS:
                raise DaemonFailed(f"{len(self.deaths)} receiver workers died within "
                                   f"{RESTART_WINDOW:.0f} s; stopping")
            self.log.warning("worker died; restarting it", worker=number, status=proc.returncode)
            self._spawn(number)
            return 1
        return 0

    def alive(self) -> bool:
        """False while a live worker has sent no heartbeat for 3 x watchdog_interval (its
        event loop is blocked): the watchdog goes unpinged and systemd restarts us. A dead
        worker is step()'s to restart, not stuck. One warning per worker per episode."""
        if self.broker is None:
            return True
        live = {n: b for n, b in self.broker.beats.items()
                if n in self.workers and self.workers[n].poll() is None}
        stuck = set(stuck_workers(live, 3 * self.settings.daemon.watchdog_interval))
        for number in sorted(stuck - self._stuck):
            self.log.warning("worker not responding; not pinging the watchdog", worker=number,
                             pid=self.workers[number].pid)
        for number in sorted((self._stuck - stuck) & live.keys()):
            self.log.info("worker responding again", worker=number)
        self._stuck = stuck
        return not stuck

    def periodic(self) -> None:
        if self.writer is not None:
            self.writer.tick()  # roll an old segment even when no mail comes

    def teardown(self) -> None:
        # stop taking mail first, then commit what sessions already handed over
        self._stop_workers()
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.committer is not None:
            self.committer.stop()
            self.log.info("committer stopped", batches=self.committer.batches,
                          messages=self.committer.messages)
            self.committer = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _stop_workers(self) -> None:
        """TERM the workers (each stops taking sessions and waits for the answers to what it
        handed over; the committer is still running), then kill any that lingers."""
        if not self.workers:
            return
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        for number, proc in self.workers.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("worker did not stop in time; killing it", worker=number)
                proc.kill()  # what it had not been answered for is not acknowledged
                proc.wait()
        self.workers = {}
        if self._port is not None:
            self._port.close()
            self._port = None
