"""Conversations (opt-in topics), who is subscribed to them, and suppression lists.

Inputs: names and descriptions (create), CSV files of subscribers (an `email` or a
`customer_id` column) and files of suppressed addresses/domains. Outputs: rows in
conversations, subscriptions, suppression_lists and suppression_entries; summaries; and the
commands `connectd conversation create|list`, `connectd subscribe import`,
`connectd suppression import|list`.

Subscriber import (streams like `connectd customers import`, one transaction per batch):
- The header names an `email` column or a `customer_id` (or `id`) column, any case; other
  columns are ignored. A file without a header whose first cell is an address is read as one
  address per line.
- A row is bad, reported as `line N: reason` and skipped when its address is implausible, its
  id is not an integer, or no customer has that address or id. Every good row is imported.
- Per batch: one query resolves the keys to customer ids, one reads the current statuses, one
  executemany upserts the changes: set-based, so a million rows take seconds, not hours.
- An import never re-subscribes a customer who opted out or bounced out (their own choice or
  the mail system's verdict beats a list someone uploads) unless `force` is given; those rows
  are counted as `kept`. Importing with status opted_out always applies. The same holds for a
  customer whose address hard-bounced out or who complained (customer_stats) before the
  conversation existed: they have no row in it, and an import does not give them one.

Suppression import: one value per line (or the first field of a CSV record); blank lines and
`#` comments are skipped, as is a header cell named email/address/domain/value. Values are
stored lower-cased. "@example.com" or a bare "example.com" is a domain entry (the whole
domain, not its subdomains: preparation compares the part after "@"); anything else with an
"@" is an address entry. The list is created on first use.
"""

from __future__ import annotations

import csv
import io
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import IO, Any

import click
import orjson
from sqlalchemy import Connection, Engine, func, insert, inspect, select
from sqlalchemy.dialects import postgresql, sqlite

from connectd import log
from connectd.core import attributes as attrs
from connectd.customers import BadRow, raw_text, read_records
from connectd.db.customer import (
    SUBSCRIPTION_STATUSES,
    Conversation,
    Subscription,
    SuppressionEntry,
    SuppressionList,
)
from connectd.db.engine import writer as write_engine

IMPORT_STATUSES = ("active", "opting_in", "opted_out")
# statuses an import does not overwrite (unless forced): the customer's or the MTA's word
PROTECTED = ("opted_out", "bounced_out")
EX_NOINPUT = 66  # sysexits.h: an input file did not exist or was not readable
_IN_LIST_MAX = 5000  # keys per IN (...): well under SQLite's 32766 host parameters
_SURROGATE = re.compile("[\udc80-\udcff]")
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}")
_SUPPRESSION_HEADERS = {"email", "e-mail", "address", "domain", "value"}


class ConversationError(Exception):
    """A request that cannot be done (unknown conversation, a name taken, a bad file)."""


# ---------------------------------------------------------------------------- conversations


def create_conversation(conn: Connection, name: str, description: str = "",
                        now: datetime | None = None) -> int:
    """Insert a conversation -> its id; ConversationError if the name is taken or empty."""
    name = name.strip()
    if not name:
        raise ConversationError("a conversation needs a name")
    if conversation_id(conn, name, missing_ok=True) is not None:
        raise ConversationError(f"conversation {name!r} already exists")
    return conn.execute(insert(Conversation).values(
        name=name, description=description, created_at=now or datetime.now(UTC))
        .returning(Conversation.id)).scalar_one()


def conversation_id(conn: Connection, name: str, missing_ok: bool = False) -> int | None:
    """The id of conversation `name`; ConversationError (or None) when there is none."""
    found = conn.execute(select(Conversation.id).where(Conversation.name == name)).scalar()
    if found is None and not missing_ok:
        known = conn.execute(select(Conversation.name).order_by(Conversation.name)).scalars().all()
        hint = f" (known: {', '.join(known)})" if known else " (none exist yet: " \
            "`connectd conversation create NAME`)"
        raise ConversationError(f"no conversation {name!r}{hint}")
    return found


