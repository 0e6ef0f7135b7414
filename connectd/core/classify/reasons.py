"""Bounce reasons in sisimai's vocabulary, from diagnostic text, DSN status and SMTP reply code.

Inputs: the diagnostic text of one recipient (Diagnostic-Code, the lines an MTA wrote next to
the address), its RFC 3463 status ("5.1.1") and SMTP reply code ("550"), when known.
Output: (reason, hard). `hard` has sisimai's meaning: the address itself is bad (userunknown,
hostunknown, hasmoved, and notaccept with a permanent 5xx code); everything else (full mailbox,
spam blocks, policy, expired, ...) is soft: the address may work next time.

Text is tried first because status codes are often generic (5.0.0, 5.7.1 for a dozen causes,
5.1.1 for a spam block at some providers); the status code is the fallback, then the reply code.
The phrase lists are the knowledge here: what mail servers actually write.
"""

from __future__ import annotations

import functools
import re

from connectd.core.classify import rhost

HARD_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved"})

# Ordered: the first matching reason wins, so the specific ones come before the broad ones
# (a "blocked" spam listing also says "rejected"; "user unknown" beats "550 rejected").
_PHRASES: list[tuple[str, str]] = [
    ("rejected", r"not have permission to post|sender address rejected|domain of sender address|sender (?:domain|address)"
                 r" (?:does not exist|must (?:exist|resolve)|is invalid|not found|unknown)"
                 r"|sender verify failed|sender verification failed|unverifiable sender"
                 r"|envelope sender|invalid sender|bad sender|sender .{0,40}rejected"),
    ("notaccept", r"does not accept (?:any )?mail|not accepting (?:any )?mail|null mx"
                  r"|accepts no mail|no mail service|no mx found|couldn't find a mail exchanger"
                  r"|no mail exchanger"),
    ("networkerror", r"name service error|malformed or unexpected name server"
                     r"|temporary (?:dns|lookup) (?:failure|error)|dns (?:server )?timeout"),
    ("hasmoved", r"has moved|user not local; please try|address (?:has )?changed to"
                 r"|no longer (?:with|at) this|moved to a new address"),
    ("mailboxfull", r"mailbox (?:is )?full|mail ?box full|over ?quota|quota (?:exceeded|exceed)"
                    r"|exceed(?:s|ed)? (?:the |their |his |her )?(?:storage|quota|mailbox size)"
                    r"|disk quota|mailfolder is full|full mailbox|inbox is full|account is full"
                    r"|not enough (?:storage|space)|insufficient (?:storage|space)|storage quota"
                    r"|mailbox size limit|quota limit|box is full|user (?:is )?over (?:their |the )?quota"
                    r"|has exceeded (?:his|her|its|their) (?:disk|storage)|mailbox would exceed"
                    r"|maximum allowed size of the mailbox|is over quota|size of the mailbox"
                    r"|mailbox has exceeded|recipient(?:'s)? mailbox is full|quota full"
                    r"|out of (?:disk )?space"),
    ("virusdetected", r"virus|malware|infected|trojan"),
    ("norelaying", r"relay(?:ing)? (?:access )?(?:denied|not permitted|prohibited|not allowed)"
                   r"|not permitted to relay|unable to relay|we do not relay|relay not permitted"
                   r"|no relaying|cannot relay|relaying (?:is )?not|not allowed to relay"
                   r"|mail server permanently rejected message \(#5\.3\.0\)"),
    ("requireptr", r"reverse (?:dns|lookup|address)|\bptr\b|\brdns\b|cannot find your hostname"
                   r"|does not have a valid (?:reverse|hostname)|hostname (?:does not|doesn't) match"
                   r"|no reverse|unresolvable (?:ip|address|hostname)|not have a reverse"
                   r"|ip name lookup failed|client host rejected: cannot find"
                   r"|your (?:ip|host) (?:address )?(?:has no|does not have) (?:a )?(?:dns )?name"),
    ("authfailure", r"\bspf\b|\bdkim\b|\bdmarc\b|sender policy framework"
                    r"|authentication (?:check )?fail|not authenticated|unauthenticated"
                    r"|sender (?:domain )?authentication"),
    ("toomanyconn", r"too many (?:connections|concurrent|sessions|simultaneous)"
                    r"|connection (?:rate|limit)|rate limit|throttl|too many (?:messages|mails|emails)"
                    r"|too fast|exceeded the rate|try again later.*rate"),
    ("exceedlimit", r"too many recipients|recipient limit|exceeds? (?:the )?(?:size|message size)"
                    r"|message (?:is )?too (?:large|big)|size limit|message size exceeds"
                    r"|message length exceeds|message exceeds|mail size"),
    ("suspend", r"(?:account|mailbox|user|address)(?: has been| is|'s)? (?:temporarily )?"
                r"(?:disabled|suspended|deactivated|inactive|frozen|locked|closed|not active"
                r"|expired|terminated|discontinued|blocked by the administrator|on hold)"
                r"|suspended|deactivated|inactive (?:user|account|mailbox)|account (?:disabled|closed)"
                r"|currently not available|mailbox is unavailable due to inactivity"
                r"|recipient(?:'s)? (?:account|mailbox) is (?:disabled|inactive)"
                r"|mailbox (?:currently )?(?:suspended|disabled|inactive)|has been disabled"
                r"|address is no longer (?:active|in use)|no longer active"),
    ("hostunknown", r"unrouteable address|dns lookup failure: host|host [a-z0-9.-]+ not found|\b[45]\d\d[ -](?:[45]\.\d{1,3}\.\d{1,3} )?"
                    r"[a-z0-9-]+(?:\.[a-z0-9-]+)+ does not exist|host unknown|unknown host"
                    r"|host not found|domain not found|no such domain"
                    r"|domain (?:does not|doesn't) exist|name or service not known"
                    r"|host or domain name not found|unrouteable mail domain|mx lookup fail"
                    r"|domain name not found|unknown domain|\bnxdomain\b|invalid domain"
                    r"|domain is not valid|couldn't find any host|no mx (?:record|host)"
                    r"|hostname not found|host name lookup fail|domain (?:isn't|is not) (?:in )?(?:my|our)"
                    r"|recipient domain|unknown mail domain|no such host|no route to domain"
                    r"|domain .{0,80} not found|dns (?:error|lookup failed) for the domain"
                    r"|name server.{0,40}not found|bad destination system address"
                    r"|domain (?:is )?not (?:registered|exist)|could not find mx"),
    ("userunknown", r"user unknown|unknown user|no such (?:user|mailbox|recipient|account|person"
                    r"|address|local user)|(?:user|recipient|mailbox|address|account|addressee)"
                    r" (?:does not|doesn't|did not|not) exist|not exist"
                    r"|(?:user|recipient|mailbox|addressee|account|address) (?:is )?(?:not found|unknown)"
                    r"|unknown (?:recipient|address|mailbox|local[- ]part|account|alias|addressee)"
                    r"|invalid (?:recipient|mailbox|address|user|account)"
                    r"|(?:recipient|mailbox|user|account) (?:is )?(?:invalid|unavailable)"
                    r"|not a valid (?:user|mailbox|recipient|address)|is not a valid (?:e-?mail|user)"
                    r"|no mailbox here by that name|mailbox unavailable|account .{0,40}does not exist"
                    r"|email account that you tried to reach does not exist"
                    r"|address (?:was )?not found|recipnotfound|recipientnotfound"
                    r"|bad destination mailbox|not our customer|unknown or illegal alias"
                    r"|no valid recipients|recipient address rejected: (?:access denied|invalid|unknown"
                    r"|user ?unknown|user .{0,60}does not exist)|recipient rejected"
                    r"|check if (?:the )?(?:e-?mail )?address is correct|and other recipients in the same domain"
                    r"|(?:doesn't|does not) have a .{0,40} account|not listed in"
                    r"|mailbox not (?:found|available|exist)|user (?:doesn't|does not) exist"
                    r"|dd this user doesn't|no such e-?mail|destin\w* (?:address|mailbox) (?:is )?"
                    r"(?:invalid|unknown)|is not a known user|user is unknown|no account by that name"
                    r"|unknown e-?mail address|this user doesn't have|mailbox .{0,60}does not exist"
                    r"|5\.1\.0 address rejected|does not have an account|invalid-?recipient"
                    r"|recipient (?:is )?not (?:local|found|valid)|not a known recipient"
                    r"|user not listed|email address (?:was )?not found|no such object"
                    r"|address (?:is )?no longer valid|recipient address (?:is )?invalid"
                    r"|the account does not exist|user account (?:does not|doesn't) exist"
                    r"|no such mail drop|\buser\b.{0,20}\bnot found|unknown user account"),
    ("blocked", r"spamhaus|spamcop|\bdnsbl\b|\brbl\b|block ?list|black ?list|sorbs|barracuda"
                r"|client host .{0,40}blocked|blocked using"),
    ("spamdetected", r"\bspam(?!haus|cop)|junk mail|unsolicited|\bube\b|bulk e?-?mail|looks like spam"
                     r"|content (?:filter )?rejected|message content rejected|scored too high"
                     r"|spam ?assassin|content looks|classified as (?:junk|spam)"
                     r"|suspicious content|detected as spam|phish"),
    ("badreputation", r"reputation"),
    ("blocked", r"block ?list|black ?list|\bblocked\b|\brbl\b|spamhaus|spamcop|\bdnsbl\b"
                r"|barracuda|(?:your|the sending|client) ip|listed (?:in|on|at)|banned"
                r"|refused to talk to me|access denied|connection refused by|not allowed to send"
                r"|client host rejected|rejected your ip|sender ip|\bip address\b.{0,40}rejected"
                r"|has been temporarily rate limited|sorbs|poor reputation|blocking"
                r"|dynamic ip|dial-?up|residential"),
    ("policyviolation", r"polic(?:y|ies)|prohibited|violat|not (?:allowed|permitted)|forbidden"),
    ("securityerror", r"tls required|must (?:issue a starttls|use tls)|encryption required"
                      r"|authentication required|insecure|security (?:policy|error|violation|reason)"
                      r"|certificate|starttls"
                      r"|submission port|use the smtp server of your isp|smtp auth"),
    ("expired", r"expired|retry time(?:out)?|too long in (?:the )?queue|has been delayed"
                r"|could not be delivered (?:with|for)in|giving up|gave up|delivery time"
                r"|time(?:d)? ?out waiting|no answer|will continue (?:to be )?(?:attempt|tri)"
                r"|still trying|delayed|delay|not (?:yet )?been delivered|retry limit"
                r"|maximum (?:time|number of retries)|queued too long|could not deliver.{0,40}days"),
    ("filtered", r"filter|refused by (?:the )?recipient|recipient refuses|user refuses"
                 r"|rejected by (?:the )?recipient|does not accept mail from|not accept(?:ing)? mail from"
                 r"|restricted|only accepts mail from|sender (?:is )?not (?:allowed|authorized)"
                 r"|mail from your domain|not on (?:the )?(?:white|allow) ?list|whitelist"),
    ("rejected", r"sender (?:address )?(?:rejected|refused|denied|verify failed|unknown|blocked)"
                 r"|domain of sender|sender domain|from address|mail from|return path|envelope"
                 r"|sender verification|sender address|invalid sender|bad sender"
                 r"|sender .{0,40}not (?:valid|exist)"),
    ("notaccept", r"does not accept (?:any )?mail|not accepting (?:any )?mail|null mx"
                  r"|accepts no mail|no mail service"),
    ("networkerror", r"connection (?:refused|reset|timed out|closed|lost|failed)|network"
                     r"|no route to host|unreachable|lost connection|mail loop|routing loop"
                     r"|too many hops|hop count|loops back to myself|timed out|dns (?:error|failure)"),
    ("systemerror", r"system error|internal (?:server )?error|local error|server error"
                    r"|temporary (?:failure|error|problem)|service (?:not )?(?:available|unavailable)"
                    r"|system (?:is )?(?:busy|not available)|try again later|resources"),
    ("contenterror", r"content|header|invalid character|8-?bit|mime|line too long|encoding"),
    ("syntaxerror", r"syntax error|command (?:not )?(?:unrecognized|recognized|implemented)"),
    ("mailererror", r"mailer error|command died|program|pipe to|procmail|exit code"),
]
# compiled without re.I over lower-cased text: case-insensitive matching costs ~2x
_COMPILED = [(reason, re.compile(pattern.lower())) for reason, pattern in _PHRASES]

