"""The reply-handler chain: loading/validation of the TOML and matching, as tables."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from connectd.core import replyrules as rr
from connectd.settings import SettingsError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "connectd" / "data" / "reply-handlers.toml"


def chain(text: str, base: Path | None = None) -> tuple[rr.Handler, ...]:
    return rr.parse_chain(tomllib.loads(text), "test.toml", base)


def facts(**kw: object) -> rr.Facts:
    return rr.Facts(**{"kind": "human", **kw})  # type: ignore[arg-type]


def test_default_chain_loads() -> None:
    """The shipped default chain is valid and has Connect's handlers in order."""
    names = [h.name for h in rr.load_chain(DEFAULT)]
    order = ["persistent-bounce", "temporary-bounce", "context-not-found", "unsubscribe",
             "auto-reply", "unexpected-reply"]
    assert [n for n in names if n in order] == order
    assert {"subscribe", "complaint", "confirm-subscription"} <= set(names)


@pytest.mark.parametrize("f, expected", [
    (facts(kind="bounce", hard=True, customer=1), "persistent-bounce"),
    (facts(kind="bounce", hard=False, customer=1), "temporary-bounce"),
    (facts(kind="bounce", hard=None), "temporary-bounce"),
    (facts(kind="feedback", customer=3), "complaint"),
    (facts(kind="feedback", customer=3, feedback_type="abuse"), "complaint"),
    (facts(kind="feedback", customer=3, feedback_type="Opt-Out"), "opt-out-report"),
    (facts(kind="delivered"), "delivery-report"),
    (facts(kind="human", customer=None), "context-not-found"),
    (facts(kind="unsubscribe", customer=None), "context-not-found"),
    (facts(kind="unsubscribe", customer=5), "unsubscribe"),
    (facts(kind="unsubscribe", customer=5, subject="Unsubscribe me from ALL"), "unsubscribe-all"),
    (facts(kind="autoreply", customer=5), "auto-reply"),
    (facts(kind="human", customer=5), "unexpected-reply"),
    (facts(kind="unknown", customer=5), "unexpected-reply"),
    (facts(kind="subscribe", customer=None), "subscribe"),
    (facts(kind="human", verp_kind="confirm", customer=None), "confirm-subscription"),
])
def test_default_chain_decides(f: rr.Facts, expected: str) -> None:
    """Each kind of message goes to the handler Connect's default chain gives it."""
    handler = rr.first_match(rr.load_chain(DEFAULT), f)
    assert handler is not None and handler.name == expected


RULES = """
[[handler]]
name = "price"
kind = ["human"]
subject_keywords = ["price", "how much"]
actions = [{ event = "asked-price" }]

[[handler]]
name = "stop"
body_keywords = ["stop"]
actions = [{ unsubscribe = "all" }]

[[handler]]
name = "mailer"
headers = { X-Mailer = '^Outlook' }
actions = ["archive"]

[[handler]]
name = "vip"
from = '@vip\\.example$'
context = "found"
actions = ["forward"]

[[handler]]
name = "order"
body_regex = 'order\\s+#?\\d{5}'
actions = [{ set_attribute = { name = "has_order", value = true } }]
"""


@pytest.mark.parametrize("f, expected", [
    (facts(subject="What is the PRICE?"), "price"),
    (facts(subject="How   much is it"), "price"),
    (facts(subject="priceless"), None),  # whole words only
    (facts(kind="autoreply", subject="price"), None),  # kind holds too
    (facts(body="Please stop sending"), "stop"),
    (facts(body="> stop\nthanks"), None),  # quoted lines do not count
    (facts(body="ok\nOn Mon, 1 Jan 2024, Shop wrote:\nstop"), None),  # nor the quote below
    (facts(headers=(("X-Mailer", "Outlook 16"),)), "mailer"),
    (facts(headers=(("x-mailer", "outlook"),)), "mailer"),  # header names in any case
    (facts(headers=(("X-Mailer", "Thunderbird"),)), None),
    (facts(sender="ann@vip.example", customer=4), "vip"),
    (facts(sender="ann@vip.example", customer=None), None),
    (facts(body="about order #12345 please"), "order"),
    (facts(body="about order 12"), None),
])
def test_match_keys(f: rr.Facts, expected: str | None) -> None:
    """Every match key (kind, keywords, regexes, headers, from, context) selects as documented."""
    handler = rr.first_match(chain(RULES), f)
    assert (handler.name if handler else None) == expected


