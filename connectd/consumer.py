"""Stream consumers: read a stream from a stored position, apply the records to one database,
and store the new position in the same transaction (exactly once).

Inputs: a spool stream, a database engine, appliers by record type (connectd.appliers).
Outputs: the appliers' effects and a consumer_positions row, committed together; records that
cannot be applied go to the shunt stream (with the reason and position) and the consumer
goes on. Records of types with no applier for this database are passed over.

The `replay` stream holds shunted records put back by `connectd spool replay`; each is applied
only by the consumer that shunted it.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from operator import attrgetter
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import Connection, Engine, Table, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError

from connectd import appliers, log
from connectd.appliers.sql import db_time, upsert
from connectd.db.engine import writer
from connectd.settings import Settings
from connectd.spool import REPLAY, SHUNT, BadRecord, Batch, Position, Spool, decode, now_ts

_TRANSIENT_RETRIES = 5
# what a bad record can cause: these shunt the record; every other error (a locked or lost
# database, a missing table, a bug) is not the record's fault and must not shunt it
_BAD_DATA = (IntegrityError, DataError, BadRecord, KeyError, TypeError, ValueError)
# SQLite reports schema problems as OperationalError too; those are not worth retrying
_PERMANENT_SQLITE = ("no such table", "no such column", "has no column")


def transient(exc: OperationalError) -> bool:
    """A database error that may go away by itself (locked, busy, connection lost)."""
    message = str(exc.orig).lower()
    return not any(text in message for text in _PERMANENT_SQLITE)
_parse_ts = datetime.fromisoformat  # raises ValueError for a date that does not exist


@dataclass(frozen=True)
class ConsumerState:
    """A consumer's stored position (for `spool status` and `spool gc`)."""

    db: str
    spool_id: str
    stream: str
    consumer: str
    position: Position
    records: int
    last_record_ts: datetime | None
    updated_at: datetime


def position_table(db: appliers.Db) -> Table:
    if db == "customer":
        from connectd.db.customer import ConsumerPosition
    else:
        from connectd.db.report import ConsumerPosition  # type: ignore[assignment]
    return ConsumerPosition.__table__


def load_positions(settings: Settings, spool_id: str | None = None) -> list[ConsumerState]:
    """Every consumer position stored in the customer and report DBs for this spool (or all
    spools when spool_id is None). Raises sqlalchemy errors if a database is unreachable."""
    from connectd.db.engine import make_engine

    out: list[ConsumerState] = []
    for db, url in (("customer", settings.database.customer_url),
                    ("report", settings.database.report_url)):
        engine = make_engine(url)
        try:
            table = position_table(db)  # type: ignore[arg-type]
            query = select(table)
            if spool_id is not None:
                query = query.where(table.c.spool_id == spool_id)
            with engine.connect() as conn:
                for row in conn.execute(query):
                    out.append(ConsumerState(db, row.spool_id, row.stream, row.consumer,
                                             Position(row.segment, row.offset), row.records,
                                             row.last_record_ts, row.updated_at))
        finally:
            engine.dispose()
    return out


