"""Classify one inbound message: bounce, auto-reply, feedback, delivered, (un)subscribe, human.

Input: the raw bytes of a received message, its envelope recipients, the VERP keys and the
reply domains. Output: a `Classification` (see the dataclass): what kind of mail it is, which
addresses bounced, hard or soft and why (sisimai's reason vocabulary), and which message
instance and customer it is about. Pure and bounded: no I/O, never raises, a few hundred
microseconds for a typical bounce.

Order of the decision (the first that holds wins):
1. an ARF report (RFC 5965)                                -> feedback
2. RFC 3464 delivery-status fields (a part, or inline)     -> bounce (failed/delayed)
                                                              or delivered (delivered/relayed)
3. a plain-text bounce (headers and text say "delivery failure"), with its failed addresses
4. an automatic reply (RFC 3834, X-Autoreply, Precedence, subject/body in many languages)
5. a mail to our unsubscribe-/confirm- VERP address, or a subscribe/unsubscribe keyword
   in the subject or the first body line
6. anything else                                           -> human
A decision never depends on a recipient's local part (test corpora spell the answer there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from connectd.core.classify import (
    arf,
    autoreply,
    context,
    dsn,
    jsonnotice,
    reasons,
    rhost,
    textbounce,
)
from connectd.core.classify.addresses import clean_address, find_addresses
from connectd.core.classify.parse import Parsed, parse

__all__ = ["KINDS", "BouncedRecipient", "Classification", "classify_reply"]

MAX_BODY = 64 * 1024
KINDS = ("bounce", "autoreply", "feedback", "delivered", "unsubscribe", "subscribe", "human",
         "unknown")


@dataclass(frozen=True)
class BouncedRecipient:
    """One address a bounce (or a feedback report) names, with its own verdict."""
    address: str
    hard: bool | None
    reason: str
    status: str | None


@dataclass(frozen=True)
class Classification:
    """What a received message is and what it is about (the contract of issue 5)."""
    kind: str
    recipients: tuple[str, ...] = ()
    hard: bool | None = None
    reason: str | None = None
    status: str | None = None
    per_recipient: tuple[BouncedRecipient, ...] = ()
    feedback_type: str | None = None
    customer: int | None = None
    instance: int | None = None
    context_via: str | None = None
    verp_kind: str | None = None
    sender: str = ""
    subject: str = ""
    message_id: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    errors: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self, file: str) -> dict[str, Any]:
        """The `connectd mail classify --json` object for this message read from `file`."""
        return {
            "file": file, "kind": self.kind, "recipients": list(self.recipients),
            "hard": self.hard, "reason": self.reason, "status": self.status,
            "per_recipient": [
                {"address": r.address, "hard": r.hard, "reason": r.reason, "status": r.status}
                for r in self.per_recipient],
            "feedback_type": self.feedback_type, "customer": self.customer,
            "instance": self.instance, "context_via": self.context_via,
            "verp_kind": self.verp_kind, "sender": self.sender, "subject": self.subject,
            "message_id": self.message_id, "errors": list(self.errors),
        }


def classify_reply(raw: bytes, *, rcpt: Sequence[str] = (), verp_keys: Sequence[str] = (),
                   reply_domains: Sequence[str] = ()) -> Classification:
    """Raw message bytes (+ envelope recipients, VERP keys, reply domains) -> Classification.

    Never raises: a message that cannot be understood is "human" (something a person may
    need to read) with `errors` saying what went wrong; "unknown" only when not even the
    headers could be read."""
    try:
        return _classify(raw, tuple(rcpt or ()), tuple(verp_keys or ()),
                         tuple(reply_domains or ()))
    except Exception as exc:  # the per-message boundary: a classifier bug must not lose mail
        return Classification(kind="unknown", errors=(f"classifier: {type(exc).__name__}: {exc}",))


def _is_report(parsed: Parsed) -> bool:
    try:
        return parsed.original.get_content_type() == "multipart/report"  # type: ignore[union-attr]
    except Exception:
        return False


def _classify_inner(parsed: Parsed, rcpt: tuple[str, ...], verp_keys: tuple[str, ...],
                    reply_domains: tuple[str, ...]) -> Classification | None:
    try:
        raw = parsed.original.as_bytes()  # type: ignore[union-attr]
    except Exception:
        return None
    return _classify(raw, rcpt, verp_keys, reply_domains, depth=1)


def _classify(raw: bytes, rcpt: tuple[str, ...], verp_keys: tuple[str, ...],
              reply_domains: tuple[str, ...], depth: int = 0) -> Classification:
    parsed = parse(raw)
    if parsed.msg is None:
        return Classification(kind="unknown", errors=tuple(parsed.errors))
    from_header = parsed.get("From")
    sender = clean_address(from_header) or ""
    subject = parsed.get("Subject")[:1000]
    message_id = parsed.get("Message-ID") or None
    body_src = parsed.first_plain if parsed.first_plain is not None else (
        parsed.notification or parsed.html_text)
    body = body_src[:MAX_BODY]
    ctx = _context(parsed, rcpt, verp_keys, reply_domains)
    base = dict(sender=sender, subject=subject, message_id=message_id,
                headers=tuple(parsed.headers), body=body, customer=ctx.customer,
                instance=ctx.instance, context_via=ctx.via, verp_kind=ctx.verp_kind)

    def done(kind: str, **kw: Any) -> Classification:
        return Classification(kind=kind, errors=tuple(parsed.errors[:20]), **base, **kw)

    report = arf.feedback(parsed)
    if report is not None:
        ftype, addrs = report
        per = tuple(BouncedRecipient(a, None, "feedback", None) for a in addrs)
        return done("feedback", reason="feedback", feedback_type=ftype, per_recipient=per)

    js = jsonnotice.notice(parsed.notification[:jsonnotice.MAX_JSON])
    if js is not None:
        if js.kind == "feedback":
            per = tuple(BouncedRecipient(a, None, "feedback", None) for a, *_ in js.recipients)
            return done("feedback", reason="feedback", feedback_type=js.feedback_type,
                        per_recipient=per)
        if js.kind == "delivered":
            return done("delivered", reason="delivered")
        verdicts = []
        for addr, status, diag, permanent in js.recipients:
            reason, hard = reasons.classify_reason(diag, status)
            if permanent is False and reason in reasons.HARD_REASONS:
                reason, hard = "expired", False
            verdicts.append(BouncedRecipient(addr, hard, reason, status))
        return done("bounce", **_bounce_fields(verdicts))

    evidence = textbounce.bounce_evidence(parsed, sender, from_header, subject)
    dsn_rcpts = _dsn_recipients(parsed, evidence)
    if dsn_rcpts:
        failed = [r for r in dsn_rcpts if _failed(r)]
        if failed:
            per = _dsn_verdicts(parsed, failed)
            return done("bounce", **_bounce_fields(per))
        if all(_delivered(r) for r in dsn_rcpts):
            return done("delivered", reason="delivered", status=dsn_rcpts[0].status)

    if depth == 0 and evidence >= 2 and parsed.original is not None and _is_report(parsed):
        # the returned "original" is itself a delivery report (a gateway relayed the bounce
        # inside its own notice): the inner report names the failed address
        inner = _classify_inner(parsed, rcpt, verp_keys, reply_domains)
        if inner is not None and inner.kind in ("bounce", "feedback") and (
                inner.recipients or inner.per_recipient):
            return inner
    auto = autoreply.autoreply_reason(parsed, subject, body[:4000])
    worded = auto is not None and auto[1]
    if evidence >= 2 and not (worded and evidence < 4):
        per = _text_verdicts(parsed, evidence)
        if per or evidence >= 4:
            return done("bounce", **_bounce_fields(per))
    if auto is not None:
        return done("autoreply", reason=auto[0])
    if ctx.verp_kind == "unsubscribe":
        return done("unsubscribe")
    if ctx.verp_kind == "confirm":
        return done("subscribe")
    request = autoreply.request_kind(subject, body)
    if request is not None:
        return done(request)
    return done("human")


# ---------------------------------------------------------------------------------------------
# Context

def _context(parsed: Parsed, rcpt: tuple[str, ...], verp_keys: tuple[str, ...],
             reply_domains: tuple[str, ...]) -> context.Context:
    addresses: list[str] = list(rcpt)
    for name in ("Delivered-To", "X-Original-To", "Envelope-To", "To", "Cc"):
        for value in parsed.get_all(name):
            addresses.extend(find_addresses(value))
    orig = parsed.original
    orig_ids: list[str] = []
    if orig is not None:
        for name in ("Return-Path", "From", "Sender", "List-Unsubscribe"):
            try:
                for value in orig.get_all(name) or []:
                    addresses.extend(find_addresses(str(value)))
            except Exception:
                pass
        try:
            orig_ids = [str(v) for v in (orig.get_all("Message-ID") or [])]
        except Exception:
            orig_ids = []
    ctx = context.from_verp(addresses, verp_keys, reply_domains)
    if ctx is not None:
        return ctx
    ids = parsed.get_all("In-Reply-To") + parsed.get_all("References") + orig_ids
    ids += re.findall(r"^[ \t>]*Message-ID:\s*(<[^>\n]{1,300}>)", parsed.notification[:60000]
                      + "\n" + parsed.original_text[:20000], re.I | re.M)
    return context.from_message_ids(ids) or context.Context()


# ---------------------------------------------------------------------------------------------
# Bounces

def _dsn_recipients(parsed: Parsed, evidence: int) -> list[dsn.DsnRecipient]:
    out: list[dsn.DsnRecipient] = []
    for text in parsed.statuses:
        out.extend(dsn.parse_status_text(text))
    if not out:
        out = dsn.find_inline(parsed.notification[:100000])
    # one entry per address: some MTAs split a recipient's fields over two blocks
    seen: dict[str, dsn.DsnRecipient] = {}
    for r in out:
        first = seen.get(r.address)
        if first is None:
            seen[r.address] = r
            continue
        first.action = first.action or r.action
        first.status = first.status if first.status not in (None, "5.0.0", "4.0.0") else (
            r.status or first.status)
        first.diagnostic = first.diagnostic or r.diagnostic
        first.original = first.original or r.original
    return list(seen.values())


def _failed(r: dsn.DsnRecipient) -> bool:
    if r.action in ("failed", "delayed", "failure", "undeliverable"):
        return True
    if r.action in ("delivered", "relayed", "expanded", "deliverable"):
        return False
    return bool(r.status and r.status[0] in "45") or (not r.status and bool(r.diagnostic))


def _delivered(r: dsn.DsnRecipient) -> bool:
    return r.action in ("delivered", "relayed", "expanded", "deliverable") or bool(
        r.status and r.status[0] == "2" and not r.action)


def _dsn_verdicts(parsed: Parsed, failed: list[dsn.DsnRecipient]) -> list[BouncedRecipient]:
    text_diag: dict[str, str] | None = None
    out = []
    for r in failed:
        diag = r.diagnostic
        if text_diag is None:
            text_diag = dict(textbounce.text_recipients(parsed, set()))
        extra = text_diag.get(r.address) or (r.original and text_diag.get(r.original)) or ""
        if not diag or not reasons.reason_from_text(diag):
            if not extra and len(failed) == 1:
                extra = parsed.notification[:3000]
            diag = f"{diag} {extra}".strip()
        status = r.status
        if status in ("5.0.0", "4.0.0") or status is None:
            better = reasons.find_status(r.diagnostic) or reasons.find_status(extra[:500])
            status = better or status
        if r.action == "delayed" and not reasons.reason_from_text(r.diagnostic):
            reason, hard = reasons.classify_reason("", status, default="expired")
            if reason not in reasons.HARD_REASONS:
                reason, hard = "expired", False
        else:
            hosts = (r.remote_mta, *rhost.hosts_in(diag), r.address.rpartition("@")[2],
                     r.reporting_mta)
            reason, hard = reasons.classify_reason(diag, status, around=extra, hosts=hosts)
        out.append(BouncedRecipient(r.address, hard, reason, status))
    return out


def _text_verdicts(parsed: Parsed, evidence: int) -> list[BouncedRecipient]:
    exclude = textbounce.sender_side(parsed)
    found = textbounce.text_recipients(parsed, exclude, excluded_strong={})
    header = textbounce.failed_header(parsed)
    if header:
        diags = dict(found)
        found = [(a, diags.get(a, "")) for a in header]
    if not found and evidence >= 4:
        originals = [a for a in textbounce.original_recipients(parsed) if a not in exclude]
        if len(originals) == 1:
            found = [(originals[0], "")]
    notification = parsed.notification or parsed.html_text
    temporary = bool(re.search(r"will (?:continue|retry|keep trying)|not yet been delivered"
                               r"|delivery (?:is )?delayed|temporar|\bdelay|warning:",
                               notification[:6000] + parsed.get("Subject"), re.I))
    reporter = parsed.get("From").rpartition("@")[2].strip("> ").lower()
    report_hosts = rhost.hosts_in(notification[:6000])
    out = []
    for addr, diag in found:
        text = diag if reasons.reason_from_text(diag) else f"{diag}\n{notification[:3000]}"
        status = reasons.find_status(diag) or None
        default = "expired" if temporary else None
        hosts = (*rhost.hosts_in(diag), addr.rpartition("@")[2], *report_hosts, reporter)
        reason, hard = reasons.classify_reason(text, status, default=default, hosts=hosts)
        if status is None:
            status = reasons.status_for(reason, temporary and reason not in
                                        reasons.HARD_REASONS)
        out.append(BouncedRecipient(addr, hard, reason, status))
    return out


def _bounce_fields(per: list[BouncedRecipient]) -> dict[str, Any]:
    if not per:
        return {"reason": "undefined", "hard": None}
    first = per[0]
    return {"recipients": tuple(r.address for r in per), "hard": first.hard,
            "reason": first.reason, "status": first.status, "per_recipient": tuple(per)}