# RFC 3463 subject.detail -> reason (class 4 and 5 alike; hardness comes from the reason).
_STATUS = {
    "1.0": "userunknown", "1.1": "userunknown", "1.2": "hostunknown", "1.3": "userunknown",
    "1.4": "userunknown", "1.5": "userunknown", "1.6": "hasmoved", "1.7": "rejected",
    "1.8": "rejected", "1.9": "rejected", "1.10": "userunknown",
    "2.0": "filtered", "2.1": "suspend", "2.2": "mailboxfull", "2.3": "exceedlimit",
    "2.4": "systemerror",
    "3.0": "systemerror", "3.1": "mailboxfull", "3.2": "notaccept", "3.3": "systemerror",
    "3.4": "exceedlimit", "3.5": "systemerror",
    "4.0": "networkerror", "4.1": "expired", "4.2": "expired", "4.3": "systemerror",
    "4.4": "hostunknown", "4.5": "toomanyconn", "4.6": "networkerror", "4.7": "expired",
    "5.0": "syntaxerror", "5.1": "syntaxerror", "5.2": "syntaxerror", "5.3": "exceedlimit",
    "5.4": "syntaxerror", "5.5": "syntaxerror",
    "6.0": "contenterror", "6.1": "contenterror", "6.2": "contenterror", "6.3": "contenterror",
    "6.4": "contenterror", "6.5": "contenterror",
    "7.0": "securityerror", "7.1": "blocked", "7.2": "securityerror", "7.3": "securityerror",
    "7.4": "securityerror", "7.5": "securityerror", "7.6": "securityerror",
    "7.7": "securityerror", "7.8": "securityerror", "7.9": "securityerror",
    "7.13": "suspend", "7.14": "securityerror", "7.23": "authfailure", "7.24": "authfailure",
    "7.25": "requireptr", "7.26": "authfailure", "7.27": "notaccept",
}
# reasons a generic status must not override when the text is silent
_GENERIC_STATUS = {"0.0", "5.0", "7.1", "7.0", "3.0", "4.0"}

