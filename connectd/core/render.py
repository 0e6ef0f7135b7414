"""Personalisation, pure: (subject, HTML, text templates, one customer's data) -> rendered parts.

No I/O. The composer calls `check` once per launch (a bad template fails the campaign before
anyone gets mail), then `render`, `rewrite_links` and `add_open_pixel` per message.

Merge tags (Connect style) are recognised by exactly this syntax:

    [Name]            the customer's attribute, or "" when it is missing or empty
    [Name|fallback]   ... or `fallback` when it is missing or empty

    Name     = a letter, then up to 63 letters, digits, spaces or underscores
    fallback = any text without "[", "]" or a line break (kept as written, spaces included)

The name becomes the attribute key as the CSV import names columns
(connectd.core.attributes.normalise_name): lower case, runs of spaces/underscores -> "_",
so [First Name], [first name] and [FIRST_NAME] all read `first_name`. "Missing or empty" means
absent, None, or a string of only whitespace (0 and false are values). Anything else in
brackets is text and passes through unchanged: [1], [ ], [#x], [a=b], [], a tag followed by "("
(a Markdown link: [see here](https://...)). Merge tags are not recognised inside Jinja2
delimiters ({{ }}, {% %}, {# #}, {% raw %} blocks, so `{{ d[key] }}` is Jinja's subscript),
nor in the HTML body's <style> and <script> elements (CSS `a[href]`) or Outlook conditional
comments (<!--[if mso]>, <![endif]-->). To write a literal tag-like text, use Jinja:
{{ "[Name]" }}.

Order: merge tags are translated to Jinja2 calls when a template is compiled, then Jinja2
renders them with the data. So merge values are data, never template source: a customer named
"{{ 7*7 }}" is greeted as exactly that, and one compiled template serves every customer
(compiled once per source text, cached). In the HTML body merge values and {{ }} output are
HTML-escaped (autoescape); a fallback is the author's own HTML and is not. Text part and
subject are not escaped; the subject then goes through `header_value`.

Jinja2 runs in an ImmutableSandboxedEnvironment: attribute names starting with "_" are refused
when the template is compiled (static check) and at render time (the sandbox), mutating
methods and unsafe callables raise, `range` is capped at 100,000 items by the sandbox, and
here `**` with a huge result and sequence repetition past 1,000,000 items are refused. Not
bounded: total work (nested loops of 100,000 each); the composer should bound wall time if it
renders untrusted templates. Every refusal or error raises RenderError(reason).
"""

from __future__ import annotations

import functools
import html as htmllib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

from jinja2 import ChainableUndefined, TemplateSyntaxError, nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from markupsafe import Markup
from markupsafe import escape as markup_escape

from connectd.core.attributes import BadAttribute, normalise_name

MAX_POWER_BITS = 4096  # `**` results above this many bits are refused (9**9**9 never finishes)
MAX_REPEAT = 1_000_000  # "x" * n and [..] * n longer than this are refused (memory)