class Consumer:
    """One consumer (`name`) of one stream, applying to one database."""

    def __init__(self, spool: Spool, stream: str, name: str, db: appliers.Db, engine: Engine,
                 batch_size: int = 5000) -> None:
        self.spool = spool
        self.stream = stream
        self.name = name
        self.db = db
        self.engine = writer(engine)
        self.batch_size = batch_size
        self.table = position_table(db)
        self.spool_id = spool.spool_id
        self.handlers, self.schemas = appliers.registry(db)
        self.handled_types = set(self.schemas.values())
        self.catalogue = appliers.catalogue()
        self.decoder = msgspec.json.Decoder(self.catalogue)
        self.batch_decoder = msgspec.json.Decoder(list[self.catalogue])  # type: ignore[name-defined]
        self.cache: dict[str, Any] = {}
        self.log = log.get(daemon="profiler", stream=stream, consumer=name)
        self.reader = spool.reader(stream, self._stored_position())

    def _stored_position(self) -> Position:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(select(t.c.segment, t.c.offset).where(
                t.c.spool_id == self.spool_id, t.c.stream == self.stream,
                t.c.consumer == self.name)).first()
        if row is None:
            return Position(0, 0)
        return Position(row.segment, row.offset)

    def close(self) -> None:
        self.reader.close()

    def poll(self) -> int:
        """Apply the next batch, if any; returns the number of lines consumed."""
        with _collector_paused():
            return self._poll()

    def _poll(self) -> int:
        start = self.reader.position
        batch = self.reader.read(self.batch_size)
        if batch is None:
            return 0
        for attempt in range(_TRANSIENT_RETRIES + 1):
            try:
                self._apply(batch)
                break
            except OperationalError as exc:  # database locked/unreachable: retry the batch
                if attempt == _TRANSIENT_RETRIES or not transient(exc):
                    self.reader.position = start  # not consumed: read it again next time
                    raise
                self.log.warning("database busy, retrying batch", error=str(exc.orig)[:200],
                                 attempt=attempt + 1)
                time.sleep(0.2 * 2 ** attempt)
        return len(batch) + (1 if batch.torn else 0)

    def _decode(self, batch: Batch) -> tuple[list[Run], list[tuple[int, str]]]:
        """Runs of consecutive records (decoded into their structs) that this database has
        appliers for, and (line index, reason) for lines that are not valid records.

        Fast path: the whole batch decoded by one msgspec call into the catalogue's structs.
        If any line is not a valid record of a known type, the batch is decoded line by line
        to keep the good ones and say exactly what is wrong with the others."""
        if self.stream != REPLAY:
            try:
                recs = self.batch_decoder.decode(
                    b"[" + batch.raw[:-1].replace(b"\n", b",") + b"]")
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
            else:
                if len(recs) == batch.count:  # else a line held more than one value
                    return _runs_of(recs, self.handled_types), []
        records: list[tuple[int, Any]] = []
        bad: list[tuple[int, str]] = []
        for idx, line in enumerate(batch.lines):
            try:
                rec = self.decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._decode_slow(idx, line, str(exc), records, bad)
                continue
            if type(rec) in self.handled_types:
                records.append((idx, rec))
        return _runs_of([r for _, r in records], self.handled_types,
                        [i for i, _ in records]), bad

    def _decode_slow(self, idx: int, line: bytes, first_error: str,
                     records: list[tuple[int, Any]], bad: list[tuple[int, str]]) -> None:
        """A line the catalogue decoder refused: a record of a type we do not know (not
        ours: passed over), a replayed record, or a bad line (shunted with the reason)."""
        try:
            rec = decode(line)
        except BadRecord as exc:
            bad.append((idx, str(exc)))
            return
        kind = rec["type"]
        if self.stream == REPLAY and kind == "record.replayed":
            inner = rec.get("record")
            if rec.get("consumer") != self.name or not isinstance(inner, dict) \
                    or inner.get("type") not in self.schemas:
                return
            try:
                records.append((idx, msgspec.convert(inner, self.catalogue)))
            except msgspec.ValidationError as exc:
                bad.append((idx, f"replayed record: {exc}"))
            return
        if kind in appliers.known_types():
            bad.append((idx, f"{kind}: {first_error}"))

    def _apply(self, batch: Batch) -> None:
        runs, bad = self._decode(batch)
        positions = batch.positions() if bad or batch.torn else None
        shunts = [(positions[i], reason, batch.lines[i]) for i, reason in bad]  # type: ignore[index]
        if batch.torn:
            shunts.append((batch.start, "torn record: incomplete line at the end of a finished "
                           "segment (writer died or disk filled mid-write)", batch.torn))
        with self.engine.begin() as conn:
            failed: set[int] = set()
            for run in runs:
                for idx, reason in self._apply_run(conn, run):
                    positions = positions or batch.positions()
                    shunts.append((positions[idx], reason, batch.lines[idx]))
                    failed.add(idx)
            for pos, reason, raw in shunts:
                # before the commit: a crash in between re-shunts on restart (a duplicate in
                # the shunt stream), never loses the record
                self.spool.shunt(self.stream, pos, self.name, reason, raw)
            # the newest record actually applied: a shunted record's ts may be what made it
            # fail (PostgreSQL refuses it here too, and the whole batch would fail forever)
            last_ts = next((rec.ts for run in reversed(runs)
                            for idx, rec in zip(reversed(run.lines), reversed(run.records),
                                                strict=True) if idx not in failed), None)
            self._store_position(conn, batch.end, batch.count, last_ts)
        if shunts:
            self.log.warning("shunted records", count=len(shunts), first_reason=shunts[0][1])

    def _apply_run(self, conn: Connection, run: Run) -> list[tuple[int, str]]:
        """Apply one run of same-type records; on failure split it in halves and retry each
        (bisection finds the bad records of a large run quickly); return the records that
        fail on their own, with the reason."""
        fns = self.handlers[type(run.records[0]).__struct_config__.tag]
        try:
            with conn.begin_nested():
                _check_timestamps(list(map(_TS, run.records)))
                for fn in fns:
                    fn(conn, run.records, self.cache)
            return []
        except _BAD_DATA as exc:  # anything else (locked, schema, a bug) escapes: not shunted
            if len(run.records) == 1:
                return [(run.lines[0], _reason(exc))]
        half = len(run.records) // 2
        return (self._apply_run(conn, Run(run.lines[:half], run.records[:half]))
                + self._apply_run(conn, Run(run.lines[half:], run.records[half:])))

    def _store_position(self, conn: Connection, end: Position, count: int,
                        last_ts: str | None) -> None:
        dialect = conn.dialect.name
        row = (self.spool_id, self.stream, self.name, end.segment, end.offset, count,
               db_time(dialect, last_ts) if last_ts else None, db_time(dialect, now_ts()))
        upsert(conn, self.table, _POSITION_COLUMNS, [row],
               keys=("spool_id", "stream", "consumer"), add=("records",),
               replace=("segment", "offset", "updated_at"), greatest=("last_record_ts",))


