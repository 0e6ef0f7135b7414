"""Set-based upserts for appliers: the same call on SQLite and PostgreSQL.

`upsert(conn, table, columns, rows, keys, add=..., greatest=..., least=...)` inserts each row
(a tuple in `columns` order) or, when its key exists, adds the `add` columns to the stored
values and keeps the greatest/least of the `greatest`/`least` columns (NULL-safe), and
replaces the `replace` columns. One executemany per call, straight to the driver: the
profiler benchmark showed SQLAlchemy's per-row parameter processing costing more than the
database work itself on this path. Timestamps are passed as text in the column's storage
format (see `db_time`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, Table

_CACHE: dict[tuple, str] = {}


def sqlite_time(ts: str) -> str:
    """A canonical record timestamp ('YYYY-MM-DDTHH:MM:SS.ffffffZ', enforced when records are
    decoded) as SQLite's timestamp text."""
    return f"{ts[:10]} {ts[11:26]}"


def db_time(dialect: str, ts: str) -> str:
    """A record timestamp (ISO 8601 UTC, '...Z') as the text a UTC timestamp column takes:
    SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff' (what SQLAlchemy's DateTime writes there, so
    ORM reads and text comparisons agree); PostgreSQL parses ISO 8601 itself."""
    if dialect != "sqlite":
        return ts
    if len(ts) == 27 and ts[10] == "T" and ts[26] == "Z":
        return f"{ts[:10]} {ts[11:26]}"
    from datetime import UTC, datetime
    dt = datetime.fromisoformat(ts)  # raises ValueError for a bad timestamp: record shunted
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f")


def _sql(dialect: str, table: Table, columns: tuple[str, ...], keys: tuple[str, ...],
         add: tuple[str, ...], greatest: tuple[str, ...], least: tuple[str, ...],
         replace: tuple[str, ...]) -> str:
    cache_key = (dialect, table.name, columns, keys, add, greatest, least, replace)
    sql = _CACHE.get(cache_key)
    if sql is not None:
        return sql
    ph = "?" if dialect == "sqlite" else "%s"
    t = f'"{table.name}"'
    # every identifier quoted: "offset" and friends are reserved words in PostgreSQL
    columns, keys, add, greatest, least, replace = (
        tuple(f'"{c}"' for c in group) for group in (columns, keys, add, greatest, least, replace))
    sets = [f"{c} = {t}.{c} + excluded.{c}" for c in add]
    sets += [f"{c} = excluded.{c}" for c in replace]
    if dialect == "postgresql":  # GREATEST/LEAST ignore NULLs
        sets += [f"{c} = GREATEST({t}.{c}, excluded.{c})" for c in greatest]
        sets += [f"{c} = LEAST({t}.{c}, excluded.{c})" for c in least]
    else:  # SQLite's scalar max()/min() return NULL if any argument is NULL
        sets += [f"{c} = max(coalesce({t}.{c}, excluded.{c}), coalesce(excluded.{c}, {t}.{c}))"
                 for c in greatest]
        sets += [f"{c} = min(coalesce({t}.{c}, excluded.{c}), coalesce(excluded.{c}, {t}.{c}))"
                 for c in least]
    action = f"DO UPDATE SET {', '.join(sets)}" if sets else "DO NOTHING"
    sql = (f"INSERT INTO {t} ({', '.join(columns)}) VALUES ({', '.join([ph] * len(columns))}) "
           f"ON CONFLICT ({', '.join(keys)}) {action}")
    _CACHE[cache_key] = sql
    return sql


def upsert(conn: Connection, table: Table, columns: Sequence[str], rows: list[tuple],
           keys: Sequence[str], add: Sequence[str] = (), greatest: Sequence[str] = (),
           least: Sequence[str] = (), replace: Sequence[str] = ()) -> None:
    if not rows:
        return
    sql = _sql(conn.dialect.name, table, tuple(columns), tuple(keys), tuple(add),
               tuple(greatest), tuple(least), tuple(replace))
    conn.exec_driver_sql(sql, rows)


def insert_many(conn: Connection, table: Table, columns: Sequence[str], rows: list[tuple]) -> None:
    """Plain INSERT of many rows (append-only fact tables)."""
    if not rows:
        return
    ph = "?" if conn.dialect.name == "sqlite" else "%s"
    quoted = ", ".join(f'"{c}"' for c in columns)
    conn.exec_driver_sql(f'INSERT INTO "{table.name}" ({quoted}) '
                         f"VALUES ({', '.join([ph] * len(columns))})", rows)


