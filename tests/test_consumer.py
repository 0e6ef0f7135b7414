"""Stream consumers (connectd.consumer) through the profiler: exactly-once application with the
position in the same transaction, restarts, shunting of bad lines and records, replays.
Every test runs on SQLite and PostgreSQL (real databases, real spool files)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_config
from helpers.profiler_data import (
    STREAM,
    add_customers,
    add_links,
    applied,
    click,
    expected_per_customer,
    random_clicks,
    shunted,
    write_clicks,
)
from sqlalchemy import select

from connectd import settings as settings_mod
from connectd.daemons.profiler import Profiler
from connectd.db.customer import CustomerStats
from connectd.db.engine import make_engine
from connectd.spool import REPLAY, Position, Spool, encode, make_record

CUSTOMERS = 50


def make_settings(root: Path, customer_url: str, report_url: str,
                  batch_size: int = 20000) -> settings_mod.Settings:
    cfg = write_config(root, customer_url=customer_url, report_url=report_url,
                       extra=f'[spool]\ndurability = "none"\n[profiler]\nbatch_size = {batch_size}\n'
                             '[log]\nlevel = "warning"\n')
    return settings_mod.load(cfg, environ={})


@pytest.fixture
def st(tmp_path: Path, migrated_customer_url: str,
       migrated_report_url: str) -> settings_mod.Settings:
    """Settings on fresh migrated DBs (db_backend) with customers 1..50 and no links."""
    add_customers(migrated_customer_url, range(1, CUSTOMERS + 1))
    return make_settings(tmp_path, migrated_customer_url, migrated_report_url)


def small_batches(st: settings_mod.Settings, batch_size: int) -> settings_mod.Settings:
    return make_settings(Path(st.source).parent.parent, st.database.customer_url,
                         st.database.report_url, batch_size)


def segment_path(st: settings_mod.Settings, number: int = 1, stream: str = STREAM) -> Path:
    return Path(st.paths.spool) / "streams" / stream / f"{number:012d}.jsonl"


def append(st: settings_mod.Settings, *fields: dict, stream: str = STREAM,
           type_: str = "link.clicked") -> None:
    spool = Spool(st.paths.spool, st.spool)
    spool.create()
    with spool.writer(stream) as w:
        for f in fields:
            w.append(type_, f)


def test_records_applied_once_with_position(st: settings_mod.Settings) -> None:
    """Every record is applied once to both DBs and each DB stores its position and count."""
    clicks = random_clicks(3000, CUSTOMERS)
    write_clicks(st, clicks)
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.per_customer == expected_per_customer(clicks)
    assert got.facts == got.hourly == got.totals == 3000
    size = segment_path(st).stat().st_size
    assert got.positions == {("customer", STREAM, "profiler.customer"): (3000, 1, size),
                             ("report", STREAM, "profiler.report"): (3000, 1, size)}
    assert shunted(st) == []
    Profiler(st).run_until_idle()  # a second run finds nothing new
    assert applied(st) == got


def test_restart_continues_from_stored_position(st: settings_mod.Settings) -> None:
    """A new profiler after a partial run applies the rest, and nothing twice."""
    clicks = random_clicks(2500, CUSTOMERS, seed=2)
    write_clicks(st, clicks[:2000])
    small = small_batches(st, 300)
    Profiler(small).run_until_idle(max_steps=2)  # 2 batches of 300 per DB, then "crash"
    partial = applied(st)
    assert partial.clicks == partial.facts == 600
    assert {p[0] for p in partial.positions.values()} == {600}
    write_clicks(st, clicks[2000:])  # more arrives while the profiler is down
    Profiler(small).run_until_idle()
    got = applied(st)
    assert got.per_customer == expected_per_customer(clicks)
    assert got.facts == got.hourly == 2500
    assert {p[0] for p in got.positions.values()} == {2500}


def test_corrupt_line_shunted_with_position(st: settings_mod.Settings) -> None:
    """A corrupt line in a segment is shunted with its position; the reader goes on."""
    append(st, click(1), click(2))
    seg = segment_path(st)
    corrupt_at = seg.stat().st_size
    with open(seg, "ab") as fh:  # no writer open: a raw line of garbage between good records
        fh.write(b"{this is not json\n")
    append(st, click(3), click(4))
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.per_customer == {1: 1, 2: 1, 3: 1, 4: 1}
    assert got.facts == 4
    assert {p[0] for p in got.positions.values()} == {5}
    shunts = shunted(st)
    # one shunt per consumer (customer DB, report DB), each with the line's position
    assert len(shunts) == 2
    assert {s["consumer"] for s in shunts} == {"profiler.customer", "profiler.report"}
    for s in shunts:
        assert s["stream"] == STREAM
        assert Position.parse(s["position"]) == Position(1, corrupt_at)
        assert "not valid JSON" in s["reason"]
        assert s["record"] == "{this is not json"


def test_wrong_field_type_shunted_naming_field(st: settings_mod.Settings) -> None:
    """A record whose customer is "abc" is shunted with a reason naming the field; the others
    are applied."""
    append(st, click(1), click("abc"), click(2))
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.per_customer == {1: 1, 2: 1}
    assert got.facts == 2
    shunts = shunted(st)
    assert len(shunts) == 2
    for s in shunts:
        assert "customer" in s["reason"]
        assert s["record"]["customer"] == "abc"


def test_missing_customer_shunted_rest_of_batch_applied(st: settings_mod.Settings) -> None:
    """A click of a customer that does not exist (FK violation) is shunted by the customer DB's
    consumer; bisection applies every other record of its batch."""
    clicks = random_clicks(1000, CUSTOMERS, seed=3)
    clicks[517] = (999, 1, 1)
    write_clicks(st, clicks)
    Profiler(st).run_until_idle()
    got = applied(st)
    good = [c for c in clicks if c[0] != 999]
    assert got.per_customer == expected_per_customer(good)
    assert got.facts == 1000  # the report DB has no customers table: every click is a fact
    shunts = shunted(st)
    assert len(shunts) == 1
    assert shunts[0]["record"]["customer"] == 999
    assert "IntegrityError" in shunts[0]["reason"] or "ForeignKey" in shunts[0]["reason"]
    assert {p[0] for p in got.positions.values()} == {1000}


def test_impossible_timestamp_shunted(st: settings_mod.Settings) -> None:
    """A record whose ts has the right shape but no such date (month 13) is shunted, and
    customer_stats stays readable."""
    spool = Spool(st.paths.spool, st.spool)
    spool.create()
    with spool.writer(STREAM) as w:
        w.append("link.clicked", click(1))
        w.append("link.clicked", click(2), ts="2026-13-45T25:61:61.000000Z")
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.per_customer == {1: 1}
    assert got.facts == 1
    assert len(shunted(st)) == 2
    engine = make_engine(st.database.customer_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(CustomerStats.customer_id, CustomerStats.last_click_at))
            assert [r.customer_id for r in rows] == [1]
    finally:
        engine.dispose()


def test_torn_tail_shunted_as_torn(st: settings_mod.Settings) -> None:
    """Half a line at the end of a segment followed by a later segment is shunted as torn."""
    append(st, click(1), click(2))
    seg = segment_path(st)
    torn_at = seg.stat().st_size
    half = encode(make_record("link.clicked", click(3)))[:40]
    with open(seg, "ab") as fh:  # a writer killed mid-write
        fh.write(half)
    append(st, click(4))  # the next writer starts segment 2
    assert segment_path(st, 2).exists()
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.per_customer == {1: 1, 2: 1, 4: 1}
    assert got.facts == 3
    shunts = shunted(st)
    assert len(shunts) == 2
    for s in shunts:
        assert "torn" in s["reason"]
        assert Position.parse(s["position"]) == Position(1, torn_at)
        assert s["record"] == half.decode()


def test_unknown_types_passed_over(st: settings_mod.Settings) -> None:
    """Records of types no applier handles are passed over (counted, not shunted)."""
    append(st, click(1))
    append(st, {"to": "x@example.com"}, type_="mail.posted")
    append(st, click(2))
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.per_customer == {1: 1, 2: 1}
    assert got.facts == 2
    assert shunted(st) == []
    assert {p[0] for p in got.positions.values()} == {3}


def test_replayed_record_applied_once_by_named_consumer(st: settings_mod.Settings) -> None:
    """A shunted record put back on the replay stream after its cause was fixed is applied
    once, by the consumer it names, and a replay naming another consumer is ignored."""
    append(st, click(1), click(999))
    Profiler(st).run_until_idle()
    (shunt,) = shunted(st)
    add_customers(st.database.customer_url, [999])  # the cause, fixed
    original = shunt["record"]
    append(st, {"consumer": "profiler.customer", "record": original},
           {"consumer": "someone-else", "record": {**original, "customer": 2}},
           stream=REPLAY, type_="record.replayed")
    Profiler(st).run_until_idle()
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.per_customer == {1: 1, 999: 1}
    assert shunted(st) == [shunt]
    assert got.positions[("customer", REPLAY, "profiler.customer")][0] == 2


def test_replay_does_not_reapply_to_the_other_database(st: settings_mod.Settings) -> None:
    """A record shunted by the customer DB's consumer only is, when replayed, applied to the
    customer DB and not a second time to the report DB (which applied it the first time)."""
    append(st, click(1), click(999))
    Profiler(st).run_until_idle()
    assert applied(st).facts == 2
    (shunt,) = shunted(st)
    add_customers(st.database.customer_url, [999])
    append(st, {"consumer": shunt["consumer"], "record": shunt["record"]},
           stream=REPLAY, type_="record.replayed")
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.per_customer == {1: 1, 999: 1}
    assert got.facts == 2


def test_interests_counted_per_link_label(st: settings_mod.Settings) -> None:
    """Each click adds one to the customer's interest count of every label of the link."""
    add_links(st.database.customer_url, {1: ["shoes", "sale"], 2: ["garden"], 3: []})
    clicks = [(1, 1, 1), (1, 1, 1), (1, 2, 1), (2, 3, 1), (2, 1, 2), (3, 4, 1)]
    write_clicks(st, clicks)
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.interests == {(1, "shoes"): 2, (1, "sale"): 2, (1, "garden"): 1,
                             (2, "shoes"): 1, (2, "sale"): 1}
    assert got.per_customer == dict(Counter(c for c, _, _ in clicks))


