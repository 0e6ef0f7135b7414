"""The web daemon: connectd.web.app (content server now; the editor later) served by uvicorn
on settings.web.host:settings.web.port.

Inputs: HTTP requests; settings (content root, customer DB). Outputs: HTTP responses; one log
line at start and stop (uvicorn's access log is off: composers fetch each content once).

How it runs: setup() binds the listening socket itself (so a port in use fails the start with
a clear error, and systemd hears READY=1 only once the socket accepts connections), then runs
uvicorn's Server on that socket in a thread with its own event loop. uvicorn installs no
signal handlers outside the main thread, so TERM/INT reach the Daemon base class as for every
daemon; teardown() asks uvicorn to exit (it finishes open requests, then stops) and joins the
thread. step() only checks that the server thread is alive: if it died, the daemon exits
non-zero and the supervisor restarts it.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from connectd.daemon import Daemon, DaemonFailed
from connectd.settings import Settings
from connectd.web.app import create_app

STARTUP_TIMEOUT = 30.0  # seconds for uvicorn to start serving on the bound socket
SHUTDOWN_GRACE = 10.0  # seconds open requests get before uvicorn is forced to stop


class WebServerDied(DaemonFailed):
    """The uvicorn thread ended while the daemon was not stopping."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a restart must not wait for the old connections' TIME_WAIT to pass
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Web(Daemon):
    name = "web"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sock: socket.socket | None = None
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def port(self) -> int:
        """The port actually bound (settings.web.port, or the one the OS chose for 0)."""
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    def setup(self) -> None:
        web = self.settings.web
        try:
            self.sock = bind(web.host, web.port)
        except OSError as exc:
            raise WebServerDied(f"cannot listen on {web.host}:{web.port}: {exc.strerror}") from None
        self.settings.paths.content_root.mkdir(parents=True, exist_ok=True)
        config = uvicorn.Config(create_app(self.settings), log_config=None, access_log=False,
                                lifespan="on", timeout_graceful_shutdown=SHUTDOWN_GRACE,
                                server_header=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise WebServerDied(f"the web server did not start: {self.error or 'timeout'}")
            time.sleep(0.01)
        self.log.info("listening", host=web.host, port=self.port,
                      content_root=str(self.settings.paths.content_root))

    def _serve(self) -> None:
        assert self.server is not None and self.sock is not None
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # noqa: BLE001 - reported by setup()/step() in the main thread
            self.error = exc

    def step(self) -> int:
        if self.thread is not None and not self.thread.is_alive() and not self._stopping:
            raise WebServerDied(f"the web server stopped: {self.error or 'no reason given'}")
        return 0

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def teardown(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(SHUTDOWN_GRACE + 2)
            if self.thread.is_alive() and self.server is not None:
                self.server.force_exit = True
                self.thread.join(5)
        if self.sock is not None:
            self.sock.close()
        self.log.info("web server stopped")

    def url(self, path: str = "") -> str:
        """http://host:port/path of this server (for tests and log lines)."""
        host = self.settings.web.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{path}"

    def info(self) -> dict[str, Any]:
        return {"host": self.settings.web.host, "port": self.port}
