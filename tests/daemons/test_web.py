"""The web daemon (content server): a real uvicorn on a free loopback port, real HTTP
requests with http.client (which sends paths as given, so traversal attempts reach the
server unnormalised), inline content from a real customer DB, and SIGTERM to a real process."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import write_config
from sqlalchemy import insert

from connectd import settings as settings_mod
from connectd.daemons.web import Web, WebServerDied
from connectd.db.customer import Content
from connectd.db.engine import make_engine

CLI = Path(sys.executable).parent / "connectd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def web_settings(tmp_path: Path, customer_url: str | None = None,
                 port: int | None = None) -> settings_mod.Settings:
    cfg = write_config(tmp_path, extra=f"[web]\nport = {port or free_port()}\n",
                       customer_url=customer_url)
    return settings_mod.load(cfg, environ={})


@pytest.fixture
def start_web(tmp_path: Path) -> Iterator[Callable[..., Web]]:
    """start_web(customer_url=None) -> a Web daemon serving (setup done; torn down after)."""
    started: list[Web] = []

    def start(customer_url: str | None = None) -> Web:
        web = Web(web_settings(tmp_path, customer_url))
        web.setup()
        started.append(web)
        return web

    yield start
    for web in started:
        web.teardown()


def get(web: Web, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def content_root(web: Web) -> Path:
    root = web.settings.paths.content_root
    root.mkdir(parents=True, exist_ok=True)
    return root


def test_healthz(start_web: Callable[..., Web]) -> None:
    """/healthz answers 200 ok once setup() has returned."""
    web = start_web()
    status, _, body = get(web, "/healthz")
    assert (status, body) == (200, b"ok\n")


def test_serves_a_file_with_type_etag_and_304(start_web: Callable[..., Web]) -> None:
    """A file under the content root: bytes, text/html; charset=utf-8, ETag, then 304."""
    web = start_web()
    page = content_root(web) / "spring" / "mail page.html"
    page.parent.mkdir()
    page.write_text("<p>Grüße</p>", encoding="utf-8")
    status, headers, body = get(web, "/content/spring/mail%20page.html")
    assert status == 200
    assert body == "<p>Grüße</p>".encode()
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["etag"] and headers["last-modified"]
    status, _, body = get(web, "/content/spring/mail%20page.html",
                          {"If-None-Match": headers["etag"]})
    assert (status, body) == (304, b"")
    status, _, _ = get(web, "/content/spring/mail%20page.html",
                       {"If-Modified-Since": headers["last-modified"]})
    assert status == 304
    status, _, _ = get(web, "/content/spring/mail%20page.html", {"If-None-Match": '"other"'})
    assert status == 200


@pytest.mark.parametrize("path", [
    "/content/../etc/connectd.toml",
    "/content/%2e%2e/etc/connectd.toml",
    "/content/spring/../../etc/connectd.toml",
    "/content//etc/passwd",
    "/content/%2Fetc%2Fpasswd",
    "/content/outside/secret.txt",   # a symlinked directory leading out of the root
    "/content/link.txt",             # a symlinked file leading out of the root
    "/content/.hidden.html",
    "/content/spring",               # a directory
    "/content/missing.html",
])
def test_refuses_what_is_not_a_file_inside_the_root(start_web: Callable[..., Web],
                                                   tmp_path: Path, path: str) -> None:
    """Traversal, absolute paths, symlinks out of the root, hidden and missing files: 404."""
    web = start_web()
    root = content_root(web)
    (root / "spring").mkdir()
    (root / ".hidden.html").write_text("hidden")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "secret.txt").write_text("top secret")
    (root / "outside").symlink_to(secret)
    (root / "link.txt").symlink_to(secret / "secret.txt")
    status, _, body = get(web, path)
    assert status == 404
    assert b"secret" not in body and b"[paths]" not in body


def test_symlink_inside_the_root_is_served(start_web: Callable[..., Web]) -> None:
    """A symlink that stays inside the content root is followed."""
    web = start_web()
    root = content_root(web)
    (root / "a.txt").write_text("plain")
    (root / "b.txt").symlink_to(root / "a.txt")
    status, headers, body = get(web, "/content/b.txt")
    assert (status, body) == (200, b"plain")
    assert headers["content-type"] == "text/plain; charset=utf-8"


@pytest.fixture
def inline_ids(migrated_customer_url: str) -> dict[str, int]:
    """Contents rows: one with html and text, one with html only."""
    engine = make_engine(migrated_customer_url)
    now = datetime(2026, 3, 1, tzinfo=UTC)
    with engine.begin() as conn:
        both = conn.execute(insert(Content).values(
            subject="s", html="<p>Hello [First Name|friend]</p>", text="Hello",
            created_at=now, updated_at=now).returning(Content.id)).scalar_one()
        html_only = conn.execute(insert(Content).values(
            subject="s", html="<b>only</b>", created_at=now, updated_at=now)
            .returning(Content.id)).scalar_one()
    engine.dispose()
    return {"both": both, "html_only": html_only}


def test_inline_content(start_web: Callable[..., Web], migrated_customer_url: str,
                        inline_ids: dict[str, int]) -> None:
    """/content/_inline/<id>.html|.txt come from the contents table, with types and ETags."""
    web = start_web(migrated_customer_url)
    status, headers, body = get(web, f"/content/_inline/{inline_ids['both']}.html")
    assert (status, body) == (200, b"<p>Hello [First Name|friend]</p>")
    assert headers["content-type"] == "text/html; charset=utf-8"
    status, _, _ = get(web, f"/content/_inline/{inline_ids['both']}.html",
                       {"If-None-Match": headers["etag"]})
    assert status == 304
    status, headers, body = get(web, f"/content/_inline/{inline_ids['both']}.txt")
    assert (status, body) == (200, b"Hello")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    for missing in (f"/content/_inline/{inline_ids['html_only']}.txt",
                    "/content/_inline/999999.html", "/content/_inline/1.pdf",
                    "/content/_inline/x.html"):
        assert get(web, missing)[0] == 404, missing


def test_head_has_no_body(start_web: Callable[..., Web]) -> None:
    """HEAD answers the headers of GET without the body."""
    web = start_web()
    (content_root(web) / "a.html").write_text("<p>x</p>")
    status, headers, body = get(web, "/content/a.html", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "8"


def test_port_in_use_fails_setup(tmp_path: Path) -> None:
    """A port someone else holds is a clear start failure, not a hang."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        web = Web(web_settings(tmp_path, port=holder.getsockname()[1]))
        with pytest.raises(WebServerDied, match="cannot listen"):
            web.setup()


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("web daemon did not become healthy")


def test_sigterm_stops_the_process_with_exit_0(tmp_path: Path,
                                               notify_socket: tuple[socket.socket, str]) -> None:
    """`connectd run web`: READY=1 once it serves, SIGTERM -> exit 0 and the port is free."""
    port = free_port()
    cfg = write_config(tmp_path, extra=f"[web]\nport = {port}\n")
    sock, address = notify_socket
    env = {**os.environ, "CONNECTD_CONFIG": str(cfg), "NOTIFY_SOCKET": address}
    proc = subprocess.Popen([str(CLI), "run", "web"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready
        # READY came after the bind: the first request already succeeds
        _wait_healthy(port, proc, timeout=2.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # free again


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """`connectd run web` on a port someone else holds: one line saying so, exit 1, no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        cfg = write_config(tmp_path, extra=f"[web]\nport = {port}\n")
        proc = subprocess.run([sys.executable, "-m", "connectd", "--config", str(cfg), "run", "web"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
