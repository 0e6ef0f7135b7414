"""Which message instance and customer a reply or bounce is about.

Inputs: the envelope recipients, the top-level headers and the attached original's headers,
the VERP keys (connectd.secrets, newest first) and the reply domains. Output: a `Context`
(instance, customer, via, verp_kind).

Signed VERP local parts the composer writes: `b-<token>@<reply domain>` (the return path)
and `unsubscribe-<token>@<reply domain>` (the List-Unsubscribe mailto); a `confirm-<token>`
local part is read the same way for double opt-in confirmations. A token that verifies is
trustworthy ("verp"); a Message-ID of ours quoted in In-Reply-To/References or in the returned
original is not signed ("message-id"), so callers may treat it with less trust.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from connectd.core import mime, tokens

_LOCAL = re.compile(r"^(b|unsubscribe|confirm)[-+=]([a-z2-7]{8,200})$", re.I)
_MSGID = re.compile(r"<[^<>\s]{1,300}>")
VERP_KINDS = {"b": "b", "unsubscribe": "unsubscribe", "confirm": "confirm"}


@dataclass(frozen=True)
class Context:
    instance: int | None = None
    customer: int | None = None
    via: str | None = None
    verp_kind: str | None = None


def from_verp(addresses: Iterable[str], verp_keys: Sequence[str | bytes],
              reply_domains: Sequence[str]) -> Context | None:
    """The first address whose local part is a signed VERP token of ours -> Context."""
    if not verp_keys:
        return None
    domains = {d.lower().rstrip(".") for d in reply_domains if d}
    for addr in addresses:
        addr = (addr or "").strip().strip("<>").lower()
        local, at, domain = addr.rpartition("@")
        if not at or (domains and domain not in domains):
            continue
        m = _LOCAL.match(local)
        if m is None:
            continue
        try:
            instance, customer = tokens.verify_verp(list(verp_keys), m.group(2))
        except (tokens.BadToken, ValueError):
            continue
        return Context(instance, customer, "verp", VERP_KINDS[m.group(1).lower()])
    return None


def from_message_ids(values: Iterable[str]) -> Context | None:
    """The first Message-ID made by connectd.core.mime.message_id_for -> Context (unsigned)."""
    for value in values:
        for mid in _MSGID.findall(value or ""):
            parsed = mime.parse_message_id(mid)
            if parsed is not None:
                return Context(parsed[0], parsed[1], "message-id", None)
    return None
