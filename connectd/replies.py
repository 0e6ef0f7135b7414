"""The reply-handler actions that do I/O: forward, reply, confirmation mail (over SMTP to the
relay), archive (a maildir), pipe (an external command).

Inputs: the stored message bytes, what the processor knows about it (`Context`), settings.
Outputs: mail handed to settings.relay.hosts[0], files in the archive maildirs, commands run.
Records are not written here: the processor turns what these return into records.

Errors: `Transient` (the relay cannot be reached or says 4xx: try the whole message again
later) and `ActionFailed` (this action cannot succeed for this message: record it in
MailProcessed.errors and go on). Nothing here logs a message body.

Outgoing mail carries a Message-ID made from the mail.received id and the action, so a message
handled again after a crash (the documented at-least-once window for outgoing mail) sends a
copy with the same Message-ID, which receiving systems and people can recognise.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate
from pathlib import Path

from connectd.core.replyrules import ReplyTemplate, render_reply
from connectd.spool import fsync_dir

AUTOMATIC_KINDS = frozenset(("bounce", "autoreply", "feedback", "delivered"))
_ADDRESS = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253})$")
_ROBOT_LOCAL = re.compile(r"^(mailer-daemon|postmaster|no-?reply|do-?not-?reply|listserv|majordomo"
                          r"|bounces?|owner-.*|.*-request|.*-owner)$", re.IGNORECASE)
MAX_LINE = 998  # RFC 5322: longer lines cannot travel in a message/rfc822 part unencoded


class ActionFailed(Exception):
    """This action cannot succeed for this message (recorded in MailProcessed.errors)."""


class Transient(Exception):
    """Try the whole message again later (relay unreachable, 4xx, database down)."""


@dataclass(frozen=True)
class Context:
    """What the actions need to know about one message."""

    received: str  # id of the mail.received record
    message: str  # inbound store name
    kind: str
    handler: str
    customer: int | None = None
    instance: int | None = None
    sender: str = ""  # From address, lower case
    mail_from: str = ""  # envelope sender ("" = null sender)
    subject: str = ""
    message_id: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    ts: str = ""  # when it was received (the mail.received ts)

    def template_vars(self) -> dict[str, object]:
        return {"customer": self.customer, "instance": self.instance, "kind": self.kind,
                "handler": self.handler, "sender": self.sender, "subject": self.subject,
                "message_id": self.message_id, "body": self.body}


# -- SMTP ---------------------------------------------------------------------------------------

class Outbox:
    """Hands mail to the first relay (settings.relay.hosts[0]); one SMTP session per message:
    the processor sends little, and a fresh session never trips over a relay's idle timeout."""

    def __init__(self, hosts: Sequence[str], timeout: float = 30.0, helo: str | None = None) -> None:
        if not hosts:
            raise ValueError("no relay configured (relay.hosts)")
        host, _, port = hosts[0].rpartition(":")
        self.host, self.port = (host or hosts[0]), int(port) if host else 25
        self.timeout = timeout
        self.helo = helo or socket.getfqdn()

    def send(self, mail_from: str, to: str, data: bytes) -> str:
        """Hand `data` over; returns the relay's reply. Transient for connection problems and
        4xx, ActionFailed for 5xx (the address or the message is refused for good)."""
        try:
            with smtplib.SMTP(self.host, self.port, local_hostname=self.helo,
                              timeout=self.timeout) as smtp:
                smtp.ehlo_or_helo_if_needed()
                options = ["BODY=8BITMIME"] if (smtp.has_extn("8bitmime") and not data.isascii()) else []
                smtp.sendmail(mail_from, [to], data, mail_options=options)
                return "250"
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return _refused(code, text, f"recipient {to}")
        except smtplib.SMTPResponseException as exc:
            return _refused(exc.smtp_code, exc.smtp_error, "relay")
        except (OSError, smtplib.SMTPException) as exc:
            raise Transient(f"relay {self.host}:{self.port}: {exc}") from None


def _refused(code: int, text: bytes | str, what: str) -> str:
    reason = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    if 400 <= code < 500:
        raise Transient(f"{what}: {code} {reason}")
    raise ActionFailed(f"{what} refused: {code} {reason}")


def _message_id(ctx: Context, what: str, domain: str) -> str:
    return f"<{what}.{ctx.received}@{domain}>"


