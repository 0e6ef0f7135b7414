"""connectd.spool at file level: record format, the one-writer lock, roll-over, append-only
segments, torn tails, readers, lag, gc, durability modes and a full disk (a real tmpfs)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from connectd import spool as sp
from connectd.settings import SpoolSettings
from connectd.spool import START, BadRecord, Position, Spool, SpoolError, StreamLocked


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A fresh spool with fsync off (these tests are about bytes, not power loss)."""
    s = Spool(tmp_path / "spool", SpoolSettings(durability="none"))
    s.create()
    return s


def read_all(spool: Spool, name: str, position: Position = START,
             max_records: int = 1000) -> tuple[list[bytes], list[bytes], Position]:
    """Every complete line and every torn tail a reader yields now, and where it stopped."""
    lines: list[bytes] = []
    torn: list[bytes] = []
    with spool.reader(name, position) as r:
        while (batch := r.read(max_records)) is not None:
            assert len(batch.lines) <= max_records
            lines.extend(batch.lines)
            if batch.torn is not None:
                torn.append(batch.torn)
        return lines, torn, r.position


def seg_path(spool: Spool, name: str, number: int) -> Path:
    return spool.stream_dir(name) / f"{number:012d}.jsonl"


def raw_append(path: Path, data: bytes) -> None:
    """Write bytes to a segment by hand, as a dying writer would have."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# --- record format ------------------------------------------------------------------------


def test_record_has_version_id_ts_type_then_fields(spool: Spool) -> None:
    """An appended record carries v, id, ts and type, then the caller's fields, as one line."""
    with spool.writer("tracker.events") as w:
        rec = w.append("link.clicked", {"customer": 7, "url": "https://x/\n"})
    lines, torn, _ = read_all(spool, "tracker.events")
    assert torn == []
    assert len(lines) == 1
    got = sp.decode(lines[0])
    assert got == rec
    assert list(got)[:4] == ["v", "id", "ts", "type"]
    assert got["v"] == sp.RECORD_VERSION and got["type"] == "link.clicked"
    assert got["url"] == "https://x/\n"  # a newline inside a field stays inside the line
    assert sp.parse_ts(got["ts"]).tzinfo is not None
    assert abs(sp.parse_ts(got["ts"]).timestamp() - time.time()) < 5


@pytest.mark.parametrize("type_", ["mail.sent", "link.clicked", "mail.bounced", "a.b",
                                   "record_x.shunted_2"])
def test_good_record_types_accepted(type_: str) -> None:
    """noun.verb types in lower case are accepted."""
    assert sp.make_record(type_)["type"] == type_


@pytest.mark.parametrize("type_", ["", "clicked", "Link.clicked", "link.Clicked", "link..clicked",
                                   "link.clicked.twice", ".clicked", "link.", "1link.clicked",
                                   "link clicked", "link.clicked\n", "link.clicked ", 42, None])
def test_bad_record_types_refused(type_: object) -> None:
    """Anything but a lower-case noun.verb string is refused with BadRecord."""
    with pytest.raises(BadRecord):
        sp.make_record(type_)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", sorted(sp.RESERVED))
def test_reserved_keys_refused(spool: Spool, key: str) -> None:
    """Fields may not override v, id, ts or type; nothing is written."""
    with spool.writer("s") as w:
        with pytest.raises(BadRecord, match="reserved"):
            w.append("mail.sent", {key: "x"})
    assert read_all(spool, "s")[0] == []


@pytest.mark.parametrize("fields", [{"x": {1, 2}}, {"x": object()}, {1: "int key"},
                                    {"x": 2 ** 70}])
def test_unserialisable_fields_refused(spool: Spool, fields: dict) -> None:
    """Values JSON cannot hold are refused with BadRecord and nothing is written."""
    with spool.writer("s") as w:
        with pytest.raises(BadRecord):
            w.append("mail.sent", fields)
        w.append("mail.sent", {"ok": True})
    lines = read_all(spool, "s")[0]
    assert [sp.decode(x)["ok"] for x in lines] == [True]


@pytest.mark.parametrize("name", ["", "Upper", "a/b", "..", ".hidden", "-x", "a b", "x" * 101,
                                  "tracker\n", "é"])
