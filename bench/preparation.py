"""Benchmark the manager's preparation: N active subscribers in one segment -> a target list.

    python bench/preparation.py [--rows N] [--keep]

Inputs: a customer count (default 1,000,000). Outputs: the figures on stdout, then one JSON
line. It makes a fresh migrated SQLite customer DB in a temp dir, bulk-inserts N customers
and their active subscriptions with the sqlite3 module's executemany (setup, not timed), adds
a campaign with one segment (`sends < 1000`, true for everyone: the filter is evaluated, the
stats outer join is done), one suppressed domain, a message and a ready instance, then times
connectd.preparation.prepare(). The reference, timed in the same run on the same database: a
bare `INSERT INTO ref SELECT id FROM customers` into a table shaped like targets' key (with the
same unique index), the floor of writing N rows there. Peak RSS (ru_maxrss) is read before and
after prepare. The growth seen is SQLite's page cache, which connectd's engine sets to 64 MiB
(bounded, not per recipient): with PRAGMA cache_size=-2000 on the same engine, prepare grew
peak RSS by 3 MB at both 100,000 and 1,000,000 customers (measured once by hand).
Target from the issue: 1,000,000 customers in under 30 s.
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert

from connectd.db import migrate
from connectd.db.customer import (
    Campaign,
    Message,
    MessageInstance,
    Segment,
    SuppressionEntry,
    SuppressionList,
)
from connectd.db.engine import make_engine, writer
from connectd.preparation import prepare

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TS = "2026-03-01T12:00:00.000000Z"  # how UtcDateTime spells NOW on SQLite


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill(path: Path, rows: int) -> None:
    """Customers 1..rows, all active in conversation 1 (raw sqlite3: setup speed only)."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    with db:
        db.execute("INSERT INTO conversations (id, name, description, created_at) "
                   "VALUES (1, 'deals', '', ?)", (TS,))
        db.executemany(
            "INSERT INTO customers (id, email, email_key, attributes, created_at, updated_at) "
            "VALUES (?, ?, ?, '{}', ?, ?)",
            ((i, f"User.{i}@Example{i % 97}.com", f"user.{i}@example{i % 97}.com", TS, TS)
             for i in range(1, rows + 1)))
        db.executemany(
            "INSERT INTO subscriptions (customer_id, conversation_id, status, changed_at) "
            "VALUES (?, 1, 'active', ?)", ((i, TS) for i in range(1, rows + 1)))
    db.execute("ANALYZE")
    db.close()


def campaign(engine: object) -> int:
    """One campaign, one segment, one suppressed domain, one message, one ready instance."""
    with writer(engine).begin() as conn:  # type: ignore[arg-type]
        camp = conn.execute(insert(Campaign).values(name="bench", conversation_id=1)
                            .returning(Campaign.id)).scalar_one()
        conn.execute(insert(Segment).values(campaign_id=camp, position=1, name="everyone",
                                            filter_expr="sends < 1000"))
        lst = conn.execute(insert(SuppressionList).values(name="dnm")
                           .returning(SuppressionList.id)).scalar_one()
        conn.execute(insert(SuppressionEntry).values(list_id=lst, kind="domain",
                                                     value="nowhere.invalid"))
        msg = conn.execute(insert(Message).values(campaign_id=camp, name="main")
                           .returning(Message.id)).scalar_one()
        return conn.execute(insert(MessageInstance).values(message_id=msg, run_key="1")
                            .returning(MessageInstance.id)).scalar_one()


def reference(path: Path) -> float:
    """Seconds for the bare INSERT ... SELECT of every customer id into a keyed table."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE ref (id INTEGER PRIMARY KEY, instance_id INTEGER NOT NULL, "
               "customer_id INTEGER NOT NULL, UNIQUE (instance_id, customer_id))")
    started = time.perf_counter()
    db.execute("BEGIN")
    db.execute("INSERT INTO ref (instance_id, customer_id) SELECT 1, id FROM customers")
    db.execute("COMMIT")
    seconds = time.perf_counter() - started
    db.execute("DROP TABLE ref")
    db.close()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--keep", action="store_true", help="keep the database and print its path")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="connectd-bench-prep-"))
    path = tmp / "customer.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine, "customer")
    t0 = time.perf_counter()
    fill(path, args.rows)
    setup = time.perf_counter() - t0
    instance = campaign(engine)
    ref = reference(path)
    rss_before = rss_mb()
    with writer(engine).connect() as conn:
        result = prepare(conn, instance, NOW)
    rss_after = rss_mb()
    engine.dispose()
    prep = result.seconds
    ok = result.total_targets == args.rows and prep < 30
    print(f"setup (not timed): {args.rows:,} customers + subscriptions in {setup:.1f} s")
    print(f"prepare: {result.total_targets:,} targets in {prep:.2f} s "
          f"({result.total_targets / prep:,.0f}/s); segments {result.segments}, "
          f"excluded {result.excluded}")
    print(f"reference INSERT ... SELECT of {args.rows:,} ids: {ref:.2f} s; "
          f"ratio prepare/reference {prep / ref:.2f}")
    print(f"peak RSS: {rss_before:.0f} MB before prepare, {rss_after:.0f} MB after")
    print(f"target < 30 s: {'met' if ok else 'NOT met'}")
    if args.keep:
        print(f"database kept: {path}")
    else:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    print(json.dumps({"bench": "preparation", "rows": args.rows, "targets": result.total_targets,
                      "prepare_s": prep, "reference_s": round(ref, 3),
                      "ratio": round(prep / ref, 2), "rss_before_mb": round(rss_before),
                      "rss_after_mb": round(rss_after), "target_met": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
