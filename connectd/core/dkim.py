"""DKIM signing (RFC 6376), pure: (message bytes, key, selector, domain, now) -> signed bytes.

No I/O. The composer holds one DkimSigner per sender domain and calls `sign` per message.

- Canonicalisation relaxed/relaxed (RFC 6376 3.4.2 and 3.4.4) is implemented here; the
  signature itself is OpenSSL's through `cryptography`: rsa-sha256 (RSA-2048 recommended,
  at least 1024 bits accepted, RFC 8301) or ed25519-sha256 (RFC 8463: Ed25519 over the
  SHA-256 digest of the signed data). dkimpy would take ~7 ms per message (pure-Python RSA).
- Input must use CRLF line endings (what connectd.core.mime produces and what goes on the
  wire); a bare LF or CR raises ValueError rather than signing bytes an MTA would then
  rewrite, which would break the signature.
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
_WSP_EOL = re.compile(rb" \r\n")
_FWS = re.compile(rb"\r\n([ \t])")
_TAG_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*\Z")


class DkimSigner:
    """One signing identity: selector + domain + private key (PEM, RSA or Ed25519)."""

    def __init__(self, selector: str, domain: str, private_key_pem: bytes | str,
                 headers: Sequence[str] = DEFAULT_HEADERS) -> None:
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
        self._key = key
        self.selector = selector
        self.domain = domain
        self.headers = tuple(h.lower() for h in headers)
        if not self.headers or "from" not in self.headers:
            raise ValueError("DKIM must sign the From header (RFC 6376 5.4)")

    def sign(self, message: bytes, now: int) -> bytes:
        """A CRLF message -> the same message with a DKIM-Signature header first."""
        head, body = _split(message)
        fields = _header_fields(head)
        names, signed = self._select(fields)
        bh = base64.b64encode(hashlib.sha256(canonical_body(body)).digest()).decode("ascii")
        prefix = _signature_prefix(self._tags(names, bh, now))
        data = b"".join(signed) + canonical_header(prefix)
        sig = self._sign_data(data)
        return prefix + _fold_base64(base64.b64encode(sig).decode("ascii")) + b"\r\n" + message

    def _select(self, fields: list[tuple[bytes, bytes]]) -> tuple[list[str], list[bytes]]:
        by_name: dict[str, list[bytes]] = {}
        for raw_name, raw in fields:
            by_name.setdefault(raw_name.decode("ascii", "replace").strip().lower(), []).append(raw)
        names, signed = [], []
        for name in self.headers:
            for raw in reversed(by_name.get(name, ())):  # bottom-up: RFC 6376 5.4.2
                names.append(name)
                signed.append(canonical_header(raw) + b"\r\n")
            if name in OVERSIGN:
                names.append(name)  # matches no instance: hashes nothing, blocks additions
        return names, signed

    def _tags(self, names: list[str], bh: str, now: int) -> list[str]:
        return ["v=1", f"a={self.algorithm}", "c=relaxed/relaxed", f"d={self.domain}",
                f"s={self.selector}", f"t={int(now)}", "h=" + ":".join(names), f"bh={bh}"]

    def _sign_data(self, data: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return self._key.sign(hashlib.sha256(data).digest())  # RFC 8463 3: sign the digest


# ---------------------------------------------------------------------------------------------
# Canonicalisation (relaxed)

def _split(message: bytes) -> tuple[bytes, bytes]:
    if message.count(b"\n") != message.count(b"\r\n") or message.count(b"\r") != message.count(
            b"\r\n"):
        raise ValueError("DKIM signing needs CRLF line endings throughout")
    at = message.find(b"\r\n\r\n")
    if at < 0:
        if not message.endswith(b"\r\n"):
            raise ValueError("message has no header section")
        return message, b""
    return message[:at + 2], message[at + 4:]


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
    value = _WSP_RUN.sub(b" ", _FWS.sub(rb"\1", value)).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value


def canonical_body(body: bytes) -> bytes:
    """Body (CRLF) -> relaxed form: WSP runs as one space, none at line ends, no trailing
    empty lines; an empty body stays empty (RFC 6376 errata 3192)."""
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    if b" \r\n" in body:
        body = _WSP_EOL.sub(b"\r\n", body)
    body = body.rstrip(b"\r\n")
    if body.endswith(b" "):  # a last line without CRLF
        body = body.rstrip(b" ")
    return body + b"\r\n" if body else b""


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
