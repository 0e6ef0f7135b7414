"""The web daemon's ASGI application (Starlette): requests -> content files, inline content
from the customer DB, a health check. The web-UI issue adds the Conversation Editor, reports
and the REST API to this same app (`create_app` is the one factory).

Routes:
- GET/HEAD /healthz -> 200 "ok".
- GET/HEAD /content/_inline/<id>.html|.txt -> contents.html / contents.text of row <id>
  (what `connectd campaign create --inline` stores), text/html or text/plain; charset=utf-8.
- GET/HEAD /content/<path> -> the file at paths.content_root/<path>, Content-Type from its
  name (text types with charset=utf-8), ETag and Last-Modified, 304 on If-None-Match /
  If-Modified-Since, Range via Starlette's FileResponse.

Confinement: a path with "..", an absolute path, a NUL byte, a hidden name (a leading ".",
e.g. the temporary files of an atomic copy), or one that resolves (symlinks followed) to
outside the content root answers 404, as does anything that is not a regular file. Composers
GET these URLs; a 404 makes the launch fail cleanly instead of mailing the wrong bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path

from sqlalchemy import Engine, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from connectd.db.customer import Content
from connectd.db.engine import make_engine
from connectd.settings import Settings

_INLINE_TYPES = {"html": "text/html; charset=utf-8", "txt": "text/plain; charset=utf-8"}


def _not_found() -> Response:
    return PlainTextResponse("not found\n", status_code=404)


def _not_modified(request: Request, etag: str, mtime: float) -> bool:
    """RFC 9110 13.1: If-None-Match wins over If-Modified-Since."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
        return "*" in tags or etag in tags
    since = request.headers.get("if-modified-since")
    if since:
        try:
            return int(mtime) <= parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError):
            return False
    return False


def _etag(*parts: object) -> str:
    digest = hashlib.sha256("-".join(map(str, parts)).encode()).hexdigest()[:32]
    return f'"{digest}"'


def confined(root: Path, relative: str) -> Path | None:
    """The regular file `relative` names under `root`, or None when the request must not
    see it (module notes)."""
    if not relative or "\0" in relative or "\\" in relative or relative.startswith("/"):
        return None
    parts = relative.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if os.path.commonpath([real_root, real]) != real_root:
        return None  # a symlink that leads out of the root
    return Path(real)


class ContentServer:
    """The endpoints; holds the settings and a lazily used engine on the customer DB."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.root = settings.paths.content_root
        self.engine = engine

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def file(self, request: Request) -> Response:
        path = confined(self.root, request.path_params["path"])
        if path is None:
            return _not_found()
        try:
            st = os.stat(path)
        except OSError:
            return _not_found()
        if not stat.S_ISREG(st.st_mode):
            return _not_found()
        response = FileResponse(path, stat_result=st)
        if _not_modified(request, response.headers["etag"], st.st_mtime):
            return Response(status_code=304, headers={
                "etag": response.headers["etag"],
                "last-modified": response.headers["last-modified"]})
        return response

    def inline(self, request: Request) -> Response:
        """Sync on purpose: Starlette runs it in its thread pool, so the database read does
        not block the event loop."""
        raw_id, ext = request.path_params["id"], request.path_params["ext"]
        if ext not in _INLINE_TYPES or not raw_id.isdigit():
            return _not_found()
        column = Content.html if ext == "html" else Content.text
        with self.engine.connect() as conn:
            row = conn.execute(select(column, Content.version, Content.updated_at)
                               .where(Content.id == int(raw_id))).one_or_none()
        if row is None or row[0] is None:
            return _not_found()
        body, version, updated = row
        mtime = updated.astimezone(UTC).timestamp()
        etag = _etag(raw_id, ext, version, hashlib.sha256(body.encode()).hexdigest())
        headers = {"etag": etag, "last-modified": formatdate(mtime, usegmt=True)}
        if _not_modified(request, etag, mtime):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=_INLINE_TYPES[ext], headers=headers)


def create_app(settings: Settings, engine: Engine | None = None) -> Starlette:
    """The ASGI app of the web daemon. `engine` (on the customer DB) is made from the
    settings when not given, and disposed at shutdown if made here."""
    own = engine is None
    engine = engine or make_engine(settings.database.customer_url)
    server = ContentServer(settings, engine)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        if own:
            engine.dispose()

    routes = [
        Route("/healthz", server.healthz, methods=["GET", "HEAD"]),
        Route("/content/_inline/{id}.{ext}", server.inline, methods=["GET", "HEAD"]),
        Route("/content/{path:path}", server.file, methods=["GET", "HEAD"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    return app
