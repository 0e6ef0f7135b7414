"""connectd.core.dkim: our signatures verified by dkimpy (no network: DNS answered locally)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
import time
from datetime import UTC, datetime

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from connectd.core import dkim, mime

NOW = 1_714_566_600
HAS_NACL = importlib.util.find_spec("nacl") is not None  # dkimpy needs PyNaCl for ed25519


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[bytes, str]]:
    return {"rsa": dkim.generate_key("rsa"), "ed25519": dkim.generate_key("ed25519")}


def built(**over: object) -> bytes:
    return mime.build_message(**built_kwargs(**over))  # type: ignore[arg-type]


def built_kwargs(**over: object) -> dict[str, object]:
    kw: dict[str, object] = dict(
        from_addr="news@shop.example", from_name="Shop \u00e9", to_addr="bob@example.org",
        subject="Offer \u2713 " * 12, html="<p>Hello</p>\n" * 400, text="Hello  Bob \n\n\n",
        message_id=mime.message_id_for(1, 2, "shop.example"),
        return_path="v@bounce.shop.example", list_unsubscribe_mailto="u@shop.example",
        list_unsubscribe_url="https://t.shop.example/u/x",
        date=datetime(2024, 5, 1, tzinfo=UTC))
    kw.update(over)
    return kw


ODD = {
    "built": built(),
    "trailing_ws": b"From: a@shop.example \t\r\nTo: b@x.example\r\nSubject:  hi  there \r\n\r\n"
                   b"line with trailing   \r\n  indented\t\ttabs \r\n\r\n\r\n\r\n",
    "empty_body": b"From: a@shop.example\r\nTo: b@x.example\r\nSubject: x\r\n\r\n",
    "no_body_section": b"From: a@shop.example\r\nSubject: x\r\n",
    "long_headers": b"From: a@shop.example\r\nSubject: " + b"w" * 900 + b"\r\nX-Long: "
                    + b"y " * 400 + b"\r\n\r\nbody\r\n",
    "folded": b"From: Someone\r\n  <a@shop.example>\r\nSubject: folded\r\n\tover\r\n  three\r\n"
              b"TO:  b@x.example\r\n\r\nno final newline",
    "dup_headers": b"From: a@shop.example\r\nTo: b@x.example\r\nTo: c@x.example\r\n\r\nx\r\n",
}


def dns(record: str):  # type: ignore[no-untyped-def]
    def answer(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"sel._domainkey.shop.example."
        return record.encode()
    return answer


def verify_ed25519(signed: bytes, record: str) -> bool:
    """Ed25519 check without PyNaCl: our relaxed canonicalisation of the signed data is
    proven by dkimpy on RSA; here the signature over its SHA-256 digest is checked."""
    pub = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(record.split("p=")[1]))
    head, rest = signed.split(b"\r\n", 1)
    while rest.startswith(b" "):
        line, rest = rest.split(b"\r\n", 1)
        head += b"\r\n" + line
    sig = base64.b64decode(re.sub(rb"\s", b"", head.split(b"b=")[-1]))
    prefix = head[:head.rindex(b"b=") + 2]
    signer_view = dkim.DkimSigner.__new__(dkim.DkimSigner)
    listed = re.search(rb"h=([^;]*);", re.sub(rb"\s", b"", head)).group(1)  # type: ignore[union-attr]
    signer_view.headers = tuple(dict.fromkeys(h.decode() for h in listed.split(b":")))
    by_name: dict[bytes, list[bytes]] = {}
    for name, raw in dkim._header_fields(dkim._split(rest)[0]):
        by_name.setdefault(name.strip().lower(), []).append(raw)
    signed_fields = [dkim.canonical_header(raw) + b"\r\n" for h in signer_view.headers
                     for raw in reversed(by_name.get(h.encode(), []))]
    data = b"".join(signed_fields) + dkim.canonical_header(prefix)
    try:
        pub.verify(sig, hashlib.sha256(data).digest())
    except Exception:  # noqa: BLE001 - InvalidSignature is the expected failure
        return False
    return True


@pytest.mark.parametrize("name", sorted(ODD))
def test_rsa_verifies_with_dkimpy(keys: dict[str, tuple[bytes, str]], name: str) -> None:
    """An RSA-2048 signature on built and odd messages verifies with dkimpy."""
    pem, record = keys["rsa"]
    signed = dkim.DkimSigner("sel", "shop.example", pem).sign(ODD[name], NOW)
    assert signed.endswith(ODD[name])
    assert dkimpy.verify(signed, dnsfunc=dns(record))


@pytest.mark.skipif(not HAS_NACL, reason="dkimpy verifies ed25519 only with PyNaCl")
@pytest.mark.parametrize("name", sorted(ODD))
def test_ed25519_verifies_with_dkimpy(keys: dict[str, tuple[bytes, str]], name: str) -> None:
    """An Ed25519 signature on built and odd messages verifies with dkimpy."""
    pem, record = keys["ed25519"]
    signed = dkim.DkimSigner("sel", "shop.example", pem).sign(ODD[name], NOW)
    assert dkimpy.verify(signed, dnsfunc=dns(record))


def test_ed25519_signature_checks_out(keys: dict[str, tuple[bytes, str]]) -> None:
    """An Ed25519 signature (RFC 8463) verifies with the public key from the TXT record."""
    pem, record = keys["ed25519"]
    signed = dkim.DkimSigner("sel", "shop.example", pem).sign(ODD["built"], NOW)
    assert b"a=ed25519-sha256;" in signed
    assert verify_ed25519(signed, record)
    assert not verify_ed25519(signed.replace(b"Subject: ", b"Subject: X"), record)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_tampering_fails(keys: dict[str, tuple[bytes, str]], kind: str) -> None:
    """A changed body byte, a changed signed header or an added From breaks the signature."""
    if kind == "ed25519" and not HAS_NACL:
        pytest.skip("dkimpy verifies ed25519 only with PyNaCl")
    pem, record = keys[kind]
    signed = dkim.DkimSigner("sel", "shop.example", pem).sign(ODD["built"], NOW)
    assert dkimpy.verify(signed, dnsfunc=dns(record))
    tampered = [
        signed.replace(b"Hello</p>", b"Hallo</p>", 1),
        signed.replace(b"To: bob@example.org", b"To: eve@example.org"),
        signed.replace(b"\r\nTo:", b"\r\nFrom: eve@evil.example\r\nTo:"),  # oversigned From
        signed.replace(b"\r\n\r\n", b"\r\nSubject: second\r\n\r\n", 1),  # oversigned Subject
    ]
    for msg in tampered:
        assert msg != signed
        assert not dkimpy.verify(msg, dnsfunc=dns(record))


def test_whitespace_changes_survive(keys: dict[str, tuple[bytes, str]]) -> None:
    """Relaxed canonicalisation: refolding headers and trailing spaces do not break it."""
    pem, record = keys["rsa"]
    signed = dkim.DkimSigner("sel", "shop.example", pem).sign(ODD["trailing_ws"], NOW)
    moved = signed.replace(b"Subject:  hi  there", b"Subject: hi\r\n there").replace(
        b"\r\n\r\n\r\n", b"   \r\n\r\n")
    assert moved != signed
    assert dkimpy.verify(moved, dnsfunc=dns(record))


def test_header_shape(keys: dict[str, tuple[bytes, str]]) -> None:
    """The header has the promised tags, lines of at most 78, From oversigned."""
    pem, _ = keys["rsa"]
    signed = dkim.DkimSigner("sel", "shop.example", pem).sign(ODD["built"], NOW)
    header = signed[:signed.index(b"\r\nFrom:")]
    flat = re.sub(rb"\s", b"", header)
    for tag in (b"v=1;", b"a=rsa-sha256;", b"c=relaxed/relaxed;", b"d=shop.example;",
                b"s=sel;", b"t=%d;" % NOW):
        assert tag in flat
    assert b"h=from:from:to:to:subject:subject:date:message-id" in flat
    assert max(len(line) for line in header.split(b"\r\n")) <= 78


@pytest.mark.parametrize("message", [b"From: a@x\nTo: b@x\n\nbody\n",
                                     b"From: a@x\r\n\r\nbare\rcr\r\n", b"garbage",
                                     b"From: a@x\r\nnot a header\r\n\r\nx"])
def test_bad_input_refused(keys: dict[str, tuple[bytes, str]], message: bytes) -> None:
    """LF-only or malformed input raises ValueError instead of a signature MTAs will break."""
    with pytest.raises(ValueError):
        dkim.DkimSigner("sel", "shop.example", keys["rsa"][0]).sign(message, NOW)


def test_bad_signer_refused(keys: dict[str, tuple[bytes, str]]) -> None:
    """An unsafe selector or a header list without From is refused."""
    with pytest.raises(ValueError):
        dkim.DkimSigner("sel; x=1", "shop.example", keys["rsa"][0])
    with pytest.raises(ValueError):
        dkim.DkimSigner("sel", "shop.example", keys["rsa"][0], headers=("Subject",))
    with pytest.raises(ValueError):
        dkim.generate_key("dsa")


@pytest.mark.parametrize("body,expected", [
    (b"", b""), (b"\r\n\r\n", b""), (b"a \t b  \r\n\r\n", b"a b\r\n"), (b"x", b"x\r\n"),
    (b" \r\nx\t\r\n", b"\r\nx\r\n"),
])
def test_canonical_body(body: bytes, expected: bytes) -> None:
    """Relaxed body canonicalisation follows RFC 6376 3.4.4."""
    assert dkim.canonical_body(body) == expected


def _reference_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 written the obvious way, line by line."""
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


