"""Signed tokens, pure: (key, non-negative int fields, kind) -> a short URL-safe string, and back.

No I/O. The composer signs, the tracker and the processor verify; they share only the keys
(connectd.secrets, newest first).

Wire format (version 1), before encoding:

    version byte (0x01) | fields as unsigned LEB128 varints | MAC (12 bytes)

    MAC = HMAC-SHA256(key, version | len(kind) | kind | varints)[:12]

Web tokens (`sign_token`) are base64url without padding: a click token for instance 123456,
customer 12345678, link 9 is 28 characters. VERP tokens (`sign_verp`) are lower-case base32
without padding, so they survive mail systems that change the case of local parts, and use only
characters that are valid in an unquoted e-mail local part ([a-z2-7]).

`kind` separates domains: "c" click, "o" open, "u" unsubscribe, "v" VERP, "s" subscription
confirmation (`sign_confirm`: the Reply-To of a double opt-in mail). It is inside the MAC,
not on the wire, so a click token verified as an unsubscribe token fails like a forgery would.

Only one encoding of a given token verifies: varints must be minimal, base64/base32 must be
canonical (no stray trailing bits), so tokens can be used as identifiers and tampering with any
character is detected. Every problem with a token (garbage, truncated, over-long, tampered, wrong
kind or key) raises BadToken and nothing else; caller mistakes (no keys, an invalid kind) raise
ValueError.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Any

VERSION = 1
MAC_LEN = 12  # 96 bits: forging one needs ~2**96 tries against a tracker that rate-limits far below
MAX_FIELDS = 8
MAX_FIELD = 2**64 - 1  # a varint of at most 10 bytes
_MAX_RAW = 1 + MAX_FIELDS * 10 + MAC_LEN
MAX_TOKEN_LEN = (_MAX_RAW * 8 + 4) // 5  # base32 is the longer encoding; anything longer is junk

KINDS = {"click": "c", "open": "o", "unsubscribe": "u", "verp": "v", "confirm": "s"}
ADDRESS_HASH_BITS = 40  # enough to tell one subscriber's address from another's; short local part
_B64_RE = re.compile(r"[A-Za-z0-9_-]*\Z")
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_IPAD = bytes(x ^ 0x36 for x in range(256))  # RFC 2104 key pads, as translate tables
_OPAD = bytes(x ^ 0x5C for x in range(256))
_BLOCK = 64  # SHA-256 block size
_VERSION_BYTE = bytes((VERSION,))
_B32_RE = re.compile(r"[a-z2-7]*\Z")


class BadToken(ValueError):
    """A token that does not verify; `reason` says why (for logs, never shown to the public)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _as_bytes(key: bytes | str) -> bytes:
    # Keys in the secrets file are text; accept either so callers need not encode each time.
    raw = key.encode() if isinstance(key, str) else key
    if not raw:
        raise ValueError("empty signing key")
    return raw


def _kind_prefix(kind: str) -> bytes:
    raw = kind.encode() if isinstance(kind, str) else b""
    if not raw or len(raw) > 255:
        raise ValueError(f"token kind must be 1-255 bytes, got {kind!r}")
    return bytes((VERSION, len(raw))) + raw


def _pack(fields: Sequence[int]) -> bytes:
    if len(fields) > MAX_FIELDS:
        raise BadToken(f"more than {MAX_FIELDS} fields")
    out = bytearray()
    for value in fields:
        # bool is an int subclass; a True where an id belongs is a bug, not a 1
        if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
            raise BadToken(f"field {value!r} is not an int")
        if value < 0 or value > MAX_FIELD:
            raise BadToken(f"field {value} outside 0..2**64-1")
        while value > 0x7F:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def _unpack(payload: bytes) -> tuple[int, ...]:
    fields: list[int] = []
    value = shift = 0
    start = 0
    for i, byte in enumerate(payload):
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte & 0x80:
            if i - start >= 9:
                raise BadToken("varint longer than 10 bytes")
            continue
        if byte == 0 and i > start:
            raise BadToken("non-minimal varint")
        if value > MAX_FIELD:
            raise BadToken("field larger than 2**64-1")
        fields.append(value)
        value = shift = 0
        start = i + 1
    if start != len(payload):
        raise BadToken("truncated varint")
    if len(fields) > MAX_FIELDS:
        raise BadToken(f"more than {MAX_FIELDS} fields")
    return tuple(fields)


def _mac(key: bytes, prefix: bytes, payload: bytes) -> bytes:
    """The reference MAC (one-shot HMAC); `_keyed_mac` computes the same bytes faster."""
    return hmac.digest(key, prefix + payload, "sha256")[:MAC_LEN]


@functools.lru_cache(maxsize=64)
def _keyed(key: bytes | str, kind: str) -> tuple[Any, Any]:
    """HMAC-SHA256 (RFC 2104) prepared up to the payload: the inner hash with the padded key
    and the kind prefix absorbed, the outer hash with its padded key. Copying these per token
    costs ~0.8 us where a one-shot hmac.digest sets the key up again each time (~2 us, and a
    mail carries 13 tokens)."""
    prefix = _kind_prefix(kind)
    raw = _as_bytes(key)
    if len(raw) > _BLOCK:
        raw = hashlib.sha256(raw).digest()
    raw = raw.ljust(_BLOCK, b"\0")
    inner = hashlib.sha256(raw.translate(_IPAD))
    inner.update(prefix)
    return inner, hashlib.sha256(raw.translate(_OPAD))


def _finish(inner: Any, outer: Any, payload: bytes) -> bytes:
    h = inner.copy()
    h.update(payload)
    out = outer.copy()
    out.update(h.digest())
    return out.digest()[:MAC_LEN]


