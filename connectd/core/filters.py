"""Segment filters, pure: expression text -> a small tree of frozen dataclasses (no I/O).

connectd.segments compiles the tree to SQLAlchemy (and checks attribute types against
attribute_defs); this module only reads the text. A bad expression raises FilterError with the
1-based column where it went wrong and the reason; `caret()` draws it for a terminal.

The language
------------
A filter is conditions joined by `and`, `or`, `not` and parentheses; `not` binds tighter than
`and`, which binds tighter than `or`. Keywords are case-insensitive.

    age >= 30 and country = "DE"
    city in ("Berlin", "Paris") or not vip = true
    email ends with "@example.com"
    name contains "an" and name not starts with "X"
    vip is set            phone is not set
    birthday < 2000-01-01
    signed_up after 2024-05-01T09:30:00Z
    clicks >= 3 and opens > 0
    last_clicked within 30 days     last_sent not within 7 days
    last_opened before 2026-01-01
    interest "shoes" >= 2

Subjects (names are case-insensitive):
    email                          the address itself (compared case-insensitively)
    sends opens clicks replies soft_bounces
                                   profile counts (no statistics yet = 0)
    last_sent last_opened last_clicked last_replied
                                   profile timestamps (never = not set)
    interest "LABEL"               how often the customer clicked links labelled LABEL (0 if never)
    any other name                 a customer attribute, typed by attribute_defs; these
                                   built-in names take precedence over attributes of that name

Predicates:
    = != < <= > >= VALUE           (`<>` and `==` are accepted spellings)
    in (VALUE, ...)                not in (...)
    contains / starts with / ends with "TEXT"   (case-insensitive; `not contains`, ...)
    is set / is not set
    within N days|hours            between N days (hours) before now and now; `not within`
    before VALUE / after VALUE     the same as < and >

Values: "strings" (with \\" and \\\\ escapes), numbers (42, -1.5), true, false, dates
(2000-01-01) and datetimes (2024-05-01T09:30:00Z, 2024-05-01T09:30:00+02:00; no offset = UTC),
written unquoted.

Absent values: a condition on an attribute that is not set is false, and so is its negation
written as an operator (`name != "x"` needs name to be set); `not` turns false into true
(`not name = "x"` matches customers without a name), so `last_sent not within 7 days` matches
customers never mailed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

# --- the tree --------------------------------------------------------------------------------
# `pos` is the 1-based column of the node's first character; it takes no part in equality so
# tests (and callers) can compare trees by meaning.


@dataclass(frozen=True)
class Literal:
    """A value: kind is string, number, boolean, date or datetime (datetimes in UTC)."""

    kind: str
    value: str | int | float | bool | date | datetime
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Field:
    """A named subject: an attribute, `email`, or a profile statistic (lower-cased)."""

    name: str
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Interest:
    """`interest "LABEL"`: the customer's click count for that interest label."""

    label: str
    pos: int = field(default=0, compare=False)


Subject = Field | Interest


@dataclass(frozen=True)
class Compare:
    """subject OP value; op is one of = != < <= > >= contains starts_with ends_with."""

    subject: Subject
    op: str
    value: Literal
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class In:
    """subject in (values...)."""

    subject: Subject
    values: tuple[Literal, ...]
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class IsSet:
    """subject is set."""

    subject: Subject
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Within:
    """subject within amount unit (unit: days or hours) of now."""

    subject: Subject
    amount: int | float
    unit: str
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Not:
    operand: Node
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]
    pos: int = field(default=0, compare=False)


Node = Compare | In | IsSet | Within | Not | And | Or

COMPARE_OPS = ("=", "!=", "<", "<=", ">", ">=")
TEXT_OPS = ("contains", "starts_with", "ends_with")
UNITS = {"day": "days", "days": "days", "hour": "hours", "hours": "hours"}


class FilterError(ValueError):
    """A bad expression: `position` is the 1-based column, `reason` says what is wrong."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"column {position}: {reason}")
        self.position = position
        self.reason = reason


def caret(expression: str, error: FilterError) -> str:
    """The expression on one line and a caret under the error's column on the next."""
    line = expression.replace("\n", " ").replace("\t", " ")
    return f"{line}\n{' ' * (max(error.position, 1) - 1)}^"


# --- tokens ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    kind: str  # name, string, number, date, datetime, op, (, ), ",", end
    text: str  # as written (strings: the unescaped value)
    pos: int


_SPACE = re.compile(r"\s+")
_DATETIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})?(?![\w.:])")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?![\w.:-])")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?![\w.])")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = ("<=", ">=", "!=", "<>", "==", "=", "<", ">")


