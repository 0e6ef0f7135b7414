"""DKIM signing (RFC 6376), pure: (message bytes, key, selector, domain, now) -> signed bytes.

No I/O. The composer holds one DkimSigner per sender domain and calls `sign` per message.

- Canonicalisation relaxed for the header (RFC 6376 3.4.2) and relaxed (3.4.4) or simple
  (3.4.3) for the body, chosen per signer, is implemented here; the
  signature itself is OpenSSL's through `cryptography`: rsa-sha256 (RSA-2048 recommended,
  at least 1024 bits accepted, RFC 8301) or ed25519-sha256 (RFC 8463: Ed25519 over the
  SHA-256 digest of the signed data). dkimpy would take ~7 ms per message (pure-Python RSA).
- Input must use CRLF line endings (what connectd.core.mime produces and what goes on the
  wire); a bare LF or CR raises ValueError rather than signing bytes an MTA would then
  rewrite, which would break the signature.
- `sign_fields` signs a message given as its header fields and body, as
  connectd.core.mime.build_parts returns them, and returns the DKIM-Signature field alone:
  no parsing of the joined bytes and no CRLF checks (the builder's output is CRLF by
  construction). `sign` parses and checks the joined bytes, then does the same: for a 16
  KB message with a simple body, 41 us against 18 (the RSA step left out).
- Simple body canonicalisation (what dkimpy and Amazon SES sign with, c=relaxed/simple)
  hashes the body as it is, less trailing empty lines; relaxed first rewrites white space,
  which costs a pass over the body. They differ only for a body that a relay changes in
  white space: lines ending in spaces or tabs, runs of them. The builder's quoted-printable
  never ends a line in white space, so for its mail the two are equally robust.
- h= lists each configured header once per instance present in the message (bottom-up,
  RFC 6376 5.4.2), plus one extra "from", "to" and "subject" (oversigning: an empty
  instance that makes a header added later in transit break the signature).
- t= is the `now` passed in; no x= (expiry), no l= (body length: it would let a forwarder
  append content).
- The DKIM-Signature header is prepended and folded to lines of at most 78 characters.

`generate_key` makes a new key and the TXT record value to publish at
{selector}._domainkey.{domain}.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

DEFAULT_HEADERS = ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version",
                   "Content-Type", "List-Unsubscribe", "List-Unsubscribe-Post")
OVERSIGN = ("from", "to", "subject")
MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers may refuse smaller keys

_WSP_RUN = re.compile(rb"[ \t]+")
_BARE_CR = re.compile(rb"\r(?!\n)")
_DOUBLE_SPACE = re.compile(rb"  ")  # literal patterns: sre's fast prefix search
_SPACE_CR = re.compile(rb" \r")
_FWS = re.compile(rb"\r\n([ \t])")
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
_TAG_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*\Z")
_WSP_RUN_S = re.compile(r"[ \t]+")
_BH_MARK = "!" * 44  # stands for a body hash (44 base64 characters) in a cached header;
# "!" is in no tag value (selector and domain are checked, names are header names)


class DkimSigner:
    """One signing identity: selector + domain + private key (PEM, RSA or Ed25519)."""

    def __init__(self, selector: str, domain: str, private_key_pem: bytes | str,
                 headers: Sequence[str] = DEFAULT_HEADERS,
                 body_canonicalization: str = "relaxed") -> None:
        for what, value in (("selector", selector), ("domain", domain)):
            if not _TAG_SAFE.match(value):
                raise ValueError(f"DKIM {what} not valid: {value!r}")
        pem = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
        key = serialization.load_pem_private_key(pem, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < MIN_RSA_BITS:
                raise ValueError(f"RSA key of {key.key_size} bits is too small")
            self.algorithm = "rsa-sha256"
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            self.algorithm = "ed25519-sha256"
        else:
            raise ValueError(f"unsupported DKIM key type {type(key).__name__}")
        if body_canonicalization not in BODY_CANONICALIZATIONS:
            raise ValueError("DKIM body canonicalisation must be one of "
                             f"{sorted(BODY_CANONICALIZATIONS)}, got {body_canonicalization!r}")
        self.body_canonicalization = body_canonicalization
        self._canonical_body = BODY_CANONICALIZATIONS[body_canonicalization]
        self._key = key
        self._rsa = isinstance(key, rsa.RSAPrivateKey)  # checked once: an ABC check per message costs
        self._around: dict[tuple[tuple[str, ...], int], tuple[bytes, bytes, bytes, bytes]] = {}
        self.selector = selector
        self.domain = domain
        self.headers = tuple(h.lower() for h in headers)
        if not self.headers or "from" not in self.headers:
            raise ValueError("DKIM must sign the From header (RFC 6376 5.4)")

    def sign(self, message: bytes, now: int) -> bytes:
        """A CRLF message -> the same message with a DKIM-Signature header first."""
        head, body = _split(message)
        # header bytes as text one byte per character (latin-1): 8-bit headers round-trip
        fields = [raw.decode("latin-1") for _, raw in _header_fields(head)]
        return self.sign_fields(fields, body, now) + message

    def sign_fields(self, fields: Sequence[str], body: bytes, now: int) -> bytes:
        """A message as (header fields as written, each without its CRLF, folds as CRLF +
        white space, ASCII; the body after the empty line, CRLF line ends) -> its
        DKIM-Signature field with its CRLF, to put before the fields.

        The input is trusted to be what connectd.core.mime.build_parts makes, or what
        `sign` parsed and checked: it is not checked for bare CR or LF (a bare one would
        only make the signature fail). Characters above ASCII stand for the bytes of the
        same value (latin-1)."""
        by_name: dict[str, list[str]] = {}  # lower-case name -> values (after the colon)
        for field in fields:
            name, _, value = field.partition(":")
            got = by_name.get(name)  # as written: the usual case, one lookup
            if got is None:
                key = name.rstrip(" \t").lower()
                got = by_name.setdefault(key, [])
                if key != name:
                    by_name[name] = got
            got.append(value)
        names: list[str] = []
        signed: list[str] = []
        oversign = OVERSIGN
        for name in self.headers:
            got = by_name.get(name)
            if got:
                for value in reversed(got):  # bottom-up: RFC 6376 5.4.2
                    names.append(name)
                    signed.append(_canonical_field(name, value))
            if name in oversign:
                names.append(name)
        bh = base64.b64encode(hashlib.sha256(self._canonical_body(body)).digest())
        # The header around bh= is the same for every message of this second with these
        # fields: folded (and canonicalised) once, then bh= goes in between.
        key = (tuple(names), now)
        around = self._around.get(key)
        if around is None:
            if len(self._around) > 64:
                self._around.clear()
            around = self._around[key] = self._prefix_around(names, now)
        before, after, canon_before, canon_after = around
        sig = self._sign_data("".join(signed).encode("latin-1") + canon_before + bh + canon_after)
        return (before + bh + after + _fold_base64(base64.b64encode(sig).decode("ascii"))
                + b"\r\n")

    def _prefix_around(self, names: list[str], now: int) -> tuple[bytes, bytes, bytes, bytes]:
        """The DKIM-Signature header up to "b=" as the pieces before and after the body
        hash, as written and canonicalised. A hash is 44 base64 characters without white
        space, so its place in the folding and in the canonical form does not depend on it."""
        prefix = _signature_prefix(self._tags(names, _BH_MARK, now))
        before, after = prefix.split(_BH_MARK.encode("ascii"))
        canon_before, canon_after = canonical_header(prefix).split(_BH_MARK.encode("ascii"))
        return before, after, canon_before, canon_after

    def _tags(self, names: list[str], bh: str, now: int) -> list[str]:
        return ["v=1", f"a={self.algorithm}", f"c=relaxed/{self.body_canonicalization}",
                f"d={self.domain}",
                f"s={self.selector}", f"t={int(now)}", "h=" + ":".join(names), f"bh={bh}"]

    def _sign_data(self, data: bytes) -> bytes:
        if self._rsa:
            return self._key.sign(data, _PKCS1V15, _SHA256)
        return self._key.sign(hashlib.sha256(data).digest())  # RFC 8463 3: sign the digest


# ---------------------------------------------------------------------------------------------
# Canonicalisation (relaxed)

def _split(message: bytes) -> tuple[bytes, bytes]:
    """A CRLF message -> (header section with its final CRLF, body); ValueError for a bare
    CR or LF anywhere."""
    at = message.find(b"\r\n\r\n")
    if at < 0:
        head, body = message, b""
        if not message.endswith(b"\r\n"):
            _check_crlf(message)
            raise ValueError("message has no header section")
    else:
        head, body = message[:at + 2], message[at + 4:]
    _check_crlf(head)
    _check_crlf(body)
    return head, body


def _check_crlf(data: bytes) -> None:
    # Every CR followed by LF (a search for the rare CR), and as many LFs as CRs: no bare
    # LF. Cheaper than counting the two-byte CRLF (~1 ns a byte, a third of the signing cost
    # of a 16 KB message without the RSA step).
    if (b"\r" in data and _BARE_CR.search(data)) or data.count(b"\r") != data.count(b"\n"):
        raise ValueError("DKIM signing needs CRLF line endings throughout")


def _header_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """Header section -> [(name, whole field as on the wire without the final CRLF)]."""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise ValueError("message starts with a continuation line")
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\r\n" + line)
            continue
        colon = line.find(b":")
        if colon <= 0:
            raise ValueError(f"not a header line: {line[:40]!r}")
        fields.append((line[:colon], line))
    return fields


def canonical_header(field: bytes) -> bytes:
    """One header field (folded or not, no final CRLF) -> relaxed form "name:value"."""
    name, _, value = field.partition(b":")
    if b"\n" in value or b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", _FWS.sub(rb"\1", value))
    return name.strip(b" \t").lower() + b":" + value.strip(b" ")


def _canonical_field(name: str, value: str) -> str:
    """`canonical_header` for a field as text, from its lower-cased name and its value (all
    after the colon), with CRLF."""
    if "\r" in value:
        value = value.replace("\r\n", "")  # a fold is CRLF + WSP: unfolding keeps the WSP
    if "\t" in value or "  " in value:
        value = _WSP_RUN_S.sub(" ", value)
    return name + ":" + value.strip(" ") + "\r\n"


def simple_body(body: bytes) -> bytes:
    """Body (CRLF) -> simple form (RFC 6376 3.4.3): no trailing empty lines, ending in one
    CRLF; an empty body is one CRLF."""
    if body.endswith(b"\r\n") and not body.endswith(b"\r\n\r\n"):
        return body  # the usual case: hashed as it is, no copy
    return body.rstrip(b"\r\n") + b"\r\n"


def canonical_body(body: bytes) -> bytes:
    """Body (CRLF) -> relaxed form: WSP runs as one space, none at line ends, no trailing
    empty lines; an empty body stays empty (RFC 6376 errata 3192)."""
    # Our own MIME output usually has no tab, no double space and no space before a line
    # end: three searches are then all it costs (~22 us for 16 KB; sre's literal search
    # beats bytes' own for these two-byte patterns). Otherwise bytes methods, not a regular
    # expression substitution over the whole body (~30x slower).
    if (b"\t" not in body and not body.endswith(b" ") and not _DOUBLE_SPACE.search(body)
            and not _SPACE_CR.search(body)):
        body = body.rstrip(b"\r\n")
        return body + b"\r\n" if body else b""
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    while b"  " in body:  # each pass halves every run of spaces
        body = body.replace(b"  ", b" ")
    if b" \r" in body:
        body = body.replace(b" \r\n", b"\r\n")
    body = body.rstrip(b"\r\n")
    if body.endswith(b" "):  # a last line without CRLF, of spaces only maybe
        body = body.rstrip(b" ").rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


BODY_CANONICALIZATIONS = {"relaxed": canonical_body, "simple": simple_body}


# ---------------------------------------------------------------------------------------------
# The header itself

def _signature_prefix(tags: list[str]) -> bytes:
    """Tags -> "DKIM-Signature: ...; b=" folded at tag boundaries (and inside h=, bh=)."""
    lines: list[str] = []
    line = "DKIM-Signature:"
    for tag in [*tags, "b="]:
        piece = tag + (";" if tag != "b=" else "")
        if len(line) + 1 + len(piece) > 78 and line.strip():
            if tag.startswith("h="):
                lines.append(line)
                line = " " + _fold_list(piece, lines)
                continue
            lines.append(line)
            line = ""
        line = f"{line} {piece}"
    lines.append(line)
    return "\r\n".join(lines).encode("ascii")


def _fold_list(piece: str, lines: list[str]) -> str:
    """A long h= tag -> the last line; earlier full lines are appended to `lines`."""
    line = ""
    for i, part in enumerate(piece.split(":")):
        part = part if i == 0 else ":" + part
        if line and len(line) + len(part) > 76:
            lines.append(" " + line)
            line = ""
        line += part
    return line


def _fold_base64(text: str) -> bytes:
    # 'b=' was written at the end of the prefix's last line; continue on new lines of 72.
    chunks = [text[i:i + 72] for i in range(0, len(text), 72)]
    return ("\r\n " + "\r\n ".join(chunks)).encode("ascii") if chunks else b""


# ---------------------------------------------------------------------------------------------
# Keys

def generate_key(kind: str = "rsa") -> tuple[bytes, str]:
    """A new key -> (private key PEM, TXT record value for {selector}._domainkey.{domain})."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"key kind must be 'rsa' or 'ed25519', got {kind!r}")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, dns_record(key)


def dns_record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """A private key -> the DKIM TXT record value publishing its public half."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
