"""What the click and open appliers share: machine traffic judged with history, and the bulk
look-ups of that history.

Inputs: runs of link.clicked / message.opened records and, per (instance, customer), what the
database remembers (the time the mail was sent, the last click and its link). Outputs:
`Verdict`s (machine or person, and why) for each record, in record order.

The tracker marks what one request shows (scanner user agents, HEAD, image proxies). What
needs history is judged here, when the records are applied:
- "soon-after-sent": a hit less than AFTER_SENT seconds after the relay took the mail (or
  before it: nobody reads a mail that was not delivered yet). Link scanners of the receiving
  side click as the mail arrives; people do not read that fast.
- "links-at-once" (clicks): a click on another link of the same message by the same customer
  less than AT_ONCE seconds after the previous click. A scanner walks every link of a mail in
  a second or two; a person reading a mail, clicking, and coming back for another link takes
  longer. The first click of such a walk stays as judged when it came (the applier does not
  rewrite what it already counted): for a mail of N links, N-1 of a scanner's clicks are
  counted as machine ones, and all of them when the walk comes soon after the send.

History is only used where the send is known (target.sent_at, message_facts.sent_at: both
from the same composer.sent record). The customer DB and the report DB judge separately with
their own copy of the same history, with the same function, so they agree; they can disagree
only when one has applied the message's composer.sent record and the other not yet, for
clicks of the first seconds.

The judgement depends only on earlier records (stream order) and stored history, never on
where a batch ended: a restart in the middle gives the same verdicts.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import Connection, select

from connectd.appliers.sql import db_time
from connectd.db.customer import Message, MessageInstance

# seconds; the lead may make these settings ([profiler] machine_after_sent, machine_at_once)
AFTER_SENT = 10.0
AT_ONCE = 2.0

SOON = "soon-after-sent"
AT_ONCE_WHY = "links-at-once"


class Verdict(NamedTuple):
    machine: bool
    why: str | None


class History(NamedTuple):
    """What one database remembers of one (instance, customer)."""

    sent_at: float | None  # epoch seconds
    last_click_at: float | None
    last_click_link: int | None


def secs(value: Any) -> float | None:
    """A stored timestamp (SQLite: text in the record spelling; PostgreSQL: an aware
    datetime) or a record ts, as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        return datetime.fromisoformat(value).timestamp()
    return value.timestamp()