def test_bad_stream_names_refused(spool: Spool, name: str) -> None:
    """Stream names that could escape the streams dir or confuse tools are refused."""
    with pytest.raises(SpoolError):
        spool.writer(name)
    assert spool.streams() == []


def test_ids_unique_over_many_appends(spool: Spool) -> None:
    """100,000 ids from one process (one writer, append and append_many) never repeat."""
    ids: list[str] = []
    with spool.writer("s") as w:
        for _ in range(200):
            ids.extend(r["id"] for r in w.append_many([("mail.sent", {"n": i}) for i in range(250)]))
    ids.extend(sp.new_id() for _ in range(50_000))
    assert len(ids) == 100_000
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 for i in ids)


def test_ids_unique_across_processes() -> None:
    """Two processes started at the same instant (and a forked child) draw disjoint ids."""
    code = "from connectd.spool import new_id\nfor _ in range(20000): print(new_id())\n"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    r, wfd = os.pipe()
    sp.new_id()  # the parent's generator is initialised before the fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        os.write(wfd, "\n".join(sp.new_id() for _ in range(5000)).encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(r) as fh:
        child = fh.read().split()
    os.waitpid(pid, 0)
    parent = [sp.new_id() for _ in range(5000)]
    everything = outs[0] + outs[1] + child + parent
    assert [len(o) for o in outs] == [20000, 20000] and len(child) == 5000
    assert len(set(everything)) == len(everything)


# --- one writer per stream ----------------------------------------------------------------


def test_second_writer_refused_naming_pid(spool: Spool) -> None:
    """A second writer gets StreamLocked naming the holder's pid; after close it may write."""
    first = spool.writer("s")
    try:
        with pytest.raises(StreamLocked, match=rf"already has a writer \(pid {os.getpid()}\)"):
            spool.writer("s")
    finally:
        first.close()
    with spool.writer("s") as second:
        second.append("mail.sent")
    assert len(read_all(spool, "s")[0]) == 1


def test_second_writer_refused_across_processes(spool: Spool, tmp_path: Path) -> None:
    """A writer held by another live process is refused with that process's pid."""
    code = ("import sys,time\nfrom connectd.spool import Spool\n"
            f"w = Spool({str(spool.root)!r}).writer('s')\nprint('ready', flush=True)\n"
            "sys.stdin.read()\nw.close()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(StreamLocked, match=rf"pid {proc.pid}\)"):
            spool.writer("s")
    finally:
        proc.communicate("", timeout=30)
    spool.writer("s").close()  # released on the holder's exit


def test_killed_writer_releases_lock(spool: Spool) -> None:
    """SIGKILL of the holder releases the lock (the kernel drops the flock)."""
    code = (f"from connectd.spool import Spool\nw = Spool({str(spool.root)!r}).writer('s')\n"
            "print('ready', flush=True)\nimport time\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    with pytest.raises(StreamLocked):
        spool.writer("s")
    proc.kill()
    proc.wait(timeout=10)
    spool.writer("s").close()


def test_waiting_writer_gets_lock_after_close(spool: Spool) -> None:
    """wait=True blocks until the holder closes, then appends after the holder's records."""
    first = spool.writer("s")
    first.append("mail.sent", {"n": 1})
    got: list[int] = []

    def second() -> None:
        with spool.writer("s", wait=True) as w:
            got.append(1)
            w.append("mail.sent", {"n": 2})

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.2)
    assert got == []  # still blocked
    first.close()
    t.join(10)
    assert got == [1]
    assert [sp.decode(x)["n"] for x in read_all(spool, "s")[0]] == [1, 2]


def test_closed_writer_refuses_appends(spool: Spool) -> None:
    """Appending to a closed writer raises SpoolError instead of writing anywhere."""
    w = spool.writer("s")
    w.close()
    w.close()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        w.append("mail.sent")


# --- roll-over and append-only segments --------------------------------------------------


