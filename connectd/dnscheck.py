"""Sender-domain DNS preflight: a From domain (+ DKIM selectors, relay IPs) -> a DomainReport.

Looks up the SPF record (TXT v=spf1 at the domain), each configured DKIM key (TXT at
{selector}._domainkey.{domain}) and the DMARC policy (TXT at _dmarc.{domain}) with dnspython,
and turns what it finds into Findings (ok / warning / error per check). A preflight advises, it
never blocks and never raises: DNS that cannot be reached becomes one "dns" warning.

The parsers (parse_spf, parse_dmarc, parse_dkim, spf_covers) are pure functions of the TXT
text, so they are tested with tables; only check_sender_domain does I/O.

Deliberately not done: SPF is not evaluated recursively (a, mx, include:, exists:, ptr and
redirect= are reported as "not evaluated", never guessed), and the DMARC organisational-domain
fallback (which needs the public suffix list) is not followed.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from connectd import log

Level = Literal["ok", "warning", "error"]
Check = Literal["spf", "dkim", "dmarc", "dns"]


@dataclass(frozen=True)
class Finding:
    level: Level
    check: Check
    message: str


@dataclass(frozen=True)
class DomainReport:
    domain: str
    findings: tuple[Finding, ...] = ()

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing is worse than a warning (a preflight never blocks on its own)."""
        return not self.errors


# -- pure parsing ------------------------------------------------------------------------------

_QUALIFIERS = "+-~?"
# SPF mechanisms whose outcome depends on further DNS lookups we do not make.
_UNEVALUATED = frozenset({"a", "mx", "include", "exists", "ptr"})
_KNOWN_MECHANISMS = _UNEVALUATED | {"all", "ip4", "ip6"}


@dataclass(frozen=True)
class SpfTerm:
    qualifier: str  # one of + - ~ ? (the default "+" made explicit)
    name: str  # mechanism ("ip4", "include", "all", ...) or modifier ("redirect", "exp")
    value: str  # "" when absent
    modifier: bool = False

    def __str__(self) -> str:
        if self.modifier:
            return f"{self.name}={self.value}"
        q = "" if self.qualifier == "+" else self.qualifier
        return f"{q}{self.name}:{self.value}" if self.value else f"{q}{self.name}"


@dataclass(frozen=True)
class SpfRecord:
    terms: tuple[SpfTerm, ...]
    problems: tuple[str, ...] = ()  # syntax errors: a receiver would return permerror

    @property
    def all_term(self) -> SpfTerm | None:
        return next((t for t in self.terms if t.name == "all" and not t.modifier), None)

    @property
    def redirect(self) -> str | None:
        return next((t.value for t in self.terms if t.modifier and t.name == "redirect"), None)


def is_spf(txt: str) -> bool:
    """RFC 7208 4.5: exactly "v=spf1" followed by a space or the end (case-insensitive)."""
    low = txt.strip().lower()
    return low == "v=spf1" or low.startswith("v=spf1 ")


_MODIFIER = re.compile(r"([a-z][a-z0-9_.-]*)=(.*)", re.IGNORECASE)
_MECHANISM = re.compile(r"([+?~-]?)([a-z][a-z0-9_.-]*)(?::([^/]*))?(/.*)?", re.IGNORECASE)


def parse_spf(txt: str) -> SpfRecord:
    """Split a v=spf1 record into terms; a malformed term is recorded, not raised."""
    terms: list[SpfTerm] = []
    problems: list[str] = []
    for token in txt.split()[1:]:
        if m := _MODIFIER.fullmatch(token):
            terms.append(SpfTerm("+", m[1].lower(), m[2], modifier=True))
            continue
        m = _MECHANISM.fullmatch(token)
        name = m[2].lower() if m else ""
        if m is None or name not in _KNOWN_MECHANISMS:
            problems.append(f"unknown mechanism {token!r}")
            continue
        # ip4:192.0.2.0/24 keeps its prefix in the value; a/24 and mx:host/24 likewise.
        value = (m[3] or "") + (m[4] or "")
        if name in ("ip4", "ip6"):
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                problems.append(f"invalid address in {token!r}")
                continue
            if net.version != int(name[-1]):
                problems.append(f"{name} with an IPv{net.version} address in {token!r}")
                continue
        terms.append(SpfTerm(m[1] or "+", name, value))
    return SpfRecord(tuple(terms), tuple(problems))


