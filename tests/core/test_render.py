"""connectd.core.render: merge tags, sandboxed Jinja2, header safety, HTML -> text, links."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectd.core import render as rd
from connectd.core.tokens import sign_token

DATA = {"first_name": "Ada", "email": "ada@example.com", "city": "", "score": 0,
        "last_name": None, "vip": False}


def text(tpl: str, data: dict[str, Any] | None = None) -> str:
    return rd.render("s", None, tpl, DATA if data is None else data).text or ""


@pytest.mark.parametrize("tpl, expected", [
    ("Hi [First Name|friend]!", "Hi Ada!"),
    ("Hi [first name|friend]!", "Hi Ada!"),
    ("Hi [FIRST_NAME|friend]!", "Hi Ada!"),
    ("Hi [First  Name ]!", "Hi Ada!"),
    ("[Email]", "ada@example.com"),
    ("[Nickname|friend]", "friend"),  # missing
    ("[Nickname]", ""),  # missing, no fallback
    ("[City|somewhere]", "somewhere"),  # empty string
    ("[Last Name|there]", "there"),  # None
    ("[Score|none]", "0"),  # 0 is a value
    ("[Vip|no]", "False"),  # so is false
    ("[Nickname| dear friend ]", " dear friend "),  # fallback kept as written
    ("[Nickname|a|b]", "a|b"),
    ("[Nickname|]", ""),
    ("[1] [ ] [] [#x] [a=b] [ First Name]", "[1] [ ] [] [#x] [a=b] [ First Name]"),
    ("see [the docs](https://x.example/a)", "see [the docs](https://x.example/a)"),
    ("[Nickname|[x]]", "[Nickname|]"),  # "[" is not allowed in a fallback: [x] is the tag
    ("{{ '[Email]' }}", "[Email]"),  # the escape for literal tag text
    ("{% raw %}[Email]{% endraw %}", "[Email]"),
    ("[First Name|friend], [Email]", "Ada, ada@example.com"),
])
def test_merge_tags(tpl: str, expected: str) -> None:
    """Merge tags resolve with fallbacks; bracketed text that is not a tag passes unchanged."""
    assert text(tpl) == expected


def test_whitespace_only_value_uses_fallback() -> None:
    """A value of only spaces counts as empty."""
    assert text("[First Name|friend]", {"first_name": "  "}) == "friend"


def test_jinja_subscript_is_not_a_merge_tag() -> None:
    """Inside {{ }} a [name] is Jinja's subscript, not a merge tag."""
    assert text("{{ d[k] }}", {"d": {"x": "yes"}, "k": "x"}) == "yes"


def test_merge_tag_does_not_read_jinja_globals() -> None:
    """[Range] looks up the customer's `range` attribute, not Jinja's range function."""
    assert text("[Range|none]") == "none"


@pytest.mark.parametrize("html", [
    "<style>a[href] { color: red }</style>",
    "<!--[if mso]><table><![endif]-->",
    "<![if !mso]>x<![endif]>",
    "<script>var a = b[c];</script>",
])
def test_html_constructs_are_not_merge_tags(html: str) -> None:
    """CSS attribute selectors, Outlook conditional comments and scripts keep their brackets."""
    assert rd.render("s", html, None, DATA).html == html


def test_merge_value_is_data_not_template() -> None:
    """A merge value that looks like Jinja is printed, never evaluated."""
    data = {"first_name": "{{ 7*7 }}{% for x in range(3) %}x{% endfor %}"}
    out = rd.render("[First Name]", "<p>[First Name]</p>", "[First Name]", data)
    assert out.text == data["first_name"]
    assert out.subject == data["first_name"]
    assert "49" not in (out.html or "")


def test_autoescape_in_html_not_in_text() -> None:
    """A merge value "<script>" is escaped in the HTML body, verbatim in text and subject."""
    data = {"first_name": "<script>alert(1)</script>", "x": "<b>&"}
    out = rd.render("Hi [First Name]", "<p>[First Name] {{ x }}</p>", "[First Name] {{ x }}",
                    data)
    assert out.html == "<p>&lt;script&gt;alert(1)&lt;/script&gt; &lt;b&gt;&amp;</p>"
    assert out.text == "<script>alert(1)</script> <b>&"
    assert out.subject == "Hi <script>alert(1)</script>"


def test_fallback_is_author_html() -> None:
    """In the HTML body a fallback is the author's markup, not escaped."""
    assert rd.render("s", "[Nickname|<b>friend</b>]", None, DATA).html == "<b>friend</b>"