def list_conversations(conn: Connection) -> list[dict[str, Any]]:
    """Every conversation with its subscriber count per status (all statuses, 0 included)."""
    counts: dict[int, dict[str, int]] = {}
    for conv, status, n in conn.execute(
            select(Subscription.conversation_id, Subscription.status, func.count())
            .group_by(Subscription.conversation_id, Subscription.status)):
        counts.setdefault(conv, {})[status] = int(n)
    rows = []
    for conv in conn.execute(select(Conversation).order_by(Conversation.name)):
        mine = counts.get(conv.id, {})
        rows.append({"name": conv.name, "description": conv.description,
                     "subscribers": {s: mine.get(s, 0) for s in SUBSCRIPTION_STATUSES},
                     "created_at": conv.created_at.isoformat()})
    return rows


# ---------------------------------------------------------------------------- subscribers


@dataclass
class SubscribeSummary:
    """What a subscriber import did. rows = inserted + updated + unchanged + kept + bad +
    duplicates."""

    file: str
    conversation: str
    status: str
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    kept: int = 0  # opted out / bounced out before: not re-subscribed
    bad: int = 0
    duplicates: int = 0
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "elapsed": round(self.elapsed, 3)}


@dataclass(frozen=True)
class _KeyColumn:
    index: int
    kind: str  # "email" or "id"
    has_header: bool


def _key_column(fields: list[str]) -> _KeyColumn:
    names = [c.strip().lower() for c in fields]
    if "email" in names:
        return _KeyColumn(names.index("email"), "email", True)
    for candidate in ("customer_id", "id"):
        if candidate in names:
            return _KeyColumn(names.index(candidate), "id", True)
    if len(fields) == 1 and "@" in fields[0]:
        return _KeyColumn(0, "email", False)  # no header: a plain list of addresses
    raise ConversationError("no email or customer_id column in the header "
                            f"(found: {', '.join(repr(c) for c in fields)})")


def _parse_key(fields: list[str], column: _KeyColumn) -> str | int:
    """A record's key (email_key or customer id); ValueError with the reason when bad."""
    joined = "".join(fields)
    if not joined.isascii() and _SURROGATE.search(joined):
        raise ValueError("bytes that are not UTF-8")
    if column.index >= len(fields):
        raise ValueError(f"no field {column.index + 1} (the record has {len(fields)})")
    value = fields[column.index].strip()
    if not value:
        raise ValueError(f"missing {'email' if column.kind == 'email' else 'customer_id'}")
    if column.kind == "id":
        if not value.isdigit():
            raise ValueError(f"customer_id is not a positive integer: {value!r}")
        return int(value)
    if not attrs.is_plausible_email(value):
        raise ValueError(f"invalid email address {value!r}")
    return attrs.email_key(value)


class _SubscriptionWriter:
    """Resolves keys to customers and upserts subscriptions with driver-level executemany
    (SQLAlchemy's per-row processing would dominate a million-row import)."""

    def __init__(self, engine: Engine, conversation: int, status: str, force: bool) -> None:
        dialect = engine.dialect
        self.pg = dialect.name == "postgresql"
        self.ph = "%s" if self.pg else "?"
        self.conversation, self.status, self.force = conversation, status, force
        ph = self.ph
        # the WHERE re-checks protection in the database, so a customer who opts out while
        # the import runs is not re-subscribed by a status read a moment earlier
        guard = "" if force or status == "opted_out" else \
            " WHERE subscriptions.status NOT IN ('opted_out', 'bounced_out')"
        # PostgreSQL: one INSERT ... SELECT FROM unnest(ids) per batch (an executemany was
        # 14,000 rows/s there); SQLite: executemany, which is a C loop over one statement
        rows = f"SELECT u, {ph}, {ph}, {ph}, 'import' FROM unnest({ph}::bigint[]) AS u" \
            if self.pg else f"VALUES ({ph}, {ph}, {ph}, {ph}, 'import')"
        self.upsert_sql = (
            "INSERT INTO subscriptions (customer_id, conversation_id, status, changed_at, source)"
            f" {rows} ON CONFLICT (customer_id, conversation_id) DO UPDATE SET status = "
            f"excluded.status, changed_at = excluded.changed_at, source = excluded.source{guard}")
        ts_type = Subscription.__table__.c.changed_at.type.dialect_impl(dialect)
        self.ts = ts_type.bind_processor(dialect) or (lambda v: v)

    def _in(self, conn: Connection, sql: str, keys: list[Any], *before: Any) -> list[Any]:
        """Rows of `sql` (ending in "... column") for keys, chunked: `IN (...)` or `= ANY`."""
        rows: list[Any] = []
        # typed array: psycopg would send Python ints as numeric[], and bigint = numeric
        # cannot use the index (a sequential scan per batch: quadratic)
        array = "%s::bigint[]" if keys and isinstance(keys[0], int) else "%s::text[]"
        for i in range(0, len(keys), _IN_LIST_MAX):
            part = keys[i:i + _IN_LIST_MAX]
            if self.pg:
                rows += conn.exec_driver_sql(f"{sql} = ANY({array})", (*before, part)).all()
            else:
                marks = ", ".join("?" * len(part))
                rows += conn.exec_driver_sql(f"{sql} IN ({marks})", (*before, *part)).all()
        return rows

    def customers(self, conn: Connection, keys: list[Any], kind: str) -> dict[Any, int]:
        """key -> customer id for the keys that name a customer."""
        column = "email_key" if kind == "email" else "id"
        return dict(self._in(conn, f"SELECT {column}, id FROM customers WHERE {column}", keys))

    def statuses(self, conn: Connection, ids: list[int]) -> dict[int, str]:
        return dict(self._in(conn, "SELECT customer_id, status FROM subscriptions WHERE "
                             f"conversation_id = {self.ph} AND customer_id", ids,
                             self.conversation))

    def barred(self, conn: Connection, ids: list[int]) -> set[int]:
        """Customers whose address hard-bounced out or who complained (the inbound appliers
        mark them on customer_stats): bounced-out and opted-out in every conversation that
        existed then, and never subscribed by an import into one made later."""
        return {cid for (cid,) in self._in(
            conn, "SELECT customer_id FROM customer_stats WHERE (bounced_out_at IS NOT NULL "
            "OR last_complaint_at IS NOT NULL) AND customer_id", ids)}

    def upsert(self, conn: Connection, ids: list[int], now: datetime) -> None:
        ts = self.ts(now)
        if self.pg:
            conn.exec_driver_sql(self.upsert_sql, (self.conversation, self.status, ts, ids))
            return
        conn.exec_driver_sql(self.upsert_sql,
                             [(cid, self.conversation, self.status, ts) for cid in ids])


