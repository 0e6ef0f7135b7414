"""The I/O actions of the reply handlers against real things: an SMTP server on 127.0.0.1, a
maildir, a pipe command; the RFC 3834 guard; confirmation tokens."""

from __future__ import annotations

import email
import email.policy
import time
from pathlib import Path

import pytest
from helpers.smtp_counter import CountingRelay, free_port

from connectd.core import tokens
from connectd.core.replyrules import ReplyTemplate
from connectd.replies import (
    ActionFailed,
    Context,
    Outbox,
    Transient,
    archive,
    archive_folder,
    build_forward,
    build_reply,
    reply_refusal,
    rfc822_safe,
    run_pipe,
)

RAW = (b"From: Ann <ann@example.com>\r\nTo: reply@reply.example\r\nSubject: Hi\r\n"
       b"Message-ID: <abc@example.com>\r\n\r\nHello\r\n")


def ctx(**kw: object) -> Context:
    base = dict(received="0123abcd", message="m1", kind="human", handler="h", customer=5,
                instance=9, sender="ann@example.com", mail_from="ann@example.com",
                subject="Hi", message_id="<abc@example.com>", ts="2024-05-06T07:08:09.000000Z")
    base.update(kw)
    return Context(**base)  # type: ignore[arg-type]


def test_forward_reaches_smtp_with_original_attached() -> None:
    """A forward arrives at the SMTP server; the original is a message/rfc822 part, byte-exact."""
    with CountingRelay(keep_bytes=True) as relay:
        data = build_forward(RAW, ctx(), to="cs@service.example", from_addr="c@reply.example")
        Outbox([f"127.0.0.1:{relay.port}"]).send("c@reply.example", "cs@service.example", data)
    (d,) = relay.deliveries
    msg = email.message_from_bytes(d.data, policy=email.policy.default)
    (part,) = list(msg.iter_attachments())
    assert part.get_content_type() == "message/rfc822"
    assert RAW in d.data
    assert msg["X-Connectd-Customer"] == "5" and d.message_id == "fwd.0123abcd@reply.example"


def test_forward_of_unsafe_bytes_is_base64() -> None:
    """Bytes that cannot travel unencoded (NUL, bare LF, long lines) go as base64 octet-stream
    and come back exactly."""
    raw = b"From: x\n\0\xff" + b"y" * 2000
    assert not rfc822_safe(raw)
    msg = email.message_from_bytes(build_forward(raw, ctx(), to="a@b.example", from_addr="c@d.example"),
                                   policy=email.policy.default)
    (part,) = list(msg.iter_attachments())
    assert part.get_content_type() == "application/octet-stream"
    assert part.get_content() == raw


def test_outbox_transient_and_permanent() -> None:
    """No server -> Transient; a 5xx refusal -> ActionFailed; a 4xx -> Transient."""
    with pytest.raises(Transient):
        Outbox([f"127.0.0.1:{free_port()}"], timeout=2).send("a@b.c", "x@y.example", RAW)
    rules = {"bad.example": lambda n: "550 5.1.1 no such user",
             "later.example": lambda n: "451 4.3.0 try later"}
    with CountingRelay(rules) as relay:
        out = Outbox([f"127.0.0.1:{relay.port}"])
        with pytest.raises(ActionFailed, match="550"):
            out.send("a@b.c", "x@bad.example", RAW)
        with pytest.raises(Transient, match="451"):
            out.send("a@b.c", "x@later.example", RAW)


def test_archive_maildir_once(tmp_path: Path) -> None:
    """Archive writes one file per received id into root/folder/new (again: still one)."""
    first = archive(tmp_path, "h", ctx(), RAW)
    again = archive(tmp_path, "h", ctx(), RAW)
    assert first == again and first.read_bytes() == RAW
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["cur", "new", "tmp"]
    assert list((tmp_path / "h" / "tmp").iterdir()) == []
    assert archive_folder(ctx(), "date") == "2024-05-06"
    with pytest.raises(ActionFailed):
        archive(tmp_path, "../escape", ctx(), RAW)