@pytest.mark.parametrize("max_bytes", [1024, 4096])
def test_roll_by_size(spool: Spool, max_bytes: int) -> None:
    """Segments never exceed segment_max_bytes (for records smaller than it) and every record
    lands in exactly one segment."""
    with spool.writer("s", segment_max_bytes=max_bytes) as w:
        for i in range(500):
            w.append("mail.sent", {"n": i, "pad": "x" * (i % 50)})
    segs = spool.segments("s")
    assert len(segs) > 5
    assert [s.number for s in segs] == list(range(1, len(segs) + 1))
    assert all(0 < s.size <= max_bytes for s in segs)
    assert all(seg_path(spool, "s", s.number).read_bytes().endswith(b"\n") for s in segs)
    lines = read_all(spool, "s")[0]
    assert [sp.decode(x)["n"] for x in lines] == list(range(500))


def test_oversized_record_gets_own_segment(spool: Spool) -> None:
    """A record larger than segment_max_bytes is written whole, in a segment of its own."""
    with spool.writer("s", segment_max_bytes=1024) as w:
        w.append("mail.sent", {"n": 0})
        w.append("mail.sent", {"n": 1, "big": "y" * 5000})
        w.append("mail.sent", {"n": 2})
    lines = read_all(spool, "s")[0]
    assert [sp.decode(x)["n"] for x in lines] == [0, 1, 2]
    assert len(spool.segments("s")) == 3


def test_roll_by_age(spool: Spool) -> None:
    """A segment older than segment_max_age is rolled on the next append, and by tick()."""
    with spool.writer("s", segment_max_age=0.05) as w:
        w.append("mail.sent", {"n": 0})
        w.append("mail.sent", {"n": 1})
        assert len(spool.segments("s")) == 1
        time.sleep(0.1)
        w.append("mail.sent", {"n": 2})
        assert len(spool.segments("s")) == 2
        time.sleep(0.1)
        w.tick()
        assert len(spool.segments("s")) == 3
        w.tick()  # an empty segment is not rolled again
        assert len(spool.segments("s")) == 3
    assert [sp.decode(x)["n"] for x in read_all(spool, "s")[0]] == [0, 1, 2]


