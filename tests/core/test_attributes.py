"""connectd.core.attributes: names, types, parsing, inference, e-mail syntax (pure functions)."""

from __future__ import annotations

import pytest

from connectd.core import attributes as attrs


@pytest.mark.parametrize("raw, name", [
    ("email", "email"),
    (" EMAIL ", "email"),
    ("First Name", "first_name"),
    ("last-seen (UTC)", "last_seen_utc"),
    ("__zip__", "zip"),
    ("Score2", "score2"),
])
def test_normalise_name(raw: str, name: str) -> None:
    """Header cells become lower snake case names."""
    assert attrs.normalise_name(raw) == name


@pytest.mark.parametrize("raw", ["", "  ", "---", "2fast", "x" * 65, "ñ"])
def test_normalise_name_rejects(raw: str) -> None:
    """Names that are empty, start with a digit or are too long are refused."""
    with pytest.raises(attrs.BadAttribute):
        attrs.normalise_name(raw)


@pytest.mark.parametrize("cell, expected", [
    ("age:integer", ("age", "integer")),
    ("Age:INTEGER", ("age", "integer")),
    ("Signup Date:date", ("signup_date", "date")),
    ("ratio:percent", ("ratio_percent", None)),  # not a type: part of the name
    ("city", ("city", None)),
])
def test_parse_header_cell(cell: str, expected: tuple[str, str | None]) -> None:
    """A ':type' suffix declares the type only when it names one."""
    assert attrs.parse_header_cell(cell) == expected


@pytest.mark.parametrize("text, expected", [
    ("age=integer", ("age", "integer")),
    ("First Name=String", ("first_name", "string")),
])
def test_parse_declaration(text: str, expected: tuple[str, str]) -> None:
    """--type NAME=TYPE values parse to a normalised name and a type."""
    assert attrs.parse_declaration(text) == expected


@pytest.mark.parametrize("text", ["age", "age=int", "=integer"])
def test_parse_declaration_rejects(text: str) -> None:
    """A --type value without '=', with an unknown type or without a name is refused."""
    with pytest.raises(attrs.BadAttribute):
        attrs.parse_declaration(text)


@pytest.mark.parametrize("type_, text, value", [
    ("string", "  hello ", "hello"),
    ("string", "007", "007"),
    ("integer", "42", 42),
    ("integer", "-7", -7),
    ("integer", "+7", 7),
    ("integer", "007", 7),
    ("integer", str(2**63 - 1), 2**63 - 1),
    ("number", "1.5", 1.5),
    ("number", "3", 3.0),
    ("number", "-2e3", -2000.0),
    ("number", ".5", 0.5),
    ("boolean", "TRUE", True),
    ("boolean", "no", False),
    ("boolean", "1", True),
    ("boolean", "f", False),
    ("date", "2024-02-29", "2024-02-29"),
    ("datetime", "2024-05-01T09:30:00Z", "2024-05-01T09:30:00+00:00"),
    ("datetime", "2024-05-01 11:30:00+02:00", "2024-05-01T09:30:00+00:00"),
    ("datetime", "2024-05-01T09:30", "2024-05-01T09:30:00+00:00"),
    ("datetime", "2024-05-01", "2024-05-01T00:00:00+00:00"),
    ("integer", "", None),
    ("date", "   ", None),
])
def test_parse_value(type_: str, text: str, value: object) -> None:
    """Cell text parses to the JSON value of its type; an empty cell is None (absent)."""
    parsed = attrs.parse_value(type_, text)
    assert parsed == value
    assert type(parsed) is type(value)


@pytest.mark.parametrize("type_, text", [
    ("integer", "4x"),
    ("integer", "1.0"),
    ("integer", str(2**63)),
    ("number", "1,5"),
    ("number", "nan"),
    ("number", "1e999"),
    ("boolean", "maybe"),
    ("date", "2023-02-29"),
    ("date", "01/02/2024"),
    ("date", "2024-01-01T00:00"),
    ("datetime", "yesterday"),
    ("datetime", "2024-13-01T00:00"),
])
def test_parse_value_rejects(type_: str, text: str) -> None:
    """Text that is not of the type raises BadAttribute with the text in the reason."""
    with pytest.raises(attrs.BadAttribute, match="not|range"):
        attrs.parse_value(type_, text)


@pytest.mark.parametrize("samples, type_", [
    (["1", "2", "-3"], "integer"),
    (["1", "2.5", ""], "number"),
    (["1e3", "4"], "number"),
    (["true", "False", "YES", "no"], "boolean"),
    (["1", "0"], "integer"),
    (["2024-01-01", "2023-12-31"], "date"),
    (["2024-01-01T10:00:00Z", "2024-01-02 10:00"], "datetime"),
    (["2024-01-01", "2024-01-02T10:00:00"], "datetime"),
    (["007", "123"], "string"),  # leading zero: an identifier, keep it as text
    (["+4420123", "12"], "string"),  # a leading + is a phone number
    ([str(2**64), "1"], "string"),
    (["1", "x"], "string"),
    (["yes", "1"], "string"),
    ([], "string"),
    (["", "  "], "string"),
])
def test_infer_type(samples: list[str], type_: str) -> None:
    """Inference picks the narrowest type all non-empty samples fit."""
    assert attrs.infer_type(samples) == type_


@pytest.mark.parametrize("address", [
    "a@x.com", "First.Last+tag@sub.example.co.uk", "o'brien@example.ie", "x@b-c.io",
    "user@bücher.de", "a_b@x-y.z1",
])
def test_plausible_email(address: str) -> None:
    """Ordinary addresses pass the syntax check."""
    assert attrs.is_plausible_email(address)


@pytest.mark.parametrize("address", [
    "", "plain", "@x.com", "a@", "a@x", "a@@x.com", "a@b@x.com", "a b@x.com", "a@x .com",
    ".a@x.com", "a.@x.com", "a..b@x.com", "a@-x.com", "a@x-.com", "a@x..com", "a@1.2.3.4",
    "a@x_y.com", "x" * 65 + "@x.com", "a@" + "x" * 64 + ".com",
])
def test_implausible_email(address: str) -> None:
    """Malformed addresses fail the syntax check."""
    assert not attrs.is_plausible_email(address)


def test_email_key_lowercases() -> None:
    """The key of an address is its lower-cased, stripped form."""
    assert attrs.email_key(" A.B@Example.COM ") == "a.b@example.com"


@pytest.mark.parametrize("type_, text", [
    ("string", "hello, world"), ("integer", "-12"), ("number", "0.1"), ("number", "1e+20"),
    ("boolean", "true"), ("boolean", "false"), ("date", "2024-02-29"),
    ("datetime", "2024-05-01T09:30:00.123456+00:00"),
])
def test_format_value_round_trips(type_: str, text: str) -> None:
    """format_value's text parses back to the same value."""
    value = attrs.parse_value(type_, text)
    assert attrs.parse_value(type_, attrs.format_value(value)) == value



@pytest.mark.parametrize("address", ["a@x.com\n", "a@x.com\n\n", "\na@x.com"])
def test_email_with_newline_is_implausible(address: str) -> None:
    """A newline before or after an address is not silently accepted."""
    assert not attrs.is_plausible_email(address)
