"""Non-standard (plain-text) bounces: is this a bounce, and which addresses failed and why.

Inputs: the parsed message (its notification text, headers, the attached original).
Outputs: `bounce_evidence` (how strongly headers and text say "delivery failure") and
`text_recipients` -> [(address, diagnostic text)].

Mail servers write the failed address in a handful of layouts, whatever their wording:
- alone on a line, maybe in <>, with ":" / "..." / "(expanded from ...)" / " on <date>" after
  it (qmail, Exim, Sendmail, Postfix, Courier, Yahoo, Exchange, Gmail, Domino, GroupWise);
- inside an SMTP reply or a sentence next to the error ("550 5.1.1 <a@b>... User unknown",
  "RCPT TO:<a@b>", "Your message to a@b couldn't be delivered", "delivery to a@b failed");
- in a header the MTA adds (X-Failed-Recipients, Exim and Gmail).
Addresses that belong to the sender side (the bounce's own From/To, the original's From,
Reply-To, Return-Path, MAIL FROM) are never recipients. The recipient's local part is never
looked at.
"""

from __future__ import annotations

import re

from connectd.core.classify.addresses import ADDRESS, clean_address, find_addresses
from connectd.core.classify.parse import Parsed

_SENDER_LOCAL = re.compile(
    r"^(?:mailer-daemon|mailer_daemon|maildaemon|postmaster|post_master|mail-daemon|mdaemon|mmdf|smtp"
    r"|mail\.?delivery|deliverystatus|delivery|bounce[s]?|noreply|no-reply|nobody|root"
    r"|mailadmin|mail-system|mailsystem|daemon|mta|auto-?reply|returns?|system"
    r"|microsoftexchange[0-9a-f]*|notes|notification[s]?)\b", re.I)
_SENDER_NAME = re.compile(r"mail delivery|mailer.?daemon|postmaster|delivery (?:status|subsystem)"
                          r"|mail administrator|system administrator|mail system|mta|mdaemon",
                          re.I)
_SUBJECT = re.compile(
    r"undeliver|undelivered|not (?:be )?delivered|delivery (?:status notification|failure|failed"
    r"|problem|report|error|notification|has failed)|failure notice|returned mail|return(?:ed)? to sender"
    r"|mail delivery (?:failed|system|subsystem)|non-?delivery|could not (?:be )?(?:deliver|send)"
    r"|delivery (?:status )?notification|warning: could not|mail system error|nondeliverable"
    r"|rejected|permanent (?:delivery )?(?:error|failure)|delayed mail|delivery delayed"
    r"|message (?:delayed|failure|not delivered|could not)|bounce|delivery warning|failed mail"
    r"|processing error|mail delivery|unable to deliver|unknown user"
    r"|user unknown|mailbox (?:full|unavailable)|over quota|failed delivery|returned|error sending"
    r"|delivery (?:to the following|notice)|nicht zustellbar|non remis|no entregado|non recapitat"
    r"|unzustellbar|onbestelbaar|配信不能|送信できませんでした|エラー|未送达|退信|退回", re.I)
_BODY = re.compile(
    r"could not be delivered|couldn't be delivered|was not delivered|wasn't delivered"
    r"|undeliverable|delivery (?:has )?failed|delivery to the following|permanent (?:fatal )?error"
    r"|failed permanently|unable to deliver|not able to deliver|wasn't able to deliver"
    r"|delivery failure|returned mail|the following address(?:es)? (?:had|failed)"
    r"|following recipient|message (?:could not|cannot) be delivered|addresses failed"
    r"|delivery (?:is )?delayed|has not yet been delivered|will (?:continue|retry)|giving up"
    r"|temporary failure|delivery problem|the error that the other server returned"
    r"|mail system at host|qmail-send program|mail delivery (?:failed|software)"
    r"|rejected your message|message was rejected|was rejected by|has been returned|been postponed|delivery attempt|could not deliver"
    r"|did not reach|not reach the following|failed to deliver|could not send"
    r"|SMTP error|host .{0,80} said:|remote host said|said: [45]\d\d|<[^>]+>\.\.\."
    r"|not be delivered|no se pudo entregar|nicht zugestellt|n'a pas pu être remis"
    r"|user unknown|no such user|mailbox (?:is )?full|over quota|does not exist".lower())

