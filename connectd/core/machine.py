"""Machine traffic at request time, pure: (method, user agent, client IP, kind) -> (machine, why).

No I/O. The tracker calls `classify` for every click and open and stores the answer with the
raw hit (`machine`, `why` of link.clicked / message.opened); nothing is dropped. Only what one
request shows is decided here. What needs history (a hit seconds after delivery, every link of
a message clicked at once) is the profiler's to decide when it applies the records.

`why` is short and stable (reports group by it):

- "head": a HEAD request. Browsers follow links with GET; HEAD comes from link checkers and
  security gateways that look before they let a mail through.
- "ua:empty": no User-Agent at all (browsers always send one).
- "ua:scanner": a mail security gateway or link pre-fetcher that names itself.
- "ua:bot": a crawler, link-preview fetcher or monitoring bot.
- "ua:tool": an HTTP library or command-line client (curl, wget, python-requests, ...).
- "ua:headless": a scripted browser (HeadlessChrome, PhantomJS, Puppeteer, ...).
- "proxy:apple-mpp" (opens): Apple Mail Privacy Protection fetches every remote image of a
  mail through Apple's proxies, whether or not the person reads it.
- "proxy:google", "proxy:yahoo", "proxy:image" (opens): webmail image proxies fetch the pixel
  on the reader's behalf (Gmail caches it: one fetch per mail, not per open).

Sources for the lists (the tokens below are those the products put in their User-Agent):
- Security gateways and link pre-fetchers: the vendors' product names as they appear in
  tracker logs and in the bot-click documentation of ESPs (SparkPost "bot clicks", Mailgun and
  Postmark on link scanning, Litmus on Apple MPP): Barracuda, Mimecast, Proofpoint (also its
  "ppops-" hosts), Microsoft Defender for Office 365 Safe Links and Office link discovery
  ("Microsoft Office Existence Discovery", "ms-office", "BingPreview"), Trend Micro, Symantec /
  Broadcom MessageLabs, Cisco IronPort, Forcepoint, Sophos, FireEye / Trellix, Fortinet,
  Zscaler, Bitdefender, Kaspersky, Avast, Check Point, Palo Alto Networks, Vade.
- Crawlers and link previews: the generic "bot", "crawler", "spider" tokens (RFC 9309's
  robots convention), Slack, Facebook, WhatsApp, Skype, Discord, Telegram, LinkedIn previews.
- Apple MPP: Apple documents that Mail Privacy Protection loads remote content privately
  through multiple proxy servers (support.apple.com, "Use Mail Privacy Protection on iPhone");
  its requests carry a bare "Mozilla/5.0" User-Agent (Litmus, Validity, Twilio SendGrid on MPP)
  and come from Apple's own network, AS714, whose registered block is 17.0.0.0/8 (ARIN). We
  only call a hit MPP when both hold (no browser tokens and an address in APPLE_RANGES).
- Gmail: "via ggpht.com GoogleImageProxy" (Google's image proxy, since 2013); Yahoo Mail:
  "YahooMailProxy".
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

# Apple's networks MPP fetches from. 17.0.0.0/8 is Apple's own (ARIN, AS714); the IPv6 block is
# AS714's registered allocation. A short, documented list: a hit outside it with a bare UA is
# left to the profiler's history rules.
APPLE_RANGES = tuple(ipaddress.ip_network(n) for n in ("17.0.0.0/8", "2620:149::/32",
                                                         "2a01:b740::/32"))

_SCANNERS = (
    "barracuda", "mimecast", "proofpoint", "ppops-", "safelinks", "safe links",
    "microsoft office existence discovery", "ms-office", "msoffice", "bingpreview",
    "trend micro", "trendmicro", "symantec", "messagelabs", "ironport", "cisco",
    "forcepoint", "websense", "sophos", "fireeye", "trellix", "fortinet", "fortiguard",
    "zscaler", "bitdefender", "kaspersky", "avast", "checkpoint", "check point", "paloalto",
    "palo alto", "vade", "cloudmark", "spamtitan", "hornetsecurity", "libraesva", "agari",
)
_BOTS = (
    "bot", "crawler", "spider", "slurp", "facebookexternalhit", "linkexpanding", "whatsapp/",
    "skypeuripreview", "monitor", "scanner",
)
_TOOLS = (
    "curl/", "wget/", "python-requests", "python-urllib", "python-httpx", "aiohttp", "httpie",
    "go-http-client", "java/", "okhttp", "apache-httpclient", "libwww-perl", "lwp::", "ruby",
    "node-fetch", "axios/", "guzzle", "postmanruntime", "powershell", "winhttp", "urlgrabber",
)
_HEADLESS = ("headlesschrome", "phantomjs", "puppeteer", "playwright", "selenium", "webdriver",
             "electron/", "slimerjs")
_IMAGE_PROXIES = (("googleimageproxy", "proxy:google"), ("ggpht.com", "proxy:google"),
                  ("yahoomailproxy", "proxy:yahoo"), ("imageproxy", "proxy:image"))
# tokens a real browser's User-Agent carries; Apple's proxy sends none of them
_BROWSER_TOKENS = re.compile(r"applewebkit|gecko|chrome|safari|firefox|trident|edg|opera",
                             re.IGNORECASE)


def _alternation(words: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(w) for w in words))


# "bot" but not inside a phone model name (Android UAs carry the device: "CUBOT X19")
_BOT_RE = re.compile(_alternation(_BOTS).pattern.replace("bot", "(?<!cu)bot", 1))
_UA_RULES = ((_alternation(_SCANNERS), "ua:scanner"), (_alternation(_HEADLESS), "ua:headless"),
             (_alternation(_TOOLS), "ua:tool"), (_BOT_RE, "ua:bot"))
_IMAGE_PROXY_RE = _alternation(tuple(t for t, _ in _IMAGE_PROXIES))
_IMAGE_PROXY_WHY = dict(_IMAGE_PROXIES)


@lru_cache(maxsize=4096)
def _by_user_agent(ua: str) -> str | None:
    # cached: a campaign's clicks come from a few hundred distinct user agents
    low = ua.lower()
    for pattern, why in _UA_RULES:
        if pattern.search(low):
            return why
    return None


def _in_apple_ranges(ip: str | None) -> bool:
    if not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in APPLE_RANGES if net.version == addr.version)


def is_apple_mpp(ua: str, ip: str | None) -> bool:
    """A bare Mozilla/5.0 User-Agent (no browser tokens) from Apple's network."""
    return ua.startswith("Mozilla/5.0") and not _BROWSER_TOKENS.search(ua) and \
        _in_apple_ranges(ip)


def classify(method: str, ua: str, ip: str | None, kind: str) -> tuple[bool, str | None]:
    """(HTTP method, User-Agent, client IP, "click" | "open") -> (machine?, why or None).

    `ip` must be the full client address (before any truncation for storage)."""
    if method == "HEAD":
        return True, "head"
    ua = ua.strip()
    if not ua:
        return True, "ua:empty"
    if kind == "open":
        if is_apple_mpp(ua, ip):
            return True, "proxy:apple-mpp"
        match = _IMAGE_PROXY_RE.search(ua.lower())
        if match:
            return True, _IMAGE_PROXY_WHY[match.group(0)]
    why = _by_user_agent(ua)
    return (why is not None), why