def test_restarted_writer_keeps_age_of_segment(spool: Spool) -> None:
    """A writer continuing a segment judges its age by the segment's first record."""
    old = sp.datetime.fromtimestamp(time.time() - 100, sp.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with spool.writer("s") as w:
        w.append("mail.sent", ts=old)
    with spool.writer("s", segment_max_age=50) as w:
        w.append("mail.sent")
    assert len(spool.segments("s")) == 2


def snapshot(spool: Spool, name: str) -> dict[int, tuple[int, bytes]]:
    return {s.number: (os.stat(s.path).st_ino, s.path.read_bytes()) for s in spool.segments(name)}


def test_writer_never_rewrites_earlier_bytes(spool: Spool) -> None:
    """Bytes and inodes of earlier segments are unchanged by later writes and by a restarted
    writer; the live segment only grows at its end."""
    with spool.writer("s", segment_max_bytes=2048) as w:
        for i in range(100):
            w.append("mail.sent", {"n": i})
        before = snapshot(spool, "s")
        for i in range(100, 200):
            w.append("mail.sent", {"n": i})
    mid = snapshot(spool, "s")
    with spool.writer("s", segment_max_bytes=2048) as w:
        for i in range(200, 300):
            w.append("mail.sent", {"n": i})
    after = snapshot(spool, "s")
    for earlier, later in ((before, mid), (mid, after)):
        last = max(earlier)
        for number, (ino, data) in earlier.items():
            assert later[number][0] == ino  # never renamed/replaced
            if number == last:
                assert later[number][1].startswith(data)
            else:
                assert later[number][1] == data
    assert [sp.decode(x)["n"] for x in read_all(spool, "s")[0]] == list(range(300))


def test_restarted_writer_continues_clean_segment(spool: Spool) -> None:
    """A new writer appends to a last segment that ends with a newline."""
    with spool.writer("s") as w:
        w.append("mail.sent", {"n": 0})
    with spool.writer("s") as w:
        assert w.position == Position(1, seg_path(spool, "s", 1).stat().st_size)
        w.append("mail.sent", {"n": 1})
    assert [s.number for s in spool.segments("s")] == [1]
    assert [sp.decode(x)["n"] for x in read_all(spool, "s")[0]] == [0, 1]


def test_restarted_writer_starts_new_segment_after_torn_tail(spool: Spool) -> None:
    """A torn last segment is left byte-for-byte; the next writer starts the next segment, and
    the reader yields the torn tail only as Batch.torn."""
    with spool.writer("s") as w:
        w.append("mail.sent", {"n": 0})
    half = sp.encode(sp.make_record("mail.sent", {"n": 99}))[:20]
    raw_append(seg_path(spool, "s", 1), half)
    torn_bytes = seg_path(spool, "s", 1).read_bytes()
    with spool.writer("s") as w:
        assert w.position == Position(2, 0)
        w.append("mail.sent", {"n": 1})
    assert seg_path(spool, "s", 1).read_bytes() == torn_bytes
    lines, torn, end = read_all(spool, "s")
    assert [sp.decode(x)["n"] for x in lines] == [0, 1]
    assert torn == [half]
    assert end == Position(2, seg_path(spool, "s", 2).stat().st_size)


def test_restarted_writer_starts_new_segment_when_last_is_full(spool: Spool) -> None:
    """A last segment at or over segment_max_bytes is not continued."""
    with spool.writer("s", segment_max_bytes=1024) as w:
        w.append("mail.sent", {"pad": "z" * 1100})
    with spool.writer("s", segment_max_bytes=1024) as w:
        w.append("mail.sent")
    assert [s.number for s in spool.segments("s")] == [1, 2]


# --- readers ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_records", [1, 3, 7, 1000])
def test_reader_follows_rollovers_in_order(spool: Spool, max_records: int) -> None:
    """Across many segments, batches of any size yield exactly the records, in order, and
    each batch's positions are where its lines start."""
    with spool.writer("s", segment_max_bytes=1024) as w:
        recs = [w.append("mail.sent", {"n": i}) for i in range(300)]
    seen: list[bytes] = []
    with spool.reader("s") as r:
        while (batch := r.read(max_records)) is not None:
            assert batch.torn is None and 0 < len(batch) <= max_records
            data = seg_path(spool, "s", batch.start.segment).read_bytes()
            for pos, line in zip(batch.positions(), batch.lines, strict=True):
                assert data[pos.offset:pos.offset + len(line) + 1] == line + b"\n"
            assert batch.end == Position(batch.start.segment,
                                         batch.start.offset + sum(len(x) + 1 for x in batch.lines))
            seen.extend(batch.lines)
    assert [sp.decode(x) for x in seen] == recs


def test_reader_resumes_from_position(spool: Spool) -> None:
    """A reader started at a batch's end yields only what comes after it."""
    with spool.writer("s", segment_max_bytes=1024) as w:
        for i in range(100):
            w.append("mail.sent", {"n": i})
    done = 0
    with spool.reader("s") as r:
        for _ in range(5):
            batch = r.read(7)
            done += len(batch.lines)
        saved = batch.end
    assert 5 <= done <= 35
    rest = read_all(spool, "s", saved)[0]
    assert [sp.decode(x)["n"] for x in rest] == list(range(done, 100))


def test_reader_sees_new_records_and_segments_later(spool: Spool) -> None:
    """A reader at the end returns None, then picks up appends and roll-overs as they come."""
    with spool.writer("s", segment_max_bytes=1024) as w, spool.reader("s") as r:
        assert r.read() is None
        n = 0
        for _ in range(20):
            for _ in range(9):
                w.append("mail.sent", {"n": n})
                n += 1
            got = []
            while (b := r.read(4)) is not None:
                got.extend(sp.decode(x)["n"] for x in b.lines)
            assert got == list(range(n - 9, n))
        assert len(spool.segments("s")) > 3


def test_reader_waits_for_torn_line_to_complete(spool: Spool) -> None:
    """Half a line at the end of the live segment is not returned; once completed it is."""
    with spool.writer("s") as w:
        w.append("mail.sent", {"n": 0})
    line = sp.encode(sp.make_record("mail.sent", {"n": 1}))
    path = seg_path(spool, "s", 1)
    raw_append(path, line[:15])
    with spool.reader("s") as r:
        first = r.read()
        assert first is not None and [sp.decode(x)["n"] for x in first.lines] == [0]
        assert first.torn is None
        assert r.read() is None  # half a line: nothing yet
        assert r.read() is None
        raw_append(path, line[15:])
        second = r.read()
        assert second is not None and second.lines == [line[:-1]]
        assert r.read() is None


def test_torn_tail_returned_as_torn_once_next_segment_exists(spool: Spool) -> None:
    """A half line followed by a later segment comes back once, as Batch.torn, then the reader
    moves on to the next segment's records."""
    with spool.writer("s") as w:
        w.append("mail.sent", {"n": 0})
    half = b'{"v":1,"id":"abc","ts":"2024'
    raw_append(seg_path(spool, "s", 1), half)
    with spool.reader("s") as r:
        assert [sp.decode(x)["n"] for x in r.read().lines] == [0]
        assert r.read() is None
        with spool.writer("s") as w:
            w.append("mail.sent", {"n": 1})
        torn = r.read()
        assert torn is not None and torn.lines == [] and torn.torn == half
        assert torn.start == Position(1, seg_path(spool, "s", 1).stat().st_size - len(half))
        assert torn.end == Position(2, 0)
        nxt = r.read()
        assert [sp.decode(x)["n"] for x in nxt.lines] == [1]
        assert r.read() is None
    recs = list(spool.reader("s").records())
    assert [(rec or {}).get("n") for _, rec, _ in recs] == [0, None, 1]
    assert recs[1][2] == half


def test_corrupt_line_returned_as_line(spool: Spool) -> None:
    """A non-JSON line in the middle is yielded as a line (consumer decides); decode raises
    BadRecord for it; the lines around it are intact."""
    with spool.writer("s") as w:
        w.append("mail.sent", {"n": 0})
    raw_append(seg_path(spool, "s", 1), b"\x00garbage{not json\n")
    with spool.writer("s") as w:
        w.append("mail.sent", {"n": 2})
    lines, torn, _ = read_all(spool, "s")
    assert torn == [] and len(lines) == 3
    assert lines[1] == b"\x00garbage{not json"
    with pytest.raises(BadRecord, match="not valid JSON"):
        sp.decode(lines[1])
    assert [(rec or {}).get("n") for _, rec, _ in spool.reader("s").records()] == [0, None, 2]


@pytest.mark.parametrize("line,reason", [(b"", "JSON"), (b"[1,2]", "object"), (b"{}", "type"),
                                         (b'{"type":1,"id":"x"}', "type"),
                                         (b'{"type":"a.b","id":5}', "id"), (b"nope", "JSON")])
def test_decode_refuses_non_records(line: bytes, reason: str) -> None:
    """decode raises BadRecord, saying why, for anything that is not a record."""
    with pytest.raises(BadRecord, match=reason):
        sp.decode(line)


def test_reader_skips_missing_segments_and_empty_spool(spool: Spool) -> None:
    """No stream: nothing; a position in a removed segment moves on to the next segment."""
    assert spool.reader("nothing").read() is None
    with spool.writer("s", segment_max_bytes=1024) as w:
        for i in range(60):
            w.append("mail.sent", {"n": i})
    os.unlink(seg_path(spool, "s", 1))
    lines = read_all(spool, "s", Position(1, 10))[0]
    assert sp.decode(lines[0])["n"] > 0 and sp.decode(lines[-1])["n"] == 59


def test_position_parse_and_order() -> None:
    """Positions print as seg:offset, parse back, and order by segment then offset."""
    p = Position(3, 120)
    assert str(p) == "3:120" and Position.parse("3:120") == p and Position.parse("4") == Position(4, 0)
    assert START < Position(1, 0) < Position(1, 5) < Position(2, 0)


# --- info, lag, shunt ---------------------------------------------------------------------


def test_info_reports_segments_bytes_newest_end(spool: Spool) -> None:
    """info() gives the segments, total bytes, the newest complete record and the end."""
    assert spool.info("s").newest is None and spool.info("s").end == START
    with spool.writer("s", segment_max_bytes=1024) as w:
        recs = [w.append("mail.sent", {"n": i}) for i in range(50)]
    raw_append(spool.segments("s")[-1].path, b'{"half')
    info = spool.info("s")
    assert info.newest == recs[-1]
    assert info.bytes == sum(p.stat().st_size for p in spool.stream_dir("s").glob("*.jsonl"))
    assert info.end == Position(info.segments[-1].number, info.segments[-1].size)


def test_lag_counts_records_and_age(spool: Spool) -> None:
    """lag() counts the complete lines after a position, aged by the first unread record."""
    now = time.time()
    ts = [sp.datetime.fromtimestamp(now - 60 + i, sp.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
          for i in range(30)]
    with spool.writer("s", segment_max_bytes=1024) as w:
        for i in range(30):
            w.append("mail.sent", {"n": i}, ts=ts[i])
    assert len(spool.segments("s")) > 1
    records, seconds = spool.lag("s", START, now=now)
    assert records == 30 and seconds == pytest.approx(60, abs=0.01)
    with spool.reader("s") as r:
        r.read(12)
        r.read(1000)  # stops at the end of a segment, wherever that is
        at = r.position
    done = sum(1 for _ in spool.reader("s", START).records()) - len(read_all(spool, "s", at)[0])
    records, seconds = spool.lag("s", at, now=now)
    assert records == 30 - done
    assert seconds == pytest.approx(60 - done, abs=0.01)
    assert spool.lag("s", spool.info("s").end, now=now) == (0, 0.0)
    assert spool.lag("nothing", START) == (0, 0.0)


def test_shunt_appends_record_with_reason(spool: Spool) -> None:
    """shunt() records stream, position, consumer, reason and the original (decoded if it is
    a record, text if not) on the shunt stream."""
    good = sp.encode(sp.make_record("mail.sent", {"n": 1}))[:-1]
    spool.shunt("s", Position(1, 0), "profiler.customer", "boom", good)
    spool.shunt("s", Position(1, 50), "profiler.customer", "x" * 5000, b"\xffnot json")
    lines = read_all(spool, sp.SHUNT)[0]
    a, b = (sp.decode(x) for x in lines)
    assert a["type"] == "record.shunted" and a["record"] == sp.decode(good)
    assert (a["stream"], a["position"], a["consumer"], a["reason"]) == (
        "s", "1:0", "profiler.customer", "boom")
    assert b["record"] == "\\xffnot json" and len(b["reason"]) == 2000


# --- gc -----------------------------------------------------------------------------------


@pytest.fixture
def three_segments(spool: Spool) -> list[sp.SegmentInfo]:
    """Stream `s` with exactly three segments of 3 records each, 1000 s old."""
    with spool.writer("s") as w:
        for n in range(3):
            for i in range(3):
                w.append("mail.sent", {"n": n * 3 + i})
            w._roll() if n < 2 else None  # noqa: B018 - deterministic segment boundaries
    segs = spool.segments("s")
    old = time.time() - 1000
    for s in segs:
        os.utime(s.path, (old, old))
    return spool.segments("s")


def _pos(segs: list[sp.SegmentInfo], i: int, end: bool = True) -> Position:
    return Position(segs[i].number, segs[i].size if end else 0)


@pytest.mark.parametrize("positions,retention,removed", [
    ([], 0, []),                                          # nobody has read: keep everything
    ([("end", 0)], 0, [1]),
    ([("end", 1)], 0, [1, 2]),
    ([("end", 2)], 0, [1, 2]),                            # never the last
    ([("start", 2)], 0, [1, 2]),
    ([("end", 2), ("start", 1)], 0, [1]),                 # the slowest consumer decides
    ([("end", 2), ("mid", 0)], 0, []),
    ([("end", 2), ("zero", 0)], 0, []),
    ([("end", 2)], 5000, []),                             # retention keeps them
])
def test_gc_removes_only_passed_and_old(spool: Spool, three_segments: list[sp.SegmentInfo],
                                        positions: list[tuple[str, int]], retention: float,
                                        removed: list[int]) -> None:
    """gc removes a prefix of segments every consumer passed and older than retention, never
    the last one, nothing without positions; dry_run reports the same and removes nothing."""
    segs = three_segments
    pos = []
    for kind, i in positions:
        pos.append({"end": _pos(segs, i), "start": _pos(segs, i, end=False),
                    "mid": Position(segs[i].number, segs[i].size // 2), "zero": START}[kind])
    expected = read_all(spool, "s", min(pos))[0] if pos else []
    dry = spool.gc("s", pos, retention=retention, dry_run=True)
    assert [s.number for s in dry] == removed
    assert len(spool.segments("s")) == 3
    done = spool.gc("s", pos, retention=retention)
    assert [s.number for s in done] == removed
    left = [s.number for s in spool.segments("s")]
    assert left == [n for n in (1, 2, 3) if n not in removed]
    # the records still there are still readable from the slowest position
    if pos:
        assert read_all(spool, "s", min(pos))[0] == expected


def test_gc_uses_settings_retention(tmp_path: Path) -> None:
    """Without an explicit retention gc uses settings.retention (and `now`)."""
    s = Spool(tmp_path, SpoolSettings(durability="none", retention=100))
    with s.writer("s", segment_max_bytes=1024) as w:
        for i in range(40):
            w.append("mail.sent", {"pad": "p" * 50, "n": i})
    end = s.info("s").end
    count = len(s.segments("s"))
    assert count > 2
    assert s.gc("s", [end], now=time.time() + 50) == []
    assert len(s.gc("s", [end], now=time.time() + 200)) == count - 1


# --- durability ---------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["always", "group", "none"])
@pytest.mark.parametrize("sync", [False, True])
def test_durability_modes_write_everything(tmp_path: Path, durability: str, sync: bool) -> None:
    """Every mode, with and without sync=True, returns and leaves every record readable; after
    a sync=True append (and in "always" mode) the writer has nothing unsynced."""
    s = Spool(tmp_path, SpoolSettings(durability=durability, group_commit_ms=2))
    with s.writer("s", segment_max_bytes=2048) as w:
        for i in range(200):
            w.append("mail.sent", {"n": i}, sync=sync)
            if sync or durability == "always":
                assert w._synced >= w._written  # fdatasync covered this write before return
        w.append_many([("mail.sent", {"n": 200 + i}) for i in range(5)], sync=sync)
    assert [sp.decode(x)["n"] for x in read_all(s, "s")[0]] == list(range(205))


def test_group_commit_sync_from_many_threads(tmp_path: Path) -> None:
    """Concurrent sync=True appends from 8 threads all return, none lost, none doubled."""
    s = Spool(tmp_path, SpoolSettings(durability="group", group_commit_ms=1))
    errors: list[BaseException] = []
    with s.writer("s", segment_max_bytes=4096) as w:
        def work(t: int) -> None:
            try:
                for i in range(100):
                    w.append("mail.sent", {"t": t, "i": i}, sync=True)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    assert errors == []
    recs = [sp.decode(x) for x in read_all(s, "s")[0]]
    assert len(recs) == 800
    for t in range(8):
        assert [r["i"] for r in recs if r["t"] == t] == list(range(100))


def test_write_lines_requires_newline(spool: Spool) -> None:
    """write_lines refuses data that does not end a line (it would tear the segment)."""
    with spool.writer("s") as w:
        with pytest.raises(BadRecord):
            w.write_lines(b'{"a":1}')
        w.write_lines(sp.encode(sp.make_record("mail.sent")))
    assert len(read_all(spool, "s")[0]) == 1


# --- disk full ----------------------------------------------------------------------------


@pytest.fixture
def small_fs(mount_tmpfs) -> Path:
    """A 64 KiB tmpfs with 64 inodes."""
    return mount_tmpfs("64k", 64)


def test_disk_full_raises_and_keeps_earlier_records(small_fs: Path) -> None:
    """An append hitting ENOSPC raises SpoolError; every record acknowledged before is intact;
    once space is freed the writer goes on in a new segment and the torn bytes never come
    back as a record."""
    filler = small_fs / "filler"
    filler.write_bytes(b"f" * 16384)
    s = Spool(small_fs / "spool", SpoolSettings(durability="none"))
    acked: list[str] = []
    with s.writer("s") as w:
        with pytest.raises(SpoolError, match="disk full"):
            for i in range(1000):
                acked.append(w.append("mail.sent", {"n": i, "pad": "x" * 700})["id"])
        assert 30 < len(acked) < 1000
        with pytest.raises(SpoolError):  # still full
            w.append("mail.sent", {"n": -1, "pad": "x" * 700})
        filler.unlink()
        after = w.append("mail.sent", {"n": "after"})
    lines, torn, _ = read_all(s, "s")
    recs = [sp.decode(x) for x in lines]  # every yielded line is a whole record
    assert [r["id"] for r in recs] == acked + [after["id"]]
    assert len(torn) <= 1
    assert s.segments("s")[-1].number > 1 or not torn
    assert recs[-1]["n"] == "after"


def test_disk_full_at_roll_writer_recovers(small_fs: Path) -> None:
    """When the disk fills mid-record and the next segment cannot even be created (no inodes
    left), the writer raises SpoolError and recovers once space is freed."""
    s = Spool(small_fs / "spool", SpoolSettings(durability="none"))
    acked: list[str] = []
    w = s.writer("s")
    try:
        # use up the inodes, keeping one file to free later
        fillers = []
        for i in range(200):
            try:
                (small_fs / f"i{i}").touch()
            except OSError:
                break
            fillers.append(small_fs / f"i{i}")
        with pytest.raises(SpoolError):
            for i in range(1000):
                acked.append(w.append("mail.sent", {"n": i, "pad": "x" * 700})["id"])
        for _ in range(3):  # torn: must roll, but no inode for the new segment
            with pytest.raises(SpoolError):
                w.append("mail.sent", {"n": -1})
        for f in fillers:
            f.unlink()
        big = sorted(small_fs.glob("spool/streams/s/*.jsonl"))
        assert len(big) == 1
        # free some blocks too: nothing else holds space but the segment itself, so give the
        # writer room by raising the size limit
        subprocess.run(["mount", "-o", "remount,size=256k", str(small_fs)], check=True)
        after = w.append("mail.sent", {"n": "after"})
    finally:
        w.close()
    lines, torn, _ = read_all(s, "s")
    assert [sp.decode(x)["id"] for x in lines] == acked + [after["id"]]
    assert len(torn) == 1


def test_following_many_segments_is_not_quadratic(spool: Spool) -> None:
    """Reading through 1,500 one-record segments with small batches takes well under a second
    per thousand segments (a directory scan with a stat per segment at every roll-over took
    ~20 s here)."""
    d = spool.stream_dir("s")
    d.mkdir(parents=True)
    for n in range(1, 1501):
        (d / f"{n:012d}.jsonl").write_bytes(sp.encode(sp.make_record("mail.sent", {"n": n})))
    t0 = time.monotonic()
    lines = read_all(spool, "s", max_records=1)[0]
    elapsed = time.monotonic() - t0
    assert [sp.decode(x)["n"] for x in lines] == list(range(1, 1501))
    assert elapsed < 3.0, f"{elapsed:.1f}s to follow 1500 segments"


def test_reader_never_skips_a_segment_a_listing_missed(spool: Spool, monkeypatch) -> None:
    """A directory listing taken while the writer rolls may show a later segment but not the
    one created just before it (readdir promises nothing about entries created meanwhile):
    the reader still reads every segment, in order."""
    with spool.writer("s", segment_max_bytes=1024) as w:
        for i in range(60):
            w.append("test.appended", {"seq": i, "pad": "x" * 100})
    numbers = [s.number for s in spool.segments("s")]
    assert len(numbers) >= 4
    real = sp._segment_numbers
    # the first segment is missing from every listing, as if created while it was taken
    monkeypatch.setattr(sp, "_segment_numbers", lambda d: [n for n in real(d) if n != numbers[0]])
    seen = []
    reader = spool.reader("s")
    while (batch := reader.read(1000)) is not None:
        seen.extend(sp.decode(line)["seq"] for line in batch.lines)
    assert seen == list(range(60))
