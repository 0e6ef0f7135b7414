"""The segment filter language, pure: expression text -> tree, and bad text -> position + reason."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from connectd.core.filters import (
    And,
    Compare,
    Field,
    FilterError,
    In,
    Interest,
    IsSet,
    Literal,
    Not,
    Or,
    Within,
    caret,
    parse,
)


def num(v: int | float) -> Literal:
    return Literal("number", v)


def s(v: str) -> Literal:
    return Literal("string", v)


AGE, COUNTRY, NAME = Field("age"), Field("country"), Field("name")

VALID = [
    ("age >= 30", Compare(AGE, ">=", num(30))),
    ("age>=30", Compare(AGE, ">=", num(30))),
    ("age > -1.5", Compare(AGE, ">", num(-1.5))),
    ('country = "DE"', Compare(COUNTRY, "=", s("DE"))),
    ('country == "DE"', Compare(COUNTRY, "=", s("DE"))),
    ('name != "x"', Compare(NAME, "!=", s("x"))),
    ('name <> "x"', Compare(NAME, "!=", s("x"))),
    ('city in ("Berlin", "Paris")', In(Field("city"), (s("Berlin"), s("Paris")))),
    ('city not in ("Berlin")', Not(In(Field("city"), (s("Berlin"),)))),
    ('email ends with "@example.com"', Compare(Field("email"), "ends_with", s("@example.com"))),
    ('name contains "an"', Compare(NAME, "contains", s("an"))),
    ('name starts with "A"', Compare(NAME, "starts_with", s("A"))),
    ('name not contains "an"', Not(Compare(NAME, "contains", s("an")))),
    ("vip is set", IsSet(Field("vip"))),
    ("vip is not set", Not(IsSet(Field("vip")))),
    ("vip = true", Compare(Field("vip"), "=", Literal("boolean", True))),
    ("vip = FALSE", Compare(Field("vip"), "=", Literal("boolean", False))),
    ("birthday < 2000-01-01", Compare(Field("birthday"), "<", Literal("date", date(2000, 1, 1)))),
    ("signup after 2024-05-01T09:30:00+02:00",
     Compare(Field("signup"), ">", Literal("datetime", datetime(2024, 5, 1, 7, 30, tzinfo=UTC)))),
    ("signup before 2024-05-01T09:30", Compare(Field("signup"), "<", Literal(
        "datetime", datetime(2024, 5, 1, 9, 30, tzinfo=UTC)))),
    ("clicks >= 3", Compare(Field("clicks"), ">=", num(3))),
    ("last_clicked within 30 days", Within(Field("last_clicked"), 30, "days")),
    ("last_sent not within 1 hour", Not(Within(Field("last_sent"), 1, "hours"))),
    ('interest "shoes" >= 2', Compare(Interest("shoes"), ">=", num(2))),
    (r'name = "say \"hi\" \\ o"', Compare(NAME, "=", s('say "hi" \\ o'))),
    ("AGE >= 30 AND Country = \"DE\"",
     And((Compare(AGE, ">=", num(30)), Compare(COUNTRY, "=", s("DE"))))),
    # precedence: not > and > or
    ("age = 1 or age = 2 and age = 3",
     Or((Compare(AGE, "=", num(1)), And((Compare(AGE, "=", num(2)), Compare(AGE, "=", num(3))))))),
    ("(age = 1 or age = 2) and age = 3",
     And((Or((Compare(AGE, "=", num(1)), Compare(AGE, "=", num(2)))), Compare(AGE, "=", num(3))))),
    ("not age = 1 and age = 2",
     And((Not(Compare(AGE, "=", num(1))), Compare(AGE, "=", num(2))))),
    ("not not vip is set", Not(Not(IsSet(Field("vip"))))),
    ("a = 1 and b = 2 and c = 3",
     And((Compare(Field("a"), "=", num(1)), Compare(Field("b"), "=", num(2)),
          Compare(Field("c"), "=", num(3))))),
]


@pytest.mark.parametrize(("text", "tree"), VALID, ids=[t for t, _ in VALID])
def test_parse_valid(text: str, tree: object) -> None:
    """A valid expression parses to the expected tree."""
    assert parse(text) == tree


INVALID = [
    ("age >=", 7, "expected a value after '>=' but found end of expression"),
    ("age >= and", 8, "expected a value after '>=' but found 'and'"),
    ("", 1, "expected a condition"),
    ("age", 4, "expected an operator"),
    ("(age = 1", 9, "expected ')' to close the '(' at column 1 but found end of expression"),
    ("age = 1)", 8, "expected 'and', 'or' or the end of the expression but found ')'"),
    ("age = 1 country = 2", 9, "expected 'and', 'or' or the end of the expression"),
    ('name = "abc', 8, "unterminated string"),
    ("name = 'x'", 8, "double quotes"),
    ("age $ 3", 5, "unexpected character '$'"),
    ("birthday < 2000-02-30", 12, "not a valid date: 2000-02-30"),
    ("age > 3days", 7, "not a number, date or datetime: '3days'"),
    ("vip is", 7, "expected 'set' after 'is' but found end of expression"),
    ("vip is not nice", 12, "expected 'set' after 'not'"),
    ("name not like \"a\"", 10, "expected 'in', 'contains', 'starts with', 'ends with' or "
                                "'within' after 'not'"),
    ("name starts \"a\"", 13, "expected 'with' after 'starts'"),
    ("name contains 3", 15, "expected a string in double quotes after 'contains'"),
    ("city in Berlin", 9, "expected '(' and a list of values after 'in'"),
    ('city in ("a" "b")', 14, "expected ',' or ')' in the list after 'in'"),
    ("city in ()", 10, "expected a value after '('"),
    ("last_sent within days", 18, "expected a number of days or hours after 'within'"),
    ("last_sent within 3 weeks", 20, "expected 'days' or 'hours' after '3'"),
    ("interest shoes > 1", 10, "expected the interest label in double quotes"),
    ("age = 1 and or age = 2", 13, "expected a condition"),
    ("not", 4, "expected a condition"),
]


@pytest.mark.parametrize(("text", "position", "reason"), INVALID, ids=[t for t, _, _ in INVALID])
def test_parse_invalid(text: str, position: int, reason: str) -> None:
    """A bad expression is refused with the 1-based column and the reason."""
    with pytest.raises(FilterError) as info:
        parse(text)
    assert info.value.position == position
    assert reason in info.value.reason
    assert str(info.value).startswith(f"column {position}: ")


def test_error_message_names_column_and_reason() -> None:
    """The error text reads `column N: reason`, as the brief's example spells it."""
    with pytest.raises(FilterError) as info:
        parse("clicks >= 3 and opens >=")
    assert str(info.value) == ("column 25: expected a value after '>=' but found end of "
                               "expression")


def test_caret_points_at_the_column() -> None:
    """caret() draws the expression with a caret under the error's column."""
    text = "age >= 30 and $"
    with pytest.raises(FilterError) as info:
        parse(text)
    assert caret(text, info.value) == "age >= 30 and $\n              ^"


def test_trees_are_frozen_and_hashable() -> None:
    """Trees are immutable values: usable as dict keys, equal by meaning (not position)."""
    a, b = parse("age >= 30"), parse("  age   >=   30")
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.op = "<"  # type: ignore[misc]
