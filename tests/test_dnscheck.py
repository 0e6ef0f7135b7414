"""connectd.dnscheck: table tests for the TXT parsers, end to end against a real local DNS server."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers.dns_server import DnsServer

from connectd.dnscheck import (
    DomainReport,
    Finding,
    check_sender_domain,
    dkim_findings,
    dmarc_findings,
    format_report,
    is_dmarc,
    is_spf,
    parse_dkim,
    parse_dmarc,
    parse_spf,
    parse_tags,
    spf_covers,
    spf_findings,
)


def _rsa_p(bits: int) -> str:
    if bits < 1024:  # cryptography will not generate these; a public key needs only a modulus
        key = rsa.RSAPublicNumbers(65537, (1 << (bits - 1)) | 0xF00D1).public_key()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    return base64.b64encode(key.public_bytes(Encoding.DER,
                                             PublicFormat.SubjectPublicKeyInfo)).decode()


RSA2048 = _rsa_p(2048)
RSA1024 = _rsa_p(1024)
RSA512 = _rsa_p(512)
ED25519 = base64.b64encode(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
    Encoding.Raw, PublicFormat.Raw)).decode()

# -- parser tables ------------------------------------------------------------------------------


@pytest.mark.parametrize(("txt", "expected"), [
    ("v=spf1 -all", True),
    ("V=SPF1 ip4:192.0.2.1 -all", True),
    ("v=spf1", True),
    ("v=spf10 -all", False),
    ("v=spf1-all", False),
    ("google-site-verification=abc", False),
    ("", False),
])
def test_is_spf(txt: str, expected: bool) -> None:
    """Only 'v=spf1' followed by a space or the end is an SPF record."""
    assert is_spf(txt) is expected


@pytest.mark.parametrize(("txt", "terms", "problems"), [
    ("v=spf1 -all", ["-all"], 0),
    ("v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 ~all", ["ip4:192.0.2.0/24", "ip6:2001:db8::/32",
                                                        "~all"], 0),
    ("v=spf1 a mx/24 include:_spf.example.net ?all", ["a", "mx:/24", "include:_spf.example.net",
                                                      "?all"], 0),
    ("v=spf1 redirect=_spf.example.net", ["redirect=_spf.example.net"], 0),
    ("v=spf1 +all", ["all"], 0),
    ("v=spf1 ip4:999.1.1.1 -all", ["-all"], 1),
    ("v=spf1 ip4:2001:db8::1 -all", ["-all"], 1),
    ("v=spf1 frobnicate -all", ["-all"], 1),
])
def test_parse_spf(txt: str, terms: list[str], problems: int) -> None:
    """SPF terms keep their qualifier and value; malformed terms become problems."""
    record = parse_spf(txt)
    assert [str(t) for t in record.terms] == terms
    assert len(record.problems) == problems


@pytest.mark.parametrize(("txt", "ip", "verdict"), [
    ("v=spf1 ip4:192.0.2.0/24 -all", "192.0.2.77", "pass"),
    ("v=spf1 ip4:192.0.2.0/24 -all", "198.51.100.1", "fail"),
    ("v=spf1 ip4:192.0.2.0/24 ~all", "198.51.100.1", "softfail"),
    ("v=spf1 ip4:192.0.2.0/24", "198.51.100.1", "neutral"),
    ("v=spf1 ip6:2001:db8::/32 -all", "2001:db8::25", "pass"),
    ("v=spf1 ip6:2001:db8::/32 -all", "192.0.2.1", "fail"),
    ("v=spf1 -ip4:192.0.2.1 ip4:192.0.2.0/24 -all", "192.0.2.1", "fail"),
    ("v=spf1 include:_spf.example.net -all", "192.0.2.1", "not evaluated"),
    ("v=spf1 mx a -all", "192.0.2.1", "not evaluated"),
    ("v=spf1 ip4:192.0.2.1 include:_spf.example.net -all", "192.0.2.1", "pass"),
    ("v=spf1 redirect=_spf.example.net", "192.0.2.1", "not evaluated"),
    ("v=spf1 +all", "203.0.113.9", "pass"),
])
def test_spf_covers(txt: str, ip: str, verdict: str) -> None:
    """A direct ip4/ip6 match decides; a lookup mechanism before any match is 'not evaluated'."""
    assert spf_covers(parse_spf(txt), ip)[0] == verdict


@pytest.mark.parametrize(("txt", "tags"), [
    ("v=DMARC1; p=none", {"v": "DMARC1", "p": "none"}),
    ("v=DMARC1;p=reject;rua=mailto:a@x.org", {"v": "DMARC1", "p": "reject",
                                              "rua": "mailto:a@x.org"}),
    (" V = DKIM1 ; k=rsa; ", {"v": "DKIM1", "k": "rsa"}),
    ("p=; p=abc", {"p": ""}),
    ("junk", {}),
])
def test_parse_tags(txt: str, tags: dict[str, str]) -> None:
    """Tag lists: names lower-cased, whitespace trimmed, the first occurrence wins."""
    assert parse_tags(txt) == tags


@pytest.mark.parametrize(("txt", "expected"), [
    ("v=DMARC1; p=none", True),
    ("v = DMARC1 ;p=reject", True),
    ("p=reject; v=DMARC1", False),
    ("v=spf1 -all", False),
])
def test_is_dmarc(txt: str, expected: bool) -> None:
    """A DMARC record must start with v=DMARC1."""
    assert is_dmarc(txt) is expected


@pytest.mark.parametrize(("txt", "policy", "rua", "pct"), [
    ("v=DMARC1; p=reject; rua=mailto:a@x.org,mailto:b@y.org", "reject",
     ("mailto:a@x.org", "mailto:b@y.org"), 100),
    ("v=DMARC1; p=Quarantine; pct=25", "quarantine", (), 25),
    ("v=DMARC1; p=none; pct=abc", "none", (), 100),
    ("v=DMARC1; p=bogus", None, (), 100),
    ("v=DMARC1; rua=mailto:a@x.org", None, ("mailto:a@x.org",), 100),
])
def test_parse_dmarc(txt: str, policy: str | None, rua: tuple[str, ...], pct: int) -> None:
    """DMARC policy, report addresses and pct are read; an invalid p= is None."""
    parsed = parse_dmarc(txt)
    assert (parsed.policy, parsed.rua, parsed.pct) == (policy, rua, pct)


@pytest.mark.parametrize(("txt", "key_type", "bits", "testing"), [
    (f"v=DKIM1; k=rsa; p={RSA2048}", "rsa", 2048, False),
    (f"v=DKIM1; p={RSA1024[:40]} {RSA1024[40:]}", "rsa", 1024, False),
    (f"v=DKIM1; k=ed25519; p={ED25519}", "ed25519", 256, False),
    (f"v=DKIM1; t=y:s; p={RSA2048}", "rsa", 2048, True),
    ("v=DKIM1; k=rsa; p=", "rsa", None, False),
    ("v=DKIM1; k=rsa; p=bm90IGEga2V5", "rsa", None, False),
    ("v=DKIM1; k=ed25519; p=" + RSA2048, "ed25519", None, False),
])
def test_parse_dkim(txt: str, key_type: str, bits: int | None, testing: bool) -> None:
    """DKIM key records: type, key size from the real key bytes, testing flag."""
    key = parse_dkim(txt)
    assert (key.key_type, key.bits, key.testing) == (key_type, bits, testing)


# -- findings from record lists (pure) -----------------------------------------------------------


def _levels(findings: list[Finding]) -> list[str]:
    return [f.level for f in findings]


@pytest.mark.parametrize(("records", "relays", "levels"), [
    (["v=spf1 ip4:192.0.2.1 -all"], (), ["ok"]),
    (["some-verification=1"], (), ["warning"]),
    (["v=spf1 -all", "v=spf1 ~all"], (), ["error"]),
    (["v=spf1 +all"], (), ["warning"]),
    (["v=spf1 ip4:192.0.2.1 -all"], ("192.0.2.1",), ["ok", "ok"]),
    (["v=spf1 ip4:192.0.2.1 -all"], ("198.51.100.1",), ["error"]),
    (["v=spf1 ip4:192.0.2.1 ~all"], ("198.51.100.1",), ["warning"]),
    (["v=spf1 include:_spf.example.net -all"], ("198.51.100.1",), ["warning"]),
    (["v=spf1 ip4:192.0.2.1 -all"], ("not-an-ip",), ["error"]),
    (["v=spf1 ip4:1.2.3 -all"], (), ["error"]),
])
def test_spf_findings(records: list[str], relays: tuple[str, ...], levels: list[str]) -> None:
    """SPF findings: missing warns, duplicates and unauthorised relays are errors."""
    assert _levels(spf_findings(records, relays)) == levels


@pytest.mark.parametrize(("records", "levels"), [
    ([f"v=DKIM1; k=rsa; p={RSA2048}"], ["ok"]),
    ([f"v=DKIM1; k=ed25519; p={ED25519}"], ["ok"]),
    ([], ["error"]),
    (["v=spf1 -all"], ["error"]),
    (["v=DKIM1; k=rsa; p="], ["error"]),
    ([f"v=DKIM1; p={RSA1024}"], ["warning"]),
    ([f"v=DKIM1; p={RSA512}"], ["error"]),
    ([f"v=DKIM2; p={RSA2048}"], ["error"]),
    ([f"v=DKIM1; k=dsa; p={RSA2048}"], ["error"]),
    ([f"v=DKIM1; t=y; p={RSA2048}"], ["warning"]),
])
def test_dkim_findings(records: list[str], levels: list[str]) -> None:
    """DKIM findings: missing, revoked, unknown or too-short keys are errors."""
    assert _levels(dkim_findings("s1", records)) == levels


@pytest.mark.parametrize(("records", "levels"), [
    (["v=DMARC1; p=reject; rua=mailto:d@example.com"], ["ok", "ok"]),
    (["v=DMARC1; p=none; rua=mailto:d@example.com"], ["warning", "ok"]),
    (["v=DMARC1; p=quarantine"], ["ok", "warning"]),
    ([], ["warning"]),
    (["v=DMARC1; p=none", "v=DMARC1; p=reject"], ["error"]),
    (["v=DMARC1; p=maybe; rua=mailto:d@example.com"], ["error", "ok"]),
])
def test_dmarc_findings(records: list[str], levels: list[str]) -> None:
    """DMARC findings: missing and p=none warn, duplicates and no valid policy are errors."""
    assert _levels(dmarc_findings(records)) == levels


# -- end to end against a real DNS server on 127.0.0.1 ---------------------------------------------

GOOD = {
    "example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all"),
                    ("TXT", "google-site-verification=xyz"),
                    ("MX", "10 mx.example.com.")],
    "s1._domainkey.example.com": [("TXT", f"v=DKIM1; k=rsa; p={RSA2048}")],
    "ed._domainkey.example.com": [("TXT", f"v=DKIM1; k=ed25519; p={ED25519}")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@example.com")],
}


@pytest.fixture
def dns_zone() -> Iterator[dict[str, list[tuple[str, str]]]]:
    """A fresh copy of the well-configured zone, for a test to spoil before serving it."""
    yield {name: list(records) for name, records in GOOD.items()}


def _check(zone: dict[str, list[tuple[str, str]]], selectors: tuple[str, ...] = ("s1",),
           **kw: object) -> DomainReport:
    with DnsServer(zone) as server:
        return check_sender_domain("example.com", selectors, resolver=server.resolver(),
                                   **kw)  # type: ignore[arg-type]


def _pairs(report: DomainReport) -> set[tuple[str, str]]:
    return {(f.level, f.check) for f in report.findings if f.level != "ok"}


def test_well_configured_domain_is_all_ok(dns_zone: dict) -> None:
    """SPF, two DKIM keys (RSA-2048, Ed25519) and DMARC p=reject: every finding is ok."""
    report = _check(dns_zone, ("s1", "ed"), relay_ips=["192.0.2.10"])
    assert report.findings and all(f.level == "ok" for f in report.findings), report
    assert {f.check for f in report.findings} == {"spf", "dkim", "dmarc"}
    assert report.ok


def test_answer_too_big_for_udp_is_read_over_tcp(dns_zone: dict) -> None:
    """Many verification TXT records at the domain: truncated over UDP, the SPF found via TCP."""
    dns_zone["example.com"] += [("TXT", f"site-verification-{i}=" + "x" * 60) for i in range(10)]
    with DnsServer(dns_zone) as server:
        report = check_sender_domain("example.com", ["s1"], resolver=server.resolver())
        asked = [q for q, _ in server.queries]
    assert asked.count("example.com.") == 2  # the UDP try (TC set) and the TCP retry
    assert all(f.level == "ok" for f in report.findings), report


def test_missing_spf_and_dmarc_are_warnings(dns_zone: dict) -> None:
    """No SPF and no _dmarc record: one warning each, no error."""
    dns_zone["example.com"] = [("MX", "10 mx.example.com.")]
    del dns_zone["_dmarc.example.com"]
    report = _check(dns_zone)
    assert _pairs(report) == {("warning", "spf"), ("warning", "dmarc")}
    assert report.ok


def test_missing_dkim_selector_is_an_error(dns_zone: dict) -> None:
    """A configured selector with no key published is an error."""
    report = _check(dns_zone, ("s1", "s2"))
    assert _pairs(report) == {("error", "dkim")}
    assert "'s2'" in report.errors[0].message
    assert not report.ok


def test_revoked_dkim_key_is_an_error(dns_zone: dict) -> None:
    """An empty p= (revoked key) is an error."""
    dns_zone["s1._domainkey.example.com"] = [("TXT", "v=DKIM1; k=rsa; p=")]
    report = _check(dns_zone)
    assert _pairs(report) == {("error", "dkim")}
    assert "revoked" in report.errors[0].message


def test_two_spf_records_is_an_error(dns_zone: dict) -> None:
    """Two v=spf1 records at the domain are an error (permerror at receivers)."""
    dns_zone["example.com"].append(("TXT", "v=spf1 include:_spf.example.net ~all"))
    assert _pairs(_check(dns_zone)) == {("error", "spf")}


def test_dmarc_p_none_is_a_warning_with_advice(dns_zone: dict) -> None:
    """p=none is a warning that says what to move to."""
    dns_zone["_dmarc.example.com"] = [("TXT", "v=DMARC1; p=none; rua=mailto:d@example.com")]
    report = _check(dns_zone)
    assert _pairs(report) == {("warning", "dmarc")}
    assert "p=quarantine" in report.warnings[0].message


def test_nxdomain_is_an_error_and_stops(dns_zone: dict) -> None:
    """A From domain that does not exist is one dns error and nothing else is asked."""
    with DnsServer(dns_zone) as server:
        report = check_sender_domain("nosuch.example.com", ["s1"], resolver=server.resolver())
        assert [q for q, _ in server.queries] == ["nosuch.example.com."]
    assert [(f.level, f.check) for f in report.findings] == [("error", "dns")]
    assert "NXDOMAIN" in report.findings[0].message


def test_unreachable_dns_is_one_warning_quickly() -> None:
    """A port nobody answers on: one dns warning within ~the lifetime, no exception."""
    with DnsServer({}, silent=True) as server:  # holds the port, so nothing else answers it
        resolver = server.resolver(lifetime=0.5)
        started = time.monotonic()
        report = check_sender_domain("example.com", ["s1"], resolver=resolver)
        elapsed = time.monotonic() - started
    assert [(f.level, f.check) for f in report.findings] == [("warning", "dns")]
    assert "could not run" in report.findings[0].message
    assert elapsed < 1.5
    assert report.ok


def test_outage_midway_keeps_findings_and_adds_one_warning(dns_zone: dict) -> None:
    """DNS that stops answering after the SPF lookup: SPF finding kept, one dns warning."""
    with DnsServer(dns_zone) as server:
        resolver = server.resolver(lifetime=0.5)
        original = server.answer

        def answer_once(wire: bytes):  # the first query is answered, then silence
            server.silent = True
            return original(wire)

        server.answer = answer_once  # type: ignore[method-assign]
        report = check_sender_domain("example.com", ["s1"], resolver=resolver)
    assert [(f.level, f.check) for f in report.findings] == [("ok", "spf"), ("warning", "dns")]
    assert "some" in report.findings[1].message


def test_single_selector_string_is_one_selector(dns_zone: dict) -> None:
    """A bare string for dkim_selectors is one selector, not one per character."""
    with DnsServer(dns_zone) as server:
        report = check_sender_domain("example.com", "s1", resolver=server.resolver())
    assert [f.message for f in report.findings if f.check == "dkim"] == [
        "selector 's1': rsa 2048-bit key"]


def test_invalid_domain_name_is_an_error() -> None:
    """A From domain that is not a DNS name is reported, not raised."""
    report = check_sender_domain("a" * 70 + ".example.com", ["s1"])
    assert [(f.level, f.check) for f in report.findings] == [("error", "dns")]


def test_format_report_lists_worst_first(dns_zone: dict) -> None:
    """The human rendering has a summary line and errors before warnings before ok."""
    dns_zone["s1._domainkey.example.com"] = [("TXT", "v=DKIM1; p=")]
    dns_zone["_dmarc.example.com"] = [("TXT", "v=DMARC1; p=none; rua=mailto:d@example.com")]
    text = format_report(_check(dns_zone))
    lines = text.splitlines()
    assert lines[0] == "DNS for example.com: 1 error, 1 warning"
    assert lines[1].split()[:2] == ["ERROR", "dkim"]
    assert lines[2].split()[:2] == ["WARNING", "dmarc"]
    assert all(line.split()[0] == "ok" for line in lines[3:]) and len(lines) > 3
