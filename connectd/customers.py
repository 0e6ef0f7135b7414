"""`connectd customers import|export`: CSV files <-> the customer DB (customers, attribute_defs).

import: a CSV file (header row; an `email` column found case-insensitively, any attribute
  columns) -> customers upserted by lower-cased email, new attribute types in attribute_defs,
  one `line N: reason` per bad row (skipped), a summary. It streams: records are read, checked
  and written `--batch-size` at a time, one transaction per batch, so memory stays flat and a
  killed import keeps every committed batch; re-running the same file is harmless.
export: customers -> CSV (email, then every attribute of attribute_defs sorted by name, each
  header cell "name:type"; an absent attribute is an empty cell).

Rules a user can rely on (also in `connectd customers import --help`):
- Attribute types: `--type NAME=TYPE` or a header suffix `age:integer` declares one; else the
  attribute's existing definition wins; else it is inferred from the first `--infer-rows`
  records (connectd.core.attributes.infer_type). A declared type that contradicts an existing
  definition stops the import before it writes anything.
- An empty cell means "no value in this file": the attribute is not stored for a new customer
  and an existing customer keeps its current value. Values given override stored ones; stored
  attributes the file does not mention are kept.
- A row is bad, reported and skipped when it has bytes that are not UTF-8, the wrong number of
  fields, no email, an implausible email (syntax only, no DNS), or a value that is not of its
  attribute's type. Line numbers are physical lines of the file; a record whose quoted field
  spans lines is reported by the line it starts on.
- The same email twice in the file (in any case): the later row wins, merged onto the earlier
  one as if imported one after the other, and counts as a duplicate, not as an update.
- Exit status: 0 when the import ran, even with bad rows (1 with --strict); 66 when the file
  cannot be opened, 65 when its header is unusable (no email column, bad attribute names, a type
  conflict), 1 when the database is not initialised.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import click
import orjson
from sqlalchemy import Connection, Engine, inspect, select
from sqlalchemy.dialects import postgresql, sqlite

from connectd import log
from connectd.core import attributes as attrs
from connectd.db.customer import AttributeDef, Customer
from connectd.db.engine import writer as write_engine

EX_DATAERR = 65  # sysexits.h: the input data was incorrect (header)
EX_NOINPUT = 66  # sysexits.h: an input file did not exist or was not readable

# Lone surrogates are what undecodable bytes become under errors="surrogateescape".
_SURROGATE = re.compile("[\udc80-\udcff]")
# How many keys go into one `email_key IN (...)`: well under SQLite's 32766 host parameters.
_IN_LIST_MAX = 5000


class ImportFailed(Exception):
    """The file as a whole cannot be imported (no email column, bad header, type conflict)."""

    def __init__(self, message: str, exit_code: int = EX_DATAERR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class BadRow:
    """One skipped record: the physical line it starts on, why, and its fields as CSV text."""

    line: int
    reason: str
    raw: str


@dataclass
class ImportSummary:
    """What an import did. rows = inserted + updated + duplicates + bad."""

    file: str
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    bad: int = 0
    duplicates: int = 0
    elapsed: float = 0.0
    types: dict[str, str] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "elapsed": round(self.elapsed, 3),
                "rows_per_s": round(self.rows_per_s, 1)}


@dataclass(frozen=True)
class Column:
    """An attribute column of the file: its field index, attribute name and resolved type."""

    index: int
    name: str
    type: str


@dataclass(frozen=True)
class Header:
    """Where the email is and which attribute each other column is (type declared or None)."""

    width: int
    email_index: int
    attributes: tuple[tuple[int, str, str | None], ...]


# ---------------------------------------------------------------------------- reading the file


def read_records(reader: Any) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """csv.reader -> (start line, fields, None) per record, or (line, None, reason) for a
    record the csv module rejects. Blank lines are skipped; line numbers are physical lines."""
    consumed = 0
    while True:
        start = consumed + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            consumed = reader.line_num
            yield start, None, f"unreadable CSV: {exc}"
            continue
        consumed = reader.line_num
        if fields:
            yield start, fields, None


def parse_header(fields: list[str], declared: dict[str, str]) -> Header:
    """Header fields -> Header; ImportFailed when there is no email column or a name is bad."""
    if _SURROGATE.search("".join(fields)):
        raise ImportFailed("header row: bytes that are not UTF-8")
    email_index: int | None = None
    seen: dict[str, str] = {}
    columns: list[tuple[int, str, str | None]] = []
    for index, cell in enumerate(fields):
        try:
            name, type_ = attrs.parse_header_cell(cell)
        except attrs.BadAttribute as exc:
            raise ImportFailed(f"header: {exc}") from None
        if name in seen:
            raise ImportFailed(f"header: columns {seen[name]!r} and {cell!r} are both "
                               f"attribute {name!r}")
        seen[name] = cell
        if name == "email":
            email_index = index
            continue
        if name in declared and type_ and declared[name] != type_:
            raise ImportFailed(f"column {cell!r}: --type {name}={declared[name]} contradicts "
                               f"the header's type")
        columns.append((index, name, declared.get(name, type_)))
    if email_index is None:
        raise ImportFailed("no email column in the header (looked for 'email' in any case)")
    unknown = sorted(set(declared) - set(seen))
    if unknown:
        raise ImportFailed(f"--type names columns the file does not have: {', '.join(unknown)}")
    return Header(len(fields), email_index, tuple(columns))


def resolve_types(header: Header, existing: dict[str, str],
                  samples: list[list[str]]) -> tuple[list[Column], dict[str, str]]:
    """Declared, else existing, else inferred from `samples` -> (columns, new definitions)."""
    columns: list[Column] = []
    new: dict[str, str] = {}
    for index, name, declared in header.attributes:
        old = existing.get(name)
        if declared and old and declared != old:
            raise ImportFailed(f"attribute {name!r} is already {old}; cannot import it as "
                               f"{declared}")
        type_ = declared or old or attrs.infer_type(
            row[index] for row in samples if len(row) == header.width)
        if old is None:
            new[name] = type_
        columns.append(Column(index, name, type_))
    return columns, new


class RowChecker:
    """Fields of one record -> (email, email_key, attributes), or BadRow.reason via ValueError."""

    def __init__(self, header: Header, columns: list[Column]) -> None:
        self.width = header.width
        self.email_index = header.email_index
        self.columns = [(c.index, c.name, attrs.parser_for(c.type)) for c in columns]

    def check(self, fields: list[str]) -> tuple[str, str, dict[str, object]]:
        # isascii() is a C-speed scan: only text with non-ASCII can hold undecodable bytes.
        joined = "".join(fields)
        if not joined.isascii() and _SURROGATE.search(joined):
            bad = next(i for i, f in enumerate(fields) if _SURROGATE.search(f))
            raise ValueError(f"bytes that are not UTF-8 in field {bad + 1}")
        if len(fields) != self.width:
            raise ValueError(f"expected {self.width} fields, got {len(fields)}")
        email = fields[self.email_index].strip()
        if not email:
            raise ValueError("missing email")
        if not attrs.is_plausible_email(email):
            raise ValueError(f"invalid email address {email!r}")
        values: dict[str, object] = {}
        for index, name, parse in self.columns:
            text = fields[index].strip()
            if not text:
                continue  # empty cell: attribute absent, an existing value is kept
            try:
                values[name] = parse(text)
            except attrs.BadAttribute as exc:
                raise ValueError(f"{name}: {exc}") from None
        return email, attrs.email_key(email), values


def raw_text(fields: list[str]) -> str:
    """A record's fields back as one CSV line, undecodable bytes shown as \\xNN escapes."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue().encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------- writing batches