def test_pipe_env_stdin(tmp_path: Path) -> None:
    """The pipe command reads the message on stdin and the context in CONNECTD_* variables."""
    out = tmp_path / "out"
    run_pipe(["/bin/sh", "-c", f'cat > {out}.eml; echo "$CONNECTD_CUSTOMER $CONNECTD_INSTANCE '
              f'$CONNECTD_KIND $CONNECTD_HANDLER" > {out}.env'], RAW, ctx(), timeout=5)
    assert Path(f"{out}.eml").read_bytes() == RAW
    assert Path(f"{out}.env").read_text() == "5 9 human h\n"


def test_pipe_failures(tmp_path: Path) -> None:
    """Non-zero exit (stderr quoted), a missing command and a timeout are ActionFailed."""
    with pytest.raises(ActionFailed, match="exit status 4: nope"):
        run_pipe(["/bin/sh", "-c", "echo nope >&2; exit 4"], RAW, ctx(), timeout=5)
    with pytest.raises(ActionFailed, match="cannot run"):
        run_pipe([str(tmp_path / "missing")], RAW, ctx(), timeout=5)
    start = time.monotonic()
    with pytest.raises(ActionFailed, match="killed after"):
        run_pipe(["/bin/sh", "-c", "sleep 30 & sleep 30"], RAW, ctx(), timeout=0.5)
    assert time.monotonic() - start < 10


def test_template_reply_headers() -> None:
    """A template reply: rendered subject and body, In-Reply-To, Auto-Submitted: auto-replied."""
    tpl = ReplyTemplate(body="Hi {{ sender }} ({{ customer }})\n", subject="About {{ subject }}")
    msg = email.message_from_bytes(build_reply(ctx(), tpl, from_addr="c@reply.example"),
                                   policy=email.policy.default)
    assert msg["Subject"] == "About Hi" and msg["To"] == "ann@example.com"
    assert msg["In-Reply-To"] == "<abc@example.com>" and msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content().rstrip() == "Hi ann@example.com (5)"


def test_template_cannot_escape_sandbox() -> None:
    """A template probing Python internals fails as the action, not the daemon."""
    tpl = ReplyTemplate(body="{{ ''.__class__.__mro__ }}")
    with pytest.raises(ActionFailed):
        build_reply(ctx(), tpl, from_addr="c@reply.example")


@pytest.mark.parametrize("kw, refused", [
    ({}, None),
    ({"kind": "bounce"}, "automatic"),
    ({"kind": "autoreply"}, "automatic"),
    ({"mail_from": ""}, "null"),
    ({"headers": (("Auto-Submitted", "auto-generated"),)}, "Auto-Submitted"),
    ({"headers": (("Auto-Submitted", "no"),)}, None),
    ({"headers": (("Precedence", "bulk"),)}, "Precedence"),
    ({"headers": (("List-Id", "<x.example>"),)}, "List-Id"),
    ({"sender": "mailer-daemon@example.com"}, "robot"),
    ({"sender": "list-request@example.com"}, "robot"),
    ({"sender": "noreply@example.com"}, "robot"),
    ({"sender": "x@reply.example"}, "loop"),
    ({"sender": "not an address"}, "no usable"),
])
def test_reply_refusal(kw: dict, refused: str | None) -> None:
    """RFC 3834: no automatic reply to automatic mail, lists, robots or ourselves."""
    why = reply_refusal(ctx(**kw), own=("reply.example",))
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_confirm_token_binds_address() -> None:
    """A confirmation token verifies only for the address it was made for, and round-trips
    None and ids; a VERP token is not a confirmation token."""
    token = tokens.sign_confirm("k", "New@Example.org", None, 7, 1)
    assert tokens.verify_confirm(["k"], token, "new@example.org") == (None, 7, 1)
    assert len(f"confirm-{token}") <= 64
    with pytest.raises(tokens.BadToken):
        tokens.verify_confirm(["k"], token, "other@example.org")
    with pytest.raises(tokens.BadToken):
        tokens.verify_confirm(["k"], tokens.sign_verp("k", 7, 1), "new@example.org")
    with pytest.raises(tokens.BadToken):
        tokens.verify_verp(["k"], token)
