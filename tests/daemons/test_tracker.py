"""The tracker as a real `connectd run tracker` process on loopback, spoken to over HTTP."""

from __future__ import annotations

import base64
import http.client
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import _free_port, seed_outbound, write_config

from connectd import settings as settings_mod
from connectd.core.tokens import sign_token
from connectd.init import initialize
from connectd.secrets import load_secrets, new_key
from connectd.spool import Spool

ROOT = Path(__file__).resolve().parents[2]
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0"
URLS = {1: "https://shop.example/a?x=1", 2: "https://shop.example/b", 3: "http://other.example/c"}


@dataclass
class Tracker:
    root: Path
    config: Path
    settings: settings_mod.Settings
    port: int
    instance: int
    proc: subprocess.Popen | None = None

    @property
    def key(self) -> str:
        return load_secrets(self.settings.paths.secrets).token_keys[0]

    def token(self, *fields: int, kind: str, key: str | None = None) -> str:
        return sign_token(key or self.key, *fields, kind=kind)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "CONNECTD_CONFIG")}
        self.proc = subprocess.Popen([sys.executable, "-m", "connectd", "--config",
                                      str(self.config), "run", "tracker"], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("tracker did not start: " +
                                     self.proc.stderr.read().decode(errors="replace")[-3000:])
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body,
                         headers={"User-Agent": BROWSER, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def records(self) -> list[dict[str, Any]]:
        spool = Spool(self.settings.paths.spool, self.settings.spool)
        out = []
        for name in spool.streams():
            if name.startswith("tracker.events."):
                with spool.reader(name) as reader:
                    out += [rec for _, rec, _ in reader.records() if rec is not None]
        return out


def make_tracker(root: Path, extra: str = "") -> Tracker:
    port = _free_port()
    cfg = write_config(root, extra=f"[tracker]\nport = {port}\nprocesses = 2\n"
                       f"link_refresh = 0.2\n{extra}[log]\nlevel = \"warning\"\n")
    st = settings_mod.load(cfg, environ={})
    initialize(st)
    ids = seed_outbound(st.database.customer_url, 5)
    db = sqlite3.connect(st.database.customer_url.removeprefix("sqlite:///"))
    with db:
        db.executemany("INSERT INTO links (id, message_id, url, labels) VALUES (?, ?, ?, '[]')",
                       [(i, ids["message"], u) for i, u in URLS.items()])
    db.close()
    return Tracker(root, cfg, st, port, ids["instance"])


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    """One tracker (2 workers) shared by the tests that only read from it."""
    t = make_tracker(tmp_path_factory.mktemp("tracker"))
    t.start()
    yield t
    t.stop()


@pytest.fixture
def own_tracker(tmp_path: Path) -> Iterator[Tracker]:
    """A tracker of the test's own (not started yet), stopped at the end."""
    t = make_tracker(tmp_path)
    yield t
    t.stop()


# -- endpoints --------------------------------------------------------------------------------

def test_click_redirects_and_records(tracker: Tracker) -> None:
    """GET /c/<token> records link.clicked, then 302 to the link's URL with the click cookie."""
    status, headers, body = tracker.request("GET", "/c/" + tracker.token(tracker.instance, 3, 2,
                                                                           kind="c"))
    assert (status, headers["location"], body) == (302, URLS[2], b"")
    assert headers["cache-control"] == "no-store"
    cookie = headers["set-cookie"]
    assert cookie.startswith("cdclick=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Max-Age=2592000" in cookie and "Secure" not in cookie  # public_url is http
    clicks = [r for r in tracker.records() if r["type"] == "link.clicked"]
    assert any(r["customer"] == 3 and r["link"] == 2 and r["instance"] == tracker.instance
               and r["ua"] == BROWSER and r["ip"] == "127.0.0.1" and r["machine"] is False
               for r in clicks)


def test_head_click_is_machine_traffic(tracker: Tracker) -> None:
    """HEAD /c/<token> redirects too, and is recorded as machine traffic ("head")."""
    status, headers, body = tracker.request("HEAD", "/c/" + tracker.token(tracker.instance, 4, 1,
                                                                            kind="c"))
    assert (status, headers["location"], body) == (302, URLS[1], b"")
    assert any(r["type"] == "link.clicked" and r["customer"] == 4 and r["machine"] is True and
               r["why"] == "head" for r in tracker.records())


def test_open_pixel(tracker: Tracker) -> None:
    """GET /o/<token> records message.opened and answers a 43-byte GIF nobody caches."""
    status, headers, body = tracker.request("GET", "/o/" + tracker.token(tracker.instance, 2,
                                                                           kind="o"))
    assert status == 200 and headers["content-type"] == "image/gif"
    assert len(body) == 43 and body.startswith(b"GIF89a")
    assert "no-store" in headers["cache-control"] and headers["pragma"] == "no-cache"
    assert any(r["type"] == "message.opened" and r["customer"] == 2 for r in tracker.records())


def test_unsubscribe_page_records_nothing(tracker: Tracker) -> None:
    """GET /u/<token> shows a self-contained page whose form POSTs back; nothing is recorded."""
    token = tracker.token(tracker.instance, 5, kind="u")
    status, headers, body = tracker.request("GET", "/u/" + token)
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert '<form method="post">' in page and "src=" not in page and "href=" not in page
    assert not any(r["type"] == "customer.unsubscribed" and r["customer"] == 5
                   for r in tracker.records())


def test_one_click_unsubscribe(tracker: Tracker) -> None:
    """POST /u/<token> with the RFC 8058 body records customer.unsubscribed via one-click."""
    status, _, body = tracker.request(
        "POST", "/u/" + tracker.token(tracker.instance, 1, kind="u"),
        b"List-Unsubscribe=One-Click", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and b"Unsubscribed" in body
    assert any(r["type"] == "customer.unsubscribed" and r["customer"] == 1 and
               r["via"] == "one-click" and r["scope"] == "conversation" and
               r["instance"] == tracker.instance for r in tracker.records())


def test_unsubscribe_form_from_everything(tracker: Tracker) -> None:
    """The page's form (scope=all) records an unsubscribe from all mail, via the page."""
    status, _, _ = tracker.request(
        "POST", "/u/" + tracker.token(tracker.instance, 2, kind="u"), b"via=page&scope=all",
        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert any(r["type"] == "customer.unsubscribed" and r["customer"] == 2 and
               r["via"] == "page" and r["scope"] == "all" for r in tracker.records())


def test_conversion_attributed_by_click_cookie(tracker: Tracker) -> None:
    """/v with the click cookie records conversion.recorded for the clicked message and link."""
    _, headers, _ = tracker.request("GET", "/c/" + tracker.token(tracker.instance, 5, 3, kind="c"))
    cookie = headers["set-cookie"].split(";")[0]
    status, _, body = tracker.request("POST", "/v?order=A-17", b"amount=19.90&currency=eur",
                                      {"Cookie": cookie,
                                       "Content-Type": "application/x-www-form-urlencoded"})
    assert (status, body) == (204, b"")
    conv = [r for r in tracker.records() if r["type"] == "conversion.recorded"]
    assert any(r["customer"] == 5 and r["link"] == 3 and r["instance"] == tracker.instance and
               r["amount"] == 19.9 and r["currency"] == "EUR" and r["order"] == "A-17"
               for r in conv)


@pytest.mark.parametrize("cookie", [None, "cdclick=garbage", "cdclick=AQEDAfdF-eYNWXsCmUmDtA"])
def test_conversion_without_valid_cookie_records_nothing(tracker: Tracker,
                                                         cookie: str | None) -> None:
    """/v without a (valid) click cookie answers 204, records nothing, and is counted."""
    def unattributed() -> int:
        text = tracker.request("GET", "/metrics")[2].decode()
        return int(text.split("\ntracker_conversions_unattributed_total ")[1].split()[0])

    before, n = unattributed(), len(tracker.records())
    status, _, _ = tracker.request("GET", "/v?order=X-1&amount=5",
                                   headers={"Cookie": cookie} if cookie else None)
    assert status == 204
    assert unattributed() == before + 1
    assert not any(r["type"] == "conversion.recorded" and r.get("order") == "X-1"
                   for r in tracker.records())
    assert len(tracker.records()) == n


def test_healthz_and_metrics(tracker: Tracker) -> None:
    """/healthz says ok; /metrics counts requests by kind and status across both workers."""
    assert tracker.request("GET", "/healthz")[:1] == (200,)
    for _ in range(4):
        tracker.request("GET", "/c/" + tracker.token(tracker.instance, 1, 1, kind="c"))
    text = tracker.request("GET", "/metrics")[2].decode()
    line = [x for x in text.splitlines()
            if x.startswith('tracker_requests_total{kind="click",status="302"}')]
    assert line and float(line[0].split()[-1]) >= 4
    assert "tracker_stream_append_seconds_bucket{le=\"+Inf\"}" in text
    assert "tracker_bad_tokens_total{kind=\"click\"}" in text


# -- bad tokens, no open redirect -------------------------------------------------------------

def _tamper(token: str) -> str:
    """The token with its last character changed (never to itself: the keys are random)."""
    return token[:-1] + ("B" if token.endswith("A") else "A")


def _swap_link(token: str, link: int) -> str:
    """The same token with another link id and the original MAC (an attacker's edit)."""
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-13] = link  # the last varint (link < 128) sits right before the 12-byte MAC
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize("make", [
    lambda t: "AAAAAAAAAAAAAAAAAAAAAAAA",  # forged
    lambda t: t.token(t.instance, 1, 1, kind="c")[:-3],  # truncated
    lambda t: _tamper(t.token(t.instance, 1, 1, kind="c")),  # tampered
    lambda t: _swap_link(t.token(t.instance, 1, 1, kind="c"), 2),  # another link, same MAC
    lambda t: t.token(t.instance, 1, kind="o"),  # an open token used as a click
    lambda t: t.token(t.instance, 1, 1, kind="c", key=new_key()),  # a key we never had
    lambda t: "..%2F..%2Fetc",
], ids=["forged", "truncated", "tampered", "link-swapped", "wrong-kind", "unknown-key", "junk"])
def test_bad_click_token_is_404_and_counted(tracker: Tracker, make: Any) -> None:
    """Every bad click token gets the 404 page, never a Location, and is counted."""
    def bad() -> float:
        text = tracker.request("GET", "/metrics")[2].decode()
        return float(text.split('\ntracker_bad_tokens_total{kind="click"} ')[1].split()[0])

    before = bad()
    status, headers, body = tracker.request("GET", "/c/" + make(tracker))
    assert status == 404 and "location" not in headers and b"Not found" in body
    assert bad() == before + 1


def test_no_open_redirect(tracker: Tracker) -> None:
    """Nothing in the request chooses where a click goes: only the signed link id does."""
    token = tracker.token(tracker.instance, 1, 1, kind="c")
    status, headers, _ = tracker.request("GET", f"/c/{token}?url=https://evil.example/",
                                         headers={"Host": "evil.example",
                                                  "Referer": "https://evil.example/"})
    assert (status, headers["location"]) == (302, URLS[1])
    for path in ("/c//evil.example", "/c/https://evil.example", "/c/"):
        status, headers, _ = tracker.request("GET", path)
        assert status == 404 and "location" not in headers


def test_unknown_link_is_404_after_a_refresh(tracker: Tracker) -> None:
    """A valid token whose link id is in no refresh of the link map gets 404, within ~1 s."""
    t0 = time.monotonic()
    status, headers, _ = tracker.request("GET", "/c/" + tracker.token(tracker.instance, 1, 99,
                                                                        kind="c"))
    assert status == 404 and "location" not in headers
    assert time.monotonic() - t0 < 2.0


def test_new_link_is_found_by_waking_the_refresher(tracker: Tracker) -> None:
    """A link added after the tracker started redirects on its first click."""
    db = tracker.settings.database.customer_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO links (id, url, labels) VALUES (50, 'https://shop.example/new', "
                     "'[]')")
    conn.close()
    status, headers, _ = tracker.request("GET", "/c/" + tracker.token(tracker.instance, 1, 50,
                                                                        kind="c"))
    assert (status, headers.get("location")) == (302, "https://shop.example/new")


def test_garbage_and_limits(tracker: Tracker) -> None:
    """Unparseable requests get 400, an over-long URL 414, over-large headers 431."""
    import socket

    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", tracker.port), timeout=5) as s:
            s.sendall(data)
            return s.recv(4096)

    assert raw(b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 414 ")
    assert raw(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n").startswith(
        b"HTTP/1.1 431 ")


def test_keep_alive_and_pipelining(tracker: Tracker) -> None:
    """Two pipelined requests on one connection are answered in order, and it stays open."""
    import socket

    token = tracker.token(tracker.instance, 1, 1, kind="c")
    req = f"GET /c/{token} HTTP/1.1\r\nHost: x\r\nUser-Agent: {BROWSER}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", tracker.port), timeout=5) as s:
        s.sendall(req + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"ok\n"):
            data += s.recv(4096)
        assert data.index(b"302 Found") < data.index(b"200 OK")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")


# -- keys, database outages --------------------------------------------------------------------

def _write_keys(t: Tracker, keys: list[str]) -> None:
    path = t.settings.paths.secrets
    text = path.read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("token_keys")]
    path.write_text("\n".join(lines + ['token_keys = [' + ", ".join(f'"{k}"' for k in keys) +
                                       "]"]) + "\n")


@pytest.mark.slow
def test_key_rotation_and_expired_key(own_tracker: Tracker) -> None:
    """New key first, old still accepted; once the old key leaves the file (HUP), its tokens
    get 404 while the new key's still redirect."""
    t = own_tracker
    old, new = t.key, new_key()
    _write_keys(t, [new, old])
    t.start()
    old_tok = t.token(t.instance, 1, 1, kind="c", key=old)
    new_tok = t.token(t.instance, 1, 1, kind="c", key=new)
    assert t.request("GET", "/c/" + old_tok)[0] == 302
    assert t.request("GET", "/c/" + new_tok)[0] == 302
    _write_keys(t, [new])
    t.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while t.request("GET", "/c/" + old_tok)[0] != 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(6):  # both workers
        assert t.request("GET", "/c/" + old_tok)[0] == 404
        assert t.request("GET", "/c/" + new_tok)[0] == 302


@pytest.mark.slow
def test_database_removed_keeps_redirecting(own_tracker: Tracker) -> None:
    """The customer DB file removed: clicks still get 302 (link map in memory), and a new
    tracker started without the database redirects from the snapshot."""
    t = own_tracker
    t.start()
    db = Path(t.settings.database.customer_url.removeprefix("sqlite:///"))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    time.sleep(1.0)  # several refreshes fail meanwhile
    for link in (1, 2, 3):
        status, headers, _ = t.request("GET", "/c/" + t.token(t.instance, 1, link, kind="c"))
        assert (status, headers["location"]) == (302, URLS[link])
    t.stop()
    assert not db.exists()
    assert (t.settings.paths.spool / "tracker" / "links.json").exists()
    t.start()
    status, headers, _ = t.request("GET", "/c/" + t.token(t.instance, 2, 3, kind="c"))
    assert (status, headers["location"]) == (302, URLS[3])


@pytest.mark.slow
def test_database_locked_keeps_redirecting(own_tracker: Tracker) -> None:
    """BEGIN EXCLUSIVE held by another connection: clicks still get 302, quickly."""
    t = own_tracker
    db = t.settings.database.customer_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # readers are locked out too (not so in WAL)
    t.start()
    conn.execute("BEGIN EXCLUSIVE")
    try:
        conn.execute("UPDATE links SET url = url")
        time.sleep(0.5)
        for _ in range(20):
            t0 = time.monotonic()
            status, headers, _ = t.request("GET", "/c/" + t.token(t.instance, 1, 2, kind="c"))
            assert (status, headers["location"]) == (302, URLS[2])
            assert time.monotonic() - t0 < 0.5
    finally:
        conn.execute("ROLLBACK")
        conn.close()


# -- processes ---------------------------------------------------------------------------------

def _worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (its parent was killed)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


@pytest.mark.slow
def test_dead_worker_is_restarted(own_tracker: Tracker) -> None:
    """A worker killed with SIGKILL is replaced; the tracker keeps answering."""
    t = own_tracker
    t.start()
    workers = _worker_pids(t.proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = _worker_pids(t.proc.pid)
        if len(now) == 2 and workers[0] not in now:
            break
        time.sleep(0.05)
    assert len(_worker_pids(t.proc.pid)) == 2 and workers[0] not in _worker_pids(t.proc.pid)
    for _ in range(10):
        assert t.request("GET", "/c/" + t.token(t.instance, 1, 1, kind="c"))[0] == 302


@pytest.mark.slow
def test_sigkill_under_load_loses_no_answered_hit(own_tracker: Tracker) -> None:
    """Clients log every answered hit; after SIGKILL of the tracker (workers die with it)
    every answered hit is in the streams, counted per kind, and a new tracker serves on."""
    t = own_tracker
    t.start()
    workers = _worker_pids(t.proc.pid)
    answered: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    paths = {"link.clicked": lambda i: "/c/" + t.token(t.instance, i % 5 + 1, i % 3 + 1, kind="c"),
             "message.opened": lambda i: "/o/" + t.token(t.instance, i % 5 + 1, kind="o")}

    def client(kind: str) -> None:
        i = 0
        conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=5)
        while not stop.is_set():
            i += 1
            try:
                conn.request("GET", paths[kind](i), headers={"User-Agent": BROWSER})
                status = conn.getresponse()
                status.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=5)
                time.sleep(0.01)
                continue
            if status.status in (200, 302):
                with lock:
                    answered[kind] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in paths for _ in range(3)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    t.proc.send_signal(signal.SIGKILL)
    t.proc.wait()
    time.sleep(0.5)
    stop.set()
    for th in threads:
        th.join()
    for pid in workers:  # died with their parent (PR_SET_PDEATHSIG)
        assert _dead(pid)
    recorded = Counter(r["type"] for r in t.records())
    assert answered["link.clicked"] > 100 and answered["message.opened"] > 100
    for kind, n in answered.items():
        assert recorded[kind] >= n, (kind, recorded[kind], n)
    t.start()
    assert t.request("GET", "/c/" + t.token(t.instance, 1, 1, kind="c"))[0] == 302


def test_ready_once_every_worker_listens(own_tracker: Tracker,
                                         notify_socket: tuple[Any, str]) -> None:
    """Under systemd the parent says READY=1 once, when both workers already answer."""
    sock, path = notify_socket
    t = own_tracker
    env = {k: v for k, v in os.environ.items() if k != "CONNECTD_CONFIG"}
    env["NOTIFY_SOCKET"] = path
    t.proc = subprocess.Popen([sys.executable, "-m", "connectd", "--config", str(t.config),
                               "run", "tracker"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    message = b""
    while b"READY=1" not in message:
        message = sock.recv(4096)
    answers = Counter(t.request("GET", "/healthz")[0] for _ in range(8))
    assert answers == Counter({200: 8})


def test_forwarded_for_only_from_trusted_proxies(tmp_path: Path) -> None:
    """Behind a trusted balancer (here: loopback) the recorded IP is X-Forwarded-For's client,
    truncated when ip_truncate is on; without trusted_proxies the header is ignored."""
    t = make_tracker(tmp_path / "a", 'trusted_proxies = ["127.0.0.0/8"]\nip_truncate = true\n')
    plain = make_tracker(tmp_path / "b")
    try:
        t.start()
        plain.start()
        for tr in (t, plain):
            status, _, _ = tr.request("GET", "/c/" + tr.token(tr.instance, 2, 1, kind="c"),
                                      headers={"X-Forwarded-For": "1.2.3.4, 203.0.113.77"})
            assert status == 302
        (got,) = [r["ip"] for r in t.records() if r["type"] == "link.clicked"]
        assert got == "203.0.113.0"  # the right-most untrusted hop, then /24
        (got,) = [r["ip"] for r in plain.records() if r["type"] == "link.clicked"]
        assert got == "127.0.0.1"
    finally:
        t.stop()
        plain.stop()


def _fill(path: Path) -> None:
    """Write `path` until the file system is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_disk_answers_503_and_loses_no_answered_hit(mount_tmpfs: Any) -> None:
    """With the spool's disk full a click is answered 503 (never a 302 it could not record);
    once space is freed clicks redirect again, and every 302 given is in the streams."""
    t = make_tracker(mount_tmpfs("16m"))
    try:
        t.start()
        path = "/c/" + t.token(t.instance, 1, 1, kind="c")
        redirected = 0
        for _ in range(20):
            status = t.request("GET", path)[0]
            assert status == 302
            redirected += 1
        _fill(t.root / "filler")
        statuses = Counter()
        for _ in range(50):
            status = t.request("GET", path)[0]
            statuses[status] += 1
            redirected += status == 302
        assert statuses[503] >= 40, statuses  # a few may still fit in a partly filled block
        assert set(statuses) <= {302, 503}, statuses
        (t.root / "filler").unlink()
        time.sleep(0.2)
        after = [t.request("GET", path)[0] for _ in range(20)]
        assert after.count(302) >= 19, after  # the first may still meet the torn segment
        redirected += after.count(302)
        t.stop()
        clicks = [r for r in t.records() if r["type"] == "link.clicked"]
        assert len(clicks) == redirected
    finally:
        t.stop()