@given(parts=st.lists(st.sampled_from([b"a", b"=", b" ", b"  ", b"\t", b"\r\n", b"x y"]),
                      max_size=40))
def test_canonical_body_matches_reference(parts: list[bytes]) -> None:
    """The fast canonicalisation equals the line-by-line reading of RFC 6376 on any mix of
    spaces, tabs and line breaks."""
    body = b"".join(parts)
    assert dkim.canonical_body(body) == _reference_body(body)


@pytest.mark.parametrize("message", [b"From: a@x\r\n\r\nx\ny\r\n", b"From: a@x\r\n\r\nx\n\ry\r\n",
                                     b"From: a@x\n\r\n\r\nx\r\n", b"From: a@x\r\n\r\nx\r\n\r",
                                     b"From: a@x\r\n\r\n\nx\r\n"])
def test_bare_line_breaks_refused(keys: dict[str, tuple[bytes, str]], message: bytes) -> None:
    """A bare LF or CR anywhere (header or body, even paired the wrong way) is refused."""
    with pytest.raises(ValueError, match="CRLF"):
        dkim.DkimSigner("sel", "shop.example", keys["rsa"][0]).sign(message, NOW)


def test_cost(keys: dict[str, tuple[bytes, str]]) -> None:
    """Prints µs per build_message and per sign (RSA-2048, Ed25519); informational."""
    message = ODD["built"]
    results = {}
    for kind in ("rsa", "ed25519"):
        signer = dkim.DkimSigner("sel", "shop.example", keys[kind][0])
        n = 300
        start = time.perf_counter()
        for _ in range(n):
            signer.sign(message, NOW)
        results[kind] = (time.perf_counter() - start) / n * 1e6
    print(f"\nsign: rsa-2048 {results['rsa']:.0f} us, ed25519 {results['ed25519']:.0f} us "
          f"per {len(message)}-byte message")
    assert results["rsa"] < 5000  # dkimpy's pure-Python RSA (~7 ms) would fail this


