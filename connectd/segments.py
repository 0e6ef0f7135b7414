"""Segment filters against the customer DB: a filter tree (connectd.core.filters) + the
attribute types (attribute_defs) + `now` -> a SQLAlchemy boolean over customers outer-joined
to customer_stats; `count()` runs it; `connectd segment count EXPR` previews it.

Every literal becomes a bound parameter (SQLAlchemy operators only, never SQL text), so a
filter cannot inject SQL. Attributes are read from the JSON column with typed extraction
(`as_integer`, `as_float`, `as_string`, `as_boolean`), which SQLAlchemy renders as
JSON_EXTRACT on SQLite and `->>` plus a cast on PostgreSQL; dates and datetimes are stored
as ISO 8601 text (connectd.core.attributes), so they compare as text, and the literal is
spelled the same way first.

Every condition compiles to a two-valued boolean (an absent value makes it false, never
NULL), so `not` means "everyone else", including customers without the value.

Type errors (an unknown attribute, `age contains "x"`, `vip > 3`) raise FilterError with the
position of the offending name or value, like parse errors.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import click
from sqlalchemy import Connection, Engine, and_, func, not_, or_, select
from sqlalchemy.sql.elements import ColumnElement

from connectd import log
from connectd.core import filters as f
from connectd.db.customer import AttributeDef, Customer, CustomerInterest, CustomerStats

EX_DATAERR = 65  # sysexits.h: the input data (here: the expression) was incorrect

# profile statistics by their filter names; counts of a customer without a stats row are 0
COUNTS = {
    "sends": CustomerStats.sent_count,
    "opens": CustomerStats.open_count,
    "clicks": CustomerStats.click_count,
    "replies": CustomerStats.reply_count,
    "soft_bounces": CustomerStats.soft_bounce_count,
}
TIMES = {
    "last_sent": CustomerStats.last_sent_at,
    "last_opened": CustomerStats.last_open_at,
    "last_clicked": CustomerStats.last_click_at,
    "last_replied": CustomerStats.last_reply_at,
}


@dataclass(frozen=True)
class _Operand:
    """A subject ready to compare: what it is (for checks and messages) and how to read it."""

    name: str       # as the user wrote it, for messages
    type: str       # an attribute type, or "email", "count", "timestamp"
    subject: f.Subject
    attribute: str | None = None  # the attribute's name when it is one

    @property
    def pos(self) -> int:
        return self.subject.pos


def source() -> Any:
    """The FROM clause every compiled filter refers to: customers LEFT JOIN customer_stats."""
    return Customer.__table__.outerjoin(
        CustomerStats.__table__, CustomerStats.customer_id == Customer.id)


def load_types(conn: Connection) -> dict[str, str]:
    """attribute name -> declared type, from attribute_defs."""
    return {name: type_ for name, type_ in conn.execute(select(AttributeDef.name, AttributeDef.type))}


def compile_filter(node: f.Node, types: Mapping[str, str], now: datetime) -> ColumnElement[bool]:
    """A filter tree -> a boolean over source(); FilterError on a type mismatch."""
    if isinstance(node, f.And):
        return and_(*(compile_filter(n, types, now) for n in node.operands))
    if isinstance(node, f.Or):
        return or_(*(compile_filter(n, types, now) for n in node.operands))
    if isinstance(node, f.Not):
        return not_(compile_filter(node.operand, types, now))
    operand = _operand(node.subject, types)
    if isinstance(node, f.IsSet):
        return _is_set(operand)
    if isinstance(node, f.Within):
        return _within(operand, node, now)
    if isinstance(node, f.In):
        return _in(operand, node.values)
    return _compare(operand, node.op, node.value)


def select_matching(node: f.Node, types: Mapping[str, str], now: datetime) -> Any:
    """SELECT customers.id of the customers the filter matches (for the manager's targets)."""
    return select(Customer.id).select_from(source()).where(compile_filter(node, types, now))


def count(engine: Engine, expression: str | f.Node, now: datetime) -> int:
    """How many customers match `expression` (text or a parsed tree) at time `now`."""
    node = f.parse(expression) if isinstance(expression, str) else expression
    with engine.connect() as conn:
        condition = compile_filter(node, load_types(conn), now)
        query = select(func.count()).select_from(source()).where(condition)
        return int(conn.execute(query).scalar_one())


# --- subjects --------------------------------------------------------------------------------

def _operand(subject: f.Subject, types: Mapping[str, str]) -> _Operand:
    if isinstance(subject, f.Interest):
        return _Operand(f'interest "{subject.label}"', "count", subject)
    name = subject.name
    if name == "email":
        return _Operand(name, "email", subject)
    if name in COUNTS:
        return _Operand(name, "count", subject)
    if name in TIMES:
        return _Operand(name, "timestamp", subject)
    if name not in types:
        known = sorted([*types, "email", *COUNTS, *TIMES])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise f.FilterError(subject.pos, f"unknown attribute '{name}'{hint}")
    return _Operand(name, types[name], subject, attribute=name)


def _column(op: _Operand, as_float: bool = False) -> ColumnElement[Any]:
    """The SQL expression reading `op` (NULL when absent, except counts)."""
    subject = op.subject
    if isinstance(subject, f.Interest):
        label_count = (select(CustomerInterest.count)
                       .where(CustomerInterest.customer_id == Customer.id,
                              CustomerInterest.label == subject.label)
                       .scalar_subquery())
        return func.coalesce(label_count, 0)
    if op.type == "email":
        return Customer.email_key  # lower-cased: e-mail compares case-insensitively
    if op.type == "count":
        return func.coalesce(COUNTS[op.name], 0)
    if op.type == "timestamp":
        return TIMES[op.name]
    value = Customer.attributes[op.attribute]
    if op.type == "integer" and not as_float:
        return value.as_integer()
    if op.type in ("integer", "number"):
        return value.as_float()
    if op.type == "boolean":
        return value.as_boolean()
    return value.as_string()  # string, date, datetime: ISO text compares in time order


def _present(op: _Operand, column: ColumnElement[Any],
             condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """`condition`, false (not NULL) when the value is absent: keeps the logic two-valued."""
    if op.type == "count":
        return condition
    return and_(column.is_not(None), condition)


# --- predicates ------------------------------------------------------------------------------

_ORDERED = ("integer", "number", "count", "date", "datetime", "timestamp")
_EQUALITY = ("string", "email", "integer", "number", "count", "boolean", "date")
_TEXT = ("string", "email")


def _refuse(op: _Operand, what: str, pos: int | None = None) -> f.FilterError:
    return f.FilterError(pos or op.pos, f"{op.name} is {_a(op.type)}; {what}")


def _a(type_: str) -> str:
    return {"count": "a count", "timestamp": "a timestamp", "email": "the e-mail address",
            "integer": "an integer attribute"}.get(type_, f"a {type_} attribute")


def _compare(op: _Operand, operator: str, lit: f.Literal) -> ColumnElement[bool]:
    if operator in f.TEXT_OPS:
        if op.type not in _TEXT:
            raise _refuse(op, f"'{operator.replace('_', ' ')}' needs a string")
        column = _column(op)
        text = str(_value(op, lit))
        method = {"contains": column.icontains, "starts_with": column.istartswith,
                  "ends_with": column.iendswith}[operator]
        return _present(op, column, method(text, autoescape=True))
    if operator in ("=", "!=") and op.type not in _EQUALITY:
        raise _refuse(op, "compare it with before, after, <, > or within (exact times "
                          "rarely match)")
    if operator not in ("=", "!=") and op.type not in _ORDERED:
        raise _refuse(op, f"'{operator}' does not apply (use = or !=)")
    value = _value(op, lit)
    column = _column(op, as_float=isinstance(value, float))
    condition = {"=": column.__eq__, "!=": column.__ne__, "<": column.__lt__,
                 "<=": column.__le__, ">": column.__gt__, ">=": column.__ge__}[operator](value)
    return _present(op, column, condition)


def _in(op: _Operand, literals: tuple[f.Literal, ...]) -> ColumnElement[bool]:
    if op.type not in _EQUALITY:
        raise _refuse(op, "'in' does not apply (use before, after or within)")
    values = [_value(op, lit) for lit in literals]
    column = _column(op, as_float=any(isinstance(v, float) for v in values))
    return _present(op, column, column.in_(values))


def _is_set(op: _Operand) -> ColumnElement[bool]:
    if op.type in ("count", "email"):
        raise _refuse(op, "it is always set (compare it instead, e.g. > 0)")
    return _column(op).is_not(None)


def _within(op: _Operand, node: f.Within, now: datetime) -> ColumnElement[bool]:
    if op.type not in ("date", "datetime", "timestamp"):
        raise _refuse(op, "'within' needs a date, datetime or timestamp")
    now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    since = now - timedelta(**{node.unit: node.amount})
    column = _column(op)
    if op.type == "date":
        low, high = since.date().isoformat(), now.date().isoformat()
    elif op.type == "datetime":
        low, high = since.isoformat(), now.isoformat()
    else:
        low, high = since, now
    return _present(op, column, and_(column >= low, column <= high))


def _value(op: _Operand, lit: f.Literal) -> Any:
    """The literal as the subject's stored value (bound as a parameter by the caller)."""
    kind, value = lit.kind, lit.value
    t = op.type
    if t in ("string", "email") and kind == "string":
        return value.lower() if t == "email" else value
    if t in ("integer", "number", "count") and kind == "number":
        return value
    if t == "boolean" and kind == "boolean":
        return value
    if t == "date" and kind == "date":
        return value.isoformat()
    if t in ("datetime", "timestamp") and kind in ("date", "datetime"):
        moment = value if isinstance(value, datetime) else _midnight(value)
        return moment.isoformat() if t == "datetime" else moment
    wanted = {"string": "a string in double quotes", "email": "a string in double quotes",
              "integer": "a number", "number": "a number", "count": "a number",
              "boolean": "true or false", "date": "a date (YYYY-MM-DD)",
              "datetime": "a date or datetime", "timestamp": "a date or datetime"}[t]
    shown = f'"{value}"' if kind == "string" else str(value).lower() if kind == "boolean" \
        else str(value)
    raise f.FilterError(lit.pos, f"{op.name} is {_a(t)}; expected {wanted} but found {shown}")


def _midnight(day: date) -> datetime:
    """A date where a time is wanted: its midnight in UTC."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


# --- command line ----------------------------------------------------------------------------

@click.group("segment")
def segment_group() -> None:
    """Preview segment filters (the language: `pydoc connectd.core.filters`)."""


@segment_group.command("count")
@click.argument("expression")
@click.option("--json", "as_json", is_flag=True, help='Print {"expression": ..., "count": N}.')
def count_command(expression: str, as_json: bool) -> None:
    """How many customers the filter EXPRESSION matches now.

    A bad expression is refused with the column and the reason, and exit status 65
    (EX_DATAERR). Example: connectd segment count 'clicks >= 3 and country = "DE"'
    """
    from connectd.db.engine import make_engine

    settings = click.get_current_context().obj.settings  # connectd.cli.Context
    engine = make_engine(settings.database.customer_url)
    try:
        started = datetime.now(UTC)
        n = count(engine, expression, started)
    except f.FilterError as exc:
        click.echo(f"connectd: bad filter: {exc}", err=True)
        click.echo(_indent(f.caret(expression, exc)), err=True)
        sys.exit(EX_DATAERR)
    finally:
        engine.dispose()
    log.get(command="segment count").debug(
        "segment.counted", count=n, ms=round((datetime.now(UTC) - started).total_seconds() * 1e3))
    if as_json:
        import orjson
        click.echo(orjson.dumps({"expression": expression, "count": n}).decode())
    else:
        click.echo(n)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