class Writer:
    """Upserts batches of customers with one driver-level executemany per batch.

    The driver is called directly (exec_driver_sql) because SQLAlchemy's per-row parameter
    processing dominated the batch time; the JSON is serialised once with orjson, and the merge
    of attributes happens in the database (json_patch on SQLite, jsonb || on PostgreSQL) so a
    concurrent writer of the same customer can never be overwritten by a stale read."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        self.dialect = dialect.name
        ph = "?" if dialect.paramstyle == "qmark" else "%s"
        json_ph, merge = (f"{ph}::jsonb", "customers.attributes || excluded.attributes") \
            if self.dialect == "postgresql" else (ph, "json_patch(customers.attributes, "
                                                      "excluded.attributes)")
        self.upsert_sql = (
            "INSERT INTO customers (email, email_key, attributes, created_at, updated_at) "
            f"VALUES ({ph}, {ph}, {json_ph}, {ph}, {ph}) "
            "ON CONFLICT (email_key) DO UPDATE SET email = excluded.email, "
            f"attributes = {merge}, updated_at = excluded.updated_at")
        # Timestamps go through SQLAlchemy's own bind processor so the ORM reads them back.
        ts_type = Customer.__table__.c.updated_at.type.dialect_impl(dialect)
        self.ts = ts_type.bind_processor(dialect) or (lambda v: v)

    def existing(self, conn: Connection, keys: list[str],
                 since: datetime) -> dict[str, bool]:
        """email_key -> "written by this import already" for the keys that exist."""
        # Plain SQL: an expanding IN through the compiler cost more than the query itself.
        found: dict[str, bool] = {}
        for i in range(0, len(keys), _IN_LIST_MAX):
            part = keys[i:i + _IN_LIST_MAX]
            if self.dialect == "postgresql":
                rows = conn.exec_driver_sql(
                    "SELECT email_key, updated_at >= %s FROM customers "
                    "WHERE email_key = ANY(%s)", (self.ts(since), part))
            else:
                rows = conn.exec_driver_sql(
                    "SELECT email_key, updated_at >= ? FROM customers WHERE email_key IN "
                    f"({', '.join('?' * len(part))})", (self.ts(since), *part))
            found.update((k, bool(mine)) for k, mine in rows)
        return found

    def upsert(self, conn: Connection, batch: dict[str, tuple[str, dict[str, object]]],
               now: datetime) -> None:
        ts = self.ts(now)
        rows = [(email, key, orjson.dumps(values).decode(), ts, ts)
                for key, (email, values) in batch.items()]
        conn.exec_driver_sql(self.upsert_sql, rows)


def load_definitions(conn: Connection) -> dict[str, str]:
    """attribute_defs as name -> type."""
    return dict(conn.execute(select(AttributeDef.name, AttributeDef.type)).all())


def store_definitions(conn: Connection, new: dict[str, str], now: datetime) -> dict[str, str]:
    """Insert new attribute definitions (a concurrent import's own win) -> all definitions."""
    if new:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        stmt = insert(AttributeDef).on_conflict_do_nothing(index_elements=["name"])
        conn.execute(stmt, [{"name": n, "type": t, "created_at": now} for n, t in new.items()])
    return load_definitions(conn)


# ---------------------------------------------------------------------------- the import


ProgressFn = Callable[[int, int], None]  # (bytes read, records read)


def import_csv(engine: Engine, source: IO[bytes], *, name: str = "-",
               declared: dict[str, str] | None = None, batch_size: int = 10_000,
               infer_rows: int = 1000, on_bad: Callable[[BadRow], None] = lambda _b: None,
               progress: ProgressFn = lambda _n, _r: None) -> ImportSummary:
    """Stream the CSV bytes of `source` into the customer DB (see the module notes).

    Raises ImportFailed before writing any customer when the header is unusable."""
    started, t0 = datetime.now(UTC), time.monotonic()
    summary = ImportSummary(file=name)
    # utf-8-sig drops a BOM; surrogateescape turns bad bytes into lone surrogates that
    # RowChecker reports per record, instead of an exception that would end the import.
    text = io.TextIOWrapper(source, encoding="utf-8-sig", errors="surrogateescape",
                            newline="")
    records = read_records(csv.reader(text))
    header_fields = _first_header(records)
    header = parse_header(header_fields, declared or {})

    # Sample the first records for type inference; they are processed after, in order.
    sample = [rec for _, rec in zip(range(infer_rows), records, strict=False)]
    with write_engine(engine).begin() as conn:
        existing = load_definitions(conn)
        columns, new = resolve_types(header, existing,
                                     [f for _, f, _ in sample if f is not None])
        # Committed before any customer, so every stored value has its definition.
        stored = store_definitions(conn, new, started)
    for col in columns:
        if stored.get(col.name) != col.type:
            raise ImportFailed(f"attribute {col.name!r} was defined as {stored.get(col.name)} "
                               f"by someone else meanwhile; run the import again")
    summary.types = {c.name: c.type for c in columns}

    checker, writer = RowChecker(header, columns), Writer(engine)
    batch: dict[str, tuple[str, dict[str, object]]] = {}
    for line, fields, error in _chain(sample, records):
        summary.rows += 1
        try:
            if fields is None:
                raise ValueError(error)
            email, key, values = checker.check(fields)
        except ValueError as exc:
            summary.bad += 1
            on_bad(BadRow(line, str(exc), raw_text(fields) if fields is not None else ""))
            continue
        earlier = batch.get(key)
        if earlier is not None:
            summary.duplicates += 1
            values = {**earlier[1], **values}  # later row wins, merged as if imported after
        batch[key] = (email, values)
        if len(batch) >= batch_size:
            _flush(engine, writer, batch, started, summary)
            batch = {}
            progress(source.tell() if source.seekable() else 0, summary.rows)
    if batch:
        _flush(engine, writer, batch, started, summary)
    progress(source.tell() if source.seekable() else 0, summary.rows)
    text.detach()  # the caller owns `source`
    summary.elapsed = time.monotonic() - t0
    return summary


def _first_header(records: Iterator[tuple[int, list[str] | None, str | None]]) -> list[str]:
    for line, fields, error in records:
        if fields is None:
            raise ImportFailed(f"line {line}: header: {error}")
        return fields
    raise ImportFailed("the file is empty (no header row)")


def _chain(first: Iterable[Any], rest: Iterable[Any]) -> Iterator[Any]:
    yield from first
    yield from rest


def _flush(engine: Engine, writer: Writer, batch: dict[str, tuple[str, dict[str, object]]],
           started: datetime, summary: ImportSummary) -> None:
    """One transaction: count what exists, then upsert the whole batch."""
    # BEGIN IMMEDIATE on SQLite: this transaction reads, then writes (see db.engine.writer).
    with write_engine(engine).begin() as conn:
        found = writer.existing(conn, list(batch), started)
        writer.upsert(conn, batch, datetime.now(UTC))
    mine = sum(found.values())
    summary.duplicates += mine
    summary.updated += len(found) - mine
    summary.inserted += len(batch) - len(found)


# ---------------------------------------------------------------------------- export


def export_csv(engine: Engine, out: IO[str], batch_size: int = 5000) -> int:
    """Write every customer as CSV (email, then "name:type" of attribute_defs, sorted by name)
    -> rows written. Reads in server-side batches of `batch_size`."""
    with engine.connect() as conn:
        types = load_definitions(conn)
        names = sorted(types)
        writer = csv.writer(out, lineterminator="\n")
        # "age:integer": the header carries the types, so the file imports back unchanged
        # even into a database that has never seen these attributes.
        writer.writerow(["email", *(f"{n}:{types[n]}" for n in names)])
        result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
            select(Customer.email, Customer.attributes).order_by(Customer.id))
        count = 0
        for email, values in result:
            writer.writerow([email, *(attrs.format_value(values.get(n)) for n in names)])
            count += 1
    return count