# ---------------------------------------------------------------------------------------------
# sign_fields (the composer's path) and simple body canonicalisation

BUILT_VARIANTS = {
    "multipart": {},
    "html_only": {"text": None},
    "text_only": {"html": None, "text": "Hi  there\n\n\n"},
    "folded_subject": {"subject": "A subject long enough to be folded " * 4},
    "extra_headers": {"extra_headers": [("X-Campaign", "spring  sale"), ("X-Tab", "a\tb")]},
}


@pytest.mark.parametrize("body_canon", ["relaxed", "simple"])
@pytest.mark.parametrize("variant", sorted(BUILT_VARIANTS))
def test_sign_fields_equals_sign(keys: dict[str, tuple[bytes, str]], variant: str,
                                 body_canon: str) -> None:
    """sign_fields on build_parts output gives byte for byte the signature sign() gives on
    the joined message, and dkimpy verifies it."""
    pem, record = keys["rsa"]
    signer = dkim.DkimSigner("sel", "shop.example", pem, body_canonicalization=body_canon)
    fields, body = mime.build_parts(**built_kwargs(**BUILT_VARIANTS[variant]))  # type: ignore[arg-type]
    message = mime.join_message(fields, body)
    assert message == built(**BUILT_VARIANTS[variant])
    via_fields = mime.join_message(fields, body, signer.sign_fields(fields, body, NOW))
    assert via_fields == signer.sign(message, NOW)  # RSA PKCS#1 v1.5 is deterministic
    assert f"c=relaxed/{body_canon};".encode() in via_fields
    assert dkimpy.verify(via_fields, dnsfunc=dns(record))


