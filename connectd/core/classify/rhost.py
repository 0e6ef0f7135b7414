"""What a few large receiving mail services mean by their own refusal texts.

Inputs: the host names around one failed recipient (the remote MTA that answered, the
recipient's domain, the reporting MTA) and that recipient's diagnostic text. Output: a reason
in sisimai's vocabulary, or None when no known service answered or its text is not one of the
codes it documents.

Some services answer in words that mean something else than the words say: au (KDDI)'s
filter says "550 : User unknown" (no address) where a real unknown mailbox gets
"550 <addr>: User unknown"; Yahoo refuses an unknown account after DATA; Orange and La Poste
carry the reason in a numbered code ("LPN007_416"); Facebook in a label ("RCP-P1"). These are
the services' published response codes (their postmaster pages), keyed on the host that
answered, never on the recipient's local part.
"""

from __future__ import annotations

import re

# (service, host-name suffixes that identify it)
_HOSTS: list[tuple[str, tuple[str, ...]]] = [
    ("kddi", ("ezweb.ne.jp", "au.com")),
    ("docomo", ("docomo.ne.jp",)),
    ("yahoo", ("yahoodns.net",)),
    ("messagelabs", ("messagelabs.com",)),
    ("orange", ("laposte.net", "orange.fr", "wanadoo.fr")),
    ("hotmail", ("hotmail.com",)),
    ("facebook", ("facebook.com",)),
    ("tencent", ("qq.com",)),
]

# Phrases per service, lower case, tried in order; the first that appears decides.
_PHRASES: dict[str, list[tuple[str, re.Pattern[str]]]] = {
    "kddi": [
        ("filtered", re.compile(r"550 : user unknown")),  # the filter: no address echoed
        ("userunknown", re.compile(r">: user unknown")),
    ],
    "docomo": [
        ("mailboxfull", re.compile(r"552 too much mail data")),
        ("toomanyconn", re.compile(r"552 too many recipients")),
        ("syntaxerror", re.compile(r"503 bad sequence of commands|504 command parameter")),
    ],
    "yahoo": [
        ("userunknown", re.compile(r"this user doesn't have a |mailbox not found")),
        ("suspend", re.compile(r" is no longer valid|this mailbox is disabled")),
        ("authfailure", re.compile(r"authenticate with either spf or dkim")),
        ("blocked", re.compile(r"spamhaus")),
        ("norelaying", re.compile(r"relaying denied for ")),
        ("notcompliantrfc", re.compile(r"headers are not rfc compliant")),
        ("policyviolation", re.compile(r"not accepted for policy reasons")),
        ("rejected", re.compile(r"unexpected volume or user complaints|will be permanently "
                                r"deferred|unresolvable rfc\.?5321")),
        ("speeding", re.compile(r"receiving mail too quickly")),
        ("toomanyconn", re.compile(r"max message per connection")),
    ],
    "messagelabs": [
        ("userunknown", re.compile(r"no such user|invalid recipient|mailbox is not allowed")),
        ("authfailure", re.compile(r"domain authentication fail")),
        ("badreputation", re.compile(r"connection rejected by policy")),
        ("rejected", re.compile(r"sender envelope domain not allowed|your (?:domain|email "
                                r"address) has been (?:blocked|blacklisted)|badmailfrom")),
        ("blocked", re.compile(r"your ip is in the pbl|your ip address (?:\(.*?\) )?has been")),
        ("notcompliantrfc", re.compile(r"not rfc 5322|requested action aborted \[4\]")),
        ("contenterror", re.compile(r"stray linefeeds")),
        ("norelaying", re.compile(r" as a relay, ")),
        ("spamdetected", re.compile(r"message filtered|filtered by outbound scanning")),
        ("toomanyconn", re.compile(r"too many recipients received this hour|too many messages")),
        ("securityerror", re.compile(r"turn on smtp authentication")),
    ],
    "hotmail": [
        ("userunknown", re.compile(r"requested action not taken: mailbox unavailable")),
        ("hostunknown", re.compile(r"the domain is not reachable")),
    ],
    "tencent": [
        ("authfailure", re.compile(r"(?:spf|dmarc) check failed")),
        ("blocked", re.compile(r"suspected bounce attacks|suspected spam ip|connection denied")),
        ("toomanyconn", re.compile(r"(?:ip|domain|sender|connection) frequency limited")),
        ("mesgtoobig", re.compile(r"message too large")),
        ("rejected", re.compile(r"suspected spam|mail is rejected by recipients")),
        ("spamdetected", re.compile(r"spam is embedded|mail content denied")),
        ("speeding", re.compile(r"access denined|frequency of receiving messages is limited")),
        ("suspend", re.compile(r"is a deactivated mailbox")),
        ("syntaxerror", re.compile(r"bad address syntax")),
        ("userunknown", re.compile(r"mailbox not found")),
    ],
}

