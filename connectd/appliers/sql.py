"""Set-based upserts for appliers, the same call on SQLite and PostgreSQL.

`upsert(conn, table, rows, keys, add=..., greatest=..., least=...)` inserts each row or, when
its key exists, adds the `add` columns to the stored values and keeps the greatest/least of the
`greatest`/`least` columns (NULL-safe). One executemany per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, func
from sqlalchemy.dialects import postgresql, sqlite

_CACHE: dict[tuple, Any] = {}


def _statement(dialect: str, table: Table, keys: tuple[str, ...], add: tuple[str, ...],
               greatest: tuple[str, ...], least: tuple[str, ...], replace: tuple[str, ...]) -> Any:
    cache_key = (dialect, table, keys, add, greatest, least, replace)
    stmt = _CACHE.get(cache_key)
    if stmt is not None:
        return stmt
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    ex, t = stmt.excluded, table.c
    updates: dict[str, Any] = {}
    for c in add:
        updates[c] = t[c] + ex[c]
    for c in replace:
        updates[c] = ex[c]
    if dialect == "postgresql":  # GREATEST/LEAST ignore NULLs
        for c in greatest:
            updates[c] = func.greatest(t[c], ex[c])
        for c in least:
            updates[c] = func.least(t[c], ex[c])
    else:  # SQLite's scalar max()/min() return NULL if any argument is NULL
        for c in greatest:
            updates[c] = func.max(func.coalesce(t[c], ex[c]), func.coalesce(ex[c], t[c]))
        for c in least:
            updates[c] = func.min(func.coalesce(t[c], ex[c]), func.coalesce(ex[c], t[c]))
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=updates)
    _CACHE[cache_key] = stmt
    return stmt


def upsert(conn: Connection, table: Table, rows: list[dict[str, Any]], keys: Sequence[str],
           add: Sequence[str] = (), greatest: Sequence[str] = (), least: Sequence[str] = (),
           replace: Sequence[str] = ()) -> None:
    if not rows:
        return
    stmt = _statement(conn.dialect.name, table, tuple(keys), tuple(add), tuple(greatest),
                      tuple(least), tuple(replace))
    conn.execute(stmt, rows)
