"""E-mail addresses found in free text: extraction and normalisation (lower case)."""

from __future__ import annotations

import re

# A pragmatic address: dot-atom local part (or quoted), a domain with at least one dot.
ADDRESS = re.compile(
    r"(?<![\w.+=/-])([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})(?![\w-]*@)\.?",
    re.ASCII)
_ANGLE = re.compile(r"<([^<>\s]+@[^<>\s]+)>")
_ONE = re.compile(r"[^@\s<>\"'()\[\],;:]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,24}", re.ASCII)


def clean_address(value: str) -> str | None:
    """"<Foo@Example.COM>", "rfc822;foo@example.com", '"x" <foo@ex.com>' -> "foo@example.com"."""
    if not value:
        return None
    value = value.strip()
    m = _ANGLE.search(value)
    if m:
        value = m.group(1)
    m = _ONE.search(value)
    if m is None:
        return None
    addr = m.group(0).strip(".").lower()
    if addr.startswith("mailto:"):
        addr = addr[7:]
    return addr


def find_addresses(text: str) -> list[str]:
    """Every address in `text`, lower case, in order of first appearance, no duplicates."""
    seen: dict[str, None] = {}
    for m in ADDRESS.finditer(text):
        addr = m.group(1).lower()
        if addr.startswith("mailto:"):
            addr = addr[7:]
        seen.setdefault(addr, None)
    return list(seen)