# An address alone on its line (the common layout), with the decorations MTAs put around it.
_ALONE = re.compile(
    r"^[ \t>*-]*(?:\d+\.\s*)?(?:(?:Intended |Failed |Original |Final )?Recipient(?:\(s\))?:\s*"
    r"|[A-Za-z][\w-]{1,20}:\s*)?"
    r"(?:\"[^\"\n@]{0,60}\"\s*|[^\"<>@\n]{0,60}?(?=<))?[<\[(\"']?(?:mailto:|SMTP:|RFC822:|rfc822;\s*)?"
    r"(?P<addr>[^\s<>()\[\]@\"']+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24})[>\])\"']?"
    r"[ \t]*(?::|\.\.\.|,|;|#|\.)?[ \t]*"
    r"(?:\((?:expanded from|generated from|[^)]{0,80}@[^)]{0,80})[^)]*\)?|\([^()\n]*@[^()\n]*\)|<[^<>\s]+@[^<>\s]+>"
    r"|on (?:\w{3}|\d{1,2}/\d{1,2}/\d{2,4}).{0,40}|<mailto:[^>]*>|\(\d+\)|\(UNKNOWN\)|\(expanded from:?)?[ \t]*$", re.M | re.I)
# An address opening its line, then the error: "<a@b>: host x said: 550 ...", "a@b: No MX".
_LEAD = re.compile(
    r"^[ \t>*-]*(?:<(?P<a1>[^\s<>()\[\]@\"']+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24})>"
    r"|\[?(?P<a2>[^\s<>()\[\]@\"':]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24})\]?(?::|\.\.\.)\s)", re.I)
# An address inside an error sentence or SMTP reply.
_INLINE = re.compile(
    r"(?:RCPT TO:?\s*<?|recipients?:?\s*<?|intended recipient:?\s*<?|SMTP[=:]\s*<?"
    r"|expanded from:?\s*<?|generated from:?\s*<?|addressed to\s*['\"<]?|local (?:user|mailbox)\s+<?"
    r"|\bfor\s+<?|delivery to\s+<?|delivered to\s*:?\s*<?|message to\s+<?"
    r"|addressed to\s+<?|mail to\s+<?|deliver(?: your message)? to\s+<?|sent to\s+<?"
    r"|for\s+<|failed:\s*<?|address(?:es)?:?\s+<|user\s+<|mailbox\s+<?|recipient address\s+<?"
    r"|[45]\d\d[ -](?:\d\.\d{1,3}\.\d{1,3}\s+)?<?|\bto\s+<)"
    r"(?P<addr>[^\s<>()\[\]@\"',;:]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24})", re.I)
_NOT_RCPT_LINE = re.compile(
    r"^[ \t>*-]*(?:From|To|Cc|Bcc|Reply-To|Return-Path|Sender|Message-ID|In-Reply-To|References"
    r"|Received|X-[\w-]+|Errors-To|Envelope-From|DKIM-Signature|Authentication-Results"
    r"|Resent-From|List-[\w-]+)\s*:|MAIL FROM|envelope-from|smtp.mailfrom|header.from"
    r"|\bby\s+\S+\s+with\b|postmaster@|abuse@|(?:contact|e-?mail|write to|reach)\s+(?:the\s+)?"
    r"(?:postmaster|administrator|helpdesk|support)|contact\s*:?\s*<?[^\s@<>]+@|\bsent (?:by|from)\b|\bfrom\s+<", re.I)
_CONTACT = re.compile(r"(?:contact|write to|send mail to)\s+(?:us\s+at\s+|the\s+)?"
                      r"(?:postmaster|administrator|helpdesk|support|us)?\s*(?:at\s+)?<?[^\s@<>]+@"
                      r"|please contact|for (?:further )?assistance", re.I)
_GENERATED = re.compile(r"^[ \t]*\((?:ultimately )?generated from:?\s*<?([^\s<>()@]+@[A-Za-z0-9.-]+"
                        r"\.[A-Za-z]{2,24})>?\)", re.I)