class RenderError(Exception):
    """A template that is refused or fails to render; the message says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str | None
    text: str | None


# ---------------------------------------------------------------------------------------------
# Header safety

_HEADER_JUNK = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")  # \s covers \r \n \v \f \x85 \u2028 \u2029


def header_value(text: str) -> str:
    """Any text -> one header-safe line: control characters and line breaks become one space.

    "Hi\\r\\nBcc: victim@x" -> "Hi Bcc: victim@x" (harmless: it stays inside the one header)."""
    return _HEADER_JUNK.sub(" ", str(text)).strip()


# ---------------------------------------------------------------------------------------------
# Merge tags -> Jinja2 calls

_MERGE_RE = re.compile(
    r"(?P<skip>"
    r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}|\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}"
    r"|<style\b.*?</style\s*>|<script\b.*?</script\s*>|<!(?:--)?\[[^\]]*\]"
    r")"
    r"|\[(?P<name>[A-Za-z][A-Za-z0-9 _]{0,63})(?:\|(?P<fallback>[^\[\]\r\n]*))?\](?!\()",
    re.S | re.I,
)
_MERGE_FN = "__merge__"
_DATA = "__data__"


def _merge_sub(m: re.Match[str]) -> str:
    if m.group("skip") is not None:
        return m.group(0)
    try:
        key = normalise_name(m.group("name"))
    except BadAttribute:
        return m.group(0)  # unreachable with the regex above; text rather than a crash
    fallback = m.group("fallback")
    # A filter on the data, not a global function: filters are called directly, sandbox calls
    # are checked each time (~3x slower per tag). Hex keeps the author's fallback out of
    # Jinja's string-literal syntax (quotes, backslashes).
    fb = "" if fallback is None else fallback.encode().hex()
    return f'{{{{ {_DATA}|{_MERGE_FN}("{key}", "{fb}") }}}}'


def translate_merge_tags(source: str) -> str:
    """Template text with merge tags -> the same text with each tag as a Jinja2 call."""
    if "[" not in source:
        return source
    return _MERGE_RE.sub(_merge_sub, source)


@functools.lru_cache(maxsize=1024)
def _unhex(fallback_hex: str) -> Markup:
    return Markup(bytes.fromhex(fallback_hex).decode())


def _merge(data: Any, key: str, fallback_hex: str) -> Any:
    value = data.get(key) if isinstance(data, Mapping) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return _unhex(fallback_hex)
    return value if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------------------
# The sandbox

class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"**", "*"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The stock sandbox returns an Undefined that renders as "" in most positions; a probe
        # for internals is an attack, and the campaign should fail rather than send quietly.
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _huge_power(left, right):
            raise SecurityError("power too large")
        if operator == "*" and _huge_repeat(left, right):
            raise SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


def _huge_power(left: Any, right: Any) -> bool:
    if not (isinstance(left, int) and isinstance(right, int)) or right <= 0 or abs(left) < 2:
        return False
    return abs(left).bit_length() * right > MAX_POWER_BITS


def _huge_repeat(left: Any, right: Any) -> bool:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, str | bytes | list | tuple) and isinstance(n, int):
            return len(seq) * n > MAX_REPEAT
    return False


def _environment(autoescape: bool) -> _Sandbox:
    env = _Sandbox(autoescape=autoescape, undefined=ChainableUndefined,
                   keep_trailing_newline=True)
    env.filters[_MERGE_FN] = _merge
    return env


_ENVS = {"html": _environment(True), "text": _environment(False)}


def _unsafe_names(tree: nodes.Template) -> list[str]:
    """Underscored attribute names used in the template, found without running it."""
    found = []
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name: Any = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        else:  # |attr("__class__")
            arg = node.args[0] if node.name == "attr" and node.args else None
            name = arg.value if isinstance(arg, nodes.Const) else None
        if isinstance(name, str) and name.startswith("_"):
            found.append(name)
    return found


@functools.lru_cache(maxsize=256)
def _compile(mode: str, source: str) -> Any:
    env = _ENVS[mode]
    try:
        tree = env.parse(translate_merge_tags(source))
    except TemplateSyntaxError as e:
        raise RenderError(f"template syntax error, line {e.lineno}: {e.message}") from None
    unsafe = _unsafe_names(tree)
    if unsafe:
        raise RenderError(f"template refused: access to {unsafe[0]!r} is not allowed")
    return env.from_string(tree)


@functools.lru_cache(maxsize=256)
def _merge_only(source: str) -> tuple[tuple[str, str, str], ...] | None:
    """A template of text and merge tags only (a typical subject) -> (text before, key,
    fallback hex) per tag, the text after as a last (text, "", "") entry; None when it has
    any Jinja2 syntax (or a CR, which Jinja2 would turn into LF)."""
    if "{{" in source or "{%" in source or "{#" in source or "\r" in source:
        return None
    parts, at = [], 0
    for m in _MERGE_RE.finditer(source):
        if m.group("skip") is None:
            try:
                key = normalise_name(m.group("name"))
            except BadAttribute:
                continue
            fallback = m.group("fallback")
            parts.append((source[at:m.start()], key,
                          "" if fallback is None else fallback.encode().hex()))
            at = m.end()
    parts.append((source[at:], "", ""))
    return tuple(parts)


def _fill(parts: tuple[tuple[str, str, str], ...], escape: bool, data: Mapping[str, Any]) -> str:
    # What Jinja2 makes of the translated template, without its per-render set-up (~10 us
    # for a subject): the same _merge per tag, autoescaped in HTML.
    out = []
    for before, key, fallback_hex in parts:
        out.append(before)
        if key:
            value = _merge(data, key, fallback_hex)
            out.append(markup_escape(value) if escape else value)
    return "".join(out)


def _run(mode: str, source: str, data: Mapping[str, Any]) -> str:
    template = _compile(mode, source)
    parts = _merge_only(source)
    if parts is not None:
        try:
            return _fill(parts, mode == "html", data)
        except Exception as e:  # noqa: BLE001 - as the Jinja2 path below reports it
            raise RenderError(f"template failed: {type(e).__name__}: {e}") from None
    try:
        return template.render(data, **{_DATA: data})
    except SecurityError as e:
        raise RenderError(f"template refused: {e}") from None
    # The template is the user's program: anything it raises means this message must not go.
    except Exception as e:  # noqa: BLE001
        raise RenderError(f"template failed: {type(e).__name__}: {e}") from None


def check(subject_tpl: str, html_tpl: str | None, text_tpl: str | None) -> None:
    """Compile the templates (and cache them); RenderError if any is refused or invalid."""
    _compile("text", subject_tpl)
    if html_tpl is not None:
        _compile("html", html_tpl)
    if text_tpl is not None:
        _compile("text", text_tpl)


def render(subject_tpl: str, html_tpl: str | None, text_tpl: str | None,
           data: Mapping[str, Any]) -> Rendered:
    """Templates + one customer's data -> subject (one header-safe line), HTML, text.

    When `text_tpl` is None the text part is derived from the rendered HTML."""
    if html_tpl is None and text_tpl is None:
        raise RenderError("neither an HTML nor a text body")
    subject = header_value(_run("text", subject_tpl, data))
    html = _run("html", html_tpl, data) if html_tpl is not None else None
    if text_tpl is not None:
        text: str | None = _run("text", text_tpl, data)
    else:
        text = html_to_text(html or "")
    return Rendered(subject, html, text)


# ---------------------------------------------------------------------------------------------
# HTML -> text

_BREAK = frozenset({"br", "tr"})
_PARAGRAPH = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol",
                        "blockquote", "section", "article", "header", "footer", "hr", "pre"})
_HIDDEN = frozenset({"script", "style", "head", "title"})
_SPACES = re.compile(r"[ \t\r\n\f\v\xa0]+")


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.hidden = 0
        self.links: list[tuple[str | None, int]] = []  # (href, index in out where it started)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN:
            self.hidden += 1
        elif tag in _BREAK:
            self.out.append("\n")
        elif tag in _PARAGRAPH:
            self.out.append("\n\n")
        elif tag == "li":
            self.out.append("\n- ")
        elif tag in ("td", "th"):
            self.out.append(" ")
        elif tag == "a":
            self.links.append((dict(attrs).get("href"), len(self.out)))
        elif tag == "img" and not self.hidden:
            alt = dict(attrs).get("alt")
            if alt:
                self.out.append(alt)

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _PARAGRAPH:
            self.out.append("\n\n")
        elif tag == "a" and self.links:
            href, start = self.links.pop()
            self._link_url(href, start)

    def _link_url(self, href: str | None, start: int) -> None:
        url = (href or "").strip()
        if not url.lower().startswith(("http://", "https://", "mailto:")):
            return
        label = _SPACES.sub(" ", "".join(self.out[start:])).strip()
        shown = url[7:] if url.lower().startswith("mailto:") else url
        if not label:
            self.out.append(url)
        elif shown not in label:
            self.out.append(f" ({url})")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.out.append(_SPACES.sub(" ", data))


def html_to_text(html: str) -> str:
    """Rendered HTML -> plain text: tags stripped, links as "text (url)", entities decoded,
    whitespace collapsed, paragraphs separated by one blank line."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    lines = [line.strip(" ") for line in "".join(parser.out).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# Template syntax a line is never broken inside: Jinja2 blocks and merge tags (their spaces and
