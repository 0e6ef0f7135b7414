"""connectd.core.tokens: signed tracker and VERP tokens (pure functions)."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectd.core import tokens as tk

KEY = b"k" * 32
OLD = b"o" * 32
fields_st = st.lists(st.integers(min_value=0, max_value=tk.MAX_FIELD),
                     max_size=tk.MAX_FIELDS).map(tuple)


@given(fields=fields_st, kind=st.sampled_from(list(tk.KINDS.values())))
def test_round_trip(fields: tuple[int, ...], kind: str) -> None:
    """Any tuple of fields comes back unchanged from a token of the same kind and key."""
    token = tk.sign_token(KEY, *fields, kind=kind)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert tk.verify_token([KEY], token, kind) == fields


@given(instance=st.integers(0, tk.MAX_FIELD), customer=st.integers(0, tk.MAX_FIELD))
def test_verp_round_trip_any_case(instance: int, customer: int) -> None:
    """A VERP token is lower-case base32 and verifies in upper or mixed case too."""
    token = tk.sign_verp(KEY, instance, customer)
    assert re.fullmatch(r"[a-z2-7]+", token)
    assert tk.verify_verp([KEY], token) == (instance, customer)
    assert tk.verify_verp([KEY], token.upper()) == (instance, customer)
    assert tk.verify_verp([KEY], token.title()) == (instance, customer)


def test_click_token_is_short() -> None:
    """A click token for realistic ids stays under 30 characters."""
    token = tk.sign_token(KEY, 123_456, 12_345_678, 9, kind="c")
    print(f"click token: {token} ({len(token)} chars)")
    assert len(token) < 30


def test_verp_token_fits_a_local_part() -> None:
    """Even the largest VERP token leaves room in a 64-octet local part."""
    token = tk.sign_verp(KEY, tk.MAX_FIELD, tk.MAX_FIELD)
    assert len(token) <= 56  # room for a short prefix such as "b-"
    assert len(tk.sign_verp(KEY, 123_456, 12_345_678)) <= 32


def _flip(token: str, i: int, alphabet: str) -> list[str]:
    return [token[:i] + c + token[i + 1:] for c in alphabet if c != token[i]]


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_tamper_every_character() -> None:
    """Changing any character of a token to any other makes it fail."""
    token = tk.sign_token(KEY, 123_456, 12_345_678, 9, kind="c")
    for i in range(len(token)):
        for bad in _flip(token, i, B64):
            with pytest.raises(tk.BadToken):
                tk.verify_token([KEY], bad, "c")


def test_tamper_every_byte() -> None:
    """Flipping any bit of the decoded bytes makes the token fail."""
    token = tk.sign_token(KEY, 7, 300, 2**40, kind="u")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for i in range(len(raw)):
        for bit in range(8):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            text = base64.urlsafe_b64encode(bytes(bad)).rstrip(b"=").decode()
            with pytest.raises(tk.BadToken):
                tk.verify_token([KEY], text, "u")


def test_tamper_every_verp_character() -> None:
    """Changing any character of a VERP token to any other letter or digit makes it fail."""
    token = tk.sign_verp(KEY, 42, 4242)
    for i in range(len(token)):
        for bad in _flip(token, i, "abcdefghijklmnopqrstuvwxyz234567"):
            with pytest.raises(tk.BadToken):
                tk.verify_verp([KEY], bad)


@pytest.mark.parametrize("cut", [1, 2, 5, 12, 20])
def test_truncated(cut: int) -> None:
    """A token missing characters at the end or the start fails."""
    token = tk.sign_token(KEY, 123_456, 12_345_678, 9, kind="c")
    for bad in (token[:-cut], token[cut:]):
        with pytest.raises(tk.BadToken):
            tk.verify_token([KEY], bad, "c")


def test_kinds_are_separate() -> None:
    """A token signed for one kind does not verify as any other."""
    for kind in tk.KINDS.values():
        token = tk.sign_token(KEY, 1, 2, 3, kind=kind)
        for other in tk.KINDS.values():
            if other == kind:
                continue
            with pytest.raises(tk.BadToken, match="bad signature"):
                tk.verify_token([KEY], token, other)


def test_click_token_is_not_a_verp_token() -> None:
    """A web token's bytes re-encoded as base32 are not accepted as a VERP token."""
    token = tk.sign_token(KEY, 1, 2, kind="c")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    as_verp = base64.b32encode(raw).rstrip(b"=").decode().lower()
    with pytest.raises(tk.BadToken):
        tk.verify_verp([KEY], as_verp)


def test_rotation() -> None:
    """Tokens signed with the old key verify while it is still listed, and not after."""
    old_token = tk.sign_token(OLD, 5, 6, kind="o")
    new_token = tk.sign_token(KEY, 5, 6, kind="o")
    assert tk.verify_token([KEY, OLD], old_token, "o") == (5, 6)
    assert tk.verify_token([KEY, OLD], new_token, "o") == (5, 6)
    with pytest.raises(tk.BadToken):
        tk.verify_token([KEY], old_token, "o")


def test_wrong_key() -> None:
    """A token signed with a key that is not listed fails."""
    token = tk.sign_token(b"x" * 32, 1, kind="c")
    with pytest.raises(tk.BadToken):
        tk.verify_token([KEY, OLD], token, "c")


def test_text_keys_equal_bytes_keys() -> None:
    """A key given as text signs exactly as its UTF-8 bytes do."""
    assert tk.sign_token("k" * 32, 1, 2, kind="c") == tk.sign_token(KEY, 1, 2, kind="c")


