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

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Union

import msgspec
from sqlalchemy import Connection, Engine, Table, select
from sqlalchemy.exc import DBAPIError, OperationalError

from connectd import appliers, log
from connectd.appliers.sql import db_time, upsert
from connectd.db.engine import writer
from connectd.settings import Settings
from connectd.spool import REPLAY, SHUNT, BadRecord, Batch, Position, Spool, decode, now_ts

_TRANSIENT_RETRIES = 5


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
        self.handled = {t.encode() for t in self.handlers}
        if self.stream == REPLAY:
            self.handled.add(b"record.replayed")
        self.union: Any = (Union[tuple(self.schemas.values())]  # noqa: UP007
                           if self.schemas else dict)
        self.decoder = msgspec.json.Decoder(self.union)
        self.cache: dict[str, Any] = {}
        self.records = 0
        self.log = log.get(daemon="profiler", stream=stream, consumer=name)
        self.reader = spool.reader(stream, self._stored_position())

    def _stored_position(self) -> Position:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(select(t.c.segment, t.c.offset, t.c.records).where(
                t.c.spool_id == self.spool_id, t.c.stream == self.stream,
                t.c.consumer == self.name)).first()
        if row is None:
            return Position(0, 0)
        self.records = row.records
        return Position(row.segment, row.offset)

    def close(self) -> None:
        self.reader.close()

    def poll(self) -> int:
        """Apply the next batch, if any; returns the number of lines consumed."""
        start = self.reader.position
        batch = self.reader.read(self.batch_size)
        if batch is None:
            return 0
        for attempt in range(_TRANSIENT_RETRIES + 1):
            try:
                self._apply(batch)
                break
            except OperationalError as exc:  # database locked/unreachable: retry the batch
                if attempt == _TRANSIENT_RETRIES:
                    self.reader.position = start  # not consumed: read it again next time
                    raise
                self.log.warning("database busy, retrying batch", error=str(exc.orig)[:200],
                                 attempt=attempt + 1)
                time.sleep(0.2 * 2 ** attempt)
        return len(batch) + (1 if batch.torn else 0)

    def _decode(self, batch: Batch) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
        """(index, record struct) for the lines this database has appliers for, and
        (index, reason) for lines that are not valid records. Lines of other types are
        passed over without being decoded (their type is read from the raw line)."""
        records: list[tuple[int, Any]] = []
        bad: list[tuple[int, str]] = []
        handled, decode_one = self.handled, self.decoder.decode
        for idx, line in enumerate(batch.lines):
            kind = _type_of(line)
            if kind is not None and kind not in handled:
                continue
            try:
                records.append((idx, decode_one(line)))
                continue
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                first_error = str(exc)
            # slow path: say exactly what is wrong, or find it is not ours after all
            try:
                rec = decode(line)
            except BadRecord as exc:
                bad.append((idx, str(exc)))
                continue
            if self.stream == REPLAY and rec.get("type") == "record.replayed":
                inner = rec.get("record")
                if rec.get("consumer") != self.name or not isinstance(inner, dict) \
                        or inner.get("type") not in self.schemas:
                    continue
                try:
                    records.append((idx, msgspec.convert(inner, self.union)))
                except msgspec.ValidationError as exc:
                    bad.append((idx, f"replayed record: {exc}"))
                continue
            if rec["type"] in self.schemas:
                bad.append((idx, f"{rec['type']}: {first_error}"))
        return records, bad

    def _apply(self, batch: Batch) -> None:
        records, bad = self._decode(batch)
        positions = batch.positions() if bad or batch.torn else None
        shunts = [(positions[i], reason, batch.lines[i]) for i, reason in bad]  # type: ignore[index]
        if batch.torn:
            shunts.append((batch.start, "torn record: incomplete line at the end of a finished "
                           "segment (writer died or disk filled mid-write)", batch.torn))
        with self.engine.begin() as conn:
            for run in _runs(records):
                for idx, reason in self._apply_run(conn, run):
                    positions = positions or batch.positions()
                    shunts.append((positions[idx], reason, batch.lines[idx]))
            for pos, reason, raw in shunts:
                # before the commit: a crash in between re-shunts on restart (a duplicate in
                # the shunt stream), never loses the record
                self.spool.shunt(self.stream, pos, self.name, reason, raw)
            last_ts = records[-1][1].ts if records else None
            self._store_position(conn, batch.end, len(batch.lines), last_ts)
        self.records += len(batch.lines)
        if shunts:
            self.log.warning("shunted records", count=len(shunts), first_reason=shunts[0][1])

    def _apply_run(self, conn: Connection, run: list[tuple[int, Any]]) -> list[tuple[int, str]]:
        """Apply one run of same-type records; on failure split it in halves and retry each
        (bisection finds the bad records of a large run quickly); return the records that
        fail on their own, with the reason."""
        fns = self.handlers[type(run[0][1]).__struct_config__.tag]
        try:
            with conn.begin_nested():
                recs = [rec for _, rec in run]
                for fn in fns:
                    fn(conn, recs, self.cache)
            return []
        except (DBAPIError, BadRecord, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, OperationalError):
                raise  # transient (locked, connection lost): the whole batch is retried
            if len(run) == 1:
                return [(run[0][0], _reason(exc))]
        half = len(run) // 2
        return self._apply_run(conn, run[:half]) + self._apply_run(conn, run[half:])

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


def _runs(records: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
    """Consecutive records of the same type, in order (order across types is kept)."""
    runs: list[list[tuple[int, Any]]] = []
    for item in records:
        if runs and type(runs[-1][0][1]) is type(item[1]):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _type_of(line: bytes) -> bytes | None:
    """The `type` of a raw record line as our writers spell it ("type":"x"), or None if not
    found that way (then the line is fully decoded to find out)."""
    i = line.find(b'"type":"')
    if i < 0:
        return None
    j = line.find(b'"', i + 8)
    return line[i + 8:j] if j > 0 else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        return f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0][:500]}"
    return f"{type(exc).__name__}: {exc}"


def all_streams(spool: Spool, only: tuple[str, ...] = ()) -> list[str]:
    """The streams a profiler follows: every stream but the shunt (or just `only`)."""
    names = only or tuple(spool.streams())
    return [n for n in names if n != SHUNT]