def test_actions_parsed_with_defaults() -> None:
    """Action names alone take their defaults; tables give arguments."""
    (h,) = chain('[[handler]]\nname = "a"\nactions = ["bounce", "archive", "unsubscribe", '
                 '{ archive = "date" }, { pipe = ["/bin/cat", "-"] }, { forward = "x@y.z" }, '
                 '{ subscribe = "news" }, "subscribe"]\n')
    assert [(a.name, a.arg) for a in h.actions] == [
        ("bounce", "classified"), ("archive", "handler"), ("unsubscribe", "conversation"),
        ("archive", "date"), ("pipe", ("/bin/cat", "-")), ("forward", "x@y.z"),
        ("subscribe", "news"), ("subscribe", None)]


def test_reply_template_file(tmp_path: Path) -> None:
    """A reply template file is read relative to the handler file and renders in the sandbox."""
    (tmp_path / "t.txt").write_text("Hello {{ sender }}, about {{ subject }}.\n")
    (h,) = chain('[[handler]]\nname = "r"\nactions = [{ reply = "t.txt" }]\n', tmp_path)
    subject, body = rr.render_reply(h.actions[0].arg, {"sender": "a@b.c", "subject": "Hi"})
    assert subject == "Re: Hi" and body == "Hello a@b.c, about Hi.\n"


@pytest.mark.parametrize("text, words", [
    ('[[handler]]\nactions = []\n', ["handler #1", "'name'"]),
    ('[[handler]]\nname = "x"\n', ["'x'", "'actions'"]),
    ('[[handler]]\nname = "x"\nkinds = ["bounce"]\nactions = []\n', ["'x'", "'kinds'"]),
    ('[[handler]]\nname = "x"\nkind = ["bouncy"]\nactions = []\n', ["'x'", "'kind'", "bouncy"]),
    ('[[handler]]\nname = "x"\nhard = "yes"\nactions = []\n', ["'x'", "'hard'"]),
    ('[[handler]]\nname = "x"\ncontext = "here"\nactions = []\n', ["'x'", "'context'"]),
    ('[[handler]]\nname = "x"\nsubject_regex = "(["\nactions = []\n', ["'x'", "subject_regex"]),
    ('[[handler]]\nname = "x"\nheaders = { X-A = "(" }\nactions = []\n', ["'x'", "headers.X-A"]),
    ('[[handler]]\nname = "x"\nactions = ["explode"]\n', ["'x'", "explode"]),
    ('[[handler]]\nname = "x"\nactions = [{ bounce = "maybe" }]\n', ["'x'", "'bounce'", "maybe"]),
    ('[[handler]]\nname = "x"\nactions = [{ pipe = [] }]\n', ["'x'", "'pipe'"]),
    ('[[handler]]\nname = "x"\nactions = ["event"]\n', ["'x'", "event name"]),
    ('[[handler]]\nname = "x"\nactions = [{ set_attribute = { name = "a" } }]\n', ["'x'", "set_attribute"]),
    ('[[handler]]\nname = "x"\nactions = [{ reply = { text = "{{ oops" } }]\n', ["'x'", "reply", "template"]),
    ('[[handler]]\nname = "x"\nactions = [{ reply = "missing.txt" }]\n', ["'x'", "reply", "missing.txt"]),
    ('[[handler]]\nname = "x"\nactions = []\n[[handler]]\nname = "x"\nactions = []\n', ["#2", "twice"]),
    ('handlers = 1\n', ["unknown top-level"]),
    ('[[handler]]\nname = "x"\nfeedback_type = []\nactions = []\n', ["'x'", "feedback_type"]),
])
def test_bad_files_name_handler_and_key(text: str, words: list[str], tmp_path: Path) -> None:
    """A bad handler file raises SettingsError naming the handler and the key at fault."""
    with pytest.raises(SettingsError) as info:
        chain(text, tmp_path)
    for word in words:
        assert word in str(info.value)


def test_load_chain_bad_toml(tmp_path: Path) -> None:
    """A file that is not TOML is a SettingsError naming the file."""
    path = tmp_path / "h.toml"
    path.write_text("[[handler]\n")
    with pytest.raises(SettingsError, match="h.toml"):
        rr.load_chain(path)


def test_fresh_text_keeps_own_words() -> None:
    """fresh_text drops quoted lines and what follows a quote header."""
    body = "Yes please\n> old\nsign me up\n-----Original Message-----\nunsubscribe"
    assert rr.fresh_text(body) == "Yes please\nsign me up"