@pytest.mark.parametrize("garbage", [
    "", "A", "AAAA", "!!!!", "abc def", "ä" * 20, "A" * (tk.MAX_TOKEN_LEN + 1),
    "AAAAAAAAAAAAAAAAAAAAAAAA=", "../../etc/passwd", "\x00" * 28, None, b"AAAA", 12,
])
def test_garbage_is_bad_token(garbage: object) -> None:
    """Anything that is not a token raises BadToken, never another exception."""
    with pytest.raises(tk.BadToken):
        tk.verify_token([KEY], garbage, "c")  # type: ignore[arg-type]
    with pytest.raises(tk.BadToken):
        tk.verify_verp([KEY], garbage)  # type: ignore[arg-type]


@given(st.text(max_size=200))
def test_random_text_is_bad_token(text: str) -> None:
    """Random text never verifies and never raises anything but BadToken."""
    with pytest.raises(tk.BadToken):
        tk.verify_token([KEY], text, "c")
    with pytest.raises(tk.BadToken):
        tk.verify_verp([KEY], text)


def _forge(payload: bytes, kind: str) -> str:
    """A correctly signed token around an arbitrary payload (what a key holder could make)."""
    prefix = bytes((tk.VERSION, len(kind))) + kind.encode()
    raw = bytes((tk.VERSION,)) + payload + tk._mac(KEY, prefix, payload)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize("payload, reason", [
    (b"\x80\x00", "non-minimal"),
    (b"\x80", "truncated"),
    (b"\xff" * 10 + b"\x01", "longer than 10"),
    (b"\xff" * 9 + b"\x02", "larger than"),
    (b"\x01" * (tk.MAX_FIELDS + 1), "more than"),
])
def test_signed_but_malformed_payload(payload: bytes, reason: str) -> None:
    """Malformed varints are refused even under a valid signature."""
    with pytest.raises(tk.BadToken, match=reason):
        tk.verify_token([KEY], _forge(payload, "c"), "c")


def test_unknown_version() -> None:
    """A token whose version byte is not 1 is refused as such."""
    token = tk.sign_token(KEY, 1, kind="c")
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[0] = 2
    bad = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(tk.BadToken, match="version"):
        tk.verify_token([KEY], bad, "c")


@pytest.mark.parametrize("fields", [(-1,), (1, -5), (2**64,), (True,), ("1",), (1.0,),
                                    tuple(range(tk.MAX_FIELDS + 1))])
def test_sign_refuses_bad_fields(fields: tuple[object, ...]) -> None:
    """Negative, too large, non-int fields, or too many of them, raise BadToken."""
    with pytest.raises(tk.BadToken):
        tk.sign_token(KEY, *fields, kind="c")  # type: ignore[arg-type]


def test_caller_mistakes_are_value_errors() -> None:
    """No keys, an empty key or an empty kind are the caller's bug: ValueError."""
    token = tk.sign_token(KEY, 1, kind="c")
    with pytest.raises(ValueError):
        tk.verify_token([], token, "c")
    with pytest.raises(ValueError):
        tk.sign_token(b"", 1, kind="c")
    with pytest.raises(ValueError):
        tk.sign_token(KEY, 1, kind="")


def test_zero_fields() -> None:
    """A token may carry no fields at all."""
    assert tk.verify_token([KEY], tk.sign_token(KEY, kind="o"), "o") == ()


def test_verp_needs_exactly_two_fields() -> None:
    """A 'v'-kind token with three fields is not accepted as a VERP address."""
    raw = tk._seal(KEY, (1, 2, 3), "v")
    text = base64.b32encode(raw).rstrip(b"=").decode().lower()
    with pytest.raises(tk.BadToken, match="pair"):
        tk.verify_verp([KEY], text)


@given(key=st.binary(min_size=1, max_size=200), kind=st.sampled_from(["c", "o", "u", "v", "x" * 255]),
       payload=st.binary(max_size=90))
def test_prepared_mac_is_hmac(key: bytes, kind: str, payload: bytes) -> None:
    """The prepared (copied) HMAC gives exactly the one-shot HMAC-SHA256, keys > 64 bytes too."""
    prefix = bytes((tk.VERSION, len(kind))) + kind.encode()
    assert tk._keyed_mac(key, kind, payload) == tk._mac(key, prefix, payload)
    assert tk._keyed_mac(key.hex(), kind, payload) == tk._mac(key.hex().encode(), prefix, payload)


def test_sign_is_fast() -> None:
    """The 13 tokens of one mail take well under 30 us (the composer's budget is ~600 us)."""
    import time
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(1000):
            tk.sign_token(KEY, 123_456, i, 9, kind="c")
        best = min(best, (time.perf_counter() - t0) / 1000)
    print(f"sign_token: {best * 1e6:.2f} us")
    assert best * 13 < 30e-6


@given(head=st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=7),
       tails=st.lists(st.integers(0, 2**64 - 1), max_size=5))
def test_sign_tokens_equals_sign_token(head: list[int], tails: list[int]) -> None:
    """sign_tokens gives exactly the tokens sign_token gives one by one, and they verify."""
    key = "k" * 43
    got = tk.sign_tokens(key, head, tails, "c")
    assert got == [tk.sign_token(key, *head, t, kind="c") for t in tails]
    for t, token in zip(tails, got, strict=True):
        assert tk.verify_token([key], token, "c") == (*head, t)


def test_sign_tokens_refuses_what_sign_token_refuses() -> None:
    with pytest.raises(tk.BadToken):
        tk.sign_tokens("k", list(range(8)), [1], "c")
    with pytest.raises(tk.BadToken):
        tk.sign_tokens("k", [1], [-1], "c")
    with pytest.raises(ValueError):
        tk.sign_tokens("k", [1], [1], "")
