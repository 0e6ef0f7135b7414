"""Provider notifications sent as JSON mail bodies (Amazon SES through SNS, and the like).

Input: the notification text of a message. Output: a `JsonNotice` (kind "bounce" /
"feedback" / "delivered", and per recipient: address, status, diagnostic, permanent) or None
when the body is not such a notification. SES wraps its event in an SNS envelope whose
"Message" field is itself JSON text; both layers are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from connectd.core.classify.addresses import clean_address

MAX_JSON = 200_000


@dataclass
class JsonNotice:
    kind: str
    recipients: list[tuple[str, str | None, str, bool | None]] = field(default_factory=list)
    feedback_type: str | None = None


def _load(text: str) -> Any:
    start = text.find("{")
    end = text.rfind("}")
    if start < 0 or end <= start or end - start > MAX_JSON:
        return None
    body = text[start:end + 1]
    # some gateways wrap long lines (a newline, maybe a space, inside a JSON string)
    for attempt in (body, body.replace("\r\n", "\n").replace("\n ", "").replace("\n", "")):
        try:
            return json.loads(attempt, strict=False)
        except ValueError:
            continue
    return None


def notice(text: str) -> JsonNotice | None:
    """The SES-style event in a JSON body, else None."""
    if "notificationType" not in text and "eventType" not in text:
        return None
    data = _load(text)
    if isinstance(data, dict) and isinstance(data.get("Message"), str):
        data = _load(data["Message"])  # the SNS envelope
    if not isinstance(data, dict):
        return None
    etype = str(data.get("notificationType") or data.get("eventType") or "").lower()
    if etype == "bounce":
        bounce = data.get("bounce") or {}
        permanent = {"permanent": True, "transient": False}.get(
            str(bounce.get("bounceType", "")).lower())
        out = JsonNotice("bounce")
        for r in bounce.get("bouncedRecipients") or []:
            if not isinstance(r, dict):
                continue
            addr = clean_address(str(r.get("emailAddress", "")))
            if addr:
                out.recipients.append((addr, r.get("status"), str(r.get("diagnosticCode") or ""),
                                       permanent))
        return out
    if etype == "complaint":
        complaint = data.get("complaint") or {}
        out = JsonNotice("feedback", feedback_type=str(
            complaint.get("complaintFeedbackType") or "abuse").lower())
        for r in complaint.get("complainedRecipients") or []:
            addr = clean_address(str(r.get("emailAddress", ""))) if isinstance(r, dict) else None
            if addr:
                out.recipients.append((addr, None, "", None))
        return out
    if etype == "delivery":
        return JsonNotice("delivered")
    return None
