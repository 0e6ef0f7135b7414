"""Pure parts of the tracker: URL cleaning for Location, IP truncation, cookies, metrics text."""

from __future__ import annotations

import pytest

from connectd.tracker.app import client_ip, parse_cookie, proxy_networks, truncate_ip
from connectd.tracker.links import clean_url
from connectd.tracker.metrics import Metrics, shared_memory


@pytest.mark.parametrize("url,expected", [
    ("https://shop.example/a?x=1&y=2#top", b"https://shop.example/a?x=1&y=2#top"),
    ("  http://shop.example/  ", b"http://shop.example/"),
    ("https://shop.example/caf\u00e9 menu", b"https://shop.example/caf%C3%A9%20menu"),
    ("https://shop.example/%41", b"https://shop.example/%41"),
    ("javascript:alert(1)", None),
    ("data:text/html,hi", None),
    ("//evil.example/", None),
    ("https://shop.example/\r\nSet-Cookie: x=1", None),
    (None, None),
])
def test_clean_url(url: object, expected: bytes | None) -> None:
    """Only http(s) URLs without control characters become Location values."""
    assert clean_url(url) == expected


@pytest.mark.parametrize("ip,expected", [
    ("203.0.113.77", "203.0.113.0"),
    ("2001:db8:abcd:12:3456::1", "2001:db8:abcd::"),
    ("::ffff:198.51.100.9", "198.51.100.0"),
    ("not-an-ip", "not-an-ip"),
])
def test_truncate_ip(ip: str, expected: str) -> None:
    """IPv4 to its /24, IPv6 to its /48, IPv4-mapped as IPv4."""
    assert truncate_ip(ip) == expected


def test_parse_cookie() -> None:
    """Our cookie is found among others; absent or non-ASCII gives None."""
    assert parse_cookie(b"a=1; cdclick=AQE-x_; b=2", "cdclick") == "AQE-x_"
    assert parse_cookie(b"a=1; xcdclick=zz", "cdclick") is None
    assert parse_cookie("cdclick=\u00e9".encode(), "cdclick") is None


def test_metrics_sum_over_workers() -> None:
    """Each worker writes its own slice; the rendered figures are the sum of all."""
    mem = shared_memory(2)
    one, two = Metrics(mem, 1), Metrics(mem, 2)
    one.request("click", 302)
    two.request("click", 302)
    two.bad_token("open")
    one.observe_append(0.00002)
    two.observe_append(0.5)
    text = two.render().decode()
    assert 'tracker_requests_total{kind="click",status="302"} 2' in text
    assert 'tracker_bad_tokens_total{kind="open"} 1' in text
    assert 'tracker_stream_append_seconds_bucket{le="2.5e-05"} 1' in text
    assert 'tracker_stream_append_seconds_bucket{le="+Inf"} 2' in text
    assert one.requests("click", 302) == 2


def test_client_ip_behind_trusted_proxies() -> None:
    """X-Forwarded-For is believed only from a trusted peer, walked from the right past every
    trusted hop; a spoofed left-most entry is never taken."""
    proxies = proxy_networks(("10.0.0.0/8", "192.0.2.7"))
    assert client_ip("10.1.2.3", b"203.0.113.9", proxies) == "203.0.113.9"
    # the client claimed 1.2.3.4 itself; our balancers appended the real address after it
    assert client_ip("10.1.2.3", b"1.2.3.4, 203.0.113.9, 192.0.2.7", proxies) == "203.0.113.9"
    assert client_ip("198.51.100.1", b"203.0.113.9", proxies) == "198.51.100.1"  # untrusted peer
    assert client_ip("10.1.2.3", b"garbage", proxies) == "10.1.2.3"
    assert client_ip("10.1.2.3", b"2001:db8::1", proxies) == "2001:db8::1"


def test_bad_trusted_proxy_is_a_settings_error(tmp_path) -> None:
    """A trusted_proxies entry that is no address stops start-up naming the key."""
    from connectd import settings

    cfg = tmp_path / "c.toml"
    cfg.write_text('[tracker]\ntrusted_proxies = ["10.0.0.0/8", "lb.example"]\n')
    with pytest.raises(settings.SettingsError, match="lb.example"):
        settings.load(cfg, environ={})
