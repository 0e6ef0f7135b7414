"""The link map: link id -> the URL a click on it redirects to, kept in memory.

Inputs: the customer DB's `links` table (read by a background thread, never on the request
path) and a snapshot file under the spool. Outputs: `get(id)` from memory; the snapshot
file, rewritten atomically when the map changed.

- At start: a full load from the database; if the database cannot be read, the snapshot
  (<spool>/tracker/links.json), so a tracker that starts while the database is down still
  redirects every link it knew.
- Every `refresh` seconds: the links added since (`id > last max id`, links are only ever
  added); every FULL_EVERY seconds a full reload (drops links whose message was deleted).
- `wake()` asks for a refresh now: a valid click token whose link is not known yet (a composer
  registered it moments ago) waits for the next refresh (see connectd.tracker.app).
- Database down: keep serving from memory, log once per outage, and once when it is back.

Only http(s) URLs without control characters are kept (anything else in the table is logged
and left out): the tracker never sends a browser to a javascript: or data: URL, and a URL
can never break out of the Location header.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from connectd import log
from connectd.spool import fsync_dir

FULL_EVERY = 600.0  # seconds between full reloads
MIN_GAP = 0.05  # seconds between two queries however often wake() is called
_SAFE = "!#$%&'()*+,/:;=?@[]~-._"  # RFC 3986 reserved + unreserved: kept as they are


def clean_url(url: Any) -> bytes | None:
    """A link's URL as the bytes of a Location header value, or None if it may not be one:
    http(s) only, no control characters; other non-ASCII is percent-encoded."""
    if not isinstance(url, str):
        return None
    url = url.strip()
    if not url.lower().startswith(("http://", "https://")) or len(url) > 8192:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return None
    return quote(url, safe=_SAFE).encode("ascii")


def _sqlite_engine(url: str) -> Any:
    """A read-only engine for a SQLite file: a removed file is an error, not a new empty
    database created under the other daemons' feet; a short busy timeout, as this is only the
    background refresh."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    path = make_url(url).database or ""
    return create_engine(f"sqlite:///file:{path}?mode=ro&uri=true", poolclass=NullPool,
                         connect_args={"timeout": 2.0})


def _engine(url: str) -> Any:
    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    from connectd.db.engine import make_engine

    return make_engine(url, connect_args={"connect_timeout": 5})


class LinkMap:
    """id -> Location bytes, refreshed by a background thread (see the module docstring)."""

    def __init__(self, db_url: str, snapshot: Path, refresh: float = 10.0, *,
                 write_snapshot: bool = True) -> None:
        self.db_url = db_url
        self.snapshot = Path(snapshot)
        self.refresh = refresh
        self.write_snapshot = write_snapshot
        self.urls: dict[int, bytes] = {}
        self.max_id = 0
        self.started = 0  # refreshes started by the thread
        self.generation = 0  # the `started` number of the last refresh that finished
        self.log = log.get(component="tracker.links")
        self._engine: Any = None
        self._down = False
        self._last_full = 0.0
        self._dirty = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_refresh: Callable[[int], None] | None = None  # called from the thread

    def get(self, link: int) -> bytes | None:
        return self.urls.get(link)

    def __len__(self) -> int:
        return len(self.urls)

    # -- loading --------------------------------------------------------------------------
    def load(self) -> str:
        """The first load: the database, else the snapshot. Returns where it came from."""
        if self._refresh_once(full=True):
            self._save_snapshot()
            return "database"
        self._load_snapshot()
        return "snapshot"

    def _load_snapshot(self) -> None:
        try:
            data = orjson.loads(self.snapshot.read_bytes())
        except FileNotFoundError:
            self.log.warning("no link snapshot; links are unknown until the database answers",
                             path=str(self.snapshot))
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            self.log.error("link snapshot unreadable", path=str(self.snapshot), error=str(exc))
            return
        urls = {int(k): v.encode("ascii") for k, v in data.get("links", {}).items()}
        self.urls = urls
        self.max_id = max(urls, default=0)
        self.log.info("links loaded from snapshot", links=len(urls), path=str(self.snapshot))

    def _query(self, full: bool) -> list[tuple[int, Any]]:
        from sqlalchemy import text

        if self._engine is None:
            self._engine = _engine(self.db_url)
        sql = "SELECT id, url FROM links"
        params: dict[str, int] = {}
        if not full:
            sql += " WHERE id > :last"
            params["last"] = self.max_id
        with self._engine.connect() as conn:
            return [(int(i), u) for i, u in conn.execute(text(sql + " ORDER BY id"), params)]

    def _refresh_once(self, full: bool) -> bool:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            rows = self._query(full)
        except SQLAlchemyError as exc:
            if not self._down:  # once per outage
                self._down = True
                self.log.warning("customer DB unreadable; serving links from memory",
                                 links=len(self.urls),
                                 error=str(getattr(exc, "orig", exc)).splitlines()[0])
            if self._engine is not None:
                self._engine.dispose()  # reconnect from scratch next time (file replaced, ...)
                self._engine = None
            return False
        if self._down:
            self._down = False
            self.log.info("customer DB readable again")
        self._apply(rows, full)
        return True

    def _apply(self, rows: list[tuple[int, Any]], full: bool) -> None:
        urls = {} if full else self.urls
        for link_id, raw in rows:
            url = clean_url(raw)
            if url is None:
                self.log.warning("link URL refused (not http(s), or control characters)",
                                 link=link_id)
                continue
            urls[link_id] = url
        if full:
            self._dirty = self._dirty or urls != self.urls
            self.urls = urls  # one assignment: readers see the old map or the new one
            self._last_full = time.monotonic()
        elif rows:
            self._dirty = True
        self.max_id = max(self.max_id, max((r[0] for r in rows), default=0))

    def _save_snapshot(self) -> None:
        if not self.write_snapshot or not self._dirty:
            return
        data = orjson.dumps({"max_id": self.max_id,
                             "links": {str(k): v.decode("ascii") for k, v in self.urls.items()}})
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot.with_name(f".{self.snapshot.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)  # the data is on disk before the name points at it (no empty snapshot)
        finally:
            os.close(fd)
        os.replace(tmp, self.snapshot)
        fsync_dir(self.snapshot.parent)  # the rename survives a crash
        self._dirty = False

    # -- background refresh ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="link-refresh", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Refresh now (thread-safe)."""
        self._wake.set()

    def close_db(self) -> None:
        """Drop database connections (before a fork: none may be shared with a child)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._engine is not None:
            self._engine.dispose()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh)
            self._wake.clear()
            if self._stop.is_set():
                return
            full = time.monotonic() - self._last_full >= FULL_EVERY
            self.started += 1
            started = self.started
            try:
                if self._refresh_once(full):
                    self._save_snapshot()
            except Exception:  # noqa: BLE001 - the refresher must outlive any one failure
                self.log.exception("link refresh failed")
            self.generation = started
            if self.on_refresh is not None:
                self.on_refresh(started)
            time.sleep(MIN_GAP)