def test_undefined_renders_empty() -> None:
    """Undefined variables, and attributes of them, render as nothing."""
    assert text("a{{ nothing }}b{{ nothing.deeper.still }}c") == "abc"


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ self.__dict__ }}",
    "{{ ()|attr('__class__') }}",
    "{{ x|attr(n) }}",  # name only known at render time
    "{{ ''['__class__'] }}",
    "{{ x[n] }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{{ namespace.__init__ }}",
    "{% set a = [] %}{{ a.append(1) }}",
    "{{ {}.update(a=1) }}",
    "{{ joiner.__call__ }}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{{ 2**100000 }}",
    "{{ 'x' * 10**8 }}",
    "{{ [1] * 10**8 }}",
    "{{ 1/0 }}",
    "{% if %}",
    "{{ unclosed",
])
def test_sandbox_refuses(payload: str) -> None:
    """Sandbox escapes, resource bombs, syntax and runtime errors raise RenderError."""
    data = {"x": "v", "n": "__class__"}
    for args in ((payload, None, "t"), ("s", payload, None), ("s", None, payload)):
        with pytest.raises(rd.RenderError):
            rd.render(*args, data)


def test_check_refuses_before_any_customer() -> None:
    """check() refuses a template that probes internals without rendering it."""
    with pytest.raises(rd.RenderError, match="__globals__"):
        rd.check("ok", "<p>{{ cycler.__init__.__globals__ }}</p>", None)
    rd.check("ok [First Name|x]", "<p>{{ a }}</p>", "{{ b }}")


def test_templates_are_compiled_once() -> None:
    """Rendering the same source for many customers reuses one compiled template."""
    src = "<p>compiled once [First Name] {{ n }}</p>"
    for n in range(5):
        rd.render("s", src, None, {"n": n})
    assert rd._compile("html", src) is rd._compile("html", src)


@pytest.mark.parametrize("raw, safe", [
    ("Hi\r\nBcc: victim@x", "Hi Bcc: victim@x"),
    ("Hi\nBcc: victim@x", "Hi Bcc: victim@x"),
    ("Hi\rBcc: victim@x", "Hi Bcc: victim@x"),
    ("a\x00b\x1bc\x7fd\x85e", "a b c d e"),
    ("line\u2028sep\u2029para", "line sep para"),
    ("  tabs\tand   spaces  ", "tabs and spaces"),
    ("Ünïcödé ok", "Ünïcödé ok"),
])
def test_header_value(raw: str, safe: str) -> None:
    """Line breaks and control characters collapse to single spaces on one line."""
    assert rd.header_value(raw) == safe


def test_subject_header_injection_neutralised() -> None:
    """CR/LF in a merge value or in the subject template never leaves the subject line."""
    data = {"first_name": "Eve\r\nBcc: victim@example.com\r\n\r\nbody"}
    out = rd.render("Hi [First Name]\nX-Evil: 1", "<p>x</p>", None, data)
    assert "\r" not in out.subject and "\n" not in out.subject
    assert out.subject == "Hi Eve Bcc: victim@example.com body X-Evil: 1"


@pytest.mark.parametrize("html, expected", [
    ("<p>Hello&nbsp;<b>Ada</b> &amp; co</p>", "Hello Ada & co\n"),
    ("<p>one</p><p>two</p>", "one\n\ntwo\n"),
    ("a<br>b<br/>c", "a\nb\nc\n"),
    ('<a href="https://x.example/a?b=1&amp;c=2">Shop now</a>',
     "Shop now (https://x.example/a?b=1&c=2)\n"),
    ('<a href="https://x.example/">https://x.example/</a>', "https://x.example/\n"),
    ('<a href="mailto:help@x.example">help@x.example</a>', "help@x.example\n"),
    ('<a href="#top">Top</a>', "Top\n"),
    ('<a href="https://x.example/"><img src="b.png" alt="Buy"></a>', "Buy (https://x.example/)\n"),
    ("<ul><li>one</li><li>two</li></ul>", "- one\n- two\n"),
    ("<html><head><title>T</title><style>p{}</style></head><body>  hi \n  there </body></html>",
     "hi there\n"),
    ("<script>alert(1)</script>ok", "ok\n"),
])
def test_html_to_text(html: str, expected: str) -> None:
    """Tags stripped, links as "text (url)", entities decoded, whitespace collapsed."""
    assert rd.html_to_text(html) == expected


def test_text_part_derived_when_missing() -> None:
    """With no text template, the text part comes from the rendered HTML."""
    out = rd.render("s", '<p>Hi [First Name]</p><a href="https://x.example/">go</a>', None, DATA)
    assert out.text == "Hi Ada\n\ngo (https://x.example/)\n"


