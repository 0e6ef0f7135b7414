"""The reply-handler chain, pure: handler TOML (already parsed) -> an ordered, validated chain;
a classified message's facts -> the first handler that accepts it.

No I/O except `load_chain`, which reads the TOML file and the reply templates it names (so a
missing template is a start-up error, not a surprise at the first reply).

The file holds `[[handler]]` tables, tried in order; the first whose every match key holds
accepts the message and ends the chain (a list inside one key matches if any item does):

    [[handler]]
    name = "persistent-bounce"          # required, unique: logged, reported, archive folder
    kind = ["bounce"]                   # classifier kinds
    hard = true                         # bounces: hard (true) or not hard (false)
    context = "found"                   # "found": customer known; "missing": not known
    verp = ["confirm"]                  # signed address it came to: "b", "unsubscribe", "confirm"
    from = 'regex'                      # on the sender address
    headers = { X-Mailer = 'regex' }    # header name -> regex on each value of that header
    subject_keywords = ["price"]        # whole words, any case
    subject_regex = 'regex'
    body_keywords = ["stop"]            # in the fresh text (quoted '>' lines left out)
    body_regex = 'regex'
    actions = ["archive", { bounce = "hard" }]

Regexes are Python `re`, case-insensitive. Actions are a name, or a one-key table giving the
name its argument:

    unsubscribe       "conversation" (default) | "all"
    subscribe         conversation id or name (default: the message's conversation); double opt-in
    confirm           (no argument) a reply to a confirmation address: the subscription is active
    bounce            "classified" (default: hard as the classifier said, unknown = soft) | "hard" | "soft"
    complaint         (no argument)
    set_attribute     { name = "...", value = ... }
    event             "event-name"
    forward           address (default: processor.customer_service)
    archive           "handler" (default: a maildir per handler) | "date" (per day)
    reply             "template-file" | { template = "file" | text = "...", subject = "..." }
    pipe              ["/path/to/command", "arg", ...]

A problem in the file raises SettingsError naming the handler and the key (the CLI exits 78).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from connectd.settings import SettingsError

KINDS = ("bounce", "autoreply", "feedback", "delivered", "unsubscribe", "subscribe", "human",
         "unknown")
VERP_KINDS = ("b", "unsubscribe", "confirm")
ACTIONS = ("unsubscribe", "subscribe", "confirm", "bounce", "complaint", "set_attribute",
           "event", "forward", "archive", "reply", "pipe")
MATCH_KEYS = ("kind", "hard", "context", "verp", "feedback_type", "from", "headers",
              "subject_keywords", "subject_regex", "body_keywords", "body_regex")
KEYS = ("name", "actions", *MATCH_KEYS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also an archive folder name
_TEMPLATES = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True)
class Action:
    """One action of a handler: `name` (one of ACTIONS) and its argument, checked."""

    name: str
    arg: Any = None  # str | int | tuple | Mapping as the action wants; None = its default

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Handler:
    """One `[[handler]]`: what it matches and what it does. None/empty = no condition."""

    name: str
    actions: tuple[Action, ...]
    kinds: frozenset[str] | None = None
    hard: bool | None = None
    context: str | None = None
    verp: frozenset[str] | None = None
    feedback_type: frozenset[str] | None = None  # ARF Feedback-Type, lower case
    sender: re.Pattern[str] | None = None
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()
    subject_keywords: re.Pattern[str] | None = None
    subject_regex: re.Pattern[str] | None = None
    body_keywords: re.Pattern[str] | None = None
    body_regex: re.Pattern[str] | None = None


@dataclass(frozen=True)
class Facts:
    """What the chain decides on: the classification plus the resolved context."""

    kind: str
    hard: bool | None = None
    customer: int | None = None
    verp_kind: str | None = None
    feedback_type: str | None = None
    sender: str = ""
    subject: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    fresh: str = field(default="", compare=False)  # body without quoted lines (made if "")


def fresh_text(body: str) -> str:
    """The part of a reply the sender wrote now: quoted lines ('>') and everything after a
    quote header or forwarded block left out, so keywords in the quoted campaign (its own
    "unsubscribe" footer) do not decide what the reply is."""
    out = []
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith(">"):
            continue
        if _QUOTE_START.match(stripped):
            break
        out.append(line)
    return "\n".join(out)


_QUOTE_START = re.compile(
    r"^(-{2,}\s*(original message|forwarded message|ursprüngliche nachricht|message d'origine)"
    r"|on .{1,200} wrote:$|am .{1,200} schrieb .{0,200}:$|le .{1,200} a écrit\s*:$"
    r"|from:\s.+)", re.IGNORECASE)


def matches(handler: Handler, facts: Facts) -> bool:
    """Whether every match key of `handler` holds for `facts`."""
    if handler.kinds is not None and facts.kind not in handler.kinds:
        return False
    if handler.hard is not None and bool(facts.hard) != handler.hard:
        return False
    if handler.context is not None and (facts.customer is not None) != (handler.context == "found"):
        return False
    if handler.verp is not None and facts.verp_kind not in handler.verp:
        return False
    if handler.feedback_type is not None and \
            (facts.feedback_type or "").lower() not in handler.feedback_type:
        return False
    if handler.sender is not None and not handler.sender.search(facts.sender):
        return False
    for name, pattern in handler.headers:
        values = [v for k, v in facts.headers if k.lower() == name]
        if not any(pattern.search(v) for v in values):
            return False
    for pattern, text in ((handler.subject_keywords, facts.subject),
                          (handler.subject_regex, facts.subject)):
        if pattern is not None and not pattern.search(text):
            return False
    fresh = facts.fresh or fresh_text(facts.body)
    for pattern in (handler.body_keywords, handler.body_regex):
        if pattern is not None and not pattern.search(fresh):
            return False
    return True


def first_match(chain: Sequence[Handler], facts: Facts) -> Handler | None:
    """The first handler of `chain` that accepts `facts`, or None (the caller then forwards
    the message to customer service)."""
    if not facts.fresh:
        facts = dataclasses.replace(facts, fresh=fresh_text(facts.body))
    for handler in chain:
        if matches(handler, facts):
            return handler
    return None


# -- loading and validation ---------------------------------------------------------------------

def load_chain(path: Path) -> tuple[Handler, ...]:
    """Read and check the handler file at `path`; reply templates are read relative to it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{path}: reply-handler file not found (processor.handlers; "
                            "`connectd init` installs the default chain there)",
                            key="processor.handlers") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not UTF-8 text (byte {exc.start})",
                            key="processor.handlers") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}", key="processor.handlers") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}", key="processor.handlers") from None
    return parse_chain(data, str(path), base=path.parent)


