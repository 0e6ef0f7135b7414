"""A launch's content, as a composer needs it: fetched by URL once, checked, links registered.

Inputs: a customer-DB Engine, a message instance id, composer settings (content_timeout,
from_address). Outputs: a `LaunchContent` (subject, From, HTML and text templates ready to
render per customer, the content hash, link ids for click tokens), cached per instance for
the life of the composer; `message_instances.content_hash` set by the first composer; rows in
`links`; ContentError(reason) when the content cannot be used (the composer then fails the
instance with that reason and sends nothing).

What happens once per launch (so not per message):
- GET html_url / text_url (http and https only; a timeout of composer.content_timeout for
  the whole fetch; non-2xx, connection errors and timeouts are ContentError naming the URL).
- sha256 over the fetched parts: the first composer stores it; a composer that fetched
  something else fails the instance ("content changed during the launch").
- CSS inlined into the HTML (css-inline), with Jinja2 blocks and merge tags kept out of the
  HTML parser's reach (swapped for inert placeholders and put back), so `{% if a < b %}` or
  `href="{{ url }}"` survive the re-serialisation.
- No text part given: the text template is derived from the HTML template (render's
  html_to_text on the source; tags and merge tags are text to it), so each message renders a
  text template instead of parsing its rendered HTML again (~10x cheaper per message);
  wrapped at 72 columns (render.wrap_text), never inside template syntax or a URL.
- render.check() on subject, HTML and text: a template that is refused (sandbox) or invalid
  fails the launch before anyone gets mail.
- Links in the text part are tracked too (a customer reading plain text clicks through the
  tracker like anyone else): every literal http(s) URL of the text template (given, or
  derived from the HTML) becomes a placeholder, after the HTML's links. A URL that runs into
  template syntax (`https://x/{{ id }}`, `https://x/[Code]`) is personal and left as written.
- Every distinct http(s) link of the HTML and the text is registered in `links`
  (message_id, url) in one transaction with the hash (PostgreSQL: the instance row is locked FOR UPDATE first;
  SQLite: BEGIN IMMEDIATE), so concurrent composers agree on one id per URL.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any

import css_inline
from sqlalchemy import Engine, insert, select, update

from connectd import log
from connectd.core import render
from connectd.db.customer import Campaign, Content, Link, Message, MessageInstance
from connectd.db.engine import writer

MAX_BYTES = 10 * 1024 * 1024  # content larger than this is refused (it would be mailed to all)
_PROTECT = re.compile(
    r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}|\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}"
    r"|\[[A-Za-z][A-Za-z0-9 _]{0,63}(?:\|[^\[\]\r\n]*)?\](?!\()", re.S)
_PLACEHOLDER = re.compile(r'cdph(\d+)x(?:="")?')
# private-use characters: no template syntax, escaping or text produces them
LINK_MARK = "\ue000%d\ue001"
OPEN_MARK = "\ue000o\ue001"  # the open pixel's URL in a marked HTML template
LINK_MARKS = re.compile("\ue000(\\d+|o)\ue001")
# a URL in plain text: up to white space, quotes, brackets or braces; trailing sentence
# punctuation is not part of it
_TEXT_URL = re.compile(r"https?://[^\s<>\"'()\[\]{}\ue000\ue001]+", re.I)
_TRAILING = ".,;:!?"


class ContentError(Exception):
    """The content cannot be sent; `reason` goes into message_instances.error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LaunchContent:
    """Everything per-launch a composer renders from."""

    instance_id: int
    message_id: int
    campaign_id: int
    campaign: str
    subject: str
    from_addr: str
    from_name: str | None
    html: str | None
    text: str | None  # None with an HTML part: derive the text from each rendered HTML
    hash: str
    links: dict[str, int] = field(default_factory=dict)  # url -> links.id
    link_order: list[int] = field(default_factory=list)  # links.id by position in the HTML
    # True: every tracked href of `html` is a placeholder LINK_MARK % i (i = position), and
    # the open pixel's src OPEN_MARK, to be replaced per message; False: links are rewritten
    # and the pixel added in each rendered HTML instead
    marked: bool = False
    # True: the literal URLs of `text` are placeholders LINK_MARK % i too, numbered after the
    # HTML's links (link_order holds both)
    text_marked: bool = False


