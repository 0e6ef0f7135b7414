"""Machine-traffic rules at request time (connectd.core.machine)."""

from __future__ import annotations

import pytest

from connectd.core.machine import classify, is_apple_mpp

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/124.0.0.0 Safari/537.36")
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1")
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"
ANDROID_CUBOT = ("Mozilla/5.0 (Linux; Android 10; CUBOT X19) AppleWebKit/537.36 (KHTML, like "
                 "Gecko) Chrome/120.0.0.0 Mobile Safari/537.36")
GMAIL_PROXY = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com "
               "GoogleImageProxy)")


@pytest.mark.parametrize("method,ua,ip,kind,expected", [
    ("GET", CHROME, "203.0.113.9", "click", (False, None)),
    ("GET", IPHONE, "17.1.2.3", "click", (False, None)),
    ("GET", FIREFOX, "198.51.100.1", "open", (False, None)),
    ("GET", ANDROID_CUBOT, "198.51.100.1", "click", (False, None)),
    ("HEAD", CHROME, "203.0.113.9", "click", (True, "head")),
    ("GET", "", "203.0.113.9", "click", (True, "ua:empty")),
    ("GET", "   ", "203.0.113.9", "open", (True, "ua:empty")),
    ("GET", "Barracuda Sentinel (EE)", "1.2.3.4", "click", (True, "ua:scanner")),
    ("GET", "Mozilla/5.0 (compatible; Mimecast URL Protect)", "1.2.3.4", "click",
     (True, "ua:scanner")),
    ("GET", "Proofpoint URL Defense", "1.2.3.4", "click", (True, "ua:scanner")),
    ("GET", "Microsoft Office Existence Discovery", "1.2.3.4", "click", (True, "ua:scanner")),
    ("GET", "Mozilla/5.0 (compatible; BingPreview/1.0b)", "1.2.3.4", "click",
     (True, "ua:scanner")),
    ("GET", "TrendMicro InterScan", "1.2.3.4", "click", (True, "ua:scanner")),
    ("GET", "Symantec MessageLabs", "1.2.3.4", "click", (True, "ua:scanner")),
    ("GET", "Cisco IronPort WSA", "1.2.3.4", "click", (True, "ua:scanner")),
    ("GET", "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
     "66.249.66.1", "click", (True, "ua:bot")),
    ("GET", "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "1.2.3.4", "click",
     (True, "ua:bot")),
    ("GET", "facebookexternalhit/1.1", "1.2.3.4", "click", (True, "ua:bot")),
    ("GET", "curl/8.5.0", "1.2.3.4", "click", (True, "ua:tool")),
    ("GET", "Wget/1.21.3", "1.2.3.4", "open", (True, "ua:tool")),
    ("GET", "python-requests/2.31.0", "1.2.3.4", "click", (True, "ua:tool")),
    ("GET", "Go-http-client/1.1", "1.2.3.4", "click", (True, "ua:tool")),
    ("GET", CHROME.replace("Chrome/", "HeadlessChrome/"), "1.2.3.4", "click",
     (True, "ua:headless")),
    ("GET", "Mozilla/5.0", "17.58.100.1", "open", (True, "proxy:apple-mpp")),
    ("GET", "Mozilla/5.0", "2620:149:a44::1", "open", (True, "proxy:apple-mpp")),
    ("GET", "Mozilla/5.0", "203.0.113.9", "open", (False, None)),  # not Apple's network
    ("GET", IPHONE, "17.58.100.1", "open", (False, None)),  # a real browser on Apple's network
    ("GET", "Mozilla/5.0", "17.58.100.1", "click", (False, None)),  # MPP fetches images only
    ("GET", GMAIL_PROXY, "66.102.8.1", "open", (True, "proxy:google")),
    ("GET", "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
     "1.2.3.4", "open", (True, "proxy:yahoo")),
])
def test_classify(method: str, ua: str, ip: str, kind: str,
                  expected: tuple[bool, str | None]) -> None:
    """Each request is classified as the documented rule says."""
    assert classify(method, ua, ip, kind) == expected


@pytest.mark.parametrize("ip", [None, "", "not-an-ip", "17.0.0.1x"])
def test_apple_mpp_needs_a_valid_apple_address(ip: str | None) -> None:
    """A bare Mozilla/5.0 without a parseable Apple address is not called MPP."""
    assert is_apple_mpp("Mozilla/5.0", ip) is False


def test_apple_mpp_ignores_ipv4_mapped_outside_range() -> None:
    """An IPv6 address outside Apple's blocks is not MPP."""
    assert is_apple_mpp("Mozilla/5.0", "2001:db8::1") is False