def _keyed_mac(key: bytes | str, kind: str, payload: bytes) -> bytes:
    return _finish(*_keyed(key, kind), payload)


def _seal(key: bytes | str, fields: Sequence[int], kind: str) -> bytes:
    inner, outer = _keyed(key, kind)  # caller mistakes (kind, key) first, as ValueError
    payload = _pack(fields)
    return _VERSION_BYTE + payload + _finish(inner, outer, payload)


def _open(keys: Sequence[bytes | str], raw: bytes, kind: str) -> tuple[int, ...]:
    _kind_prefix(kind)
    if not keys:
        raise ValueError("no verification keys")
    if len(raw) < 1 + MAC_LEN:
        raise BadToken("too short")
    if raw[0] != VERSION:
        raise BadToken(f"unknown version {raw[0]}")
    payload, mac = raw[1:-MAC_LEN], raw[-MAC_LEN:]
    # Check every key, not the first that matches: the time taken says nothing about which.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(_keyed_mac(key, kind, payload), mac)
    if not ok:
        raise BadToken("bad signature")
    return _unpack(payload)


def sign_token(key: bytes | str, *fields: int, kind: str) -> str:
    """`fields` (non-negative ints) signed with `key` for use as `kind` -> base64url text.

    Raises BadToken for a negative, non-int or too large field, or more than MAX_FIELDS."""
    return _b64url(_seal(key, fields, kind))


def _b64url(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode(
        "ascii")


def sign_tokens(key: bytes | str, head: Sequence[int], tails: Sequence[int],
                kind: str) -> list[str]:
    """[sign_token(key, *head, t, kind=kind) for t in tails]: the same tokens, with `head`
    packed and absorbed into the MAC once (a message's links: head = instance, customer,
    tails = link ids)."""
    if len(head) >= MAX_FIELDS:
        raise BadToken(f"more than {MAX_FIELDS} fields")
    inner, outer = _keyed(key, kind)
    packed = _pack(head)
    started = inner.copy()
    started.update(packed)
    lead = _VERSION_BYTE + packed
    out = []
    for tail in tails:
        last = _pack((tail,))
        h = started.copy()
        h.update(last)
        o = outer.copy()
        o.update(h.digest())
        out.append(_b64url(lead + last + o.digest()[:MAC_LEN]))
    return out


def verify_token(keys: Sequence[bytes | str], token: str, kind: str) -> tuple[int, ...]:
    """A token from `sign_token` with any of `keys` and the same `kind` -> its fields.

    Raises BadToken for anything else."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN:
        raise BadToken("not a token")
    if not _B64_RE.match(token):
        raise BadToken("not base64url")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise BadToken("not base64url") from None
    # Unused trailing bits would let two spellings decode alike; only the canonical one counts.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token:
        raise BadToken("non-canonical base64")
    return _open(keys, raw, kind)


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).rstrip(b"=").decode("ascii").lower()


def _unb32(localpart: str) -> bytes:
    if not isinstance(localpart, str) or len(localpart) > MAX_TOKEN_LEN:
        raise BadToken("not a token")
    text = localpart.lower()
    if not _B32_RE.match(text):
        raise BadToken("not base32")
    try:
        raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise BadToken("not base32") from None
    if _b32(raw) != text:
        raise BadToken("non-canonical base32")
    return raw


def sign_verp(key: bytes | str, instance: int, customer: int) -> str:
    """(instance, customer) signed for a VERP return path -> lower-case base32 local-part text."""
    return _b32(_seal(key, (instance, customer), KINDS["verp"]))


def verify_verp(keys: Sequence[bytes | str], localpart: str) -> tuple[int, int]:
    """A token from `sign_verp` (any letter case) -> (instance, customer); else BadToken.

    `localpart` is the token alone: the caller strips any prefix or suffix it added."""
    fields = _open(keys, _unb32(localpart), KINDS["verp"])
    if len(fields) != 2:
        raise BadToken("not an (instance, customer) pair")
    return fields[0], fields[1]


def address_hash(address: str) -> int:
    """An e-mail address (any case) -> ADDRESS_HASH_BITS bits of its SHA-256: what a
    confirmation token holds instead of the address itself (short, and says nothing)."""
    digest = hashlib.sha256(address.strip().lower().encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - ADDRESS_HASH_BITS)


def sign_confirm(key: bytes | str, address: str, customer: int | None, instance: int | None,
                 conversation: int | None) -> str:
    """A double opt-in request for `address` (customer, instance and conversation ids, None =
    unknown) signed for a `confirm-<token>@<reply domain>` Reply-To -> lower-case base32 text.
    Ids are stored plus one so that 0 can mean None."""
    fields = (address_hash(address), *(0 if v is None else v + 1
                                        for v in (customer, instance, conversation)))
    return _b32(_seal(key, fields, KINDS["confirm"]))


def verify_confirm(keys: Sequence[bytes | str], localpart: str,
                   address: str) -> tuple[int | None, int | None, int | None]:
    """A token from `sign_confirm` whose address is `address` (the confirming reply's sender)
    -> (customer, instance, conversation), None where unknown; else BadToken (also when the
    token was made for another address)."""
    fields = _open(keys, _unb32(localpart), KINDS["confirm"])
    if len(fields) != 4:
        raise BadToken("not a confirmation token")
    if fields[0] != address_hash(address):
        raise BadToken("made for another address")
    customer, instance, conversation = (None if v == 0 else v - 1 for v in fields[1:])
    return customer, instance, conversation
