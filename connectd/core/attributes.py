"""Customer attributes, pure: CSV header cell / cell text -> attribute name, type and JSON value.

No I/O. The CSV import (connectd.customers) calls these; so may any other writer of profiles.

Types (stored in attribute_defs.type) and the JSON value each one keeps in customers.attributes:

    string    the text as given (surrounding whitespace stripped)
    integer   a JSON integer in the signed 64-bit range
    number    a JSON number (finite; no NaN or infinity)
    boolean   true/false; accepts true/false, yes/no, t/f, y/n, 1/0 in any case
    date      "YYYY-MM-DD" (ISO 8601 calendar date)
    datetime  ISO 8601 in UTC with its offset, "2024-05-01T09:30:00+00:00"; a value without an
              offset is taken to be UTC

Inference (`infer_type`) looks at sample values and picks the narrowest type every non-empty
sample parses as, in the order integer, number, boolean, date, datetime, string. It is stricter
than parsing so that identifiers are not mangled: digits with a leading zero ("007", zip codes)
or a leading "+" (phone numbers), and integers outside 64 bits, make a column a string; 1/0 are
integers, not booleans. Dates and datetimes mixed in one column make it datetime.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime

TYPES = ("string", "integer", "number", "boolean", "date", "datetime")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_NAME_LEN = 64  # attribute_defs.name is String(64)

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*\Z")
_INT_RE = re.compile(r"^[+-]?[0-9]+\Z")
_INFER_INT_RE = re.compile(r"^-?(?:0|[1-9][0-9]*)\Z")
_NUMBER_RE = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_INFER_NUMBER_RE = re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
# A date, "T" or one space, then a time: what datetime.fromisoformat reads, minus the oddities.
_DATETIME_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}")
_TRUE = frozenset({"true", "yes", "t", "y", "1"})
_FALSE = frozenset({"false", "no", "f", "n", "0"})
_INFER_BOOL = frozenset({"true", "false", "yes", "no"})

# E-mail syntax check, deliberately small (no DNS, no quoted local parts, no IP literals):
# local part: 1-64 printable ASCII characters from RFC 5322's atext plus dots, not starting or
# ending with a dot, no "..";  domain: at most 253 characters, two or more dot-separated labels
# of letters, digits and hyphens (1-63 each, no leading or trailing hyphen), non-ASCII letters
# allowed for internationalised domains; the last label is not all digits.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[^\W_](?:(?:[^\W_]|-){0,61}[^\W_])?"  # \w minus "_": letters and digits, any script
_EMAIL_RE = re.compile(
    rf"^{_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_LABEL}\.)+(?P<tld>{_LABEL})\Z")


class BadAttribute(ValueError):
    """A value, name or type that is not acceptable; the message says why (for `line N:`)."""


def normalise_name(raw: str) -> str:
    """A header cell -> the attribute name: lower snake case ("First Name" -> "first_name").

    Raises BadAttribute when nothing usable is left or the name is too long."""
    name = re.sub(r"[^0-9a-z]+", "_", raw.strip().lower()).strip("_")
    if not name:
        raise BadAttribute(f"column {raw!r}: not a usable attribute name")
    if not _NAME_RE.match(name):
        raise BadAttribute(f"column {raw!r}: attribute names must start with a letter")
    if len(name) > MAX_NAME_LEN:
        raise BadAttribute(f"column {raw!r}: attribute name longer than {MAX_NAME_LEN}")
    return name


def check_type(type_: str) -> str:
    """`type_` lower-cased if it is one of TYPES, else BadAttribute."""
    t = type_.strip().lower()
    if t not in TYPES:
        raise BadAttribute(f"unknown attribute type {type_!r} (one of {', '.join(TYPES)})")
    return t


def parse_header_cell(cell: str) -> tuple[str, str | None]:
    """"Age:integer" -> ("age", "integer"); "First Name" -> ("first_name", None)."""
    head, sep, type_ = cell.rpartition(":")
    if sep and type_.strip().lower() in TYPES:
        return normalise_name(head), type_.strip().lower()
    return normalise_name(cell), None


def parse_declaration(text: str) -> tuple[str, str]:
    """A `--type` option value "NAME=TYPE" -> (normalised name, type)."""
    name, sep, type_ = text.partition("=")
    if not sep:
        raise BadAttribute(f"--type {text!r}: expected NAME=TYPE")
    return normalise_name(name), check_type(type_)


def is_plausible_email(address: str) -> bool:
    """True when `address` looks like a deliverable address by syntax alone (see module notes)."""
    at = address.find("@")
    if not 1 <= at <= 64 or len(address) - at - 1 > 253:
        return False
    match = _EMAIL_RE.match(address)
    return match is not None and not match["tld"].isdigit()


def email_key(address: str) -> str:
    """The unique key of an address: the same address in another case is the same customer."""
    return address.strip().lower()


def _parse_integer(text: str) -> int:
    if not _INT_RE.match(text):
        raise BadAttribute(f"not an integer: {text!r}")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadAttribute(f"integer out of 64-bit range: {text!r}")
    return value


def _parse_number(text: str) -> float:
    if not _NUMBER_RE.match(text):
        raise BadAttribute(f"not a number: {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise BadAttribute(f"number out of range: {text!r}")
    return value


def _parse_boolean(text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise BadAttribute(f"not a boolean: {text!r}")


def _parse_date(text: str) -> str:
    if not _DATE_RE.match(text):
        raise BadAttribute(f"not a date (YYYY-MM-DD): {text!r}")
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise BadAttribute(f"not a date (YYYY-MM-DD): {text!r}") from None


def _parse_datetime(text: str) -> str:
    if not (_DATETIME_RE.match(text) or _DATE_RE.match(text)):
        raise BadAttribute(f"not an ISO 8601 datetime: {text!r}")
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadAttribute(f"not an ISO 8601 datetime: {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


_PARSERS = {
    "string": lambda text: text,
    "integer": _parse_integer,
    "number": _parse_number,
    "boolean": _parse_boolean,
    "date": _parse_date,
    "datetime": _parse_datetime,
}


def parser_for(type_: str) -> Callable[[str], object]:
    """The function that turns stripped, non-empty cell text into the JSON value of `type_`;
    it raises BadAttribute with the reason when the text is not of that type."""
    return _PARSERS[check_type(type_)]


def parse_value(type_: str, text: str) -> object:
    """Cell text -> JSON value of `type_`, or None for an empty cell (attribute absent)."""
    text = text.strip()
    if not text:
        return None
    return parser_for(type_)(text)


def _looks_integer(text: str) -> bool:
    return bool(_INFER_INT_RE.match(text)) and INT64_MIN <= int(text) <= INT64_MAX


def _looks_number(text: str) -> bool:
    if _INFER_INT_RE.match(text):
        return _looks_integer(text)  # a long digit string is an identifier, not a float
    return bool(_INFER_NUMBER_RE.match(text)) and math.isfinite(float(text))


def _parses(parse, text: str) -> bool:
    try:
        parse(text)
    except BadAttribute:
        return False
    return True


_INFER_ORDER = (
    ("integer", _looks_integer),
    ("number", _looks_number),
    ("boolean", lambda t: t.lower() in _INFER_BOOL),
    ("date", lambda t: _parses(_parse_date, t)),
    ("datetime", lambda t: _parses(_parse_datetime, t)),
)


def infer_type(samples: Iterable[str]) -> str:
    """The narrowest type every non-empty sample fits (see module notes); "string" if none."""
    values = [s.strip() for s in samples if s and s.strip()]
    if not values:
        return "string"
    for type_, fits in _INFER_ORDER:
        if all(fits(v) for v in values):
            return type_
    return "string"


def format_value(value: object) -> str:
    """A stored JSON value -> CSV cell text that `parse_value` reads back to the same value."""
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        import orjson
        return orjson.dumps(value).decode()
    return str(value)