# line breaks are not places to wrap at).
_UNBREAKABLE = re.compile(
    r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}|\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}"
    r"|\[[A-Za-z][A-Za-z0-9 _]{0,63}(?:\|[^\[\]\r\n]*)?\]", re.S)
_NOT_SPACE = str.maketrans({" ": "\x00", "\n": "\x00", "\t": "\x00"})


def wrap_text(text: str, width: int = 72) -> str:
    """A plain-text template -> the same with lines longer than `width` broken at spaces
    (the space becomes the line break; nothing else changes). Template syntax ({{ }}, {% %},
    {# #}, merge tags) is never broken, and a word longer than `width` (a URL) gets a line of
    its own. Lines are measured as written, so a rendered line may come out a little longer
    or shorter; the MIME encoder soft-breaks any that end up over 76 characters.

    What a text part derived from HTML is wrapped with: plain text is read at 72-78 columns
    (RFC 3676), and short lines go through quoted-printable without soft breaks."""
    masked = _UNBREAKABLE.sub(lambda m: m.group(0).translate(_NOT_SPACE), text)
    out = list(text)
    start = 0  # index where the current output line starts
    for line_end in [*(i for i, ch in enumerate(masked) if ch == "\n"), len(masked)]:
        while line_end - start > width:
            cut = masked.rfind(" ", start, start + width + 1)
            if cut < 0:  # one long word: it ends the line
                cut = masked.find(" ", start + width, line_end)
                if cut < 0:
                    break
            out[cut] = "\n"
            start = cut + 1
        start = line_end + 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Links and the open pixel

