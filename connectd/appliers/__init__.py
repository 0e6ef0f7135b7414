"""Appliers: what each record type does to the customer DB and to the report DB.

An applier is `fn(conn, records, cache)`: a run of consecutive records of one type, decoded
into that type's struct (connectd.records), in stream order; `conn` is inside the consumer's
transaction (the stream position is committed with the applier's effects, which is what makes
each record apply exactly once); `cache` is a dict private to the consumer, for look-ups worth
keeping between batches. Appliers aggregate within the run (one upsert per customer, not per
record) and raise on a bad record: the consumer then bisects the run and shunts the records
that fail on their own.

Register with @applies(RecordStruct, db="customer"|"report"). Modules that hold appliers are
imported by `registry()`; later issues add their modules to _MODULES.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal, Union

from sqlalchemy import Connection

from connectd.records import Record, record_type

Db = Literal["customer", "report"]
Applier = Callable[[Connection, list[Any], dict[str, Any]], None]

_APPLIERS: dict[str, dict[str, list[Applier]]] = {"customer": {}, "report": {}}
_SCHEMAS: dict[str, type[Record]] = {}
_MODULES = ("connectd.appliers.tracking", "connectd.appliers.engagement",
            "connectd.appliers.outbound", "connectd.appliers.inbound")


def applies(schema: type[Record], db: Db) -> Callable[[Applier], Applier]:
    """Register the decorated function as an applier of records of `schema` to `db`."""
    def register(fn: Applier) -> Applier:
        name = record_type(schema)
        _SCHEMAS[name] = schema
        bucket = _APPLIERS[db].setdefault(name, [])
        if fn not in bucket:
            bucket.append(fn)
        return fn
    return register


def known_types() -> dict[str, type[Record]]:
    """Every record type some applier consumes, with its struct."""
    registry("customer")
    return _SCHEMAS


def catalogue() -> Any:
    """The tagged union of every known record struct (decodes any known record line)."""
    schemas = tuple(known_types().values())
    return Union[schemas] if len(schemas) > 1 else schemas[0]  # noqa: UP007


def registry(db: Db) -> tuple[dict[str, list[Applier]], dict[str, type[Record]]]:
    """(record type -> appliers, record type -> schema) for database `db`."""
    for name in _MODULES:
        importlib.import_module(name)
    handlers = _APPLIERS[db]
    return handlers, {t: _SCHEMAS[t] for t in handlers}