def parse_chain(data: Mapping[str, Any], source: str = "reply handlers",
                base: Path | None = None) -> tuple[Handler, ...]:
    """Parsed TOML -> the checked chain. `base` resolves reply template files (their text is
    read and compiled now); without it, only inline reply text is allowed."""
    extra = set(data) - {"handler"}
    if extra:
        raise SettingsError(f"{source}: unknown top-level key(s) {sorted(extra)}; "
                            "handlers are [[handler]] tables", key="processor.handlers")
    tables = data.get("handler", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise SettingsError(f"{source}: 'handler' must be [[handler]] tables",
                            key="processor.handlers")
    chain: list[Handler] = []
    seen: set[str] = set()
    for number, table in enumerate(tables, 1):
        handler = _handler(table, f"{source}: handler #{number}", base)
        if handler.name in seen:
            raise SettingsError(f"{source}: handler #{number} {handler.name!r}: name used twice",
                                key="processor.handlers")
        seen.add(handler.name)
        chain.append(handler)
    return tuple(chain)


class _Where:
    """Builds error messages that name the handler and the key."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, key: str, problem: str) -> SettingsError:
        return SettingsError(f"{self.where}, key {key!r}: {problem}", key="processor.handlers")


def _handler(table: Mapping[str, Any], where: str, base: Path | None) -> Handler:
    name = table.get("name")
    err = _Where(where if not isinstance(name, str) else f"{where} {name!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise err("name", "required: letters, digits, '.', '_', '-' (at most 64), got "
                  f"{name!r}")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise err(unknown[0], f"unknown key (known: {', '.join(KEYS)})")
    if "actions" not in table:
        raise err("actions", "required (an empty list accepts the message and does nothing)")
    return Handler(
        name=name,
        actions=_actions(table["actions"], err, base),
        kinds=_choices(table, "kind", KINDS, err),
        hard=_bool(table, "hard", err),
        context=_context(table, err),
        verp=_choices(table, "verp", VERP_KINDS, err),
        feedback_type=_words(table, "feedback_type", err),
        sender=_regex(table, "from", err),
        headers=_headers(table, err),
        subject_keywords=_keywords(table, "subject_keywords", err),
        subject_regex=_regex(table, "subject_regex", err),
        body_keywords=_keywords(table, "body_keywords", err),
        body_regex=_regex(table, "body_regex", err),
    )


def _choices(table: Mapping[str, Any], key: str, allowed: Sequence[str],
             err: _Where) -> frozenset[str] | None:
    if key not in table:
        return None
    value = table[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise err(key, f"expected a non-empty list of strings, got {value!r}")
    bad = [v for v in value if v not in allowed]
    if bad:
        raise err(key, f"{bad[0]!r} is not one of {', '.join(allowed)}")
    return frozenset(value)


def _words(table: Mapping[str, Any], key: str, err: _Where) -> frozenset[str] | None:
    """A non-empty list of free words (any case), e.g. ARF feedback types."""
    if key not in table:
        return None
    value = table[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or \
            not all(isinstance(v, str) and v.strip() for v in value):
        raise err(key, f"expected a non-empty list of strings, got {value!r}")
    return frozenset(v.strip().lower() for v in value)


def _bool(table: Mapping[str, Any], key: str, err: _Where) -> bool | None:
    value = table.get(key)
    if value is not None and not isinstance(value, bool):
        raise err(key, f"expected true or false, got {value!r}")
    return value


def _context(table: Mapping[str, Any], err: _Where) -> str | None:
    value = table.get("context")
    if value is not None and value not in ("found", "missing"):
        raise err("context", f"expected \"found\" or \"missing\", got {value!r}")
    return value


def _compile(pattern: Any, key: str, err: _Where) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise err(key, f"expected a regular expression (a non-empty string), got {pattern!r}")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise err(key, f"bad regular expression {pattern!r}: {exc}") from None


def _regex(table: Mapping[str, Any], key: str, err: _Where) -> re.Pattern[str] | None:
    return _compile(table[key], key, err) if key in table else None


def _keywords(table: Mapping[str, Any], key: str, err: _Where) -> re.Pattern[str] | None:
    if key not in table:
        return None
    words = table[key]
    if isinstance(words, str):
        words = [words]
    if (not isinstance(words, list) or not words
            or not all(isinstance(w, str) and w.strip() for w in words)):
        raise err(key, f"expected a non-empty list of words, got {words!r}")
    # whole words or phrases, any case, any run of white space between the words of a phrase
    alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def _headers(table: Mapping[str, Any], err: _Where) -> tuple[tuple[str, re.Pattern[str]], ...]:
    value = table.get("headers", {})
    if not isinstance(value, dict):
        raise err("headers", f"expected a table of header name = regex, got {value!r}")
    return tuple((name.lower(), _compile(pattern, f"headers.{name}", err))
                 for name, pattern in value.items())


# -- actions ------------------------------------------------------------------------------------

def _actions(value: Any, err: _Where, base: Path | None) -> tuple[Action, ...]:
    if not isinstance(value, list):
        raise err("actions", f"expected a list, got {value!r}")
    out = []
    for item in value:
        if isinstance(item, str):
            name, arg, given = item, None, False
        elif isinstance(item, dict) and len(item) == 1:
            ((name, arg),) = item.items()
            given = True
        else:
            raise err("actions", f"each action is a name or a one-key table, got {item!r}")
        if name not in ACTIONS:
            raise err("actions", f"unknown action {name!r} (known: {', '.join(ACTIONS)})")
        out.append(Action(name, _CHECKS[name](arg, given, err.__class__(
            f"{err.where}, action {name!r}"), base)))
    return tuple(out)


def _no_arg(arg: Any, given: bool, err: _Where, base: Path | None) -> None:
    if given and arg not in (True, {}, ""):
        raise err("actions", f"takes no argument, got {arg!r}")
    return None


def _one_of(*allowed: str) -> Any:
    def check(arg: Any, given: bool, err: _Where, base: Path | None) -> str:
        if not given:
            return allowed[0]
        if arg not in allowed:
            raise err("actions", f"expected one of {', '.join(map(repr, allowed))}, got {arg!r}")
        return arg
    return check


def _conversation(arg: Any, given: bool, err: _Where, base: Path | None) -> int | str | None:
    if not given or arg == "":
        return None
    if isinstance(arg, bool) or not isinstance(arg, int | str) or (isinstance(arg, int) and arg < 1):
        raise err("actions", f"expected a conversation id or name, got {arg!r}")
    return arg


def _attribute(arg: Any, given: bool, err: _Where, base: Path | None) -> tuple[str, Any]:
    if not isinstance(arg, dict) or set(arg) != {"name", "value"} or not isinstance(arg["name"], str):
        raise err("actions", f"expected {{ name = \"...\", value = ... }}, got {arg!r}")
    value = arg["value"]
    if not isinstance(value, str | int | float | bool):
        raise err("actions", f"value must be a string, number or boolean, got {value!r}")
    return arg["name"], value


def _text_arg(what: str) -> Any:
    def check(arg: Any, given: bool, err: _Where, base: Path | None) -> str | None:
        if not given:
            if what == "event name":
                raise err("actions", "needs an event name, e.g. { event = \"asked-price\" }")
            return None
        if not isinstance(arg, str) or not arg.strip():
            raise err("actions", f"expected {what}, got {arg!r}")
        return arg.strip()
    return check


def _pipe(arg: Any, given: bool, err: _Where, base: Path | None) -> tuple[str, ...]:
    if isinstance(arg, str) and arg:
        arg = [arg]
    if not isinstance(arg, list) or not arg or not all(isinstance(a, str) and a for a in arg):
        raise err("actions", f"expected a command as an argv list, e.g. [\"/usr/bin/x\", \"-v\"], got {arg!r}")
    return tuple(arg)


@dataclass(frozen=True)
class ReplyTemplate:
    """A checked reply: the body template source and the subject template source."""

    body: str
    subject: str = "Re: {{ subject }}"
    source: str = ""  # the file it came from ("" = inline)


def _reply(arg: Any, given: bool, err: _Where, base: Path | None) -> ReplyTemplate:
    if isinstance(arg, str):
        arg = {"template": arg}
    if not isinstance(arg, dict) or not (set(arg) <= {"template", "text", "subject"}) or (
            ("template" in arg) == ("text" in arg)):
        raise err("actions", "expected \"file\" or { template = \"file\" | text = \"...\", "
                  f"subject = \"...\" }}, got {arg!r}")
    subject = arg.get("subject", "Re: {{ subject }}")
    if not isinstance(subject, str):
        raise err("actions", f"subject must be text, got {subject!r}")
    source = ""
    if "text" in arg:
        body = arg["text"]
        if not isinstance(body, str):
            raise err("actions", f"text must be a string, got {body!r}")
    else:
        if base is None or not isinstance(arg["template"], str):
            raise err("actions", f"template {arg['template']!r}: no directory to read it from")
        path = (base / arg["template"]).resolve()
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise err("actions", f"template {str(path)!r}: cannot read: {exc}") from None
        source = str(path)
    for what, text in (("subject", subject), ("template", body)):
        try:
            _TEMPLATES.parse(text)
        except TemplateSyntaxError as exc:
            raise err("actions", f"{what} is not a valid template: line {exc.lineno}: "
                      f"{exc.message}") from None
    return ReplyTemplate(body=body, subject=subject, source=source)


_CHECKS: dict[str, Any] = {
    "unsubscribe": _one_of("conversation", "all"),
    "subscribe": _conversation,
    "confirm": _no_arg,
    "bounce": _one_of("classified", "hard", "soft"),
    "complaint": _no_arg,
    "set_attribute": _attribute,
    "event": _text_arg("event name"),
    "forward": _text_arg("an address"),
    "archive": _one_of("handler", "date"),
    "reply": _reply,
    "pipe": _pipe,
}


def render_reply(template: ReplyTemplate, context: Mapping[str, Any]) -> tuple[str, str]:
    """(subject, body) of a reply, rendered in Jinja2's immutable sandbox from `context`."""
    subject = _TEMPLATES.from_string(template.subject).render(context)
    body = _TEMPLATES.from_string(template.body).render(context)
    return " ".join(subject.split())[:200], body