def import_subscriptions(engine: Engine, source: IO[bytes], conversation: str, status: str,
                         *, name: str = "-", force: bool = False, batch_size: int = 10_000,
                         on_bad: Callable[[BadRow], None] = lambda _b: None) -> SubscribeSummary:
    """Stream a CSV of subscribers into `conversation` with `status` (module notes).
    ConversationError for an unknown conversation, a bad status or an unusable header."""
    if status not in IMPORT_STATUSES:
        raise ConversationError(f"status {status!r} is not one of {', '.join(IMPORT_STATUSES)}")
    t0 = time.monotonic()
    with engine.connect() as conn:
        conv = conversation_id(conn, conversation)
    assert conv is not None
    summary = SubscribeSummary(file=name, conversation=conversation, status=status)
    text = io.TextIOWrapper(source, encoding="utf-8-sig", errors="surrogateescape", newline="")
    records = read_records(csv.reader(text))
    first = next(records, None)
    if first is None:
        raise ConversationError("the file is empty")
    line, fields, error = first
    if fields is None:
        raise ConversationError(f"line {line}: header: {error}")
    column = _key_column(fields)
    if not column.has_header:
        records = _prepend(first, records)
    writer = _SubscriptionWriter(engine, conv, status, force)
    batch: dict[Any, int] = {}  # key -> line (the later line wins)
    bad: list[BadRow] = []
    for line, fields, error in records:
        summary.rows += 1
        try:
            if fields is None:
                raise ValueError(error)
            key = _parse_key(fields, column)
        except ValueError as exc:
            bad.append(BadRow(line, str(exc), raw_text(fields) if fields is not None else ""))
            continue
        if key in batch:
            summary.duplicates += 1
        batch[key] = line
        if len(batch) >= batch_size:
            _flush_subscriptions(engine, writer, column.kind, batch, bad, summary, on_bad)
            batch, bad = {}, []
    _flush_subscriptions(engine, writer, column.kind, batch, bad, summary, on_bad)
    text.detach()  # the caller owns `source`
    summary.elapsed = time.monotonic() - t0
    return summary


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _flush_subscriptions(engine: Engine, writer: _SubscriptionWriter, kind: str,
                         batch: dict[Any, int], bad: list[BadRow], summary: SubscribeSummary,
                         on_bad: Callable[[BadRow], None]) -> None:
    """One transaction: resolve keys, read current statuses, upsert what changes. Bad rows of
    the batch are reported in line order afterwards."""
    if batch:
        # BEGIN IMMEDIATE on SQLite: this transaction reads, then writes
        with write_engine(engine).begin() as conn:
            found = writer.customers(conn, list(batch), kind)
            current = writer.statuses(conn, list(found.values()))
            guarded = writer.status != "opted_out" and not writer.force
            barred = writer.barred(conn, list(found.values())) if guarded else set()
            changes: list[int] = []
            for cid in found.values():
                old = current.get(cid)
                if old is None and cid in barred:
                    summary.kept += 1  # bounced out or complained before this conversation
                    continue
                if old is None:
                    summary.inserted += 1
                elif old == writer.status:
                    summary.unchanged += 1
                    continue
                elif old in PROTECTED and writer.status != "opted_out" and not writer.force:
                    summary.kept += 1
                    continue
                else:
                    summary.updated += 1
                changes.append(cid)
            if changes:
                writer.upsert(conn, changes, datetime.now(UTC))
        what = "email" if kind == "email" else "id"
        bad += [BadRow(line, f"no customer with {what} {key!r}", str(key))
                for key, line in batch.items() if key not in found]
    for row in sorted(bad, key=lambda b: b.line):
        summary.bad += 1
        on_bad(row)