# An <a> start tag whose attribute values may hold ">" inside quotes; comments pass untouched.
_A_TAG = re.compile(r"<!--.*?-->|<a(?=[\s/>])(?:[^>\"']|\"[^\"]*\"|'[^']*')*>", re.I | re.S)
_ATTR = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+)))?""")


def rewrite_links(html: str, make_url: Callable[[int, str], str]) -> tuple[str, list[str]]:
    """HTML -> (HTML with each http(s) <a href> replaced by make_url(i, url), the urls in order).

    `url` is the link as the browser would follow it (entities decoded); links without an
    http(s) href (mailto:, tel:, #anchor, javascript:) and <a data-notrack> stay as they are."""
    urls: list[str] = []

    def one(m: re.Match[str]) -> str:
        tag = m.group(0)
        if tag.startswith("<!"):
            return tag
        href = None
        for a in _ATTR.finditer(tag, 2, len(tag) - 1):
            name = a.group(1).lower()
            if name == "data-notrack":
                return tag
            if name == "href" and href is None:  # the first href is the one browsers use
                href = a
        if href is None:
            return tag
        raw = next((v for v in href.groups()[1:] if v is not None), "")
        url = htmllib.unescape(raw).strip()
        if not url.lower().startswith(("http://", "https://")):
            return tag
        new = make_url(len(urls), url)
        urls.append(url)
        return f'{tag[:href.start()]}href="{htmllib.escape(new)}"{tag[href.end():]}'

    return _A_TAG.sub(one, html), urls


def open_pixel(url: str) -> str:
    """The open-tracking image for `url`, as an HTML snippet."""
    return (f'<img src="{htmllib.escape(url)}" width="1" height="1" alt="" '
            'style="border:0;width:1px;height:1px" />')


def add_open_pixel(html: str, url: str) -> str:
    """HTML with the open pixel inserted before its last </body> (appended if there is none)."""
    at = html.lower().rfind("</body")
    pixel = open_pixel(url)
    if at < 0:
        return html + pixel
    return html[:at] + pixel + html[at:]