def tokenize(text: str) -> list[Token]:
    """Split `text` into tokens, ending with an `end` token; FilterError on a stray character
    or an unterminated string."""
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        space = _SPACE.match(text, i)
        if space:
            i = space.end()
            continue
        token, i = _next_token(text, i)
        tokens.append(token)
    tokens.append(Token("end", "", len(text) + 1))
    return tokens


def _next_token(text: str, i: int) -> tuple[Token, int]:
    ch, pos = text[i], i + 1
    if ch == '"':
        return _string(text, i)
    if ch in "(),":
        return Token(ch, ch, pos), i + 1
    for op in _OPS:
        if text.startswith(op, i):
            return Token("op", op, pos), i + len(op)
    for kind, pattern in (("datetime", _DATETIME), ("date", _DATE), ("number", _NUMBER),
                          ("name", _NAME)):
        match = pattern.match(text, i)
        if match:
            return Token(kind, match.group(), pos), match.end()
    if ch.isdigit() or ch == "-":
        raise FilterError(pos, f"not a number, date or datetime: {_word(text, i)!r}")
    if ch == "'":
        raise FilterError(pos, "strings are written in double quotes (\"...\")")
    raise FilterError(pos, f"unexpected character {ch!r}")


def _word(text: str, i: int) -> str:
    end = i
    while end < len(text) and not text[end].isspace() and text[end] not in "(),":
        end += 1
    return text[i:end]


def _string(text: str, i: int) -> tuple[Token, int]:
    out: list[str] = []
    j = i + 1
    while j < len(text):
        ch = text[j]
        if ch == "\\" and j + 1 < len(text) and text[j + 1] in '"\\':
            out.append(text[j + 1])
            j += 2
            continue
        if ch == '"':
            return Token("string", "".join(out), i + 1), j + 1
        out.append(ch)
        j += 1
    raise FilterError(i + 1, "unterminated string (no closing '\"')")


# --- parser ----------------------------------------------------------------------------------

def parse(text: str) -> Node:
    """Expression text -> its tree; FilterError with position and reason when it is bad."""
    return _Parser(tokenize(text)).parse()


def _describe(token: Token) -> str:
    if token.kind == "end":
        return "end of expression"
    if token.kind == "string":
        return f'string "{token.text}"'
    return f"'{token.text}'"