# ---------------------------------------------------------------------------- suppression


@dataclass
class SuppressionSummary:
    """What a suppression import did. rows = inserted + existing + duplicates + bad."""

    file: str
    list: str
    rows: int = 0
    inserted: int = 0
    existing: int = 0
    duplicates: int = 0
    bad: int = 0
    addresses: int = 0
    domains: int = 0
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "elapsed": round(self.elapsed, 3)}


def classify_suppression(value: str) -> tuple[str, str]:
    """A line's value -> (kind, lower-cased value); ValueError with the reason when bad."""
    value = value.strip().lower()
    if not value:
        raise ValueError("empty value")
    if value.startswith("@"):
        value = value[1:]
    elif "@" in value:
        if not attrs.is_plausible_email(value):
            raise ValueError(f"invalid email address {value!r}")
        return "address", value
    value = value.rstrip(".")
    if not _DOMAIN.fullmatch(value):
        raise ValueError(f"neither an address nor a domain: {value!r}")
    return "domain", value


def suppression_list_id(conn: Connection, name: str, create: bool = False) -> int | None:
    """The id of suppression list `name` (created when asked), else None."""
    found = conn.execute(select(SuppressionList.id).where(SuppressionList.name == name)).scalar()
    if found is None and create:
        insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        conn.execute(insert_(SuppressionList).values(name=name, created_at=datetime.now(UTC))
                     .on_conflict_do_nothing(index_elements=["name"]))
        found = conn.execute(select(SuppressionList.id)
                             .where(SuppressionList.name == name)).scalar_one()
    return found


def _suppression_values(text: IO[str]) -> Iterator[tuple[int, str | None, str | None]]:
    """(line, value, None) per non-blank, non-comment record; (line, None, reason) if bad."""
    first = True
    for line, fields, error in read_records(csv.reader(text)):
        if fields is None:
            yield line, None, error
            continue
        value = fields[0].strip()
        if not value or value.startswith("#"):
            continue
        if first and value.lower() in _SUPPRESSION_HEADERS:
            first = False
            continue  # a header cell
        first = False
        if _SURROGATE.search(value):
            yield line, None, "bytes that are not UTF-8"
            continue
        yield line, value, None


def import_suppressions(engine: Engine, source: IO[bytes], list_name: str,
                        reason: str | None = None, *, name: str = "-",
                        batch_size: int = 10_000,
                        on_bad: Callable[[BadRow], None] = lambda _b: None) -> SuppressionSummary:
    """Stream suppressed addresses/domains into list `list_name` (module notes)."""
    list_name = list_name.strip()
    if not list_name:
        raise ConversationError("a suppression list needs a name")
    t0 = time.monotonic()
    summary = SuppressionSummary(file=name, list=list_name)
    text = io.TextIOWrapper(source, encoding="utf-8-sig", errors="surrogateescape", newline="")
    with write_engine(engine).begin() as conn:
        list_id = suppression_list_id(conn, list_name, create=True)
    assert list_id is not None
    batch: dict[str, str] = {}  # value -> kind
    for line, value, error in _suppression_values(text):
        summary.rows += 1
        try:
            if value is None:
                raise ValueError(error)
            kind, key = classify_suppression(value)
        except ValueError as exc:
            summary.bad += 1
            on_bad(BadRow(line, str(exc), value or ""))
            continue
        if key in batch:
            summary.duplicates += 1
        batch[key] = kind
        if len(batch) >= batch_size:
            _flush_suppressions(engine, list_id, batch, reason, summary)
            batch = {}
    _flush_suppressions(engine, list_id, batch, reason, summary)
    text.detach()
    summary.elapsed = time.monotonic() - t0
    return summary


