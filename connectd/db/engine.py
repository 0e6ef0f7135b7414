"""Engines for the customer DB and the report DB (SQLite embedded, PostgreSQL at scale).

SQLite gets WAL (readers never block the writer), synchronous=NORMAL (a committed transaction
survives a process crash; WAL keeps the file consistent across a power loss), a busy timeout
long enough for daemons that share the file, and foreign keys on.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url


def make_engine(url: str, echo: bool = False, **kw: Any) -> Engine:
    """An Engine for `url` with connectd's per-backend connection setup."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, echo=echo, connect_args={"timeout": 30}, **kw)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(parsed, echo=echo, pool_pre_ping=True, **kw)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