# Orange / La Poste put a numbered code after LPN / OFR / OUK ("LPN007_416", "OFR_417").
_ORANGE_CODE = re.compile(r"\b(?:lpn|ofr|ouk)(?:[a-z]*\d*[_-])?(\d{3})\b")
_ORANGE: dict[str, str] = {
    "101": "blocked", "102": "blocked", "103": "blocked", "104": "toomanyconn",
    "305": "securityerror", "401": "authfailure", "402": "securityerror", "403": "rejected",
    "405": "rejected", "415": "rejected", "416": "userunknown", "417": "mailboxfull",
    "420": "suspend", "421": "rejected", "426": "suspend", "505": "systemerror",
    "506": "spamdetected", "510": "blocked", "514": "mesgtoobig", "517": "authfailure",
    "630": "policyviolation", "999": "blocked",
}
# Facebook's response labels (postmaster.facebook.com/response_codes).
_FACEBOOK_CODE = re.compile(r"\b([A-Z]{3}-[PT]\d)\b")
_FACEBOOK: dict[str, str] = {
    "RCP-P1": "userunknown", "INT-P1": "userunknown", "INT-P3": "userunknown",
    "INT-P4": "userunknown", "RCP-P2": "filtered", "RCP-P3": "filtered", "RCP-T4": "suspend",
    "RCP-T1": "systemerror", "POL-P1": "blocked", "POL-P2": "blocked", "POL-P3": "blocked",
    "POL-P4": "blocked", "POL-T1": "blocked", "POL-T2": "blocked", "POL-T3": "blocked",
    "POL-P5": "virusdetected", "POL-P6": "spamdetected", "POL-P7": "authfailure",
    "MSG-P1": "mesgtoobig", "INT-P2": "mesgtoobig", "MSG-P2": "contenterror",
    "MSG-P3": "notcompliantrfc", "DNS-P1": "rejected", "DNS-P2": "rejected",
    "DNS-T1": "rejected", "DNS-P3": "requireptr", "DNS-T2": "requireptr",
    "CON-T1": "toomanyconn", "CON-T2": "toomanyconn", "CON-T3": "toomanyconn",
    "CON-T4": "toomanyconn", "MSG-T1": "toomanyconn",
}


def service(hosts: tuple[str, ...]) -> str | None:
    """The known service among `hosts` (remote MTA first, then recipient domain, then the
    reporting MTA), else None."""
    for host in hosts:
        host = host.lower().strip(". ")
        if not host:
            continue
        for name, suffixes in _HOSTS:
            for suffix in suffixes:
                if host == suffix or host.endswith("." + suffix):
                    return name
    return None


def reason(hosts: tuple[str, ...], text: str, status: str | None, stage: str | None
           ) -> str | None:
    """The reason the answering service means by `text`, or None."""
    name = service(hosts)
    if name is None or not text:
        return None
    low = text.lower()
    if name == "orange":
        codes = _ORANGE_CODE.findall(low)
        return _ORANGE.get(codes[-1]) if codes else None
    if name == "facebook":
        m = _FACEBOOK_CODE.search(text)
        return _FACEBOOK.get(m.group(1)) if m else None
    if name == "docomo":
        sub = (status or "").partition(".")[2]
        if sub == "2.0":
            return "filtered"  # docomo's reception filter, refused after DATA
        if "unknown user" in low and stage == "data":
            return "rejected"  # refused after DATA for the sender (domain-specific rejection)
        if "unknown user" in low and stage == "rcpt":
            return "userunknown"
    for reason_name, rx in _PHRASES.get(name, ()):
        if rx.search(low):
            return reason_name
    return None


_HOST_SAID = re.compile(r"(?:\bhost:?|while talking to|remote host|\bserver)\s+\[?"
                        r"([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24})\b", re.I)


def hosts_in(text: str) -> list[str]:
    """Host names a text bounce names as the one that answered ("host mx.x.org[1.2.3.4] said",
    "... while talking to mx.x.org.:")."""
    return [m.group(1) for m in _HOST_SAID.finditer(text[:20000])]