SpfVerdict = Literal["pass", "fail", "softfail", "neutral", "not evaluated"]


def spf_covers(record: SpfRecord, ip: str) -> tuple[SpfVerdict, str]:
    """What the record says about mail from `ip`, as far as it can be told without lookups.

    Walks the terms in order like a receiver: a matching ip4/ip6 decides; reaching a mechanism
    that needs DNS (a, mx, include, ...) before any match means we cannot tell.
    """
    addr = ipaddress.ip_address(ip)
    verdicts: dict[str, SpfVerdict] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
    skipped: list[str] = []
    for term in record.terms:
        if term.modifier:
            continue
        if term.name in ("ip4", "ip6"):
            net = ipaddress.ip_network(term.value, strict=False)
            if net.version == addr.version and addr in net:
                return verdicts[term.qualifier], f"matched {term}"
        elif term.name in _UNEVALUATED:
            skipped.append(str(term))
        elif term.name == "all":
            if skipped:
                break
            return verdicts[term.qualifier], f"no ip4/ip6 match, falls to {term}"
    if record.redirect and record.all_term is None:  # redirect= is ignored when all exists
        skipped.append(f"redirect={record.redirect}")
    if skipped:
        return "not evaluated", "no ip4/ip6 match; not evaluated: " + ", ".join(skipped)
    return "neutral", "no ip4/ip6 match and no 'all' (neutral)"


def parse_tags(txt: str) -> dict[str, str]:
    """DKIM/DMARC tag=value lists ("v=DMARC1; p=none"): names lower-cased, first one wins."""
    tags: dict[str, str] = {}
    for part in txt.split(";"):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if sep and name and name not in tags:
            tags[name] = value.strip()
    return tags


def is_dmarc(txt: str) -> bool:
    """RFC 7489 6.4: the record starts with the v=DMARC1 tag."""
    first = txt.split(";", 1)[0].replace(" ", "").replace("\t", "")
    return first.lower() == "v=dmarc1"


@dataclass(frozen=True)
class DmarcPolicy:
    policy: str | None  # none / quarantine / reject, None when absent or invalid
    rua: tuple[str, ...] = ()
    pct: int = 100
    tags: dict[str, str] = field(default_factory=dict)


def parse_dmarc(txt: str) -> DmarcPolicy:
    tags = parse_tags(txt)
    policy = tags.get("p", "").lower()
    rua = tuple(u.strip() for u in tags.get("rua", "").split(",") if u.strip())
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    return DmarcPolicy(policy if policy in ("none", "quarantine", "reject") else None,
                       rua, pct, tags)


@dataclass(frozen=True)
class DkimKey:
    key_type: str  # k= (default rsa)
    public_key: str  # p= with whitespace removed; "" = revoked
    bits: int | None  # RSA modulus size / 256 for ed25519; None if undecodable
    testing: bool = False  # t=y
    version: str | None = None  # v= if present (must be DKIM1)


def parse_dkim(txt: str) -> DkimKey:
    tags = parse_tags(txt)
    key_type = tags.get("k", "rsa").lower()
    public_key = "".join(tags.get("p", "").split())
    flags = [f.strip().lower() for f in tags.get("t", "").split(":")]
    return DkimKey(key_type, public_key, _key_bits(key_type, public_key), "y" in flags,
                   tags.get("v"))


def _key_bits(key_type: str, b64: str) -> int | None:
    if not b64:
        return None
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if key_type == "ed25519":  # RFC 8463: the bare 32-byte key, not SubjectPublicKeyInfo
        return 256 if len(raw) == 32 else None
    try:
        key = load_der_public_key(raw)
    except (ValueError, TypeError):
        return None
    return key.key_size if isinstance(key, rsa.RSAPublicKey) else None


# -- findings from parsed records --------------------------------------------------------------


def spf_findings(records: Sequence[str], relay_ips: Sequence[str] = ()) -> list[Finding]:
    """Findings for the TXT strings at the domain (non-SPF TXT records are ignored)."""
    spf = [r for r in records if is_spf(r)]
    if not spf:
        return [Finding("warning", "spf", "no SPF record (TXT v=spf1): receivers cannot tell "
                        "which servers may send for this domain")]
    if len(spf) > 1:
        return [Finding("error", "spf", f"{len(spf)} SPF records: receivers treat this as a "
                        "permanent error; merge them into one")]
    record = parse_spf(spf[0])
    out = [Finding("error", "spf", f"SPF syntax: {p}") for p in record.problems]
    all_term = record.all_term
    if all_term is not None and all_term.qualifier == "+":
        out.append(Finding("warning", "spf", f"'{all_term}' authorises every host on the "
                           "internet to send as this domain; use ~all or -all"))
    for ip in relay_ips:
        out.append(_relay_finding(record, ip))
    if not any(f.level != "ok" for f in out):
        out.insert(0, Finding("ok", "spf", f"SPF record: {spf[0]}"))
    return out