def test_render_needs_a_body() -> None:
    """Neither HTML nor text is refused."""
    with pytest.raises(rd.RenderError):
        rd.render("s", None, None, DATA)


def tracked(i: int, url: str) -> str:
    return f"https://t.example/c/{i}"


@pytest.mark.parametrize("html, out, urls", [
    ('<a href="https://a.example/">x</a>', '<a href="https://t.example/c/0">x</a>',
     ["https://a.example/"]),
    ("<a href='https://a.example/'>x</a>", '<a href="https://t.example/c/0">x</a>',
     ["https://a.example/"]),
    ("<a href=https://a.example/>x</a>", '<a href="https://t.example/c/0">x</a>',
     ["https://a.example/"]),
    ('<A class="b" HREF = "http://a.example/q?x=1&amp;y=2" target=_blank>x</A>',
     '<A class="b" href="https://t.example/c/0" target=_blank>x</A>',
     ["http://a.example/q?x=1&y=2"]),
    ('<a title="a > b" href="https://a.example/">x</a>',
     '<a title="a > b" href="https://t.example/c/0">x</a>', ["https://a.example/"]),
    ('<a\n  style="x"\n  href="  https://a.example/  ">x</a>',
     '<a\n  style="x"\n  href="https://t.example/c/0">x</a>', ["https://a.example/"]),
    ('<a href="mailto:x@y">m</a><a href="tel:+1">t</a><a href="#top">a</a>'
     '<a href="javascript:x()">j</a><a name="n">n</a><abbr href="https://a/">b</abbr>',
     None, []),
    ('<a data-notrack href="https://a.example/">x</a>', None, []),
    ('<a href="https://a.example/" data-notrack="1">x</a>', None, []),
    ('<!-- <a href="https://a.example/">x</a> -->', None, []),
    ('<a href="https://a/1">1</a> <a href="https://a/2">2</a> <a href="https://a/1">1</a>',
     '<a href="https://t.example/c/0">1</a> <a href="https://t.example/c/1">2</a> '
     '<a href="https://t.example/c/2">1</a>', ["https://a/1", "https://a/2", "https://a/1"]),
    ('<a href="https://a/1" href="https://a/2">x</a>', '<a href="https://t.example/c/0" '
     'href="https://a/2">x</a>', ["https://a/1"]),
])
def test_rewrite_links(html: str, out: str | None, urls: list[str]) -> None:
    """Every http(s) <a href> is rewritten, in order; other links and marked ones are not."""
    assert rd.rewrite_links(html, tracked) == (html if out is None else out, urls)


def test_rewrite_links_escapes_new_url() -> None:
    """The tracker URL is HTML-escaped inside the attribute."""
    html, _ = rd.rewrite_links('<a href="https://a/">x</a>', lambda i, u: 'https://t/?a=1&b="2"')
    assert html == '<a href="https://t/?a=1&amp;b=&quot;2&quot;">x</a>'


@pytest.mark.parametrize("html, expected", [
    ("<html><body><p>x</p></body></html>", '<html><body><p>x</p>PIXEL</body></html>'),
    ("<p>x</p></BODY >", "<p>x</p>PIXEL</BODY >"),
    ("<p>x</p>", "<p>x</p>PIXEL"),
])
def test_add_open_pixel(html: str, expected: str) -> None:
    """The pixel goes just before </body>, or at the end when there is none."""
    pixel = rd.open_pixel("https://t.example/o/abc?x=1&y=2")
    assert 'src="https://t.example/o/abc?x=1&amp;y=2"' in pixel
    assert rd.add_open_pixel(html, "https://t.example/o/abc?x=1&y=2") == expected.replace(
        "PIXEL", pixel)


def _page() -> str:
    links = "".join(f'<p>Offer {i}: <a href="https://shop.example/item/{i}?utm=mail">'
                    f"see item {i}</a></p>\n" for i in range(10))
    filler = "<p>" + "Lorem ipsum dolor sit amet, [First Name|friend]. " * 6 + "</p>\n"
    body = "<html><body><h1>Hello {{ first_name }}</h1>\n" + links
    while len(body) < 8000:
        body += filler
    return body + "{% if vip %}<p>VIP</p>{% endif %}</body></html>"