class _Parser:
    """Recursive descent: or_expr := and_expr ("or" and_expr)*; and_expr := not_expr ("and"
    not_expr)*; not_expr := "not" not_expr | "(" or_expr ")" | condition."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.i = 0

    # helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        token = self.tokens[self.i]
        if token.kind != "end":
            self.i += 1
        return token

    def is_word(self, *words: str) -> bool:
        return self.tok.kind == "name" and self.tok.text.lower() in words

    def expect_word(self, word: str, after: Token) -> Token:
        if not self.is_word(word):
            raise FilterError(self.tok.pos, f"expected '{word}' after '{after.text}' but found "
                                            f"{_describe(self.tok)}")
        return self.advance()

    # grammar
    def parse(self) -> Node:
        node = self.or_expr()
        if self.tok.kind != "end":
            raise FilterError(self.tok.pos, "expected 'and', 'or' or the end of the expression "
                                            f"but found {_describe(self.tok)}")
        return node

    def or_expr(self) -> Node:
        first = self.and_expr()
        operands = [first]
        while self.is_word("or"):
            self.advance()
            operands.append(self.and_expr())
        return first if len(operands) == 1 else Or(tuple(operands), _pos(first))

    def and_expr(self) -> Node:
        first = self.not_expr()
        operands = [first]
        while self.is_word("and"):
            self.advance()
            operands.append(self.not_expr())
        return first if len(operands) == 1 else And(tuple(operands), _pos(first))

    def not_expr(self) -> Node:
        if self.is_word("not"):
            token = self.advance()
            return Not(self.not_expr(), token.pos)
        if self.tok.kind == "(":
            opening = self.advance()
            node = self.or_expr()
            if self.tok.kind != ")":
                raise FilterError(self.tok.pos, f"expected ')' to close the '(' at column "
                                                f"{opening.pos} but found {_describe(self.tok)}")
            self.advance()
            return node
        return self.condition()

    def subject(self) -> Subject:
        token = self.tok
        if token.kind != "name" or token.text.lower() in _RESERVED:
            raise FilterError(token.pos, "expected a condition (an attribute, email, a statistic "
                                         f"or interest \"LABEL\") but found {_describe(token)}")
        self.advance()
        if token.text.lower() == "interest":
            if self.tok.kind != "string":
                raise FilterError(self.tok.pos, "expected the interest label in double quotes "
                                                f"after 'interest' but found {_describe(self.tok)}")
            return Interest(self.advance().text, token.pos)
        return Field(token.text.lower(), token.pos)

    def condition(self) -> Node:
        subject = self.subject()
        pos = subject.pos
        token = self.tok
        if token.kind == "op":
            self.advance()
            op = {"<>": "!=", "==": "="}.get(token.text, token.text)
            return Compare(subject, op, self.value(token), pos)
        if self.is_word("is"):
            last = self.advance()
            negated = self.is_word("not")
            if negated:
                last = self.advance()
            self.expect_word("set", last)
            node: Node = IsSet(subject, pos)
            return Not(node, pos) if negated else node
        if self.is_word("not"):
            not_token = self.advance()
            if not self.is_word("in", "contains", "starts", "ends", "within"):
                raise FilterError(self.tok.pos, "expected 'in', 'contains', 'starts with', "
                                                "'ends with' or 'within' after 'not' but found "
                                                f"{_describe(self.tok)}")
            return Not(self.positive(subject), not_token.pos)
        if self.is_word(*_PREDICATE_WORDS):
            return self.positive(subject)
        raise FilterError(token.pos, "expected an operator (= != < <= > >=, in, contains, starts "
                                     "with, ends with, is set, within, before, after) after "
                                     f"'{self.tokens[self.i - 1].text}' but found "
                                     f"{_describe(token)}")

    def positive(self, subject: Subject) -> Node:
        pos = subject.pos
        token = self.advance()
        word = token.text.lower()
        if word == "in":
            return In(subject, self.value_list(token), pos)
        if word == "contains":
            return Compare(subject, "contains", self.text_value(token), pos)
        if word in ("starts", "ends"):
            with_ = self.expect_word("with", token)
            return Compare(subject, f"{word}_with", self.text_value(with_), pos)
        if word == "within":
            return self.within(subject, token)
        return Compare(subject, "<" if word == "before" else ">", self.value(token), pos)

    def within(self, subject: Subject, token: Token) -> Within:
        amount = self.tok
        if amount.kind != "number" or amount.text.startswith("-"):
            raise FilterError(amount.pos, "expected a number of days or hours after 'within' "
                                          f"but found {_describe(amount)}")
        self.advance()
        unit = self.tok
        if unit.kind != "name" or unit.text.lower() not in UNITS:
            raise FilterError(unit.pos, f"expected 'days' or 'hours' after '{amount.text}' but "
                                        f"found {_describe(unit)}")
        self.advance()
        return Within(subject, _number(amount.text), UNITS[unit.text.lower()], subject.pos)

    def value_list(self, after: Token) -> tuple[Literal, ...]:
        if self.tok.kind != "(":
            raise FilterError(self.tok.pos, "expected '(' and a list of values after 'in' but "
                                            f"found {_describe(self.tok)}")
        previous = self.advance()
        values = [self.value(previous)]
        while self.tok.kind == ",":
            previous = self.advance()
            values.append(self.value(previous))
        if self.tok.kind != ")":
            raise FilterError(self.tok.pos, "expected ',' or ')' in the list after 'in' but "
                                            f"found {_describe(self.tok)}")
        self.advance()
        return tuple(values)

    def text_value(self, after: Token) -> Literal:
        if self.tok.kind != "string":
            raise FilterError(self.tok.pos, f"expected a string in double quotes after "
                                            f"'{after.text}' but found {_describe(self.tok)}")
        token = self.advance()
        return Literal("string", token.text, token.pos)

    def value(self, after: Token) -> Literal:
        token = self.tok
        if token.kind == "string":
            self.advance()
            return Literal("string", token.text, token.pos)
        if token.kind == "number":
            self.advance()
            return Literal("number", _number(token.text), token.pos)
        if token.kind == "date":
            self.advance()
            return Literal("date", _date(token), token.pos)
        if token.kind == "datetime":
            self.advance()
            return Literal("datetime", _datetime(token), token.pos)
        if self.is_word("true", "false"):
            self.advance()
            return Literal("boolean", token.text.lower() == "true", token.pos)
        raise FilterError(token.pos, f"expected a value after '{after.text}' but found "
                                     f"{_describe(token)}")


_PREDICATE_WORDS = ("in", "contains", "starts", "ends", "within", "before", "after")
# words that cannot start a condition (`interest` can: it is a subject)
_RESERVED = frozenset({"and", "or", "not", "is", "set", "true", "false", "with",
                       *_PREDICATE_WORDS})


def _pos(node: Node) -> int:
    return node.pos


def _number(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def _date(token: Token) -> date:
    try:
        return date.fromisoformat(token.text)
    except ValueError:
        raise FilterError(token.pos, f"not a valid date: {token.text}") from None


def _datetime(token: Token) -> datetime:
    try:
        value = datetime.fromisoformat(token.text)
    except ValueError:
        raise FilterError(token.pos, f"not a valid datetime: {token.text}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # no offset means UTC throughout connectd
    return value.astimezone(UTC)
