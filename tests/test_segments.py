"""Segment filters compiled to SQLAlchemy and counted on real SQLite and PostgreSQL databases,
their type errors, and `connectd segment count`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_config
from sqlalchemy import Engine, func, insert, select

from connectd.core.filters import FilterError, parse
from connectd.db.customer import AttributeDef, Customer, CustomerInterest, CustomerStats
from connectd.db.engine import make_engine
from connectd.segments import EX_DATAERR, compile_filter, count, select_matching

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TYPES = {"age": "integer", "score": "number", "country": "string", "name": "string",
         "city": "string", "vip": "boolean", "birthday": "date", "signup": "datetime"}

# ann, bob, cy, dee (no attributes), dan (LIKE wildcards in the name)
PEOPLE = [
    ("ann@example.com", {"age": 30, "score": 4.5, "country": "DE", "name": "Ann",
                         "city": "Berlin", "vip": True, "birthday": "1990-05-01",
                         "signup": "2025-06-01T10:00:00+00:00"}),
    ("Bob@Example.com", {"age": 45, "score": 2, "country": "FR", "name": "Bob",
                         "city": "Paris", "vip": False, "birthday": "2001-01-01",
                         "signup": "2020-01-01T00:00:00+00:00"}),
    ("cy@other.org", {"age": 22, "country": "DE", "name": "Cyan", "city": "Hamburg"}),
    ("dee@other.org", {}),
    ("dan@shop.net", {"age": 5, "name": "Dan_%"}),
]


def days_ago(n: int) -> datetime:
    return NOW - timedelta(days=n)


def _fill(engine: Engine) -> dict[str, int]:
    """Insert PEOPLE, their attribute types, stats for ann and bob, interests; return ids."""
    ids: dict[str, int] = {}
    with engine.begin() as conn:
        conn.execute(insert(AttributeDef), [{"name": n, "type": t, "created_at": NOW}
                                            for n, t in TYPES.items()])
        for email, attrs in PEOPLE:
            ids[email.split("@")[0].lower()] = conn.execute(
                insert(Customer).values(email=email, email_key=email.lower(), attributes=attrs,
                                        created_at=NOW, updated_at=NOW)
                .returning(Customer.id)).scalar_one()
        conn.execute(insert(CustomerStats), [
            {"customer_id": ids["ann"], "sent_count": 5, "open_count": 3, "click_count": 4,
             "reply_count": 1, "last_sent_at": days_ago(2), "last_open_at": days_ago(10),
             "last_click_at": days_ago(3), "last_reply_at": datetime(2025, 12, 1, tzinfo=UTC)},
            {"customer_id": ids["bob"], "sent_count": 2, "open_count": 0, "click_count": 0,
             "reply_count": 0, "last_sent_at": days_ago(20), "last_open_at": None,
             "last_click_at": None, "last_reply_at": None},
        ])
        conn.execute(insert(CustomerInterest), [
            {"customer_id": ids["ann"], "label": "shoes", "count": 3},
            {"customer_id": ids["ann"], "label": "bags", "count": 1},
            {"customer_id": ids["bob"], "label": "shoes", "count": 1},
        ])
    return ids


@pytest.fixture
def engine(migrated_customer_url: str) -> Engine:
    engine = make_engine(migrated_customer_url)
    _fill(engine)
    yield engine
    engine.dispose()


COUNTS = [
    ("age >= 30", 2),
    ("age > 3", 4),
    ("age = 30.0", 1),
    ("age in (22, 45)", 2),
    ("score > 3", 1),
    ("score >= 2", 2),
    ('country = "DE"', 2),
    ('country != "DE"', 1),
    ('not country = "DE"', 3),
    ('city in ("Berlin", "Paris")', 2),
    ('city not in ("Berlin")', 4),
    ('email ends with "@example.com"', 2),
    ('email ends with "@EXAMPLE.COM"', 2),
    ('email = "BOB@example.com"', 1),
    ('email starts with "d"', 2),
    ('name contains "an"', 3),
    ('name starts with "b"', 1),
    ('name not starts with "b"', 4),
    ('name contains "%"', 1),
    ('name contains "_"', 1),
    ('name = "Dan_%"', 1),
    ("vip is set", 2),
    ("vip is not set", 3),
    ("vip = true", 1),
    ("vip = false", 1),
    ("vip != true", 1),
    ("birthday < 2000-01-01", 1),
    ("birthday after 2000-12-31", 1),
    ("birthday = 2001-01-01", 1),
    ("signup after 2025-01-01", 1),
    ("signup before 2025-06-01T10:00:01Z", 2),
    ("signup within 365 days", 1),
    ("signup not within 365 days", 4),
    ("clicks >= 3", 1),
    ("clicks = 0", 4),
    ("opens > 0", 1),
    ("sends >= 2", 2),
    ("replies = 1", 1),
    ("soft_bounces = 0", 5),
    ("last_clicked within 30 days", 1),
    ("last_clicked within 2 days", 0),
    ("last_sent within 7 days", 1),
    ("last_sent not within 7 days", 4),
    ("last_sent within 72 hours", 1),
    ("last_opened before 2026-01-01", 0),
    ("last_replied before 2026-01-01", 1),
    ("last_sent after 2026-02-01T00:00:00+01:00", 2),
    ("last_opened is set", 1),
    ("last_opened is not set", 4),
    ('interest "shoes" >= 2', 1),
    ('interest "shoes" >= 1', 2),
    ('interest "shoes" = 0', 3),
    ('interest "hats" < 1', 5),
    ('country = "DE" or country = "FR" and age > 40', 3),
    ('(country = "DE" or country = "FR") and age > 40', 1),
    ('not country = "DE" and vip is set', 1),
    ('NOT (age > 25 AND country = "DE")', 4),
    ('AGE >= 30 And Country = "DE"', 1),
    ('clicks >= 3 and interest "bags" > 0 and email ends with "example.com"', 1),
]


@pytest.mark.parametrize(("expression", "expected"), COUNTS, ids=[e for e, _ in COUNTS])
def test_count(engine: Engine, expression: str, expected: int) -> None:
    """Each expression counts the customers it should, on SQLite and PostgreSQL."""
    assert count(engine, expression, NOW) == expected


def test_select_matching_lists_the_customers(engine: Engine) -> None:
    """select_matching() gives the ids the filter matches (what the manager selects)."""
    with engine.connect() as conn:
        emails = conn.execute(
            select(Customer.email_key).where(Customer.id.in_(
                select_matching(parse('country = "DE"'), TYPES, NOW)))).scalars().all()
    assert sorted(emails) == ["ann@example.com", "cy@other.org"]


def test_injection_attempt_matches_nothing_and_breaks_nothing(engine: Engine) -> None:
    """A literal is a bound parameter: SQL in it is data, not SQL."""
    assert count(engine, "name = \"x' OR 1=1 --\"", NOW) == 0
    assert count(engine, 'name contains "\'; DROP TABLE customers; --"', NOW) == 0
    assert count(engine, 'interest "x\') OR 1=1 --" = 0', NOW) == 5
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Customer)).scalar_one() == 5


def test_compiled_sql_binds_every_literal() -> None:
    """No literal value appears in the SQL text; all are parameters."""
    compiled = compile_filter(parse('name = "Zebra" and age > 12345 and interest "Quux" > 7'),
                              TYPES, NOW).compile()
    sql = str(compiled)
    assert "Zebra" not in sql and "12345" not in sql and "Quux" not in sql
    assert {"Zebra", 12345, "Quux", 7} <= set(compiled.params.values())


TYPE_ERRORS = [
    ("agee > 3", 1, "unknown attribute 'agee' (did you mean 'age'?)"),
    ("age = 1 and colour = 2", 13, "unknown attribute 'colour'"),
    ('age contains "3"', 1, "age is an integer attribute; 'contains' needs a string"),
    ('age = "30"', 7, 'age is an integer attribute; expected a number but found "30"'),
    ("vip > 1", 1, "vip is a boolean attribute; '>' does not apply"),
    ("vip = 1", 7, "expected true or false but found 1"),
    ('name < "b"', 1, "name is a string attribute; '<' does not apply"),
    ("name = 3", 8, "expected a string in double quotes but found 3"),
    ("clicks is set", 1, "clicks is a count; it is always set"),
    ("email is set", 1, "it is always set"),
    ('clicks = "3"', 10, "expected a number"),
    ("country within 3 days", 1, "'within' needs a date, datetime or timestamp"),
    ("last_sent = 2026-01-01", 1, "last_sent is a timestamp; compare it with before, after"),
    ("last_sent in (2026-01-01)", 1, "'in' does not apply"),
    ("last_sent > 3", 13, "expected a date or datetime but found 3"),
    ("birthday < 2000-01-01T00:00:00Z", 12, "expected a date (YYYY-MM-DD)"),
    ('interest "shoes" contains "x"', 1, "'contains' needs a string"),
]


@pytest.mark.parametrize(("expression", "position", "reason"), TYPE_ERRORS,
                         ids=[e for e, _, _ in TYPE_ERRORS])
def test_type_errors(expression: str, position: int, reason: str) -> None:
    """A well-formed filter that does not fit the attribute types is refused with position and
    reason."""
    with pytest.raises(FilterError) as info:
        compile_filter(parse(expression), TYPES, NOW)
    assert info.value.position == position
    assert reason in info.value.reason


# --- the command -------------------------------------------------------------------------------

@pytest.fixture
def cli_config(engine: Engine, migrated_customer_url: str, tmp_path: Path) -> Path:
    return write_config(tmp_path / "root", customer_url=migrated_customer_url)


def _run(cfg: Path, *args: str):
    from connectd.cli import main  # imports every command module: import lazily
    return CliRunner().invoke(main, ["--config", str(cfg), "segment", "count", *args])


def test_cli_prints_the_count(cli_config: Path) -> None:
    """`connectd segment count EXPR` prints the number of matching customers."""
    result = _run(cli_config, "age > 3")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "4"


def test_cli_json(cli_config: Path) -> None:
    """--json prints the expression and the count as one JSON object."""
    result = _run(cli_config, 'country = "DE"', "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == '{"expression":"country = \\"DE\\"","count":2}'


def test_cli_bad_expression_shows_caret_and_exits_65(cli_config: Path) -> None:
    """A bad expression exits 65 (EX_DATAERR) with the reason and a caret under the column."""
    result = _run(cli_config, "clicks >= 3 and opens >=")
    assert result.exit_code == EX_DATAERR
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "connectd: bad filter: column 25: expected a value after '>=' but found end of "
        "expression",
        "  clicks >= 3 and opens >=",
        "                          ^",
    ]


def test_cli_unknown_attribute_exits_65(cli_config: Path) -> None:
    """A type error (unknown attribute) is refused like a syntax error."""
    result = _run(cli_config, "age > 3 or shoe_size > 40")
    assert result.exit_code == EX_DATAERR
    assert "column 12: unknown attribute 'shoe_size'" in result.stderr