def test_micro_timing_render_and_rewrite() -> None:
    """Prints per-message cost of render + link rewriting + pixel for an 8 KB page."""
    page = _page()
    key = b"k" * 32
    data = {"first_name": "Ada <x>", "vip": True, "email": "ada@example.com"}

    def one(customer: int) -> str:
        out = rd.render("Hello [First Name|friend]", page, None, data)
        html, urls = rd.rewrite_links(
            out.html or "",
            lambda i, u: "https://t.example/c/" + sign_token(key, 7, customer, i, kind="c"))
        return rd.add_open_pixel(html, "https://t.example/o/" + sign_token(key, 7, customer,
                                                                           kind="o"))

    html = one(1)
    assert len(page) >= 8000 and len(re.findall(r"https://t\.example/c/", html)) == 10
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        rd.render("Hello [First Name|friend]", page, None, data)
    t1 = time.perf_counter()
    for c in range(n):
        one(c)
    t2 = time.perf_counter()
    rendered = rd.render("s", page, "", data).html or ""
    t3 = time.perf_counter()
    for c in range(n):
        rd.rewrite_links(rendered, lambda i, u, c=c: "https://t.example/c/" + sign_token(
            key, 7, c, i, kind="c"))
    t4 = time.perf_counter()
    print(f"\n8 KB page, 10 links, per message: render (incl. derived text) "
          f"{(t1 - t0) / n * 1e6:.0f} us, rewrite 10 signed links {(t4 - t3) / n * 1e6:.0f} us, "
          f"render + rewrite + pixel {(t2 - t1) / n * 1e6:.0f} us")


MERGE_ONLY_PIECES = ["Hi ", "[First Name|friend]", "[city]", "<b>", "&", "\n", "[x|<i>y</i>]",
                     "<style>a[href]{}</style>", "[LAST_NAME| ]", "}}", "%}", "{", "}", "[1]",
                     "[see](https://x)", "<!--[if mso]>"]


@given(pieces=st.lists(st.sampled_from(MERGE_ONLY_PIECES), max_size=12),
       first=st.sampled_from(["Ann", "<&>", "", "  ", None, 7, "{{ 7*7 }}"]),
       city=st.sampled_from(["Lyon", "", None, "a&b"]))
def test_merge_only_templates_render_as_jinja(pieces: list[str], first: object,
                                              city: object) -> None:
    """A template of text and merge tags only (rendered without Jinja2's per-render set-up)
    gives exactly what Jinja2 gives, escaped in HTML and not in text."""
    source = "".join(pieces)
    data = {"first_name": first, "city": city, "last_name": "Doe"}
    if not any(d in source for d in ("{{", "{%", "{#")):
        assert rd._merge_only(source) is not None
    for mode in ("html", "text"):
        try:
            template = rd._compile(mode, source)
        except rd.RenderError:
            continue  # refused by check() before any customer, fast path or not
        assert rd._run(mode, source, data) == template.render(data, **{rd._DATA: data})


# ---------------------------------------------------------------------------------------------
# wrap_text

def test_wrap_text_breaks_at_spaces_only() -> None:
    """Long lines break at a space (the space becomes the break), short ones and existing
    breaks stay; nothing else changes."""
    line = " ".join(f"word{i}" for i in range(40))
    out = rd.wrap_text(line + "\nshort line\n\n" + line, 30)
    assert out.replace("\n", " ") == (line + " short line  " + line)
    assert all(len(x) <= 30 for x in out.split("\n"))
    assert "\nshort line\n\n" in out


def test_wrap_text_keeps_template_syntax_and_long_words_whole() -> None:
    """No break inside {{ }}, {% %}, {# #} or a merge tag, even with spaces in them; a word
    longer than the width (a URL) gets a line of its own and is not cut."""
    url = "https://shop.example/" + "x" * 90
    tpl = ("Hello [First Name|my very dear friend] and welcome " * 2
           + "{{ city | default('some place far far away') }} {% if a and b %}yes{% endif %} "
           + url + " the end {# a comment with spaces #} done")
    out = rd.wrap_text(tpl, 20)
    assert out.replace("\n", " ") == tpl
    for piece in ("[First Name|my very dear friend]", "{{ city | default('some place far far away') }}",
                  "{% if a and b %}", "{# a comment with spaces #}", url):
        assert piece in out
    assert url in out.split("\n")


@given(st.text(alphabet=st.sampled_from(list("ab [|]{}%#\n")), max_size=200),
       st.integers(min_value=1, max_value=40))
def test_wrap_text_changes_only_spaces_into_breaks(text: str, width: int) -> None:
    """Whatever the input: same length, and the only changes are spaces that became line
    breaks; the result renders to the same text once breaks are read as spaces."""
    out = rd.wrap_text(text, width)
    assert len(out) == len(text)
    assert all(a == b or (a == " " and b == "\n") for a, b in zip(text, out, strict=True))
