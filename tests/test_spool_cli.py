"""`connectd spool status|tail|gc|replay` through click's CliRunner (and tail -f as a real
process), against a temp tree with a real spool and real SQLite databases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result
from conftest import write_config
from sqlalchemy import insert

from connectd import settings as settings_mod
from connectd.cli import main
from connectd.db.customer import ConsumerPosition as CustomerPosition
from connectd.db.customer import CustomerBase
from connectd.db.engine import make_engine
from connectd.db.report import ConsumerPosition as ReportPosition
from connectd.db.report import ReportBase
from connectd.spool import REPLAY, SHUNT, Position, Spool, decode, encode, make_record

STREAM = "tracker.events"


class Tree:
    """A temp checkout: settings file, spool, and (on demand) the two SQLite databases."""

    def __init__(self, root: Path, customer_url: str | None = None,
                 report_url: str | None = None) -> None:
        self.cfg = write_config(root, customer_url=customer_url, report_url=report_url)
        self.settings = settings_mod.load(self.cfg, environ={})
        self.spool = Spool(self.settings.paths.spool, self.settings.spool)
        self.spool.create()

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["--config", str(self.cfg), "spool", *args],
                                  catch_exceptions=False)

    def fill(self, name: str = STREAM, n: int = 30, max_bytes: int = 1024) -> list[dict]:
        with self.spool.writer(name, segment_max_bytes=max_bytes) as w:
            return [w.append("link.clicked", {"n": i, "url": f"https://example.com/{i} x"})
                    for i in range(n)]

    def databases(self) -> None:
        for url, base in ((self.settings.database.customer_url, CustomerBase),
                          (self.settings.database.report_url, ReportBase)):
            engine = make_engine(url)
            base.metadata.create_all(engine)
            engine.dispose()

    def position(self, db: str, stream: str, consumer: str, pos: Position, records: int) -> None:
        url = self.settings.database.customer_url if db == "customer" \
            else self.settings.database.report_url
        table = (CustomerPosition if db == "customer" else ReportPosition).__table__
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(insert(table).values(
                spool_id=self.spool.spool_id, stream=stream, consumer=consumer,
                segment=pos.segment, offset=pos.offset, records=records,
                last_record_ts=None, updated_at=datetime.now(UTC)))
        engine.dispose()


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


@pytest.fixture
def db_tree(tmp_path: Path, migrated_customer_url: str, migrated_report_url: str) -> Tree:
    """A tree whose databases are migrated ones on SQLite and on PostgreSQL (db_backend)."""
    return Tree(tmp_path, migrated_customer_url, migrated_report_url)


def age_segments(spool: Spool, name: str, seconds: float = 10 * 86400) -> None:
    old = time.time() - seconds
    for s in spool.segments(name):
        os.utime(s.path, (old, old))


# --- status ---------------------------------------------------------------------------------


def test_status_without_databases_shows_streams(tree: Tree) -> None:
    """Without databases, status lists streams (segments, bytes, newest) and says why there
    are no positions, and creates no database file."""
    recs = tree.fill()
    res = tree.run("status")
    assert res.exit_code == 0, res.output
    assert STREAM in res.output
    assert recs[-1]["id"] in res.output and "link.clicked" in res.output
    assert "no consumer positions (databases not initialised?)" in res.output
    assert not (tree.settings.paths.spool / "customer.db").exists()


def test_status_json_with_positions(db_tree: Tree) -> None:
    """--json gives one document: per stream segments, bytes, newest, and each consumer's
    position, applied count and lag in records and seconds."""
    recs = db_tree.fill(n=30)
    db_tree.databases()
    with db_tree.spool.reader(STREAM) as r:
        done = len(r.read(10))  # one segment's worth at most
        at = r.position
    db_tree.position("customer", STREAM, "profiler", at, done)
    db_tree.position("report", STREAM, "profiler", db_tree.spool.info(STREAM).end, 30)
    res = db_tree.run("status", "--json")
    assert res.exit_code == 0, res.output
    doc = orjson.loads(res.output)
    assert doc["positions_note"] is None and doc["spool_id"] == db_tree.spool.spool_id
    (st,) = doc["streams"]
    info = db_tree.spool.info(STREAM)
    assert (st["name"], st["segments"], st["bytes"]) == (STREAM, len(info.segments), info.bytes)
    assert st["newest"] == {k: recs[-1][k] for k in ("type", "ts", "id")}
    by_db = {c["db"]: c for c in st["consumers"]}
    assert by_db["customer"]["position"] == str(at) and by_db["customer"]["records"] == done
    assert by_db["customer"]["lag_records"] == 30 - done
    assert by_db["customer"]["lag_seconds"] >= 0
    assert by_db["report"]["lag_records"] == 0 and by_db["report"]["lag_seconds"] == 0


def test_status_human_shows_consumer_lag(tree: Tree) -> None:
    """The table shows each consumer under its stream with its lag."""
    tree.fill(n=12)
    tree.databases()
    tree.position("customer", STREAM, "profiler", Position(0, 0), 0)
    res = tree.run("status")
    assert res.exit_code == 0, res.output
    assert "customer/profiler: at 0:0, 0 applied, lag 12 records" in res.output
    assert "not initialised" not in res.output


def test_status_empty_spool(tree: Tree) -> None:
    """A spool with no streams says so."""
    res = tree.run("status")
    assert res.exit_code == 0 and "no streams yet" in res.output


# --- tail -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 10, 29, 30, 100])
def test_tail_n_human(tree: Tree, n: int) -> None:
    """tail -n N prints the last N records across segments, one line each: ts type id k=v."""
    recs = tree.fill(n=30)
    res = tree.run("tail", "-n", str(n), STREAM)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    want = recs[-n:] if n else []
    assert len(lines) == len(want)
    for line, rec in zip(lines, want, strict=True):
        assert line == (f"{rec['ts']} link.clicked {rec['id']} n={rec['n']} "
                        f'url="{rec["url"]}"')


def test_tail_default_ten_json(tree: Tree) -> None:
    """--json prints the stored lines as they are; the default is the last 10."""
    recs = tree.fill(n=25)
    res = tree.run("tail", "--json", STREAM)
    assert res.exit_code == 0, res.output
    assert [decode(x.encode()) for x in res.output.splitlines()] == recs[-10:]


def test_tail_skips_torn_tail_and_marks_bad_lines(tree: Tree) -> None:
    """An incomplete last line is not printed; a corrupt line is shown as not a record."""
    recs = tree.fill(n=3, max_bytes=1 << 20)
    seg = tree.spool.segments(STREAM)[-1].path
    with open(seg, "ab") as fh:
        fh.write(b"garbage\n" + encode(make_record("link.clicked"))[:30])
    res = tree.run("tail", "-n", "2", STREAM)
    lines = res.output.splitlines()
    assert recs[-1]["id"] in lines[0] and lines[1].startswith("?? not a record")
    assert len(lines) == 2


def test_tail_unknown_stream_lists_streams(tree: Tree) -> None:
    """An unknown stream is an error that lists the streams there are."""
    tree.fill()
    tree.fill("composer.sent", n=1)
    res = CliRunner().invoke(main, ["--config", str(tree.cfg), "spool", "tail", "nope"])
    assert res.exit_code == 1
    assert "no stream 'nope'" in res.output and "composer.sent, tracker.events" in res.output


def test_tail_follow_prints_new_records_until_interrupt(tree: Tree) -> None:
    """tail -f prints the last records, then new ones (across a roll-over) as they are
    appended, and exits 0 on Ctrl-C."""
    tree.fill(n=5)
    proc = subprocess.Popen([sys.executable, "-m", "connectd", "--config", str(tree.cfg),
                             "spool", "tail", "-f", "-n", "2", "--json", STREAM],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = [proc.stdout.readline() for _ in range(2)]
        assert [decode(x)["n"] for x in first] == [3, 4]
        with tree.spool.writer(STREAM, segment_max_bytes=1024) as w:
            for i in range(5, 40):
                w.append("link.clicked", {"n": i, "url": "u"})
        got = [decode(proc.stdout.readline())["n"] for _ in range(35)]
        assert got == list(range(5, 40))
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


# --- gc -------------------------------------------------------------------------------------


def test_gc_without_positions_leaves_streams_alone(tree: Tree) -> None:
    """With no consumer positions gc removes nothing and says each stream was left alone."""
    tree.fill()
    age_segments(tree.spool, STREAM)
    before = len(tree.spool.segments(STREAM))
    res = tree.run("gc")
    assert res.exit_code == 0, res.output
    assert f"{STREAM}: no consumer has read it; left alone" in res.output
    assert len(tree.spool.segments(STREAM)) == before


def test_gc_removes_passed_segments(db_tree: Tree) -> None:
    """gc (dry run first) removes the old segments every consumer has passed, printing each
    with its size; the live segment and the unpassed ones stay."""
    db_tree.fill(n=60)
    age_segments(db_tree.spool, STREAM)
    segs = db_tree.spool.segments(STREAM)
    assert len(segs) >= 4
    db_tree.databases()
    db_tree.position("customer", STREAM, "profiler", db_tree.spool.info(STREAM).end, 60)
    db_tree.position("report", STREAM, "profiler", Position(segs[2].number, 0), 20)
    dry = db_tree.run("gc", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"{STREAM}: would remove {segs[0].path.name}" in dry.output
    assert "would remove 2 segment(s)" in dry.output
    assert len(db_tree.spool.segments(STREAM)) == len(segs)
    res = db_tree.run("gc")
    assert res.exit_code == 0, res.output
    assert f"{STREAM}: removed {segs[1].path.name}" in res.output
    assert [s.number for s in db_tree.spool.segments(STREAM)] == [s.number for s in segs[2:]]


def test_gc_retention_and_unread_consumer(tree: Tree) -> None:
    """--retention keeps young segments; a stream a known consumer has not read is left alone."""
    tree.fill(n=60)
    tree.fill("composer.sent", n=60)
    tree.databases()
    for db in ("customer", "report"):
        tree.position(db, STREAM, "profiler", tree.spool.info(STREAM).end, 60)
    tree.position("customer", "composer.sent", "profiler", tree.spool.info("composer.sent").end, 60)
    before = {n: len(tree.spool.segments(n)) for n in (STREAM, "composer.sent")}
    res = tree.run("gc", "--retention", "3600")
    assert res.exit_code == 0, res.output
    assert f"{STREAM}: removed 0 segment(s)" in res.output
    assert "composer.sent: report/profiler has not read it yet; left alone" in res.output
    res = tree.run("gc", "--retention", "0")
    assert len(tree.spool.segments(STREAM)) == 1
    assert len(tree.spool.segments("composer.sent")) == before["composer.sent"]


def test_gc_keeps_what_the_processor_has_not_read(tree: Tree) -> None:
    """receiver.events segments the profiler passed but the processor has not (its place is
    the `position` of its last mail.processed) are kept; the ones it passed go."""
    recv = "receiver.events"
    tree.fill(recv, n=60)
    age_segments(tree.spool, recv)
    segs = tree.spool.segments(recv)
    assert len(segs) >= 4
    tree.databases()
    for db in ("customer", "report"):
        tree.position(db, recv, "profiler", tree.spool.info(recv).end, 60)
    res = tree.run("gc", "--retention", "0")
    assert f"{recv}: removed 0 segment(s)" in res.output  # the processor has read nothing
    with tree.spool.writer("processor.events") as w:
        w.append("mail.processed", {"message": "m", "received": "r", "kind": "human",
                                    "position": str(Position(segs[2].number, 0))})
    for db in ("customer", "report"):
        tree.position(db, "processor.events", "profiler", tree.spool.info("processor.events").end, 1)
    res = tree.run("gc", "--retention", "0")
    assert res.exit_code == 0, res.output
    assert [s.number for s in tree.spool.segments(recv)] == [s.number for s in segs[2:]]


# --- replay ---------------------------------------------------------------------------------


def shunted(tree: Tree) -> list[dict]:
    recs = tree.fill(n=5)
    for consumer in ("profiler", "other"):
        for rec in recs[:2]:
            tree.spool.shunt(STREAM, Position(1, 0), consumer, "boom", encode(rec)[:-1])
    tree.spool.shunt(STREAM, Position(1, 99), "profiler", "bad json", b"{not json")
    return recs


def replayed(tree: Tree) -> list[dict]:
    return [rec for _, rec, _ in tree.spool.reader(REPLAY).records()]


def test_replay_twice_replays_once(tree: Tree) -> None:
    """replay puts each shunted record on the replay stream for its consumer, once; the second
    run replays nothing; undecodable ones are listed as cannot replay with their position."""
    recs = shunted(tree)
    res = tree.run("replay")
    assert res.exit_code == 0, res.output
    assert "replayed 4 record(s); 0 already replayed; 1 cannot be replayed" in res.output
    assert "cannot replay: not a record: shunt 1:" in res.output
    got = replayed(tree)
    assert [(r["type"], r["consumer"], r["stream"], r["record"]) for r in got] == [
        ("record.replayed", c, STREAM, rec) for c in ("profiler", "other") for rec in recs[:2]]
    again = tree.run("replay")
    assert "replayed 0 record(s); 4 already replayed; 1 cannot be replayed" in again.output
    assert replayed(tree) == got


def test_replay_filters_and_dry_run(tree: Tree) -> None:
    """--consumer/--stream select shunted records; --dry-run writes nothing; a later run
    replays only what is left; a record shunted twice is replayed once."""
    recs = shunted(tree)
    tree.spool.shunt(STREAM, Position(1, 0), "other", "again", encode(recs[0])[:-1])
    dry = tree.run("replay", "--dry-run")
    assert "would replay 4 record(s)" in dry.output
    assert replayed(tree) == [] and not tree.spool.segments(REPLAY)
    assert "replayed 0 record(s)" in tree.run("replay", "--stream", "composer.sent").output
    res = tree.run("replay", "--consumer", "other")
    # the second shunt of recs[0] by "other" counts as already replayed
    assert "replayed 2 record(s); 1 already replayed; 0 cannot be replayed" in res.output
    assert {r["consumer"] for r in replayed(tree)} == {"other"}
    res = tree.run("replay")
    assert "replayed 2 record(s); 3 already replayed" in res.output
    assert len(replayed(tree)) == 4


def test_replay_without_shunts(tree: Tree) -> None:
    """Nothing shunted: nothing replayed, no replay stream created."""
    res = tree.run("replay")
    assert res.exit_code == 0 and "replayed 0 record(s)" in res.output
    assert SHUNT not in tree.spool.streams() and REPLAY not in tree.spool.streams()