@pytest.mark.skipif(not HAS_NACL, reason="dkimpy verifies ed25519 only with PyNaCl")
def test_sign_fields_ed25519_and_rsa_together(keys: dict[str, tuple[bytes, str]]) -> None:
    """Two signatures over the same fields (the composer's RSA + Ed25519) both verify."""
    fields, body = mime.build_parts(**built_kwargs())  # type: ignore[arg-type]
    rsa_sig = dkim.DkimSigner("sel", "shop.example", keys["rsa"][0],
                              body_canonicalization="simple").sign_fields(fields, body, NOW)
    ed_sig = dkim.DkimSigner("sel", "shop.example", keys["ed25519"][0],
                             body_canonicalization="simple").sign_fields(fields, body, NOW)
    signed = mime.join_message(fields, body, ed_sig + rsa_sig)
    results = []
    for idx in (0, 1):
        d = dkimpy.DKIM(signed)
        results.append(d.verify(idx=idx, dnsfunc=dns(keys["ed25519" if idx == 0 else "rsa"][1])))
    assert results == [True, True]


def test_simple_body_breaks_on_whitespace_change(keys: dict[str, tuple[bytes, str]]) -> None:
    """Simple body canonicalisation: the body is signed as it is, so a changed space in it
    fails where relaxed would pass; trailing empty lines still do not count."""
    pem, record = keys["rsa"]
    fields, body = mime.build_parts(**built_kwargs(text="two  spaces\n"))  # type: ignore[arg-type]
    for canon, survives in (("simple", False), ("relaxed", True)):
        signer = dkim.DkimSigner("sel", "shop.example", pem, body_canonicalization=canon)
        signed = mime.join_message(fields, body, signer.sign_fields(fields, body, NOW))
        assert dkimpy.verify(signed + b"\r\n\r\n", dnsfunc=dns(record))
        changed = signed.replace(b"two  spaces", b"two spaces")
        assert changed != signed
        assert dkimpy.verify(changed, dnsfunc=dns(record)) is survives


@pytest.mark.parametrize("body,expected", [
    (b"", b"\r\n"), (b"\r\n", b"\r\n"), (b"\r\n\r\n", b"\r\n"), (b"x", b"x\r\n"),
    (b"a \t b  \r\n\r\n", b"a \t b  \r\n"), (b"x\r\n", b"x\r\n"), (b"x\r\n\r\n\r\n", b"x\r\n"),
])
def test_simple_body(body: bytes, expected: bytes) -> None:
    """Simple body canonicalisation follows RFC 6376 3.4.3 (an empty body is one CRLF)."""
    assert dkim.simple_body(body) == expected


def test_bad_body_canonicalisation_refused(keys: dict[str, tuple[bytes, str]]) -> None:
    with pytest.raises(ValueError, match="canonicalisation"):
        dkim.DkimSigner("sel", "shop.example", keys["rsa"][0], body_canonicalization="nowsp")