_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY_RE = re.compile(r"(?<![\d.])([245][0-5]\d)(?:[ -]|$)")


def find_status(text: str) -> str | None:
    """The first RFC 3463 status code in `text` ("5.1.1"), else None."""
    m = _STATUS_RE.search(text or "")
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def find_reply_code(text: str) -> str | None:
    """The first SMTP reply code (4xx/5xx) in `text`, else None."""
    for m in _REPLY_RE.finditer(text or ""):
        if m.group(1)[0] in "45":
            return m.group(1)
    return None


def reason_from_text(text: str) -> str | None:
    """The reason a diagnostic text states, else None."""
    if not text:
        return None
    return _reason_from_text(text[:2000].lower())


@functools.lru_cache(maxsize=512)
def _reason_from_text(text: str) -> str | None:
    for reason, rx in _COMPILED:
        if rx.search(text):
            return reason
    return None


def reason_from_status(status: str | None) -> str | None:
    if not status:
        return None
    cls, _, rest = status.partition(".")
    if cls == "2":
        return "delivered"
    return _STATUS.get(rest)


def classify_reason(text: str, status: str | None, reply: str | None = None,
                    default: str | None = None, around: str = "",
                    hosts: tuple[str, ...] = ()) -> tuple[str, bool | None]:
    """(diagnostic text, status, reply code) -> (reason, hard). `around` is more text about
    the same recipient (the report's prose), read only for the SMTP stage of the refusal;
    `hosts` are the answering MTA, the recipient's domain and the reporting MTA (a few
    services mean something else than their words say, see rhost)."""
    if status is None:
        status = find_status(text)
    if reply is None:
        reply = find_reply_code(text)
    stage = _stage(text) or _stage(around)
    reason = rhost.reason(hosts, text, status, stage) if hosts else None
    if reason is not None:
        return reason, _hard(reason, _permanent(status, reply))
    sub = status.partition(".")[2] if status else ""
    reason = None
    # specific status codes that text rarely contradicts
    if sub in ("1.1", "1.2", "1.6", "2.2", "1.10", "7.26", "7.13"):
        reason = _STATUS.get(sub)
        text_reason = reason_from_text(text)
        # 5.1.1 is also used by some providers for blocks and full mailboxes
        if text_reason in ("mailboxfull", "filtered", "suspend", "blocked", "spamdetected",
                           "hasmoved", "policyviolation", "norelaying", "requireptr",
                           "authfailure"):
            reason = text_reason
    if reason is None:
        reason = reason_from_text(text)
        if reason in ("userunknown", "suspend") and sub in _FILTER_STATUS and stage != "rcpt":
            reason = "filtered"  # the mailbox exists but refuses this mail (status says so)
    if (reason == "userunknown" and stage != "rcpt" and sub not in _ADDRESS_STATUS
            and not _address_detail(sub) and _ANY_REPLY.search(text or "")):
        # An unknown mailbox is refused at RCPT TO, or said with x.1.1; "unknown user" after
        # DATA, or with no stage and no address status, is a content/sender filter speaking
        # (mobile carriers and filtering gateways answer that way): sisimai's "filtered".
        reason = "filtered"
    if reason in (None, "userunknown", "hostunknown", "undefined") and stage == "mail":
        reason = "rejected"  # refused at MAIL FROM: the sender, not the recipient
    if reason is None and sub not in _GENERIC_STATUS:
        reason = reason_from_status(status)
    if reason is None and status:
        reason = reason_from_status(status)
    if reason is None:
        reason = default or ("expired" if (status or reply or "5").startswith("4") else "undefined")
    permanent = _permanent(status, reply)
    if reason == "hostunknown" and permanent is False:
        reason = "networkerror"  # a DNS answer the MTA itself calls temporary
    return reason, _hard(reason, permanent)


