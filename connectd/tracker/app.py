"""The tracker's endpoints: a parsed HTTP request -> one record appended to the worker's
stream -> the bytes of the HTTP response.

Inputs: `Request`s from connectd.tracker.server, the token keys (connectd.secrets, newest
first: every key verifies, the first signs cookies), the in-memory link map, the worker's
stream writer. Outputs: response bytes (or, for a click on a link not in the map yet, a
coroutine that waits for the link map's next refresh), records, metrics.

Endpoints:
- GET|HEAD /c/<token>: link.clicked, then 302 to the link's URL (Cache-Control: no-store) and
  the click cookie (the token's instance, customer and link and the time, signed with the
  first token key as kind "cookie"), which attributes later conversions. The URL comes from the
  link map by the link id inside the signed token, never from the request: there is no open
  redirect. A valid token whose link is not in the map yet (a composer registered it moments
  ago) wakes the map's refresher and waits for one refresh that started after the request, at
  most LINK_WAIT seconds, then gets 404 if the link is still unknown.
- GET|HEAD /o/<token>: message.opened, then a 43-byte transparent GIF that nobody caches.
- GET /u/<token>: a confirmation page (no external assets) whose form POSTs back; nothing is
  recorded, because mail scanners fetch every link of a mail.
- POST /u/<token>: customer.unsubscribed, via "one-click" (RFC 8058 body
  `List-Unsubscribe=One-Click`) or "page" (the form; `scope=all` leaves every conversation).
- GET|POST /v: conversion.recorded from amount, currency, order (query or form body),
  attributed by the click cookie; no cookie or a bad or expired one: nothing recorded (counted
  as conversions_unattributed). Always 204, so the shop's page learns nothing either way.
- GET /healthz, GET /metrics (Prometheus text).

Every bad token (forged, truncated, tampered, another kind, a key no longer in the secrets
file) gets the same 404 page and is counted; it never redirects. A hit is answered only after
its record is in the stream's file (one write() into the kernel: the process may die right
after and the hit is still there); if the append fails (disk full) the hit gets 503, never an
answer for a hit that was not recorded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs

from connectd import log
from connectd.core.machine import classify
from connectd.core.tokens import BadToken, sign_token, verify_token
from connectd.settings import TrackerSettings
from connectd.spool import StreamWriter, encode, new_id
from connectd.tracker.links import LinkMap
from connectd.tracker.metrics import Metrics

LINK_WAIT = 1.0  # seconds a click on a not-yet-known link waits for the link map's refresh
COOKIE = "cdclick"
COOKIE_KIND = "cookie"
MAX_UA = 512  # characters of User-Agent kept in a record

# The smallest transparent GIF: 1x1, one transparent palette entry (43 bytes)
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
         b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")

REASONS = {100: "Continue", 200: "OK", 204: "No Content", 302: "Found", 400: "Bad Request",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}
_STATUS_LINES = {code: f"HTTP/1.1 {code} {text}\r\n".encode() for code, text in REASONS.items()}
_NO_CACHE = b"Cache-Control: no-store\r\n"
_PIXEL_HEADERS = (b"Content-Type: image/gif\r\n"
                  b"Cache-Control: no-store, no-cache, must-revalidate, private, max-age=0\r\n"
                  b"Pragma: no-cache\r\nExpires: Thu, 01 Jan 1970 00:00:00 GMT\r\n")
_HTML_HEADERS = (b"Content-Type: text/html; charset=utf-8\r\n" + _NO_CACHE +
                 b"X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n"
                 b"Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; "
                 b"form-action 'self'; frame-ancestors 'none'\r\n")
_TEXT_HEADERS = b"Content-Type: text/plain; charset=utf-8\r\n" + _NO_CACHE
_METRICS_HEADERS = b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n" + _NO_CACHE

_STYLE = ("<style>body{font-family:system-ui,sans-serif;max-width:32em;margin:4em auto;"
          "padding:0 1em;color:#222}button{font-size:1em;padding:.5em 1em;margin:.25em 0}"
          "</style>")


def _page(title: str, body: str) -> bytes:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="robots" content="noindex"><title>{title}</title>{_STYLE}</head>'
            f"<body><h1>{title}</h1>{body}</body></html>\n").encode()


NOT_FOUND_PAGE = _page("Not found", "<p>This link is not valid.</p>")
UNSUBSCRIBE_PAGE = _page(
    "Unsubscribe",
    '<p>Do you want to stop receiving these e-mails?</p><form method="post">'
    '<input type="hidden" name="via" value="page">'
    '<p><button type="submit" name="scope" value="conversation">Unsubscribe from this list'
    '</button></p><p><button type="submit" name="scope" value="all">Unsubscribe from all our '
    "e-mail</button></p></form>")
UNSUBSCRIBED_PAGE = _page("Unsubscribed", "<p>You will not receive these e-mails any more.</p>")
UNAVAILABLE_PAGE = _page("Try again", "<p>Please try again in a moment.</p>")


@dataclass(slots=True)
class Request:
    """What the server parsed: method, target split into path and query, the few headers the
    tracker reads, the body, and whether the connection stays open."""

    method: str
    path: bytes
    query: bytes = b""
    ua: bytes = b""
    cookie: bytes = b""
    content_type: bytes = b""
    body: bytes = b""
    keep_alive: bool = True
    http10: bool = False
    forwarded_for: bytes = b""  # X-Forwarded-For, believed only from tracker.trusted_proxies


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.header = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.header = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return self.header


date_header = _Date()


class _Timestamp:
    """Record timestamps (connectd.spool.now_ts's spelling) with the date and time formatted
    once a second: strftime per hit was a fifth of a click's cost."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        return f"{self.prefix}{int((now - second) * 1e6):06d}Z"


record_ts = _Timestamp()


def response(status: int, headers: bytes = b"", body: bytes = b"", *, keep_alive: bool = True,
             head: bool = False, http10: bool = False) -> bytes:
    """The bytes of one HTTP/1.1 response (headers end with CRLF each)."""
    conn = b"" if keep_alive and not http10 else (
        b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n")
    return b"".join((_STATUS_LINES[status], date_header(), headers,
                     b"Content-Length: %d\r\n" % len(body), conn, b"\r\n",
                     b"" if head else body))


@lru_cache(maxsize=65536)
def proxy_networks(entries: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """tracker.trusted_proxies as networks (a bare address is a /32 or /128); ValueError
    names a bad entry."""
    nets = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"tracker.trusted_proxies: {entry!r} is not an address or CIDR") from None
    return tuple(nets)


def client_ip(peer: str, forwarded_for: bytes, proxies: tuple[Any, ...]) -> str:
    """The client's address behind trusted proxies: walking X-Forwarded-For from the right
    (the hop our own proxy added last), the first address that is not a trusted proxy. The
    peer itself must be trusted, otherwise anyone could claim any address; a malformed entry
    stops the walk there (the last trusted hop's view is kept)."""
    def trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in proxies)

    if not trusted(peer):
        return peer
    current = peer
    for hop in reversed(forwarded_for.decode("latin-1").split(",")):
        hop = hop.strip()
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return current
        current = hop
        if not trusted(hop):
            return hop
    return current


def truncate_ip(ip: str) -> str:
    """An IPv4 address's /24 or an IPv6 address's /48 network address (privacy); text that is
    not an IP address comes back as it is."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    prefix = 24 if addr.version == 4 else 48
    if addr.version == 6 and addr.ipv4_mapped:  # ::ffff:a.b.c.d is an IPv4 client
        return truncate_ip(str(addr.ipv4_mapped))
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)


def parse_cookie(header: bytes, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header, or None."""
    want = name.encode() + b"="
    for part in header.split(b";"):
        part = part.strip()
        if part.startswith(want):
            try:
                return part[len(want):].decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


def _form(data: bytes) -> dict[str, str]:
    """A urlencoded query or body -> first value of each field (at most 20 fields)."""
    try:
        parsed = parse_qs(data.decode("utf-8", "replace"), max_num_fields=20)
    except ValueError:
        return {}
    return {k: v[0] for k, v in parsed.items() if v}


def _amount(text: str | None) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and abs(value) < 1e12 else None


def _currency(text: str | None) -> str | None:
    text = (text or "").strip().upper()
    return text if len(text) == 3 and text.isascii() and text.isalpha() else None


class TrackerApp:
    """The endpoints of one worker process."""

    def __init__(self, settings: TrackerSettings, keys: Sequence[str], links: LinkMap,
                 writer: StreamWriter, metrics: Metrics) -> None:
        self.settings = settings
        self.keys = tuple(keys)
        self.links = links
        self.writer = writer
        self.metrics = metrics
        self._proxies = proxy_networks(settings.trusted_proxies)
        self.log = log.get(daemon="tracker")
        self.cookie_max_age = settings.cookie_days * 86400
        attrs = f"; Max-Age={self.cookie_max_age}; Path=/"
        if settings.cookie_domain:
            attrs += f"; Domain={settings.cookie_domain}"
        attrs += "; HttpOnly"
        if settings.public_url.lower().startswith("https://"):
            attrs += "; Secure"
        self._cookie_attrs = (attrs + "; SameSite=Lax\r\n").encode()
        self._append_failing = False

    # -- dispatch -------------------------------------------------------------------------
    def handle(self, req: Request, ip: str | None) -> bytes | Coroutine[Any, Any, bytes]:
        """A request -> response bytes (or a coroutine giving them: a click that waits for
        the link map)."""
        path = req.path
        if path.startswith(b"/c/"):
            return self.click(req, ip)
        if path.startswith(b"/o/"):
            return self.open(req, ip)
        if path.startswith(b"/u/"):
            return self.unsubscribe(req, ip)
        if path == b"/v":
            return self.conversion(req, ip)
        if path == b"/healthz":
            return self.reply("healthz", req, 200, _TEXT_HEADERS, b"ok\n")
        if path == b"/metrics" and req.method in ("GET", "HEAD"):
            return self.reply("metrics", req, 200, _METRICS_HEADERS, self.metrics.render())
        return self.reply("other", req, 404, _HTML_HEADERS, NOT_FOUND_PAGE)

    def reply(self, kind: str, req: Request, status: int, headers: bytes = b"",
              body: bytes = b"") -> bytes:
        self.metrics.request(kind, status)
        return response(status, headers, body, keep_alive=req.keep_alive,
                        head=req.method == "HEAD", http10=req.http10)

    def not_found(self, kind: str, req: Request) -> bytes:
        return self.reply(kind, req, 404, _HTML_HEADERS, NOT_FOUND_PAGE)

    def bad_token(self, kind: str, req: Request) -> bytes:
        self.metrics.bad_token(kind)
        return self.not_found(kind, req)

    def not_allowed(self, kind: str, req: Request, allow: bytes) -> bytes:
        return self.reply(kind, req, 405, b"Allow: " + allow + b"\r\n" + _TEXT_HEADERS,
                          b"method not allowed\n")

    def _token(self, req: Request, kind: str, fields: int) -> tuple[int, ...] | None:
        try:
            values = verify_token(self.keys, req.path[3:].decode("ascii"), kind)
        except (BadToken, UnicodeDecodeError):
            return None
        return values if len(values) == fields else None

    def _client(self, req: Request, ip: str | None) -> tuple[str, str | None]:
        ua = req.ua.decode("utf-8", "replace")[:MAX_UA] if req.ua else ""
        if req.forwarded_for and ip and self._proxies:
            ip = client_ip(ip, req.forwarded_for, self._proxies)
        stored = truncate_ip(ip) if ip and self.settings.ip_truncate else ip
        return ua, stored

    def _append(self, type_: str, fields: dict[str, Any]) -> bool:
        """Append one record; False if it could not be written (the caller answers 503)."""
        t0 = time.perf_counter()
        try:
            # the record as connectd.spool.make_record builds it, without re-checking the
            # type and field names that are constants here
            self.writer.write_lines(encode({"v": 1, "id": new_id(), "ts": record_ts(),
                                            "type": type_, **fields}))
        except OSError as exc:  # SpoolError is not an OSError: both are caught below
            return self._append_failed(exc)
        except Exception as exc:  # noqa: BLE001 - a hit we cannot record is answered 503
            return self._append_failed(exc)
        self.metrics.observe_append(time.perf_counter() - t0)
        if self._append_failing:
            self._append_failing = False
            self.log.info("appending to the stream works again", stream=self.writer.name)
        return True

    def _append_failed(self, exc: BaseException) -> bool:
        self.metrics.inc("append_errors")
        if not self._append_failing:  # once per outage
            self._append_failing = True
            self.log.error("cannot append to the stream; answering 503", stream=self.writer.name,
                           error=str(exc))
        return False

    def _unavailable(self, kind: str, req: Request) -> bytes:
        return self.reply(kind, req, 503, b"Retry-After: 1\r\n" + _HTML_HEADERS, UNAVAILABLE_PAGE)

    # -- click ----------------------------------------------------------------------------
    def click(self, req: Request, ip: str | None) -> bytes | Coroutine[Any, Any, bytes]:
        if req.method not in ("GET", "HEAD"):
            return self.not_allowed("click", req, b"GET, HEAD")
        fields = self._token(req, "c", 3)
        if fields is None:
            return self.bad_token("click", req)
        url = self.links.get(fields[2])
        if url is None:
            return self._click_after_refresh(req, ip, fields)
        return self._clicked(req, ip, fields, url)

    def _clicked(self, req: Request, ip: str | None, fields: tuple[int, ...],
                 url: bytes) -> bytes:
        instance, customer, link = fields
        ua, stored_ip = self._client(req, ip)
        machine, why = classify(req.method, ua, ip, "click")
        if machine:
            self.metrics.inc("machine_hits")
        if not self._append("link.clicked", {"instance": instance, "customer": customer,
                                             "link": link, "ua": ua, "ip": stored_ip,
                                             "machine": machine, "why": why}):
            return self._unavailable("click", req)
        cookie = sign_token(self.keys[0], instance, customer, link, int(time.time()),
                            kind=COOKIE_KIND)
        headers = b"".join((b"Location: ", url, b"\r\n", _NO_CACHE, b"Set-Cookie: ",
                            COOKIE.encode(), b"=", cookie.encode(), self._cookie_attrs))
        return self.reply("click", req, 302, headers)

    async def _click_after_refresh(self, req: Request, ip: str | None,
                                   fields: tuple[int, ...]) -> bytes:
        self.metrics.inc("links_waited")
        need = self.links.started + 1  # a refresh that starts after this request arrived
        self.links.wake()
        deadline = time.monotonic() + LINK_WAIT
        while True:
            url = self.links.get(fields[2])
            if url is not None:
                return self._clicked(req, ip, fields, url)
            if self.links.generation >= need or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)  # rare (a link registered moments ago): polling is enough
        self.metrics.inc("unknown_links")
        return self.not_found("click", req)

    # -- open -----------------------------------------------------------------------------
    def open(self, req: Request, ip: str | None) -> bytes:
        if req.method not in ("GET", "HEAD"):
            return self.not_allowed("open", req, b"GET, HEAD")
        fields = self._token(req, "o", 2)
        if fields is None:
            return self.bad_token("open", req)
        ua, stored_ip = self._client(req, ip)
        machine, why = classify(req.method, ua, ip, "open")
        if machine:
            self.metrics.inc("machine_hits")
        if not self._append("message.opened", {"instance": fields[0], "customer": fields[1],
                                               "ua": ua, "ip": stored_ip, "machine": machine,
                                               "why": why}):
            return self._unavailable("open", req)
        return self.reply("open", req, 200, _PIXEL_HEADERS, PIXEL)

    # -- unsubscribe ----------------------------------------------------------------------
    def unsubscribe(self, req: Request, ip: str | None) -> bytes:
        if req.method not in ("GET", "HEAD", "POST"):
            return self.not_allowed("unsubscribe", req, b"GET, HEAD, POST")
        fields = self._token(req, "u", 2)
        if fields is None:
            return self.bad_token("unsubscribe", req)
        if req.method != "POST":
            return self.reply("unsubscribe", req, 200, _HTML_HEADERS, UNSUBSCRIBE_PAGE)
        via, scope = self._unsubscribe_form(req)
        ua, stored_ip = self._client(req, ip)
        if not self._append("customer.unsubscribed", {
                "customer": fields[1], "instance": fields[0], "scope": scope, "via": via,
                "ua": ua, "ip": stored_ip}):
            return self._unavailable("unsubscribe", req)
        return self.reply("unsubscribe", req, 200, _HTML_HEADERS, UNSUBSCRIBED_PAGE)

    @staticmethod
    def _unsubscribe_form(req: Request) -> tuple[str, str]:
        """(via, scope) from the POST body: RFC 8058 sends List-Unsubscribe=One-Click, as
        application/x-www-form-urlencoded or multipart/form-data; our page sends via=page."""
        body = req.body
        if req.content_type.lower().startswith(b"multipart/form-data"):
            one_click = b'name="List-Unsubscribe"' in body and b"One-Click" in body
            return ("one-click" if one_click else "page"), "conversation"
        form = _form(body)
        scope = "all" if form.get("scope") == "all" else "conversation"
        if form.get("List-Unsubscribe") == "One-Click":
            return "one-click", scope
        return "page", scope

    # -- conversion -----------------------------------------------------------------------
    def conversion(self, req: Request, ip: str | None) -> bytes:
        if req.method not in ("GET", "HEAD", "POST"):
            return self.not_allowed("conversion", req, b"GET, HEAD, POST")
        form = _form(req.query)
        if req.method == "POST" and req.content_type.lower().startswith(
                b"application/x-www-form-urlencoded"):
            form.update(_form(req.body))
        click = self._click_cookie(req)
        if click is None:
            self.metrics.inc("conversions_unattributed")
            return self.reply("conversion", req, 204, _NO_CACHE)
        instance, customer, link = click
        order = (form.get("order") or "").strip()[:128] or None
        ua, stored_ip = self._client(req, ip)
        if not self._append("conversion.recorded", {
                "instance": instance, "customer": customer, "link": link,
                "amount": _amount(form.get("amount")), "currency": _currency(form.get("currency")),
                "order": order, "ua": ua, "ip": stored_ip}):
            return self._unavailable("conversion", req)
        return self.reply("conversion", req, 204, _NO_CACHE)

    def _click_cookie(self, req: Request) -> tuple[int, int, int] | None:
        """(instance, customer, link) of a valid, unexpired click cookie, else None."""
        value = parse_cookie(req.cookie, COOKIE) if req.cookie else None
        if not value:
            return None
        try:
            instance, customer, link, at = verify_token(self.keys, value, COOKIE_KIND)
        except (BadToken, ValueError):  # ValueError: not four fields
            return None
        now = time.time()
        if at > now + 300 or now - at > self.cookie_max_age:
            return None
        return instance, customer, link