# ---------------------------------------------------------------------------- the commands


@click.group("customers")
def customers_group() -> None:
    """Import and export customers."""


def _engine() -> Engine:
    """The customer DB engine, after checking it has been created."""
    from connectd.db.engine import make_engine

    settings = click.get_current_context().obj.settings  # connectd.cli.Context
    engine = make_engine(settings.database.customer_url)
    if not inspect(engine).has_table("customers"):
        raise click.ClickException(
            f"the customer database at {engine.url!r} has no customers table; run `connectd init`")
    return engine


class _Progress:
    """A progress bar on a terminal; else a line on stderr at most every `interval` seconds."""

    def __init__(self, total: int, interval: float = 5.0) -> None:
        self.tty = sys.stderr.isatty()
        self.total, self.interval = total, interval
        self.t0 = self.last = time.monotonic()
        self.done = 0
        self.bar = None
        if self.tty and total > 0:
            self.bar = click.progressbar(length=total, label="importing", file=sys.stderr)
            self.bar.__enter__()

    def __call__(self, nbytes: int, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(max(0, nbytes - self.done))
            self.done = max(self.done, nbytes)
            return
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        pct = f"{100 * nbytes / self.total:.0f}% " if self.total else ""
        click.echo(f"importing: {pct}{rows} rows, {rows / (now - self.t0):.0f} rows/s", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class _BadRows:
    """Reports bad rows: the first `shown` on stderr, all of them to the --errors CSV."""

    def __init__(self, errors: IO[str] | None, shown: int = 100) -> None:
        self.writer = csv.writer(errors, lineterminator="\n") if errors else None
        if self.writer:
            self.writer.writerow(["line", "reason", "raw"])
        self.shown, self.count = shown, 0

    def __call__(self, bad: BadRow) -> None:
        self.count += 1
        if self.count <= self.shown:
            click.echo(f"line {bad.line}: {bad.reason}", err=True)
        elif self.count == self.shown + 1:
            click.echo(f"(more bad rows not shown{'; see the --errors file' if self.writer else ''})",
                       err=True)
        if self.writer:
            self.writer.writerow([bad.line, bad.reason, bad.raw])


def _open_source(path: str) -> tuple[IO[bytes], int]:
    if path == "-":
        return sys.stdin.buffer, 0
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        click.echo(f"connectd: cannot open {path}: {exc.strerror}", err=True)
        sys.exit(EX_NOINPUT)
    return fh, os.fstat(fh.fileno()).st_size


@customers_group.command("import")
@click.argument("file", metavar="FILE.csv")
@click.option("--type", "types", multiple=True, metavar="NAME=TYPE",
              help="Declare an attribute's type: string, integer, number, boolean, date, "
                   "datetime (repeatable). A header cell 'age:integer' does the same.")
@click.option("--errors", "errors_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every bad row (line, reason, raw) to this CSV file.")
@click.option("--strict", is_flag=True,
              help="Exit 1 if any row was bad (the good rows are still imported).")
@click.option("--batch-size", default=10_000, show_default=True, type=click.IntRange(1),
              help="Rows per transaction; a killed import keeps every committed batch.")
@click.option("--infer-rows", default=1000, show_default=True, type=click.IntRange(1),
              help="Records sampled to infer the types of new attributes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def import_command(file: str, types: tuple[str, ...], errors_path: Path | None, strict: bool,
                   batch_size: int, infer_rows: int, as_json: bool) -> None:
    """Import customers from FILE.csv ('-' for stdin), upserting by email.

    The header row names an `email` column (any case) and attribute columns. A bad row is
    reported as `line N: reason` on stderr and skipped; every good row is kept. Empty cells
    leave an attribute unset (existing values are kept). Ends with a summary on stdout.
    """
    try:
        declared = dict(attrs.parse_declaration(t) for t in types)
    except attrs.BadAttribute as exc:
        raise click.BadParameter(str(exc), param_hint="--type") from None
    engine = _engine()
    source, size = _open_source(file)
    errors_fh = open(errors_path, "w", encoding="utf-8", newline="") if errors_path else None  # noqa: SIM115
    bad_rows, progress = _BadRows(errors_fh), _Progress(size)
    try:
        summary = import_csv(engine, source, name=file, declared=declared,
                             batch_size=batch_size, infer_rows=infer_rows, on_bad=bad_rows,
                             progress=progress)
    except ImportFailed as exc:
        progress.close()  # end the bar's line before the message
        click.echo(f"connectd: {file}: {exc}", err=True)
        sys.exit(exc.exit_code)
    finally:
        progress.close()
        if errors_fh:
            errors_fh.close()
        if source is not sys.stdin.buffer:
            source.close()
        engine.dispose()
    log.get().info("customers.imported", **summary.as_dict())
    if as_json:
        click.echo(orjson.dumps(summary.as_dict()).decode())
    else:
        click.echo(f"{file}: {summary.rows} rows read, {summary.inserted} inserted, "
                   f"{summary.updated} updated, {summary.bad} bad, {summary.duplicates} "
                   f"duplicates in {summary.elapsed:.1f} s ({summary.rows_per_s:.0f} rows/s)")
    if strict and summary.bad:
        sys.exit(1)


@customers_group.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1),
              help="Rows fetched from the database at a time.")
def export_command(file: Path | None, batch_size: int) -> None:
    """Write every customer as CSV to FILE (default stdout): email, then each attribute.

    Attribute columns are every name in attribute_defs, sorted, headed "name:type"; the output
    imports back unchanged. FILE is written under a temporary name and renamed when complete.
    """
    engine = _engine()
    try:
        if file is None:
            count = export_csv(engine, sys.stdout, batch_size)
        else:
            tmp = file.with_name(f".{file.name}.tmp")
            with open(tmp, "w", encoding="utf-8", newline="") as out:
                count = export_csv(engine, out, batch_size)
                out.flush()
                os.fsync(out.fileno())  # the rename must never expose a half-written file
            os.replace(tmp, file)
    finally:
        engine.dispose()
    log.get().info("customers.exported", rows=count, file=str(file or "-"))