def _domain(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


# -- forward ------------------------------------------------------------------------------------

def rfc822_safe(raw: bytes) -> bool:
    """Whether `raw` may travel as a message/rfc822 part unencoded: CRLF line ends only, no
    NUL, no line over 998 octets (else it is attached as application/octet-stream, base64)."""
    if b"\0" in raw or raw.count(b"\r") != raw.count(b"\n") or raw.count(b"\r\n") != raw.count(b"\n"):
        return False
    return all(len(line) <= MAX_LINE for line in raw.split(b"\r\n"))


def build_forward(raw: bytes, ctx: Context, *, to: str, from_addr: str,
                  errors: Sequence[str] = ()) -> bytes:
    """The mail to customer service: a short text part saying what the processor made of the
    message, then the original exactly as received (message/rfc822; octet-stream when its
    bytes cannot travel unencoded)."""
    summary = [f"connectd received a message it handed to customer service (handler: "
               f"{ctx.handler or 'none'}).", "",
               f"Kind:      {ctx.kind}", f"From:      {ctx.sender or '(unknown)'}",
               f"Subject:   {ctx.subject}", f"Customer:  {ctx.customer if ctx.customer is not None else 'unknown'}",
               f"Instance:  {ctx.instance if ctx.instance is not None else 'unknown'}",
               f"Stored as: {ctx.message}", ""]
    if errors:
        summary += ["Problems met while processing it:", *(f"  - {e}" for e in errors), ""]
    summary.append("The original message is attached.")
    text = "\r\n".join(summary).encode("utf-8") + b"\r\n"
    boundary = f"=_connectd_{ctx.received}_{os.urandom(6).hex()}".encode()
    while boundary in raw:
        boundary += b"x"
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = from_addr
    msg["To"] = to
    if _ADDRESS.match(ctx.sender or ""):
        msg["Reply-To"] = ctx.sender  # customer service answers the customer directly
    msg["Subject"] = f"[connectd {ctx.kind}] {ctx.subject}"[:250]
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = _message_id(ctx, "fwd", _domain(from_addr))
    msg["Auto-Submitted"] = "auto-forwarded"
    msg["X-Connectd-Kind"] = ctx.kind
    msg["X-Connectd-Handler"] = ctx.handler or "-"
    msg["X-Connectd-Customer"] = str(ctx.customer) if ctx.customer is not None else "-"
    msg["X-Connectd-Instance"] = str(ctx.instance) if ctx.instance is not None else "-"
    head = bytes(msg).rstrip(b"\r\n") + b"\r\n"
    head += (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"" + boundary
             + b"\"\r\n\r\n")
    body = [b"--" + boundary, b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: 8bit", b"", text]
    if rfc822_safe(raw):
        body += [b"--" + boundary, b"Content-Type: message/rfc822",
                 b"Content-Disposition: inline",
                 b"Content-Transfer-Encoding: " + (b"7bit" if raw.isascii() else b"8bit"), b"",
                 raw if raw.endswith(b"\r\n") else raw + b"\r\n"]
    else:
        encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
        body += [b"--" + boundary,
                 b"Content-Type: application/octet-stream; name=\"original.eml\"",
                 b"Content-Disposition: attachment; filename=\"original.eml\"",
                 b"Content-Transfer-Encoding: base64", b"", encoded]
    body += [b"--" + boundary + b"--", b""]
    return head + b"\r\n".join(body)


# -- reply and confirmation ---------------------------------------------------------------------

def reply_refusal(ctx: Context, own: Sequence[str] = ()) -> str | None:
    """Why an automatic reply to this message must not be sent (RFC 3834 section 2), or None.
    `own` are our own addresses and domains: never answer ourselves (a loop)."""
    if ctx.kind in AUTOMATIC_KINDS:
        return f"no reply to an automatic message ({ctx.kind})"
    if not ctx.mail_from:
        return "no reply to a null envelope sender"
    if not _ADDRESS.match(ctx.sender or ""):
        return "no usable sender address to reply to"
    for name, value in ctx.headers:
        lname, lvalue = name.lower(), value.strip().lower()
        if lname == "auto-submitted" and lvalue and not lvalue.startswith("no"):
            return f"no reply to Auto-Submitted: {lvalue[:40]}"
        if lname == "precedence" and lvalue in ("bulk", "junk", "list"):
            return f"no reply to Precedence: {lvalue}"
        if lname == "list-id":
            return "no reply to mailing-list mail (List-Id)"
    local, _, domain = ctx.sender.partition("@")
    if _ROBOT_LOCAL.match(local):
        return f"no reply to a robot address ({local})"
    mine = {o.lower() for o in own}
    if ctx.sender in mine or domain in mine:
        return "no reply to our own address (loop)"
    return None


def _text_mail(ctx: Context, *, from_addr: str, to: str, subject: str, body: str, what: str,
               reply_to: str | None = None) -> bytes:
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = from_addr
    msg["To"] = to
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = _message_id(ctx, what, _domain(from_addr))
    if ctx.message_id and re.fullmatch(r"<[^<>\s]{1,900}>", ctx.message_id.strip()):
        msg["In-Reply-To"] = ctx.message_id.strip()
        msg["References"] = ctx.message_id.strip()
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834: other responders will not answer it
    msg.set_content(body, charset="utf-8")
    return bytes(msg)


def build_reply(ctx: Context, template: ReplyTemplate, *, from_addr: str) -> bytes:
    """A templated reply to the sender (the caller has checked reply_refusal)."""
    try:
        subject, body = render_reply(template, ctx.template_vars())
    except Exception as exc:  # a template error is this action's failure, not the daemon's
        raise ActionFailed(f"reply template {template.source or 'inline'}: {exc}") from None
    return _text_mail(ctx, from_addr=from_addr, to=ctx.sender, subject=subject or "Re:",
                      body=body, what="reply")


CONFIRM_TEXT = """\
Hello,

we received a request to subscribe {address} to our mailing list.

To confirm, just reply to this message (what you write does not matter).
If you did not ask for this, ignore this message: you will not be subscribed.
"""


def build_confirmation(ctx: Context, *, address: str, reply_to: str, from_addr: str) -> bytes:
    """The double opt-in mail: replying to it (Reply-To: confirm-<token>@...) confirms."""
    return _text_mail(ctx, from_addr=from_addr, to=address,
                      subject="Please confirm your subscription",
                      body=CONFIRM_TEXT.format(address=address), what="confirm",
                      reply_to=reply_to)


# -- archive ------------------------------------------------------------------------------------

def archive_folder(ctx: Context, mode: str) -> str:
    """The maildir a message goes to: its handler's name, or the day it was received."""
    if mode == "date":
        return (ctx.ts[:10] if len(ctx.ts) >= 10 else datetime.now(UTC).strftime("%Y-%m-%d"))
    return ctx.handler or "unhandled"


def archive(root: Path, folder: str, ctx: Context, raw: bytes) -> Path:
    """Store `raw` in the maildir root/folder (tmp/, fsync, rename into new/). The file is
    named after the mail.received id, so archiving the same message again (after a crash)
    leaves one copy. Raises ActionFailed on a disk problem."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", folder):
        raise ActionFailed(f"archive folder {folder!r} is not a plain name")
    box = Path(root) / folder
    name = f"{ctx.received}.connectd"
    final = box / "new" / name
    try:
        if final.exists() or (box / "cur" / name).exists():
            return final
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        tmp = box / "tmp" / f"{name}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # the bytes are on disk before the name in new/ points at them
        finally:
            os.close(fd)
        os.replace(tmp, final)
        fsync_dir(box / "new")  # the archived message survives a crash
    except OSError as exc:
        raise ActionFailed(f"archive {box}: {exc.strerror or exc}") from None
    return final


# -- pipe ---------------------------------------------------------------------------------------

def pipe_env(ctx: Context) -> dict[str, str]:
    """The context of a message as environment variables for a pipe command."""
    def s(v: object) -> str:
        # an environment value cannot hold NUL (hostile headers may): drop it, not the action
        return "" if v is None else str(v).replace("\0", "")

    return {"CONNECTD_CUSTOMER": s(ctx.customer), "CONNECTD_INSTANCE": s(ctx.instance),
            "CONNECTD_KIND": s(ctx.kind), "CONNECTD_HANDLER": s(ctx.handler),
            "CONNECTD_SENDER": s(ctx.sender), "CONNECTD_SUBJECT": s(ctx.subject),
            "CONNECTD_MESSAGE": s(ctx.message), "CONNECTD_RECEIVED": s(ctx.received)}


def run_pipe(argv: Sequence[str], raw: bytes, ctx: Context, timeout: float,
             environ: Mapping[str, str] | None = None) -> None:
    """Run `argv` with the message on stdin and the context in its environment; ActionFailed
    when it cannot start, exits non-zero (its stderr's tail quoted) or outlives `timeout`
    (then it and its children are killed)."""
    env = {**(os.environ if environ is None else environ), **pipe_env(ctx)}
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        raise ActionFailed(f"pipe {argv[0]}: cannot run: {exc.strerror or exc}") from None
    try:
        _, err = proc.communicate(raw, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise ActionFailed(f"pipe {argv[0]}: killed after {timeout:g} s") from None
    if proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
        raise ActionFailed(f"pipe {argv[0]}: exit status {proc.returncode}"
                           + (f": {tail[0][:200]}" if tail else ""))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # the command's own children (a shell script's) hold the pipes too: kill the session
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5)

