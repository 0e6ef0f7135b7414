"""RFC 3464 delivery status notifications: the fields of a message/delivery-status body.

Input: the text of a delivery-status part (or any text that carries DSN fields inline, as
mislabelled reports and text bounces from Exchange and others do). Output: one `DsnRecipient`
per per-recipient block with its address, action, status, diagnostic and remote MTA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from connectd.core.classify.addresses import clean_address

_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]{1,40})[ \t]*:[ \t]*(.*)$")
_KIND = re.compile(r"[A-Za-z0-9-]{1,20}")
_BLOCKS = re.compile(r"\n[ \t]*\n")
_FINAL = re.compile(r"^[ \t]*Final-Recipient[ \t]*:", re.M | re.I)
_STATUS = re.compile(r"\d\.\d{1,3}\.\d{1,3}")
_INLINE = re.compile(r"^[ \t]*(?:Final|Original)-Recipient[ \t]*:", re.I | re.M)


@dataclass
class DsnRecipient:
    address: str
    original: str | None
    action: str
    status: str | None
    diagnostic: str
    remote_mta: str
    reporting_mta: str = ""


def _fields(block: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    last = None
    for line in block.splitlines():
        if line[:1] in (" ", "\t") and last is not None:
            fields[last] += " " + line.strip()
            continue
        m = _FIELD.match(line.strip())
        if m is None:
            last = None
            continue
        last = m.group(1).lower()
        if last in fields:  # a repeated field: keep the first, as RFC 3464 allows only one
            last = None
            continue
        fields[last] = m.group(2).strip()
    return fields


def _typed_value(value: str) -> str:
    """"rfc822; <a@b>" -> "a@b"; "smtp; 550 5.1.1 ..." -> "550 5.1.1 ..."."""
    kind, sep, rest = value.partition(";")
    if sep and _KIND.fullmatch(kind.strip()):
        return rest.strip()
    return value.strip()


def _host(value: str) -> str:
    """"dns; mx.example.jp (TCP|...)" -> "mx.example.jp"."""
    words = _typed_value(value).split()
    return words[0].strip("[]().").lower() if words else ""


def _split_recipients(block: str) -> list[str]:
    """A block with several Final-Recipient fields and no blank line between them (some MTAs
    write that) -> one block per recipient. The lines before the second one stay with the
    first: some MTAs put Status and Diagnostic-Code before their Final-Recipient."""
    starts = [m.start() for m in _FINAL.finditer(block)]
    if len(starts) < 2:
        return [block]
    cuts = [0] + starts[1:] + [len(block)]
    return [block[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def parse_status_text(text: str) -> list[DsnRecipient]:
    """A delivery-status body -> its per-recipient blocks (those with a recipient address)."""
    out: list[DsnRecipient] = []
    text = text.replace("\r\n", "\n")[:200_000]
    # blocks are separated by blank lines; a recipient field starts a new block even without one
    blocks = []
    for block in _BLOCKS.split(text):
        blocks.extend(_split_recipients(block))
    pending_original: str | None = None
    reporting = ""
    for block in blocks:
        if not block or not block.strip():
            continue
        f = _fields(block)
        reporting = _host(f.get("reporting-mta", "")) or reporting
        final = f.get("final-recipient") or f.get("x-actual-recipient")
        original = f.get("original-recipient")
        if not final and original and not f.get("action"):
            pending_original = original  # Original-Recipient written in a block of its own
            continue
        addr = clean_address(_typed_value(final or "")) or clean_address(
            _typed_value(original or ""))  # an X.400 Final-Recipient has no address
        if not addr:
            continue
        orig = clean_address(_typed_value(original)) if original else None
        if orig is None and pending_original:
            orig = clean_address(_typed_value(pending_original))
        pending_original = None
        if orig and orig != addr:
            # the address as the sender wrote it (before aliases/forwarding rewrote it): that
            # is the one on our list; the final one stays in `original` for diagnostics
            addr, orig = orig, addr
        status_m = _STATUS.search(f.get("status", ""))
        out.append(DsnRecipient(
            address=addr, original=orig,
            action=f.get("action", "").lower().split(" ")[0].strip("();"),
            status=status_m.group(0) if status_m else None,
            diagnostic=_typed_value(f.get("diagnostic-code", "")),
            remote_mta=_host(f.get("remote-mta", "")), reporting_mta=reporting))
    return out


def find_inline(text: str) -> list[DsnRecipient]:
    """DSN fields pasted into a text part (mislabelled reports): parse from the first one."""
    m = _INLINE.search(text)
    if m is None:
        return []
    start = text.rfind("\n\n", 0, m.start())
    return parse_status_text(text[start + 1 if start >= 0 else 0:])