_POSITION_COLUMNS = ("spool_id", "stream", "consumer", "segment", "offset", "records",
                     "last_record_ts", "updated_at")


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a batch is read, decoded and applied: its
    records and their column lists live until the commit, so each collection the allocations
    set off only walked them again (reference counting still frees everything; what is
    cyclic waits for the next collection). Measured 0.2-0.3 s of ~4 s per worker on
    bench/profiler_ingest.py."""
    if not gc.isenabled():  # someone else's decision: left alone
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Run(NamedTuple):
    """Consecutive records of one type: their line numbers in the batch and the records."""

    lines: Sequence[int]
    records: list[Any]


def _runs_of(recs: list[Any], handled: set[type], lines: list[int] | None = None) -> list[Run]:
    """Split decoded records into runs of one type (order across types is kept), dropping
    the types this database does not handle. `lines` maps each record to its batch line
    (default: record i is line i)."""
    runs: list[Run] = []
    pos = 0
    for cls, group in groupby(recs, key=type):
        items = list(group)
        n = len(items)
        if cls in handled:
            runs.append(Run(range(pos, pos + n) if lines is None else lines[pos:pos + n], items))
        pos += n
    return runs


_TS = attrgetter("ts")
_TS_SHAPE = ((4, "-"), (7, "-"), (10, "T"), (13, ":"), (16, ":"), (19, "."), (26, "Z"))


def _check_timestamps(stamps: list[str]) -> None:
    """Every ts must be spelled YYYY-MM-DDTHH:MM:SS.ffffffZ (appliers compare them as text and
    convert them by slicing) and be a real time: SQLite would store month 13 as text and every
    later read of the column would fail. msgspec already checked the length (27); here the
    separators are checked with strided slices of the joined run and the rest by one C-level
    parse per record: a Python loop or a regular expression cost more than the decoding."""
    joined, n = "".join(stamps), len(stamps)
    if len(joined) != 27 * n or any(joined[i::27] != ch * n for i, ch in _TS_SHAPE):
        bad = next(ts for ts in stamps
                   if len(ts) != 27 or any(ts[i] != ch for i, ch in _TS_SHAPE))
        raise BadRecord(f"ts {bad!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ")
    deque(map(_parse_ts, stamps), maxlen=0)  # raises ValueError for an impossible date


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        return f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0][:500]}"
    return f"{type(exc).__name__}: {exc}"


def all_streams(spool: Spool, only: tuple[str, ...] = ()) -> list[str]:
    """The streams a profiler follows: every stream but the shunt (or just `only`)."""
    names = only or tuple(spool.streams())
    return [n for n in names if n != SHUNT]