def _relay_finding(record: SpfRecord, ip: str) -> Finding:
    try:
        verdict, why = spf_covers(record, ip)
    except ValueError:
        return Finding("error", "spf", f"relay {ip!r} is not an IP address")
    if verdict == "pass":
        return Finding("ok", "spf", f"relay {ip} authorised ({why})")
    if verdict == "fail":
        return Finding("error", "spf", f"relay {ip} NOT authorised: mail from it fails SPF "
                       f"({why})")
    if verdict == "not evaluated":
        return Finding("warning", "spf", f"relay {ip}: could not confirm it is authorised "
                       f"({why}); check that these cover it")
    return Finding("warning", "spf", f"relay {ip} not authorised ({verdict}: {why})")


def dkim_findings(selector: str, records: Sequence[str]) -> list[Finding]:
    """Findings for the TXT strings at {selector}._domainkey.{domain}."""
    keys = [r for r in records if "p" in parse_tags(r)]
    where = f"selector {selector!r}"
    if not keys:
        return [Finding("error", "dkim", f"{where}: no DKIM key published; signed mail will "
                        "fail verification")]
    key = parse_dkim(keys[0])
    if key.version is not None and key.version != "DKIM1":
        return [Finding("error", "dkim", f"{where}: v={key.version}, expected DKIM1")]
    if not key.public_key:
        return [Finding("error", "dkim", f"{where}: key revoked (empty p=)")]
    if key.key_type not in ("rsa", "ed25519"):
        return [Finding("error", "dkim", f"{where}: unknown key type k={key.key_type}")]
    if key.bits is None:
        return [Finding("error", "dkim", f"{where}: p= is not a valid {key.key_type} key")]
    out: list[Finding] = []
    if key.key_type == "rsa" and key.bits < 1024:
        out.append(Finding("error", "dkim", f"{where}: RSA {key.bits}-bit key is too short; "
                           "receivers ignore it (RFC 8301)"))
    elif key.key_type == "rsa" and key.bits < 2048:
        out.append(Finding("warning", "dkim", f"{where}: RSA {key.bits}-bit key; 2048 is "
                           "recommended"))
    if key.testing:
        out.append(Finding("warning", "dkim", f"{where}: t=y (testing): receivers may treat "
                           "signatures as unsigned"))
    if len(keys) > 1:
        out.append(Finding("warning", "dkim", f"{where}: {len(keys)} key records; receivers "
                           "may pick either"))
    if not out:
        out.append(Finding("ok", "dkim", f"{where}: {key.key_type} {key.bits}-bit key"))
    return out


def dmarc_findings(records: Sequence[str]) -> list[Finding]:
    """Findings for the TXT strings at _dmarc.{domain}."""
    dmarc = [r for r in records if is_dmarc(r)]
    if not dmarc:
        return [Finding("warning", "dmarc", "no DMARC record at _dmarc: mailbox providers "
                        "increasingly require one from bulk senders; start with "
                        "'v=DMARC1; p=none; rua=mailto:...'")]
    if len(dmarc) > 1:
        return [Finding("error", "dmarc", f"{len(dmarc)} DMARC records: receivers ignore them "
                        "all; keep one")]
    policy = parse_dmarc(dmarc[0])
    out: list[Finding] = []
    if policy.policy is None:
        out.append(Finding("error", "dmarc", "DMARC record has no valid p= "
                           "(none, quarantine or reject)"))
    elif policy.policy == "none":
        out.append(Finding("warning", "dmarc", "p=none: monitoring only, spoofed mail is "
                           "still delivered; once the rua reports show your mail aligns, move "
                           "to p=quarantine, then p=reject"))
    else:
        out.append(Finding("ok", "dmarc", f"policy p={policy.policy}"
                           + (f" (pct={policy.pct})" if policy.pct != 100 else "")))
    if policy.rua:
        out.append(Finding("ok", "dmarc", "aggregate reports go to " + ", ".join(policy.rua)))
    else:
        out.append(Finding("warning", "dmarc", "no rua=: you receive no aggregate reports "
                           "about who sends as this domain"))
    return out


