"""Abuse Reporting Format (RFC 5965) feedback reports.

Input: the message/feedback-report fields (or None), the top-level headers and the attached
original. Output: (feedback type, the complaining recipients) or None when not a report.
"""

from __future__ import annotations

import re

from connectd.core.classify.addresses import clean_address, find_addresses
from connectd.core.classify.parse import Parsed

_TYPE = re.compile(r"^Feedback-Type[ \t]*:[ \t]*([A-Za-z0-9_-]+)", re.I | re.M)
_FIELD = re.compile(r"^(Original-Rcpt-To|Removal-Recipient|Original-Recipient)[ \t]*:[ \t]*(.+)$",
                    re.I | re.M)


def feedback(parsed: Parsed) -> tuple[str, list[str]] | None:
    """The feedback type and complaining addresses of an ARF report, else None."""
    text = parsed.feedback
    hotmail = _hotmail(parsed)
    if hotmail is not None:
        return hotmail
    apple = _APPLE.search(parsed.notification[:2000])
    if apple is not None:
        return "opt-out", []
    if text is None:
        # a report whose feedback part is mislabelled or inline (some providers)
        if parsed.report_type == "feedback-report" or _TYPE.search(parsed.notification[:20000]):
            text = parsed.notification
        else:
            return None
    m = _TYPE.search(text)
    if m is None and parsed.report_type != "feedback-report":
        return None
    ftype = m.group(1).lower() if m else "abuse"
    rcpts: list[str] = []
    for fm in _FIELD.finditer(text):
        addr = clean_address(fm.group(2))
        if addr and addr not in rcpts:
            rcpts.append(addr)
    if not rcpts and parsed.original is not None:
        try:
            to = parsed.original.get_all("To") or []
        except Exception:
            to = []
        for value in to:
            for addr in find_addresses(str(value)):
                if addr not in rcpts:
                    rcpts.append(addr)
    return ftype, rcpts


# Apple Mail's one-click unsubscribe: a mail the client sends on the user's behalf
_APPLE = re.compile(r"Apple Mail sent this email to unsubscribe", re.I)


def _hotmail(parsed: Parsed) -> tuple[str, list[str]] | None:
    """Microsoft's JMRP complaints: the original attached, its recipient in a header of its own."""
    orig = parsed.original
    if orig is None:
        return None
    try:
        value = orig.get("X-HmXmrOriginalRecipient")
    except Exception:
        value = None
    if not value:
        return None
    addr = clean_address(str(value))
    return "abuse", [addr] if addr else []
