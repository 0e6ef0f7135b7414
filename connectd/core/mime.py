"""Outgoing message assembly, pure: (addresses, subject, rendered HTML/text, ids, date) -> bytes.

No I/O. The composer calls `build_message` once per recipient, then DKIM-signs the bytes
(connectd.core.dkim) and hands them to the relay with the VERP address as MAIL FROM.

The bytes are assembled directly rather than through `email.message.EmailMessage` (about 20x
slower, see issue 3); the stdlib is used only for `formataddr` of a non-ASCII display name.
What comes out:

- CRLF line endings everywhere, every line at most 78 characters except where a single
  URL or address is longer (never more than 998: anything that could not fit raises ValueError).
- Headers in this order: From, To, Subject, Date, Message-ID, List-Unsubscribe,
  List-Unsubscribe-Post, the caller's extra headers, MIME-Version, Content-Type.
  Every value goes through `render.header_value` (CR, LF and other controls become a space),
  so a merge value can never start a new header. Subject and extra values that are not plain
  ASCII (or that contain "=?", which a reader would decode) become RFC 2047 encoded words.
- No Return-Path header: the receiving MTA writes it from the envelope sender (RFC 5321
  4.4). `return_path` is checked here so a bad one fails before the hand-off, but the
  composer passes it to the relay as MAIL FROM.
- List-Unsubscribe: <mailto:...>, <https://...>; List-Unsubscribe-Post:
  List-Unsubscribe=One-Click only when the URL is HTTPS (RFC 8058 requires it).
- Body: multipart/alternative (text/plain, then text/html) when both parts are given, a
  single part when only one is. UTF-8, line breaks normalised to CRLF, quoted-printable
  (soft breaks at 76, trailing spaces, lone dots and "From " at line start escaped), or
  base64 when more than a sixth of the bytes are non-ASCII (shorter than QP then).
- The boundary is derived from the Message-ID (the same inputs give the same bytes) and
  contains "=_", which neither quoted-printable nor base64 output can contain, so it cannot
  occur inside a part whatever the content.

Addresses must be ASCII (punycode for international domains; SMTPUTF8 is not supported).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime, formataddr

from connectd.core.render import header_value

CRLF = b"\r\n"
MAX_LINE = 998  # RFC 5322 2.1.1: the hard limit, CRLF excluded
FOLD_AT = 78  # RFC 5322 2.1.1: the SHOULD limit we fold to

# Headers build_message writes itself; extra_headers may not repeat them (a second From or
# Content-Type would be ambiguous to readers and break DKIM's meaning of "the" header).
RESERVED = frozenset({
    "from", "to", "subject", "date", "message-id", "mime-version", "content-type",
    "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post", "return-path",
    "dkim-signature", "sender", "cc", "bcc",
})

_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}\Z")  # printable ASCII except ":" (RFC 5322 ftext)
_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,253}\Z")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_URL_BAD = re.compile(r"[\s<>,\"]")
_TARGET_PLAIN = re.compile(r"[^\s<>,\"\x00-\x1f\x7f-\x9f]+\Z")  # header_value leaves it alone
_MESSAGE_ID = re.compile(r"<i(\d+)\.c(\d+)@([^<>@\s]+)>\Z")
_FROM_LINE = re.compile(rb"^From ", re.M)
_ASCII_BYTES = bytes(range(128))
# quoted-printable: controls other than tab and LF (what a quick translate looks for), the
# escapes by byte, the white space a line may not end with, and a line's pieces between soft
# breaks: up to 75 bytes, not ending inside an =XX escape (DOTALL "." is counted, not scanned)
_QP_PLAIN = bytes(b for b in range(256) if b in (9, 10) or 32 <= b < 127)
_QP_HEX = {b: b"=%02X" % b for b in range(256)}
_QP_ESCAPED = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f-\xff]")
_QP_LINE_END = (b" ", b"\t")
_QP_PIECE = re.compile(rb".{1,75}(?<!=)(?<!=.)", re.S)
# a line ending in white space, a lone dot after a line break; both searches start with a
# literal line break, which sre finds with memchr (bytes' own `in` is ~3x slower for these)
_QP_LINE_TROUBLE = re.compile(rb"\n(?:(?<=[ \t]\n)|\.(?:\n|\Z))")
_NL_FROM = re.compile(rb"\nFrom ")
# after a line break: the end of a line in white space, a lone dot, "From ", a line over 76
_QP_AS_IS_NOT = re.compile(rb"\n(?:(?<=[ \t]\n)|\.(?:\n|\Z)|From |[^\n]{77})")


# ---------------------------------------------------------------------------------------------
# Ids and addresses

def message_id_for(instance: int, customer: int, domain: str) -> str:
    """(message instance, customer, sender domain) -> "<i{instance}.c{customer}@{domain}>".

    Stable, so a retried hand-off carries the same id (receivers de-duplicate on it), and
    readable back with `parse_message_id` when a reply quotes it in In-Reply-To."""
    for n in (instance, customer):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"message id needs non-negative ints, got {n!r}")
    return f"<i{instance}.c{customer}@{_domain(domain)}>"


def parse_message_id(message_id: str) -> tuple[int, int, str] | None:
    """A Message-ID made by `message_id_for` -> (instance, customer, domain); else None."""
    m = _MESSAGE_ID.match(message_id.strip())
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3)


def verp_address(local_token: str, domain: str) -> str:
    """A VERP local part (e.g. tokens.sign_verp(...)) and the bounce domain -> the address."""
    if not _LOCAL.match(local_token) or len(local_token) > 64:
        raise ValueError(f"not a valid local part: {local_token!r}")
    return f"{local_token}@{_domain(domain)}"


def _domain(domain: str) -> str:
    if not isinstance(domain, str) or not _DOMAIN.match(domain) or ".." in domain:
        raise ValueError(f"not a valid domain: {domain!r}")
    return domain


def _address(addr: str, what: str) -> str:
    if not isinstance(addr, str) or not _ADDRESS.match(addr):
        raise ValueError(f"{what}: not a plain ASCII address: {addr!r}")
    return addr


# ---------------------------------------------------------------------------------------------
# Header lines

def _encoded_words(name: str, text: str) -> str:
    """Text -> RFC 2047 base64 encoded words, folded so every line stays under 78.

    Words end after a space where possible: RFC 2047 decoders drop the fold between encoded
    words, but some (Python's address parser) show it as a space, which then falls where the
    text had one anyway."""
    words: list[str] = []
    chunk = ""
    for ch in text:
        if len((chunk + ch).encode()) > 45:  # 60 base64 chars + =?utf-8?b??= + fold < 78
            cut = chunk.rfind(" ") + 1
            if cut <= 0 or cut < len(chunk) - 20:
                cut = len(chunk)
            words.append(chunk[:cut])
            chunk = chunk[cut:]
        chunk += ch
    words.append(chunk)
    encoded = [f"=?utf-8?b?{base64.b64encode(w.encode()).decode('ascii')}?=" for w in words]
    return f"{name}: " + "\r\n ".join(encoded)


def _fold_words(name: str, text: str) -> str | None:
    """ASCII text -> "Name: text" folded at spaces to <= 78 columns; None if a word is too long."""
    line = f"{name}:"
    if len(line) + 1 + len(text) <= FOLD_AT:
        return f"{line} {text}" if text else line
    lines = []
    for word in text.split(" "):
        if len(word) > FOLD_AT - 2:
            return None
        if len(line) + 1 + len(word) > FOLD_AT:
            lines.append(line)
            line = ""
        line = f"{line} {word}"
    lines.append(line)
    return "\r\n".join(lines)


def unstructured(name: str, value: str) -> str:
    """Header name and any text -> one safe header field (no trailing CRLF): CR/LF and
    controls flattened, folded, RFC 2047 encoded when not plain ASCII."""
    text = header_value(value)
    if text.isascii() and "=?" not in text:
        folded = _fold_words(name, text)
        if folded is not None:
            return folded
    return _encoded_words(name, text)


@functools.lru_cache(maxsize=256)
def _from_header(name: str, addr: str) -> str:
    # One sender per campaign: cache the (rarely cheap) formataddr + encoding work.
    shown = header_value(name)
    value = formataddr((shown, _address(addr, "from_addr"))) if shown else addr
    if len(value) + 6 > MAX_LINE:
        raise ValueError("From header too long")
    if len(value) + 6 <= FOLD_AT or not value.startswith("=?"):
        return f"From: {value}"
    # A long encoded display name: formataddr gives one encoded word; refold it.
    return _encoded_words("From", shown) + f"\r\n <{addr}>"


@functools.lru_cache(maxsize=16)
def _date_header(date: datetime) -> str:
    # A sender passing whole seconds (the header has no finer ones) formats once a second.
    return "Date: " + format_datetime(date)


def _list_unsubscribe(mailto: str | None, url: str | None) -> list[str]:
    targets = []
    if mailto:
        mailto = _target(mailto)
        if mailto[:7].lower() != "mailto:":
            mailto = "mailto:" + mailto
        targets.append(mailto)
    https = False
    if url:
        url = _target(url)
        https = url[:8].lower() == "https://"
        if not https and url[:7].lower() != "http://":
            raise ValueError(f"list_unsubscribe_url must be http(s): {url!r}")
        targets.append(url)
    for t in targets:
        if len(t) + 20 > MAX_LINE:
            raise ValueError(f"unsubscribe target not usable in a header: {t!r}")
    if not targets:
        return []
    line = "List-Unsubscribe: <" + ">, <".join(targets) + ">"
    if len(line) > FOLD_AT:
        line = "List-Unsubscribe: <" + ">,\r\n <".join(targets) + ">"
    if https:
        return [line, "List-Unsubscribe-Post: List-Unsubscribe=One-Click"]
    return [line]


def _target(value: str) -> str:
    """An unsubscribe address or URL as it may stand in <...>: header_value's flattening
    (a value without white space or controls, the usual one, is taken as it is), and
    ValueError when white space, "<", ">", "," or '"' remain in it."""
    if _TARGET_PLAIN.match(value):
        return value
    value = header_value(value)
    if _URL_BAD.search(value):
        raise ValueError(f"unsubscribe target not usable in a header: {value!r}")
    return value


def _extra(headers: Sequence[tuple[str, str]]) -> list[str]:
    out = []
    for name, value in headers:
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ValueError(f"not a valid header name: {name!r}")
        if name.lower() in RESERVED:
            raise ValueError(f"header {name!r} is set by build_message")
        out.append(unstructured(name, value))
    return out


# ---------------------------------------------------------------------------------------------
# Body parts

def _newlines_lf(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _encode_body(text: str) -> tuple[bytes, bytes]:
    """Text -> (Content-Transfer-Encoding value, encoded body with CRLF line ends)."""
    data = _newlines_lf(text).encode("utf-8")
    if data.isascii():
        if _qp_as_is(data):
            return b"quoted-printable", data.replace(b"\n", CRLF)
    elif len(data.translate(None, _ASCII_BYTES)) * 6 > len(data):
        return b"base64", _base64_lines(data)
    qp = quoted_printable(data)
    if qp.startswith(b"From ") or _NL_FROM.search(qp):
        # An mbox writer on the way would turn these into ">From "; =46 reads the same.
        qp = _FROM_LINE.sub(b"=46rom ", qp)
        if any(len(line) > 76 for line in qp.split(CRLF)):  # the escape overflowed a line
            return b"base64", _base64_lines(data)
    return b"quoted-printable", qp


def _qp_as_is(data: bytes) -> bool:
    """ASCII text (LF line ends) that quoted-printable leaves as it is but for CRLF: no "=",
    no control, no line over 76, ending in white space, a lone dot or starting "From " (the
    usual text part: one search finds any of these, where quoted_printable's general path
    splits, measures and joins the lines and a second search looks for "From ")."""
    if b"=" in data or data.translate(None, _QP_PLAIN):
        return False
    end = data.find(b"\n")
    first = data if end < 0 else data[:end]
    if len(first) > 76 or first == b"." or first[:5] == b"From " or data[-1:] in _QP_LINE_END:
        return False
    return _QP_AS_IS_NOT.search(data) is None


def _base64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF).rstrip(CRLF)


def quoted_printable(data: bytes) -> bytes:
    """Bytes with LF line ends -> quoted-printable (RFC 2045 6.7) with CRLF line ends: "=",
    controls and non-ASCII as =XX, a space or tab ending a line escaped, a line that is a
    lone "." as =2E, soft breaks so no line exceeds 76 characters and no escape is cut.

    The same bytes as binascii.b2a_qp(istext=True) except where b2a_qp breaks its own rules
    (a line ending in white space can become 78 characters, a bare CR stays raw) and that a
    76-character line ending in an escape stays whole. About 4x faster than b2a_qp, which
    looks at every byte twice in C (~7 ns a byte, 100 us for the two parts of an 8 KB mail):
    here "=" is a bytes.replace, other escapes one substitution each (none in ASCII text
    without controls), and long lines are cut by a regular expression whose "." steps over
    75 bytes at a time."""
    if b"=" in data:
        data = data.replace(b"=", b"=3D")
    if not data.isascii() or data.translate(None, _QP_PLAIN):
        data = _QP_ESCAPED.sub(_qp_escape, data)
    lines = data.split(b"\n")
    # Lines that need work (over 76, ending in white space, a lone dot) are found with
    # C-level scans; only then does a Python loop go over the lines (~0.2 us a line: 30 us
    # for the 150 lines of a wrapped text part that needs nothing).
    if (max(map(len, lines)) > 76 or data[-1:] in _QP_LINE_END or data[:2] == b".\n"
            or data == b"." or _QP_LINE_TROUBLE.search(data)):
        lines = [_qp_line(line) if len(line) > 76 or line[-1:] in _QP_LINE_END or line == b"."
                 else line for line in lines]
    return CRLF.join(lines)


def _qp_escape(m: re.Match[bytes]) -> bytes:
    return _QP_HEX[m.group()[0]]


def _qp_line(line: bytes) -> bytes:
    """One line (escapes done) -> its trailing white space or lone dot escaped, soft breaks."""
    last = line[-1:]
    if last in _QP_LINE_END:
        line = line[:-1] + _QP_HEX[last[0]]
    elif line == b".":
        return b"=2E"
    if len(line) <= 76:
        return line
    pieces = _QP_PIECE.findall(line)
    if len(pieces[-1]) == 1 and len(pieces[-2]) == 75:
        pieces[-2:] = [pieces[-2] + pieces[-1]]  # a last character may be the 76th
    return b"=\r\n".join(pieces)


def _part(subtype: bytes, text: str) -> tuple[bytes, bytes]:
    """A body part -> (its header section with the empty line, its encoded content)."""
    cte, body = _encode_body(text)
    return (b"Content-Type: text/" + subtype + b'; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n", body)


def _end_single(cte: bytes, body: bytes) -> bytes:
    """A single part's encoded body -> ending in CRLF without adding a line break to its
    content.

    In a multipart the CRLF before the boundary belongs to the boundary; with no boundary the
    last CRLF is content, so a text without a final newline ends in a QP soft break."""
    if body.endswith(CRLF) or cte == b"base64":
        return body if body.endswith(CRLF) else body + CRLF
    start = body.rfind(CRLF) + 2
    last = body[start:]
    if len(last) < 76:
        return body + b"=" + CRLF
    cut = 72
    if last[cut - 1:cut] == b"=":  # never split an =XX escape
        cut -= 1
    elif last[cut - 2:cut - 1] == b"=":
        cut -= 2
    return body[:start] + last[:cut] + b"=" + CRLF + last[cut:] + b"=" + CRLF


def _boundary(message_id: str) -> bytes:
    digest = hashlib.sha256(message_id.encode()).hexdigest()[:32]
    return ("=_" + digest).encode("ascii")


# ---------------------------------------------------------------------------------------------
# The message

def build_message(*, from_addr: str, from_name: str | None, to_addr: str, subject: str,
                  html: str | None, text: str | None, message_id: str, return_path: str,
                  list_unsubscribe_mailto: str | None, list_unsubscribe_url: str | None,
                  date: datetime, extra_headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """One recipient's message -> its bytes (CRLF), ready for DKIM signing and SMTP DATA.

    `date` should be timezone-aware (a naive one is written with the "-0000" unknown zone).
    Raises ValueError for an invalid address, header name, URL or Message-ID, or when both
    `html` and `text` are None."""
    return join_message(*build_parts(
        from_addr=from_addr, from_name=from_name, to_addr=to_addr, subject=subject, html=html,
        text=text, message_id=message_id, return_path=return_path,
        list_unsubscribe_mailto=list_unsubscribe_mailto,
        list_unsubscribe_url=list_unsubscribe_url, date=date, extra_headers=extra_headers))


def join_message(fields: Sequence[str], body: bytes, first: bytes = b"") -> bytes:
    """`build_parts` output -> the message bytes; `first`: a header field (with its CRLF)
    to put before the others, a DKIM-Signature (connectd.core.dkim `sign_fields`)."""
    return first + "\r\n".join(fields).encode("ascii") + b"\r\n\r\n" + body


def build_parts(*, from_addr: str, from_name: str | None, to_addr: str, subject: str,
                html: str | None, text: str | None, message_id: str, return_path: str,
                list_unsubscribe_mailto: str | None, list_unsubscribe_url: str | None,
                date: datetime, extra_headers: Sequence[tuple[str, str]] = ()
                ) -> tuple[list[str], bytes]:
    """`build_message` in two pieces: (the header fields as written, each without its
    CRLF, folds included; the body after the empty line). A DKIM signer takes them as they
    are (`DkimSigner.sign_fields`) instead of parsing the joined bytes again."""
    if html is None and text is None:
        raise ValueError("neither an HTML nor a text part")
    _address(return_path, "return_path")
    mid = header_value(message_id)
    if not (mid.startswith("<") and mid.endswith(">") and "@" in mid) or len(mid) > 900:
        raise ValueError(f"not a valid Message-ID: {message_id!r}")
    head = [
        _from_header(from_name or "", from_addr),
        "To: " + _address(to_addr, "to_addr"),
        unstructured("Subject", subject),
        _date_header(date),
        "Message-ID: " + mid,
        *_list_unsubscribe(list_unsubscribe_mailto, list_unsubscribe_url),
        *_extra(extra_headers),
        "MIME-Version: 1.0",
    ]
    if html is None or text is None:
        subtype, content = ("html", html) if text is None else ("plain", text)
        cte, body = _encode_body(content)  # type: ignore[arg-type]
        head.append(f'Content-Type: text/{subtype}; charset="utf-8"')
        head.append("Content-Transfer-Encoding: " + cte.decode("ascii"))
        return head, _end_single(cte, body)
    boundary = _boundary(mid)
    head.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary.decode()}"')
    delimiter = b"\r\n--" + boundary
    return head, b"".join((  # one copy of the parts' content, into the body
        b"--", boundary, CRLF, *_part(b"plain", text),
        delimiter, CRLF, *_part(b"html", html),
        delimiter, b"--\r\n",
    ))
