"""Appliers: what each record type does to the customer DB and to the report DB.

An applier is `fn(conn, records, cache)`: a run of consecutive records of one type, decoded,
in stream order; `conn` is inside the consumer's transaction (the stream position is committed
with the applier's effects, which is what makes each record apply exactly once); `cache` is a
dict private to the consumer, for look-ups worth keeping between batches. Appliers aggregate
within the run (one upsert per customer, not per record) and raise on a bad record: the
consumer then retries the run one record at a time and shunts the ones that fail.

Register with @applies("noun.verb", db="customer"|"report"). Modules that hold appliers are
imported by `registry()`; later issues add their modules to _MODULES.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import Connection

Db = Literal["customer", "report"]
Applier = Callable[[Connection, list[dict[str, Any]], dict[str, Any]], None]

_REGISTRY: dict[str, dict[str, list[Applier]]] = {"customer": {}, "report": {}}
_MODULES = ("connectd.appliers.tracking",)


def applies(record_type: str, db: Db) -> Callable[[Applier], Applier]:
    """Register the decorated function as an applier of `record_type` to database `db`."""
    def register(fn: Applier) -> Applier:
        bucket = _REGISTRY[db].setdefault(record_type, [])
        if fn not in bucket:
            bucket.append(fn)
        return fn
    return register


def registry(db: Db) -> dict[str, list[Applier]]:
    """record type -> appliers for database `db` (importing every applier module once)."""
    for name in _MODULES:
        importlib.import_module(name)
    return _REGISTRY[db]
