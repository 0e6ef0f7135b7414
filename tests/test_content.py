"""Content by URL from a real HTTP server on loopback: fetch outcomes, hash, CSS inlining,
link registration shared by composers, and the failure reasons the instance gets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update

from connectd.content import (
    ContentError,
    ContentStore,
    fail_instance,
    fetch,
    inline_css,
    mark_text_urls,
)
from connectd.db.customer import Content, Link, MessageInstance
from connectd.db.engine import make_engine

PAGE = (b"<html><head><style>p { color: red }</style></head><body>"
        b"<p>Hi [First Name|friend]</p><a href='https://shop.example/a'>A</a>"
        b"<a href='https://shop.example/b'>B</a><a href='https://shop.example/a'>A again</a>"
        b"</body></html>")


class _Handler(BaseHTTPRequestHandler):
    pages: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/slow":
            time.sleep(2)
        if self.path == "/boom":
            self.send_error(500, "Internal Server Error")
            return
        body = self.pages.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web() -> Iterator[tuple[str, dict[str, bytes]]]:
    pages = {"/page.html": PAGE, "/text.txt": b"Hi [First Name|friend], text part\n"}
    handler = type("H", (_Handler,), {"pages": pages})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", pages
    srv.shutdown()
    srv.server_close()


def test_fetch_200(web):
    """A 200 answer's body comes back as it was served."""
    base, _ = web
    assert fetch(f"{base}/page.html", 5) == PAGE


@pytest.mark.parametrize("path,reason", [("/missing", "HTTP 404"), ("/boom", "HTTP 500")])
def test_fetch_http_errors_name_url_and_status(web, path, reason):
    """Non-2xx answers are ContentError with the URL and status."""
    base, _ = web
    with pytest.raises(ContentError) as err:
        fetch(f"{base}{path}", 5)
    assert reason in err.value.reason and f"{base}{path}" in err.value.reason


def test_fetch_timeout(web):
    """A server slower than the timeout: ContentError saying it timed out."""
    base, _ = web
    t0 = time.monotonic()
    with pytest.raises(ContentError, match="timed out"):
        fetch(f"{base}/slow", 0.3)
    assert time.monotonic() - t0 < 1.5


def test_fetch_connection_refused():
    """Nobody listening: ContentError naming the URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ContentError, match=f"127.0.0.1:{port}"):
        fetch(f"http://127.0.0.1:{port}/x", 2)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x"])
def test_fetch_refuses_other_schemes(url):
    """Only http(s) is fetched: file: would read the composer's own disk."""
    with pytest.raises(ContentError, match="not http"):
        fetch(url, 1)


def test_inline_css_keeps_template_syntax():
    """Styles are inlined; Jinja2 blocks, expressions and merge tags come back unchanged."""
    html = ('<style>p{color:red}</style><p>[First Name|friend] {% if a < b %}x{% endif %}</p>'
            '<a href="https://x.example/{{ id }}">go</a>')
    out = inline_css(html)
    assert 'style="color: red;"' in out and "<style" not in out
    assert "[First Name|friend] {% if a < b %}x{% endif %}" in out
    assert 'href="https://x.example/{{ id }}"' in out


@pytest.fixture
def engine(migrated_customer_url):
    eng = make_engine(migrated_customer_url)
    yield eng
    eng.dispose()


def test_store_loads_registers_links_and_hash(web, engine, migrated_customer_url,
                                              outbound_seed):
    """First load: CSS inlined, text derived, links registered once per URL, hash stored;
    a second composer gets the same link ids and no new rows."""
    base, _ = web
    seed = outbound_seed(migrated_customer_url, 1, html_url=f"{base}/page.html")
    first = ContentStore(engine, 5, "x@example.com").get(seed["instance"])
    assert 'style="color: red;"' in first.html and "friend" in first.text
    assert list(first.links) == ["https://shop.example/a", "https://shop.example/b"]
    a, b = first.links["https://shop.example/a"], first.links["https://shop.example/b"]
    # the HTML's three links, then the same three in the text derived from it
    assert first.link_order == [a, b, a, a, b, a] and first.text_marked
    second = ContentStore(engine, 5, "x@example.com").get(seed["instance"])
    assert second.links == first.links and second.hash == first.hash
    with engine.connect() as conn:
        assert conn.execute(select(Link.id)).scalars().all() == sorted(first.links.values())
        stored = conn.execute(select(MessageInstance.content_hash)).scalar_one()
    assert stored == first.hash and first.from_addr == "news@example.com"