def _flush_suppressions(engine: Engine, list_id: int, batch: dict[str, str],
                        reason: str | None, summary: SuppressionSummary) -> None:
    if not batch:
        return
    now = datetime.now(UTC)
    values = list(batch)
    with write_engine(engine).begin() as conn:
        existing: set[str] = set()
        for i in range(0, len(values), _IN_LIST_MAX):
            existing.update(conn.execute(
                select(SuppressionEntry.value).where(
                    SuppressionEntry.list_id == list_id,
                    SuppressionEntry.value.in_(values[i:i + _IN_LIST_MAX]))).scalars())
        new = [{"list_id": list_id, "kind": batch[v], "value": v, "reason": reason,
                "added_at": now} for v in values if v not in existing]
        if new:
            insert_ = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            conn.execute(insert_(SuppressionEntry).on_conflict_do_nothing(
                index_elements=["list_id", "value"]), new)
    summary.existing += len(existing)
    summary.inserted += len(new)
    summary.domains += sum(1 for row in new if row["kind"] == "domain")
    summary.addresses += sum(1 for row in new if row["kind"] == "address")


def list_suppressions(conn: Connection) -> list[dict[str, Any]]:
    """Every suppression list with its number of address and domain entries."""
    counts: dict[int, dict[str, int]] = {}
    for list_id, kind, n in conn.execute(
            select(SuppressionEntry.list_id, SuppressionEntry.kind, func.count())
            .group_by(SuppressionEntry.list_id, SuppressionEntry.kind)):
        counts.setdefault(list_id, {})[kind] = int(n)
    return [{"name": row.name, "description": row.description,
             "addresses": counts.get(row.id, {}).get("address", 0),
             "domains": counts.get(row.id, {}).get("domain", 0),
             "created_at": row.created_at.isoformat()}
            for row in conn.execute(select(SuppressionList).order_by(SuppressionList.name))]


# ---------------------------------------------------------------------------- command line


def cli_engine() -> Engine:
    """The customer DB engine of the current command, after checking it has been created
    (ClickException, exit 1, with what to do otherwise)."""
    from connectd.db.engine import make_engine

    settings = click.get_current_context().obj.settings  # connectd.cli.Context
    engine = make_engine(settings.database.customer_url)
    try:
        ready = inspect(engine).has_table("campaigns")
    except Exception as exc:  # noqa: BLE001 - any connection failure is one clear message
        engine.dispose()
        raise click.ClickException(f"cannot open the customer database "
                                   f"{engine.url.render_as_string()!r}: {exc}") from None
    if not ready:
        engine.dispose()
        raise click.ClickException(f"the customer database at {engine.url!r} is not set up; "
                                   "run `connectd init`")
    return engine