def fetch(url: str, timeout: float) -> bytes:
    """GET `url` (http or https) -> the body; ContentError with the URL and why otherwise."""
    if not url.lower().startswith(("http://", "https://")):
        raise ContentError(f"content URL {url!r} is not http(s)")
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - checked above
            chunks, size = [], 0
            while True:
                chunk = resp.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BYTES:
                    raise ContentError(f"GET {url}: larger than {MAX_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise ContentError(f"GET {url}: timed out after {timeout:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise ContentError(f"GET {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise ContentError(f"GET {url}: timed out after {timeout:g} s") from None
        raise ContentError(f"GET {url}: {reason}") from None
    except TimeoutError:
        raise ContentError(f"GET {url}: timed out after {timeout:g} s") from None
    except OSError as exc:
        raise ContentError(f"GET {url}: {exc}") from None


def content_hash(html: bytes | None, text: bytes | None) -> str:
    """sha256 hex of the fetched parts (which part is which counts)."""
    h = hashlib.sha256()
    for name, part in ((b"html", html), (b"text", text)):
        if part is not None:
            h.update(name + b"\0" + str(len(part)).encode() + b"\0" + part)
    return h.hexdigest()


def inline_css(html: str) -> str:
    """<style> rules moved into style attributes; template syntax left exactly as written."""
    if "<style" not in html.lower():
        return html  # nothing to inline: spare the parse and re-serialisation
    kept: list[str] = []

    def keep(m: re.Match[str]) -> str:
        kept.append(m.group(0))
        return f"cdph{len(kept) - 1}x"

    safe = _PROTECT.sub(keep, html)
    inlined = css_inline.CSSInliner(load_remote_stylesheets=False).inline(safe)
    return _PLACEHOLDER.sub(lambda m: kept[int(m.group(1))], inlined)


def _decode(body: bytes) -> str:
    return body.decode("utf-8", "replace")


def _text_template(html: str) -> str | None:
    """The HTML template as a text template, or None when that does not compile (template
    syntax inside tags, say): the text is then derived from each rendered HTML instead."""
    # wrapped at 72 as plain text is written (and short lines cost the quoted-printable
    # encoder nothing per message)
    text = render.wrap_text(render.html_to_text(html))
    try:
        render.check("", None, text)
    except render.RenderError:
        return None
    return text


def _templated(url: str) -> bool:
    return "{{" in url or "{%" in url or "[" in url


def mark_text_urls(text: str, first: int) -> tuple[str, list[str]]:
    """Plain-text template -> (the template with each literal http(s) URL replaced by
    LINK_MARK % i, i counting from `first`; the URLs in order). URLs followed directly by
    template syntax ("{" or "[") are personalised and stay as written."""
    urls: list[str] = []

    def one(m: re.Match[str]) -> str:
        url = m.group(0).rstrip(_TRAILING)
        after = text[m.start() + len(url):m.start() + len(url) + 1]
        if after in ("{", "[") or len(url) < 10:
            return m.group(0)
        urls.append(url)
        return LINK_MARK % (first + len(urls) - 1) + m.group(0)[len(url):]

    return _TEXT_URL.sub(one, text), urls


def link_urls(html: str) -> list[str]:
    """The http(s) links of an HTML template, in document order (repeats included)."""
    return render.rewrite_links(html, lambda _i, url: url)[1]


class ContentStore:
    """Per-composer cache of LaunchContent by instance id."""

    def __init__(self, engine: Engine, timeout: float, default_from: str) -> None:
        self.engine = engine
        self.timeout = timeout
        self.default_from = default_from
        self._cache: dict[int, LaunchContent] = {}
        self.log = log.get(component="content")

    def get(self, instance_id: int) -> LaunchContent:
        """The instance's content (fetched and registered on first use); ContentError."""
        got = self._cache.get(instance_id)
        if got is None:
            got = self._cache[instance_id] = self._load(instance_id)
        return got

    def forget(self, instance_id: int) -> None:
        self._cache.pop(instance_id, None)

    def _row(self, instance_id: int) -> Any:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(MessageInstance.message_id, Message.campaign_id, Campaign.name,
                       Campaign.from_address.label("campaign_from"), Content.subject,
                       Content.from_address, Content.html_url, Content.text_url)
                .select_from(MessageInstance)
                .join(Message, Message.id == MessageInstance.message_id)
                .join(Campaign, Campaign.id == Message.campaign_id)
                .outerjoin(Content, Content.id == Message.content_id)
                .where(MessageInstance.id == instance_id)).first()
        if row is None or row.subject is None:
            raise ContentError(f"instance {instance_id}: its message has no content")
        if not row.html_url and not row.text_url:
            raise ContentError(f"instance {instance_id}: content has neither html_url nor text_url")
        return row

    def _load(self, instance_id: int) -> LaunchContent:
        t0 = time.perf_counter()
        row = self._row(instance_id)
        html_raw = fetch(row.html_url, self.timeout) if row.html_url else None
        text_raw = fetch(row.text_url, self.timeout) if row.text_url else None
        digest = content_hash(html_raw, text_raw)
        html = inline_css(_decode(html_raw)) if html_raw is not None else None
        text = _decode(text_raw) if text_raw is not None else None
        try:
            render.check(row.subject, html, text)
        except render.RenderError as exc:
            raise ContentError(f"content does not render: {exc.reason}") from None
        if text is None:
            text = _text_template(html or "")
        name, addr = parseaddr(row.from_address or row.campaign_from or self.default_from)
        if "@" not in addr:
            raise ContentError(f"no usable From address ({addr!r})")
        urls = link_urls(html) if html else []
        text_urls: list[str] = []
        if text is not None:
            text, text_urls = mark_text_urls(text, len(urls))
        links = self._register(instance_id, row.message_id, digest, urls + text_urls)
        marked = bool(urls) and not any(_templated(u) for u in urls)
        if marked:
            # the literal links become placeholders once here, so each message only swaps
            # them for its signed URLs instead of parsing its rendered HTML for <a> tags
            html = render.rewrite_links(html, lambda i, _url: LINK_MARK % i)[0]
            # and the open pixel goes in here too, its URL a placeholder as well
            html = render.add_open_pixel(html, OPEN_MARK)
        self.log.info("content.loaded", instance=instance_id, campaign=row.name,
                      hash=digest[:12], links=len(links),
                      ms=round((time.perf_counter() - t0) * 1000, 1))
        return LaunchContent(instance_id, row.message_id, row.campaign_id, row.name,
                             row.subject, addr, name or None, html, text, digest, links,
                             [links[u] for u in urls + text_urls], marked, bool(text_urls))

    def _register(self, instance_id: int, message_id: int, digest: str,
                  urls: list[str]) -> dict[str, int]:
        """Set the instance's hash (first composer) and get an id per distinct URL."""
        with writer(self.engine).begin() as conn:
            # serialises concurrent first fetches of this instance (SQLite: BEGIN IMMEDIATE)
            stored = conn.execute(select(MessageInstance.content_hash).where(
                MessageInstance.id == instance_id).with_for_update()).scalar_one()
            if stored is None:
                conn.execute(update(MessageInstance).where(
                    MessageInstance.id == instance_id, MessageInstance.content_hash.is_(None))
                    .values(content_hash=digest))
            elif stored != digest:
                raise ContentError(f"content changed during the launch (sha256 {digest[:12]} "
                                   f"fetched, {stored[:12]} sent before)")
            known = dict(conn.execute(select(Link.url, Link.id).where(
                Link.message_id == message_id)).all())
            for url in dict.fromkeys(urls):
                if url not in known:
                    known[url] = conn.execute(insert(Link).values(
                        message_id=message_id, url=url, labels=[]).returning(Link.id)).scalar_one()
        return {u: known[u] for u in urls}


def fail_instance(engine: Engine, instance_id: int, reason: str) -> bool:
    """Mark the instance "failed" with `reason` unless it already ended; True if changed."""
    with writer(engine).begin() as conn:
        return conn.execute(update(MessageInstance).where(
            MessageInstance.id == instance_id,
            MessageInstance.status.in_(("ready", "preparing", "executing", "paused")))
            .values(status="failed", error=reason[:2000], finished_at=datetime.now(UTC))
        ).rowcount == 1