def test_store_uses_the_text_url_when_given(web, engine, migrated_customer_url, outbound_seed):
    """A text_url gives the text part as fetched."""
    base, _ = web
    seed = outbound_seed(migrated_customer_url, 1, html_url=f"{base}/page.html",
                         text_url=f"{base}/text.txt")
    got = ContentStore(engine, 5, "x@example.com").get(seed["instance"])
    assert got.text == "Hi [First Name|friend], text part\n"


def test_store_content_changed_during_launch(web, engine, migrated_customer_url,
                                             outbound_seed):
    """A composer that fetches different bytes than the hash stored refuses the launch."""
    base, pages = web
    seed = outbound_seed(migrated_customer_url, 1, html_url=f"{base}/page.html")
    ContentStore(engine, 5, "x@example.com").get(seed["instance"])
    pages["/page.html"] = PAGE.replace(b"Hi", b"Hello")
    with pytest.raises(ContentError, match="content changed during the launch"):
        ContentStore(engine, 5, "x@example.com").get(seed["instance"])


def test_store_refuses_a_sandbox_escape(web, engine, migrated_customer_url, outbound_seed):
    """A template probing internals fails the launch with the render reason."""
    base, pages = web
    pages["/evil.html"] = b"<p>{{ ''.__class__.__mro__ }}</p>"
    seed = outbound_seed(migrated_customer_url, 1, html_url=f"{base}/evil.html")
    with pytest.raises(ContentError, match="does not render: template refused"):
        ContentStore(engine, 5, "x@example.com").get(seed["instance"])


def test_store_missing_page_and_fail_instance(web, engine, migrated_customer_url, outbound_seed):
    """A 404 content URL: ContentError; fail_instance records it as the instance's error."""
    base, _ = web
    seed = outbound_seed(migrated_customer_url, 1, html_url=f"{base}/gone.html")
    with pytest.raises(ContentError) as err:
        ContentStore(engine, 5, "x@example.com").get(seed["instance"])
    assert fail_instance(engine, seed["instance"], err.value.reason)
    with engine.connect() as conn:
        status, error = conn.execute(select(MessageInstance.status, MessageInstance.error)).one()
    assert status == "failed" and "HTTP 404" in error and "/gone.html" in error


def test_store_without_any_url(engine, migrated_customer_url, outbound_seed):
    """Content with neither URL is refused with that reason."""
    seed = outbound_seed(migrated_customer_url, 1)
    with engine.begin() as conn:
        conn.execute(update(Content).values(html_url=None, text_url=None))
    with pytest.raises(ContentError, match="neither html_url nor text_url"):
        ContentStore(engine, 5, "x@example.com").get(seed["instance"])


def test_text_urls_are_marked_after_the_html_links() -> None:
    """Literal URLs of a text template become placeholders numbered after the HTML's links;
    trailing punctuation stays text; URLs running into template syntax stay as written."""
    text = ("Sale (https://shop.example/sale). See https://shop.example/a?b=1, "
            "or https://shop.example/{{ code }} and https://shop.example/[Code]\n")
    marked, urls = mark_text_urls(text, 2)
    assert urls == ["https://shop.example/sale", "https://shop.example/a?b=1"]
    assert marked == ("Sale (\ue0002\ue001). See \ue0003\ue001, "
                      "or https://shop.example/{{ code }} and https://shop.example/[Code]\n")


def test_store_tracks_the_text_parts_links(web, engine, migrated_customer_url, outbound_seed):
    """A given text part's URLs are registered with the HTML's and marked for tracking."""
    base, pages = web
    pages["/links.txt"] = b"Hi, see https://shop.example/t and https://shop.example/a.\n"
    seed = outbound_seed(migrated_customer_url, 1, html_url=f"{base}/page.html",
                         text_url=f"{base}/links.txt")
    got = ContentStore(engine, 5, "x@example.com").get(seed["instance"])
    assert got.text_marked and "https://" not in got.text
    assert list(got.links) == ["https://shop.example/a", "https://shop.example/b",
                               "https://shop.example/t"]
    # HTML positions 0-2, then the text's two links
    assert got.link_order[3:] == [got.links["https://shop.example/t"],
                                  got.links["https://shop.example/a"]]


def test_derived_text_is_wrapped_at_72() -> None:
    """A text part derived from the HTML is wrapped at 72 columns, never inside a merge tag
    or Jinja2 expression."""
    from connectd.content import _text_template

    html = ("<p>" + "Hello [First Name|dear friend], {{ city | default('your town') }} is " * 12
            + "</p>")
    text = _text_template(html)
    assert text is not None
    assert max(len(line) for line in text.split("\n")) <= 72
    assert text.count("[First Name|dear friend]") == 12
    assert text.count("{{ city | default('your town') }}") == 12