def _hard(reason: str, permanent: bool | None) -> bool:
    """sisimai's hard bounce: the address itself is bad (a refused null-MX domain too)."""
    return reason in HARD_REASONS or (reason == "notaccept" and permanent is not False)


# mailbox statuses that say "it exists but refuses this mail" (RFC 3463 x.2.0, x.2.1, x.2.4,
# x.1.4) and the policy ones
_FILTER_STATUS = frozenset({"2.0", "2.1", "2.4", "1.4", "7.1", "7.0"})
# a remote server's SMTP reply code anywhere ("550 ...", "550: ...", "ERROR_CODE :550"): without
# one, the reporting MTA judged the address itself (a directory lookup, not a filter)
_ANY_REPLY = re.compile(r"(?<![\d.])[45][0-5]\d(?![\d.])")
_ADDRESS_STATUS = frozenset({"1.0", "1.1", "1.3"})  # statuses that name the mailbox itself
_STAGE = re.compile(r"(?:after|in reply to|did not like our|while (?:sending|talking)"
                    r"|>>>)\s*(?:end of |our final |the )?(MAIL FROM|RCPT TO|DATA|RCPT|MAIL)\b"
                    r"|does not like (recipient)|(failed after I sent the message)"
                    r"|(does not like sender)", re.I)