def _open(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        click.echo(f"connectd: cannot open {path}: {exc.strerror}", err=True)
        sys.exit(EX_NOINPUT)


def _report_bad(row: BadRow, shown: list[int], limit: int = 100) -> None:
    shown[0] += 1
    if shown[0] <= limit:
        click.echo(f"line {row.line}: {row.reason}", err=True)
    elif shown[0] == limit + 1:
        click.echo("(more bad rows not shown)", err=True)


@click.group("conversation")
def conversation_group() -> None:
    """Conversations: opt-in topics with their own subscribers."""


@conversation_group.command("create")
@click.argument("name")
@click.option("--description", default="", help="What the conversation is about.")
def conversation_create(name: str, description: str) -> None:
    """Create conversation NAME."""
    engine = cli_engine()
    try:
        with write_engine(engine).begin() as conn:
            create_conversation(conn, name, description)
    except ConversationError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    click.echo(f"conversation {name.strip()!r} created")


@conversation_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def conversation_list(as_json: bool) -> None:
    """Every conversation with its subscribers per status."""
    engine = cli_engine()
    try:
        with engine.connect() as conn:
            rows = list_conversations(conn)
    finally:
        engine.dispose()
    if as_json:
        click.echo(orjson.dumps(rows).decode())
        return
    header = ["NAME", *(s.upper() for s in SUBSCRIPTION_STATUSES)]
    table = [[r["name"], *(str(r["subscribers"][s]) for s in SUBSCRIPTION_STATUSES)]
             for r in rows]
    click.echo(format_table(header, table))


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain aligned columns (first column left, the others right-aligned)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@click.group("subscribe")
def subscribe_group() -> None:
    """Subscribe customers to conversations."""


@subscribe_group.command("import")
@click.argument("file", metavar="FILE.csv")
@click.option("--conversation", required=True, help="The conversation to subscribe to.")
@click.option("--status", type=click.Choice(IMPORT_STATUSES), default="active",
              show_default=True, help="The subscription status to give.")
@click.option("--force", is_flag=True,
              help="Also re-subscribe customers who opted out or bounced out (only with "
                   "their renewed consent).")
@click.option("--batch-size", default=10_000, show_default=True, type=click.IntRange(1),
              help="Rows per transaction.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def subscribe_import(file: str, conversation: str, status: str, force: bool, batch_size: int,
                     as_json: bool) -> None:
    """Subscribe the customers of FILE.csv ('-' for stdin) to a conversation.

    The header names an `email` or a `customer_id` column (or the file is one address per
    line). Bad rows are reported as `line N: reason` and skipped; good rows are imported.
    Customers who opted out or bounced out keep that status unless --force.
    """
    summary = _run_import(file, "subscriptions.imported", lambda engine, source, on_bad:
                          import_subscriptions(engine, source, conversation, status, name=file,
                                               force=force, batch_size=batch_size,
                                               on_bad=on_bad))
    if as_json:
        click.echo(orjson.dumps(summary.as_dict()).decode())
        return
    click.echo(f"{file}: {summary.rows} rows read, {summary.inserted} subscribed, "
               f"{summary.updated} changed, {summary.unchanged} unchanged, {summary.kept} kept "
               f"(opted out or bounced out), {summary.bad} bad, {summary.duplicates} duplicates "
               f"in {summary.elapsed:.1f} s")


def _run_import(file: str, event: str, run: Callable[[Any, Any, Callable[[Any], None]], Any]) -> Any:
    """Open FILE ('-' = stdin), run one import on a CLI engine with bad rows reported as they
    come, close everything, log `event` with the summary; a ConversationError is a usage
    error naming the file."""
    engine = cli_engine()
    source = _open(file)
    shown = [0]
    try:
        summary = run(engine, source, lambda row: _report_bad(row, shown))
    except ConversationError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    finally:
        if source is not sys.stdin.buffer:
            source.close()
        engine.dispose()
    log.get().info(event, **summary.as_dict())
    return summary


@click.group("suppression")
def suppression_group() -> None:
    """Suppression lists: addresses and domains that are never mailed."""


@suppression_group.command("import")
@click.argument("file")
@click.option("--list", "list_name", required=True, help="The list (created on first use).")
@click.option("--reason", default=None, help="Why these are suppressed (stored per entry).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def suppression_import(file: str, list_name: str, reason: str | None, as_json: bool) -> None:
    """Add the addresses and domains of FILE ('-' for stdin) to a suppression list.

    One value per line, or the first field of a CSV. "@example.com" or "example.com" is a
    whole domain; values are stored lower-cased. Bad lines are reported and skipped.
    """
    summary = _run_import(file, "suppressions.imported", lambda engine, source, on_bad:
                          import_suppressions(engine, source, list_name, reason, name=file,
                                              on_bad=on_bad))
    if as_json:
        click.echo(orjson.dumps(summary.as_dict()).decode())
        return
    click.echo(f"{file}: {summary.rows} values read, {summary.inserted} added "
               f"({summary.addresses} addresses, {summary.domains} domains), "
               f"{summary.existing} already listed, {summary.duplicates} duplicates, "
               f"{summary.bad} bad")


@suppression_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def suppression_list(as_json: bool) -> None:
    """Every suppression list with its number of addresses and domains."""
    engine = cli_engine()
    try:
        with engine.connect() as conn:
            rows = list_suppressions(conn)
    finally:
        engine.dispose()
    if as_json:
        click.echo(orjson.dumps(rows).decode())
        return
    click.echo(format_table(["LIST", "ADDRESSES", "DOMAINS"],
                            [[r["name"], str(r["addresses"]), str(r["domains"])] for r in rows]))