# -- querying ---------------------------------------------------------------------------------


class _Unreachable(Exception):
    """DNS gave no usable answer (timeout, no servers, SERVFAIL, no configuration)."""


class _NoSuchDomain(Exception):
    pass


def _txt(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    """TXT values at name (strings of one record joined, RFC 7208 3.3); NXDOMAIN raises."""
    try:
        answer = resolver.resolve(name, dns.rdatatype.TXT, raise_on_no_answer=False,
                                  search=False)
    except dns.resolver.NXDOMAIN as e:
        raise _NoSuchDomain(name) from e
    except (dns.exception.DNSException, OSError) as e:
        raise _Unreachable(f"{name}: {e}") from e
    if answer.rrset is None:
        return []
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]


def _txt_or_empty(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    """As _txt, but a name that does not exist simply has no records."""
    try:
        return _txt(resolver, name)
    except _NoSuchDomain:
        return []


def check_sender_domain(domain: str, dkim_selectors: Sequence[str], *,
                        resolver: dns.resolver.Resolver | None = None,
                        relay_ips: Sequence[str] = ()) -> DomainReport:
    """Check SPF, DKIM and DMARC for a From domain; never raises for DNS trouble."""
    domain = domain.strip().rstrip(".").lower()
    if isinstance(dkim_selectors, str):  # a str is a Sequence[str]: "s1" must not mean s, 1
        dkim_selectors = [dkim_selectors]
    logger = log.get(component="dnscheck", domain=domain)
    findings: list[Finding] = []
    try:
        try:
            dns.name.from_text(domain)
        except dns.exception.DNSException as e:
            findings.append(Finding("error", "dns", f"{domain!r} is not a valid domain: {e}"))
            return _done(domain, findings, logger)
        if resolver is None:
            resolver = dns.resolver.Resolver()
        _check_all(findings, resolver, domain, dkim_selectors, relay_ips)
    except _NoSuchDomain:
        findings.append(Finding("error", "dns", f"{domain} does not exist (NXDOMAIN): mail "
                                "from it will be rejected"))
    except (_Unreachable, dns.exception.DNSException, OSError) as e:
        # The resolver constructor itself raises without /etc/resolv.conf: same advice.
        what = "some SPF/DKIM/DMARC checks" if findings else "SPF/DKIM/DMARC checks"
        findings.append(Finding("warning", "dns", f"DNS unreachable: {what} could not run "
                                f"({e}); not a block, check again before launch"))
    return _done(domain, findings, logger)


def _check_all(out: list[Finding], resolver: dns.resolver.Resolver, domain: str,
               selectors: Sequence[str], relay_ips: Sequence[str]) -> None:
    """Append findings as each lookup answers, so an outage midway keeps what was learnt."""
    # The domain's own TXT lookup comes first: it tells NXDOMAIN and unreachable DNS apart
    # before anything else is asked.
    out.extend(spf_findings(_txt(resolver, domain), relay_ips))
    if not selectors:
        out.append(Finding("warning", "dkim", "no DKIM selector configured: mail goes out "
                           "unsigned and cannot pass DMARC via DKIM"))
    for selector in selectors:
        out.extend(dkim_findings(selector,
                                 _txt_or_empty(resolver, f"{selector}._domainkey.{domain}")))
    out.extend(dmarc_findings(_txt_or_empty(resolver, f"_dmarc.{domain}")))


def _done(domain: str, findings: list[Finding], logger: Any) -> DomainReport:
    report = DomainReport(domain, tuple(findings))
    logger.info("dns.checked", errors=len(report.errors), warnings=len(report.warnings))
    return report


def format_report(report: DomainReport) -> str:
    """Human-readable: a summary line, then one line per finding, worst first."""
    order = {"error": 0, "warning": 1, "ok": 2}
    n_err, n_warn = len(report.errors), len(report.warnings)
    head = (f"DNS for {report.domain}: {n_err} error{'s' if n_err != 1 else ''}, "
            f"{n_warn} warning{'s' if n_warn != 1 else ''}")
    lines = [head]
    for f in sorted(report.findings, key=lambda f: order[f.level]):
        lines.append(f"  {f.level.upper() if f.level != 'ok' else 'ok':<8} {f.check:<6} "
                     f"{f.message}")
    return "\n".join(lines)
