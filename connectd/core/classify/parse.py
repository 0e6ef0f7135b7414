"""Parse raw mail bytes into what the classifier reads, bounded and never raising.

Input: the bytes of one message (any bytes at all). Output: a `Parsed`: decoded top-level
headers, the notification's text (text/* parts outside any attached original), the contents of
message/delivery-status and message/feedback-report parts, and the headers of the attached
original message (message/rfc822, text/rfc822-headers, or a copy inlined after a separator line).

The standard library's compat32 policy does the MIME work (several times faster than
policy.default, and tolerant of broken mail); every step that can fail on hostile input is
guarded, and the problems met are kept in `errors`. Work is bounded: the raw message, each
decoded part and the total of text read are capped, so a 10 MB attachment or a thousand nested
multiparts cost milliseconds.
"""

from __future__ import annotations

import email
import email.header
import email.parser
import email.policy
import re
from dataclasses import dataclass, field
from email.message import Message

MAX_RAW = 2 * 1024 * 1024  # a bounce past this is its attached original, not the report
MAX_PART = 256 * 1024  # decoded text read from one part
MAX_TEXT = 512 * 1024  # decoded text read from all parts together
MAX_PARTS = 200  # parts walked; deeper/wider structures are hostile or irrelevant
MAX_DEPTH = 12

_PARSER = email.parser.BytesParser(policy=email.policy.compat32)
_HEADER_PARSER = email.parser.Parser(policy=email.policy.compat32)

# Lines that begin the copy of the original message in a plain-text bounce (qmail, Exim,
# Sendmail, Postfix, Courier, Exchange, ...): everything after them is the sender's own mail.
_HARD_SEPARATOR = re.compile(
    r"^[ \t>]*(?:-+ ?(?:Below this line is a copy of the message|This is a copy of the message"
    r"|Original message|Returned message|Unsent message below|Returned mail follows"
    r"|Message header follows|Text of returned message|Undelivered message follows"
    r"|original message follows|Message text follows|Original message header follows"
    r"|The header of the original message is following)"
    r"|Original message headers:|\*\*\* ?Message headers follow|Below is a copy of the original"
    r"|-+ ?START OF RETURNED MESSAGE|-+ ?RETURNED MAIL FOLLOWS|A copy of the original message below"
    r"|Your message reads \(in part\)|The first \d+ lines of your original message"
    r"|Original message as received|A summary of the undelivered message"
    r"|-+ ?This is a copy of your message|Message headers follow"
    r"|-+ ?Original Message ?-+)", re.I | re.M)
_HEADERISH = re.compile(r"^(?:Received|Return-Path|From|To|Subject|Message-I[Dd]|Date):", re.M)


@dataclass
class Parsed:
    """What the classifier reads of one message (see the module docstring)."""
    msg: Message | None
    headers: list[tuple[str, str]] = field(default_factory=list)
    notification: str = ""  # text of the report itself (text/* parts outside the original)
    first_plain: str | None = None  # the first text/plain part, whole (the human-readable body)
    html_text: str = ""  # the same from text/html parts, tags stripped (used when no plain)
    statuses: list[str] = field(default_factory=list)  # message/delivery-status contents
    feedback: str | None = None  # message/feedback-report contents
    original: Message | None = None  # headers (and maybe body) of the returned message
    original_text: str = ""  # the returned message as text (bounded)
    content_type: str = ""
    report_type: str = ""
    errors: list[str] = field(default_factory=list)
    _budget: int = MAX_TEXT

    def get(self, name: str) -> str:
        """The first top-level header `name`, decoded, "" if absent."""
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return ""

    def get_all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self.headers if k.lower() == low]


def decode_header(value: object) -> str:
    """A raw header value (str, or email.header.Header for undecodable bytes) -> one line."""
    try:
        text = str(value)
        if "=?" in text:
            parts = email.header.decode_header(text)
            out = []
            for chunk, charset in parts:
                if isinstance(chunk, bytes):
                    out.append(_decode_bytes(chunk, charset))
                else:
                    out.append(chunk)
            text = "".join(out)
    except Exception:  # hostile encoded words: keep the raw text
        text = str(value) if isinstance(value, str) else ""
    return " ".join(text.split())


def _decode_bytes(data: bytes, charset: str | None) -> str:
    cs = (charset or "ascii").strip().strip('"').lower() or "ascii"
    if cs in ("unknown-8bit", "x-unknown", "us-ascii", "ascii"):
        cs = "utf-8"
    try:
        return data.decode(cs, errors="replace")
    except LookupError:
        return data.decode("latin-1")


def _part_text(part: Message, parsed: Parsed) -> str:
    """Decoded text of a leaf part, bounded by the part and total budgets."""
    if parsed._budget <= 0:
        return ""
    try:
        payload = part.get_payload(decode=True)
    except Exception as exc:
        parsed.errors.append(f"payload: {type(exc).__name__}")
        return ""
    if payload is None:
        raw = part.get_payload()
        payload = raw.encode("utf-8", "replace") if isinstance(raw, str) else b""
    if not isinstance(payload, bytes):
        return ""
    limit = min(MAX_PART, parsed._budget)
    if len(payload) > limit:
        payload = payload[:limit]
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    text = _decode_bytes(payload, charset)
    parsed._budget -= len(text)
    return text