_LOCAL_NEVER = re.compile(r"^(?:mailer-daemon|postmaster|mail-daemon|abuse)$", re.I)
_ERRORISH = re.compile(
    r"\b[45]\d\d\b|\b[45]\.\d{1,3}\.\d{1,3}\b|unknown|no such|not found|does not exist"
    r"|doesn't exist|invalid|rejected|refused|denied|full|quota|disabled|failed|failure|error"
    r"|unavailable|blocked|spam|not (?:be )?delivered|undeliverable|couldn't|could not"
    r"|unable|expired|timed? ?out|permanent|fatal|said|reason|deferred|delayed|not known"
    r"|wrong|no longer|postponed|bounced|returned|not recognized|did not reach", re.I)
_ERROR_STRICT = re.compile(
    r"\b[45]\d\d\b|\b[45]\.\d{1,3}\.\d{1,3}\b|unknown|no such|not found|does not exist"
    r"|doesn't exist|invalid|rejected|refused|full|quota|disabled|undeliverable|not delivered"
    r"|not known|unavailable|\bfailed\b|failure", re.I)


def bounce_evidence(parsed: Parsed, sender: str, from_header: str, subject: str) -> int:
    """0 (none) .. 5 (sure) for "this is a delivery failure notice", from headers and text."""
    score = 0
    local = sender.partition("@")[0]
    if _SENDER_LOCAL.match(local) or _SENDER_NAME.search(from_header):
        score += 2
    if _SUBJECT.search(subject):
        score += 2
    if parsed.get("X-Failed-Recipients"):
        score += 3
    if _BODY.search((parsed.notification[:20000] or parsed.html_text[:20000]).lower()):
        score += 1
    if parsed.report_type == "delivery-status" or parsed.statuses:
        score += 3
    return score


def sender_side(parsed: Parsed) -> set[str]:
    """Addresses of the sender side: never bounced recipients."""
    out: set[str] = set()
    for name in ("From", "To", "Cc", "Reply-To", "Return-Path", "Sender", "Errors-To"):
        for value in parsed.get_all(name):
            out.update(find_addresses(value))
    orig = parsed.original
    if orig is not None:
        for name in ("From", "Sender", "Reply-To", "Return-Path", "Errors-To"):
            try:
                values = orig.get_all(name) or []
            except Exception:
                values = []
            for value in values:
                out.update(find_addresses(str(value)))
    return out - set(original_recipients(parsed))


def original_recipients(parsed: Parsed) -> list[str]:
    """To and Cc of the returned original (a fallback when the report names no address)."""
    orig = parsed.original
    if orig is None:
        return []
    out: list[str] = []
    for name in ("To", "Cc"):
        try:
            values = orig.get_all(name) or []
        except Exception:
            values = []
        for value in values:
            for addr in find_addresses(str(value)):
                if addr not in out:
                    out.append(addr)
    return out


def _usable(addr: str, exclude: set[str]) -> bool:
    local, _, domain = addr.rpartition("@")
    if addr in exclude or not local or "." not in domain:
        return False
    # mail system mailboxes, not people: "contact postmaster@..." lines in every bounce
    return not _LOCAL_NEVER.match(local)


def _diagnostic(lines: list[str], i: int, rcpt_lines: set[int]) -> str:
    """The address's own line and the lines after it, up to the next address line."""
    out = [lines[i]]
    blank = 0
    for j in range(i + 1, min(len(lines), i + 12)):
        if j in rcpt_lines:
            break
        line = lines[j]
        if not line.strip():
            blank += 1
            if blank > 1 or len(out) > 1:
                if len(out) > 1:
                    break
            continue
        out.append(line)
    return " ".join(s.strip() for s in out)