def test_schema_error_is_not_shunted(st: settings_mod.Settings) -> None:
    """A missing table is not the records' fault: nothing is shunted, the position does not
    move, and the error escapes (the daemon exits and is restarted once the schema is back)."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError, ProgrammingError

    append(st, click(1), click(2))
    engine = make_engine(st.database.report_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE click_facts"))
    engine.dispose()
    with pytest.raises((OperationalError, ProgrammingError)):
        Profiler(st, dbs=("report",)).run_until_idle()
    assert shunted(st) == []
    engine = make_engine(st.database.report_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM consumer_positions")).scalar_one() == 0
    engine.dispose()


def test_line_with_two_records_is_shunted_not_split(st: settings_mod.Settings) -> None:
    """A line holding two JSON objects is one bad line (shunted), never two records, and the
    records around it are applied in place."""
    append(st, click(1))
    seg = segment_path(st)
    one = encode(make_record("link.clicked", {"instance": 1, "customer": 2, "link": 1}))
    with open(seg, "ab") as fh:  # no writer open: two records on one line, comma-separated
        fh.write(one[:-1] + b"," + one)
    append(st, click(3))
    Profiler(st).run_until_idle()
    got = applied(st)
    assert got.per_customer == {1: 1, 3: 1}
    assert got.facts == 2
    assert {s["consumer"] for s in shunted(st)} == {"profiler.customer", "profiler.report"}


@pytest.fixture
def small_fs(mount_tmpfs) -> Path:
    """A 1 MiB tmpfs."""
    return mount_tmpfs("1m")


@pytest.mark.slow
def test_full_disk_stops_without_losing_or_shunting(tmp_path: Path, small_fs: Path) -> None:
    """The report DB's disk fills up mid-stream: the profiler stops with the database error
    (after its retries), nothing is shunted, every committed batch matches its position; once
    space is freed a restart applies the rest, each record exactly once."""
    from conftest import migrated_url
    from sqlalchemy import text

    customer_url = migrated_url(f"sqlite:///{tmp_path / 'customer.db'}", "customer")
    report_url = migrated_url(f"sqlite:///{small_fs / 'report.db'}", "report")
    add_customers(customer_url, range(1, CUSTOMERS + 1))
    st = make_settings(tmp_path / "tree", customer_url, report_url, batch_size=500)
    filler = small_fs / "filler"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    filler.write_bytes(b"f" * max(0, free - 96 * 1024))  # leave ~96 KiB for the database
    n = 6000
    append(st, *(click(1 + i % CUSTOMERS) for i in range(n)))
    with pytest.raises(Exception, match="full"):
        Profiler(st, dbs=("report",)).run_until_idle()
    assert shunted(st) == []
    engine = make_engine(report_url)
    with engine.connect() as conn:
        facts = conn.execute(text("SELECT count(*) FROM click_facts")).scalar_one()
        pos = conn.execute(text("SELECT coalesce(sum(records), 0) FROM consumer_positions"))
        assert facts == pos.scalar_one() < n  # what committed matches its position
    engine.dispose()
    filler.unlink()
    Profiler(st, dbs=("report",)).run_until_idle()
    engine = make_engine(report_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM click_facts")).scalar_one() == n
    engine.dispose()
    assert shunted(st) == []