def _container_text(part: Message) -> str:
    """The text of a message/* part that compat32 parsed into sub-messages (delivery-status)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        chunks = []
        for sub in payload[:64]:
            if isinstance(sub, Message):
                # the fields as written; as_string() would re-fold each one (slow)
                chunks.append("\n".join(f"{k}: {v}" for k, v in sub.items()))
            else:
                chunks.append(str(sub))
        return "\n".join(chunks)
    if isinstance(payload, str):
        return payload[:MAX_PART]
    return ""


_TAG = re.compile(r"<(?:script|style)\b.*?</(?:script|style)>|<[^>]{0,2000}>", re.S | re.I)
_BR = re.compile(r"<(?:br|/p|/div|/tr|p|div|li)\b[^>]*>", re.I)
_ENTITY = re.compile(r"&(#?\w{1,8});")


def html_to_text(html: str) -> str:
    """HTML -> rough text: block tags become newlines, other tags go, entities decode."""
    import html as html_mod
    text = _BR.sub("\n", html)
    text = _TAG.sub("", text)
    return html_mod.unescape(text)


def parse(raw: bytes) -> Parsed:
    """Raw message bytes -> Parsed (never raises)."""
    errors: list[str] = []
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raw = b""
    raw = bytes(raw)
    if len(raw) > MAX_RAW:
        raw = raw[:MAX_RAW]
        errors.append(f"truncated: message larger than {MAX_RAW} bytes")
    try:
        msg = _PARSER.parsebytes(raw)
    except Exception as exc:  # the parser is tolerant; this is belt and braces
        return Parsed(msg=None, errors=errors + [f"unparsable: {type(exc).__name__}"])
    parsed = Parsed(msg=msg, errors=errors)
    for defect in getattr(msg, "defects", [])[:5]:
        parsed.errors.append(type(defect).__name__)
    try:
        for k, v in msg.items()[:500]:
            parsed.headers.append((k, decode_header(v)))
    except Exception as exc:
        parsed.errors.append(f"headers: {type(exc).__name__}")
    try:
        parsed.content_type = msg.get_content_type()
        parsed.report_type = (msg.get_param("report-type") or "")
        if not isinstance(parsed.report_type, str):
            parsed.report_type = ""
        parsed.report_type = parsed.report_type.lower()
    except Exception:
        parsed.content_type = "text/plain"
    plain: list[str] = []
    html: list[str] = []
    state = {"parts": 0}
    try:
        _walk(msg, parsed, plain, html, 0, state)
    except RecursionError:
        parsed.errors.append("nesting too deep")
    except Exception as exc:  # hostile structure: keep what was read so far
        parsed.errors.append(f"walk: {type(exc).__name__}")
    parsed.notification = "\n".join(plain)
    parsed.html_text = "\n".join(html)
    if parsed.original is None:
        _inline_original(parsed)
    return parsed


def _walk(part: Message, parsed: Parsed, plain: list[str], html: list[str], depth: int,
          state: dict[str, int]) -> None:
    state["parts"] += 1
    if state["parts"] > MAX_PARTS:
        if state["parts"] == MAX_PARTS + 1:
            parsed.errors.append("too many parts")
        return
    if depth > MAX_DEPTH:
        parsed.errors.append("nesting too deep")
        return
    try:
        ctype = part.get_content_type()
    except Exception:
        ctype = "text/plain"
    if ctype == "message/delivery-status" or ctype == "message/global-delivery-status":
        text = _container_text(part) if part.is_multipart() else _part_text(part, parsed)
        parsed.statuses.append(text)
        return
    if ctype == "message/feedback-report":
        parsed.feedback = _container_text(part) if part.is_multipart() else _part_text(part,
                                                                                      parsed)
        return
    if ctype in ("message/rfc822", "message/global", "text/rfc822-headers",
                 "message/rfc822-headers", "message/partial"):
        _take_original(part, ctype, parsed)
        return
    if part.is_multipart():
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    _walk(sub, parsed, plain, html, depth + 1, state)
        return
    maintype = ctype.split("/", 1)[0]
    if maintype != "text" and depth > 0:
        return  # attachments: images, archives, the 10 MB PDF
    try:
        disposition = (part.get("Content-Disposition") or "").lower()
    except Exception:
        disposition = ""
    text = _part_text(part, parsed)
    if ctype == "text/html":
        html.append(html_to_text(text))
    elif depth > 0 and "attachment" in disposition and _HEADERISH.search(text[:2000]):
        # a returned message attached as text/plain (some MTAs do): that is the original
        if parsed.original is None:
            _set_original_text(parsed, text)
    else:
        if parsed.first_plain is None and ctype == "text/plain":
            parsed.first_plain = text
        plain.append(text)


def _take_original(part: Message, ctype: str, parsed: Parsed) -> None:
    if parsed.original is not None:
        return
    try:
        if part.is_multipart():
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, Message):
                parsed.original = inner
                # its headers as text (for quoted ids); as_string() would re-fold every header
                parsed.original_text = "\n".join(f"{k}: {v}" for k, v in inner.items()[:200])
                return
        _set_original_text(parsed, _part_text(part, parsed))
    except Exception as exc:
        parsed.errors.append(f"original: {type(exc).__name__}")


def _set_original_text(parsed: Parsed, text: str) -> None:
    parsed.original_text = text[:MAX_PART]
    try:
        parsed.original = _HEADER_PARSER.parsestr(text.lstrip()[:MAX_PART], headersonly=True)
    except Exception:
        parsed.original = None


def _inline_original(parsed: Parsed) -> None:
    """A plain-text bounce that pastes the original after a separator line: split it off."""
    text = parsed.notification
    m = _HARD_SEPARATOR.search(text)
    if m is None:
        return
    rest = text[m.end():]
    nl = rest.find("\n")
    rest = rest[nl + 1:] if nl >= 0 else ""
    parsed.notification = text[:m.start()]
    # the original starts at the first header-looking line after the separator
    h = _HEADERISH.search(rest[:4000])
    if h is not None:
        _set_original_text(parsed, rest[h.start():])
    else:
        parsed.original_text = rest[:MAX_PART]