def text_ts(dialect: str, value: Any) -> str | None:
    """A stored timestamp back as column text (None stays None)."""
    if value is None or isinstance(value, str):
        return value
    return db_time(dialect, value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def judge(records: list[Any], history: dict[tuple[int, int], History],
          clicks: bool) -> tuple[list[Verdict], dict[tuple[int, int], tuple[str, int]]]:
    """Verdicts for `records` (in order) and, for clicks, the new last click (ts, link) of
    every (instance, customer) in `history`. Records whose pair has no known send keep the
    tracker's verdict."""
    out: list[Verdict] = []
    last: dict[tuple[int, int], tuple[str, int]] = {}
    state: dict[tuple[int, int], list[Any]] = {}
    for r in records:
        key = (r.instance, r.customer)
        h = history.get(key)
        if h is None:
            out.append(Verdict(r.machine, r.why))
            continue
        if clicks:
            last[key] = (r.ts, r.link)
        if h.sent_at is None:
            out.append(Verdict(r.machine, r.why))
            continue
        t = secs(r.ts)
        s = state.setdefault(key, [h.last_click_at, h.last_click_link])
        verdict = Verdict(r.machine, r.why)
        if not r.machine:
            if t - h.sent_at < AFTER_SENT:  # type: ignore[operator]
                verdict = Verdict(True, SOON)
            elif clicks and s[0] is not None and s[1] != r.link and 0 <= t - s[0] < AT_ONCE:
                verdict = Verdict(True, AT_ONCE_WHY)
        if clicks:
            s[0], s[1] = t, r.link
        out.append(verdict)
    return out, last


def present(conn: Connection, table: str, instances: set[int]) -> set[int]:
    """Which of `instances` have any row in `table` (one index probe each, one statement):
    clicks that come before any send record of their instance need no pair-by-pair look-up,
    and callers can skip building the pairs at all."""
    if not instances:
        return set()
    if conn.dialect.name == "postgresql":
        return {row[0] for row in conn.exec_driver_sql(
            f'SELECT i FROM unnest(%b::bigint[]) AS r(i) WHERE EXISTS '
            f'(SELECT 1 FROM "{table}" AS t WHERE t.instance_id = r.i)', (list(instances),))}
    return {row[0] for row in conn.exec_driver_sql(
        f'SELECT value FROM json_each(?) WHERE EXISTS '
        f'(SELECT 1 FROM "{table}" AS t WHERE t.instance_id = value)',
        (json.dumps(list(instances)),))}


def lookup(conn: Connection, table: str, columns: tuple[str, ...],
           pairs: set[tuple[int, int]], live: set[int] | None = None
           ) -> dict[tuple[int, int], tuple]:
    """`columns` of `table` for the rows keyed (instance_id, customer_id) in `pairs`: one
    statement (a JSON array on SQLite, unnested arrays on PostgreSQL); pairs with no row are
    left out. `live`: the instances that have rows, when the caller already asked (`present`)
    and kept only their pairs."""
    if live is None:
        instances = {p[0] for p in pairs}
        live = present(conn, table, instances)
        if len(live) < len(instances):
            pairs = {p for p in pairs if p[0] in live}
    if not live or not pairs:
        return {}
    cols = ", ".join(f't."{c}"' for c in columns)
    if conn.dialect.name == "postgresql":
        sql = (f'SELECT t.instance_id, t.customer_id, {cols} FROM unnest(%b::bigint[], '
               f'%b::bigint[]) AS r(i, c) JOIN "{table}" AS t '
               f"ON t.instance_id = r.i AND t.customer_id = r.c")
        params: Any = ([p[0] for p in pairs], [p[1] for p in pairs])
    else:
        # CROSS JOIN: the records drive the loop, each probing the (instance, customer) key
        sql = (f"SELECT t.instance_id, t.customer_id, {cols} FROM json_each(?) AS r "
               f'CROSS JOIN "{table}" AS t '
               f"ON t.instance_id = r.value ->> 0 AND t.customer_id = r.value ->> 1")
        params = (msgspec.json.encode(list(pairs)).decode(),)
    return {(row[0], row[1]): tuple(row[2:]) for row in conn.exec_driver_sql(sql, params)}


def history(conn: Connection, table: str, pairs: set[tuple[int, int]], clicks: bool,
            live: set[int] | None = None
            ) -> tuple[dict[tuple[int, int], History], dict[tuple[int, int], tuple]]:
    """(History per pair with a row, the extra columns per pair) for targets (customer DB:
    no extra columns) or message_facts (report DB: segment_id and the counts). `live` as
    for `lookup`."""
    extra: tuple[str, ...] = ()
    if table == "message_facts":
        extra = ("segment_id",) if clicks else ("segment_id", "open_count",
                                                "machine_open_count")
    rows = lookup(conn, table, ("sent_at", "last_click_at", "last_click_link", *extra), pairs,
                  live)
    hist = {k: History(secs(v[0]), secs(v[1]), v[2]) for k, v in rows.items()}
    return hist, {k: v[3:] for k, v in rows.items()}


def hour(dialect: str, ts: str) -> str:
    """The start of the UTC hour of a record ts, as column text."""
    return db_time(dialect, f"{ts[:10]}T{ts[11:13]}:00:00.000000Z")


def update_last_clicks(conn: Connection, last: dict[tuple[int, int], tuple[str, int]],
                       table: str) -> None:
    """last_click_at/last_click_link of `table` (targets in the customer DB, message_facts in
    the report DB) for the pairs that have a row: one UPDATE; a stored later click is kept."""
    if not last:
        return
    dialect = conn.dialect.name
    rows = [(i, c, db_time(dialect, ts), link) for (i, c), (ts, link) in last.items()]
    if dialect == "postgresql":
        conn.exec_driver_sql(
            f"UPDATE {table} SET last_click_at = r.ts, last_click_link = r.link "
            "FROM unnest(%b::bigint[], %b::bigint[], %b::timestamptz[], %b::bigint[]) "
            f"AS r(i, c, ts, link) WHERE {table}.instance_id = r.i AND {table}.customer_id = r.c "
            f"AND ({table}.last_click_at IS NULL OR {table}.last_click_at <= r.ts)",
            tuple(list(col) for col in zip(*rows, strict=True)))
        return
    conn.exec_driver_sql(
        f"UPDATE {table} SET last_click_at = r.value ->> 2, last_click_link = r.value ->> 3 "
        f"FROM json_each(?) AS r WHERE {table}.instance_id = r.value ->> 0 "
        f"AND {table}.customer_id = r.value ->> 1 "
        f"AND ({table}.last_click_at IS NULL OR {table}.last_click_at <= r.value ->> 2)",
        (json.dumps(rows),))


def trial_instances(conn: Connection, instances: set[int], cache: dict[str, Any]) -> set[int]:
    """Which of `instances` are trial sends (a message of kind "trial"); remembered, since an
    instance never changes its message."""
    known: dict[int, bool] = cache.setdefault("trial_instance", {})
    unknown = [i for i in instances if i not in known]
    if unknown:
        found = set(conn.execute(
            select(MessageInstance.id).join(Message, Message.id == MessageInstance.message_id)
            .where(MessageInstance.id.in_(unknown), Message.kind == "trial")).scalars())
        known.update((i, i in found) for i in unknown)
    return {i for i in instances if known[i]}


def without_trials(conn: Connection, records: list[Any], cache: dict[str, Any],
                   instances: set[int] | None = None) -> list[Any]:
    """`records` minus those of trial sends (test copies): like their hand-offs
    (connectd.appliers.outbound), their opens and clicks are not the customer's.
    `instances`: those of `records`, when the caller has them."""
    if instances is None:
        instances = {r.instance for r in records}
    trials = trial_instances(conn, instances, cache)
    return [r for r in records if r.instance not in trials] if trials else records