# An SMTP command echoed in upper case in a transcript or reply ("RCPT TO:<a@b>", ">>> DATA"):
# the latest stage named is the one refused. Case-sensitive on purpose: "data" in prose is
# not a command.
_COMMAND = re.compile(r"(?<![A-Za-z0-9.@-])(MAIL F|RCPT|DATA|EHLO|HELO)(?![a-z0-9@])")
_ORDER = {"EHLO": 0, "HELO": 0, "MAIL F": 1, "RCPT": 2, "DATA": 3}


def _address_detail(sub: str) -> bool:
    """A status under subject 1 (addressing) other than the sender's (x.1.7, x.1.8): about the
    destination address, standard or vendor ("1.10", Exchange's "1.351" recipient not found)."""
    head, _, detail = sub.partition(".")
    return head == "1" and detail.isdigit() and detail not in ("7", "8")


def _stage(text: str) -> str | None:
    """The SMTP command a refusal answered ("connect", "mail", "rcpt", "data"), when the MTA
    says so in words or echoes the command."""
    if not text:
        return None
    m = _STAGE.search(text)
    if m is not None:
        # qmail's own words: "does not like recipient" (RCPT), "failed after I sent the
        # message" (DATA), "does not like sender" (MAIL)
        word = (m.group(1) or ("RCPT" if m.group(2) else "DATA" if m.group(3) else "MAIL")).upper()
        return "mail" if word.startswith("MAIL") else "rcpt" if word.startswith("RCPT") else "data"
    best = -1
    for c in _COMMAND.finditer(text):
        best = max(best, _ORDER[c.group(1)])
    # an echoed MAIL FROM / EHLO alone is too often a summary line ("MAIL FROM: a@b") to
    # blame the sender for the refusal: only RCPT and DATA count from echoes
    return "rcpt" if best == 2 else "data" if best == 3 else None


def _permanent(status: str | None, reply: str | None) -> bool | None:
    if status:
        return status[0] == "5"
    if reply:
        return reply[0] == "5"
    return None


_REASON_STATUS = {
    "userunknown": "5.1.1", "hostunknown": "5.1.2", "hasmoved": "5.1.6", "mailboxfull": "5.2.2",
    "exceedlimit": "5.2.3", "suspend": "5.2.1", "notaccept": "5.3.2", "expired": "4.4.7",
    "networkerror": "4.4.0", "systemerror": "5.3.0", "blocked": "5.7.1", "norelaying": "5.7.1",
    "spamdetected": "5.7.1", "policyviolation": "5.7.1", "securityerror": "5.7.0",
    "virusdetected": "5.7.1", "contenterror": "5.6.0", "filtered": "5.2.0", "rejected": "5.1.8",
    "authfailure": "5.7.26", "requireptr": "5.7.25", "toomanyconn": "4.7.0",
    "syntaxerror": "5.5.2", "mailererror": "5.3.0",
}


def status_for(reason: str, temporary: bool = False) -> str | None:
    """A representative status code for a reason found in text (when the MTA gave none)."""
    status = _REASON_STATUS.get(reason)
    if status and temporary:
        status = "4" + status[1:]
    return status