def text_recipients(parsed: Parsed, exclude: set[str],
                    excluded_strong: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """(address, diagnostic) for each failed address a plain-text bounce names.
    `excluded_strong`, when given, collects the sender-side addresses that stood where a
    failed address stands (alone on a line, or opening an error line): a sender who wrote
    to itself is bounced too (the caller uses them only when nothing else is found)."""
    text = parsed.notification
    if not text.strip() or not _ADDR_ANY.search(text):
        text = parsed.html_text or text
    text = text[:60000].replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    # a mailbox the report tells the reader to contact is not a bounced one, wherever else
    # the report repeats it (a translated paragraph, a signature)
    exclude = exclude | {a for line in lines if "@" in line and _CONTACT.search(line)
                         and "recipient" not in line.lower() for a in find_addresses(line)}
    found: dict[str, int] = {}
    layout: set[str] = set()  # addresses seen alone on their line
    strong: set[str] = set()
    for i, line in enumerate(lines):
        if "@" not in line or len(line) > 2000:
            continue
        if _NOT_RCPT_LINE.search(line):
            continue
        m = _ALONE.match(line)
        if m is not None:
            addr = m.group("addr").lower().strip(".")
            if addr.startswith("mailto:"):
                addr = addr[7:]
            if _usable(addr, exclude):
                if addr not in layout:
                    # the address alone on its line heads its error block: prefer it to an
                    # earlier mention in a sentence ("Your message to a@b couldn't be...")
                    found[addr] = i
                    layout.add(addr)
                strong.add(addr)
            elif excluded_strong is not None and _usable(addr, set()):
                excluded_strong.setdefault(addr, i)
            continue
        lm = _LEAD.match(line)
        if lm is not None:
            addr = (lm.group("a1") or lm.group("a2")).lower()
            if _usable(addr, exclude):
                found.setdefault(addr, i)
                strong.add(addr)
            elif excluded_strong is not None and _usable(addr, set()):
                excluded_strong.setdefault(addr, i)
        for im in _INLINE.finditer(line):
            addr = im.group("addr").lower().strip(".")
            window = " ".join(lines[max(0, i - 1):i + 3])
            if _usable(addr, exclude) and _ERRORISH.search(window):
                found.setdefault(addr, i)
                strong.add(addr)
    if not found and excluded_strong:
        found = dict(excluded_strong)
    if not found:
        found = _aol_screen_names(parsed, lines)
    if not found:
        # Exim: "an undisclosed address\n  (generated from a@b)": the alias the sender used
        for i, line in enumerate(lines):
            g = _GENERATED.match(line)
            if g is not None and _usable(g.group(1).lower(), exclude):
                found.setdefault(g.group(1).lower(), i)
    if not found:
        # last resort inside the report: any address on a line that reads like an error
        for i, line in enumerate(lines):
            if "@" not in line or _NOT_RCPT_LINE.search(line) or len(line) > 2000:
                continue
            if not _ERROR_STRICT.search(line):
                continue
            for m in ADDRESS.finditer(line):
                addr = m.group(1).lower()
                if _usable(addr, exclude):
                    found.setdefault(addr, i)
    if not found:
        # a summary of the returned message ("To: a@b") inside the report: its one recipient
        tos = {a for line in lines if re.match(r"^[ \t>*-]*To:", line)
               for a in find_addresses(line) if _usable(a, exclude)}
        if len(tos) == 1:
            addr = tos.pop()
            found[addr] = next(i for i, line in enumerate(lines) if addr in line.lower())
    rcpt_lines = set(found.values())
    return [(addr, _diagnostic(lines, i, rcpt_lines)) for addr, i in found.items()]


_AOL_HEAD = re.compile(r"your mail to the following recipients could not be delivered", re.I)
_SCREEN_NAME = re.compile(r"^\t[ \t]*([A-Za-z0-9][A-Za-z0-9._-]{1,40})[ \t]*$")


def _aol_screen_names(parsed: Parsed, lines: list[str]) -> dict[str, int]:
    """AOL lists failed recipients by screen name, one per tab-indented line, under "Your
    mail to the following recipients could not be delivered": the format itself says the
    domain is the reporting one (aol.com)."""
    domain = parsed.get("From").rpartition("@")[2].strip("> ").lower()
    if domain not in ("aol.com", "aol.net") or not any(_AOL_HEAD.search(x) for x in lines[:20]):
        return {}
    return {f"{m.group(1).lower()}@{domain}": i for i, line in enumerate(lines[:60])
            if (m := _SCREEN_NAME.match(line))}


def _next(lines: list[str], i: int) -> str:
    return lines[i + 1] if i + 1 < len(lines) else ""


_ADDR_ANY = re.compile(r"@[A-Za-z0-9-]+\.")


def failed_header(parsed: Parsed) -> list[str]:
    """X-Failed-Recipients (Exim, Gmail): the MTA's own list of failed addresses."""
    out: list[str] = []
    for value in parsed.get_all("X-Failed-Recipients"):
        for addr in find_addresses(value):
            if addr not in out:
                out.append(addr)
    return out


__all__ = ["bounce_evidence", "clean_address", "failed_header", "original_recipients",
           "sender_side", "text_recipients"]
