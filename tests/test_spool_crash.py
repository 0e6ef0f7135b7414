"""connectd.spool with real processes: writers killed with SIGKILL mid-append, roll-over under
load with a reader in another process, and readers killed and restarted from saved positions.
Nothing acknowledged may be lost, nothing may be read twice, no partial record is ever a record."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from connectd import spool as sp
from connectd.settings import SpoolSettings
from connectd.spool import START, Position, Spool

HELPERS = Path(__file__).parent / "helpers"
STREAM = "crash.events"


def start_writer(root: Path, rnd: int, count: int, max_bytes: int, durability: str,
                 batch: int = 1) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(HELPERS / "spool_writer.py"), str(root), STREAM,
                             str(rnd), str(count), str(max_bytes), durability, str(batch)],
                            stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line.startswith(b"ready "), line
    return proc


class Drain(threading.Thread):
    """Reads a child's stdout as it comes, so a full pipe never blocks the child."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.chunks: list[bytes] = []
        self.start()

    def run(self) -> None:
        while chunk := self.proc.stdout.read1(1 << 16):
            self.chunks.append(chunk)

    def lines(self, timeout: float = 60) -> list[bytes]:
        """The child's complete output lines, once it has exited (a cut last line dropped)."""
        self.proc.wait(timeout)
        self.join(timeout)
        return b"".join(self.chunks).split(b"\n")[:-1]


def acks_of(proc: subprocess.Popen[bytes]) -> list[int]:
    """Every seq the writer acknowledged (complete ack lines only; a killed writer may have
    died mid-ack)."""
    return [int(x) for x in Drain(proc).lines() if x.isdigit()]


class Watcher(threading.Thread):
    """Follows the stream while writers die, asserting every line it gets is a whole record."""

    def __init__(self, spool: Spool) -> None:
        super().__init__(daemon=True)
        self.spool = spool
        self.stop = threading.Event()
        self.records: list[dict] = []
        self.torn: list[bytes] = []
        self.bad: list[bytes] = []

    def run(self) -> None:
        with self.spool.reader(STREAM) as r:
            while True:
                stopping = self.stop.is_set()
                while (batch := r.read(50)) is not None:
                    for line in batch.lines:
                        try:
                            self.records.append(sp.decode(line))
                        except sp.BadRecord:
                            self.bad.append(line)
                    if batch.torn is not None:
                        self.torn.append(batch.torn)
                if stopping:
                    return
                time.sleep(0.001)


def check_rounds(records: list[dict], acked: dict[int, list[int]]) -> None:
    """Per round: seqs are 0..k in order with k >= the last ack; rounds in order; ids unique."""
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    rounds = [r["round"] for r in records]
    assert rounds == sorted(rounds)
    for rnd, acks in acked.items():
        seqs = [r["seq"] for r in records if r["round"] == rnd]
        assert seqs == list(range(len(seqs))), f"round {rnd}: gap or repeat"
        assert acks == list(range(len(acks)))
        # everything acknowledged is there; at most the record(s) in flight at the kill more
        assert len(seqs) >= len(acks), f"round {rnd}: acknowledged record lost"


@pytest.mark.slow
@pytest.mark.parametrize("durability,batch", [("none", 1), ("group", 1), ("none", 16),
                                              ("none", 5000)])  # 5000: ~600 KB per write
def test_sigkilled_writer_loses_nothing_acknowledged(tmp_path: Path, durability: str,
                                                     batch: int) -> None:
    """10 rounds: a writer appending flat out is SIGKILLed at a random instant and restarted;
    every acknowledged record is in the stream exactly once, in order, and a follower reading
    all along never gets a partial record as a record."""
    rng = random.Random(1234 + batch)
    spool = Spool(tmp_path, SpoolSettings(durability="none"))
    watcher = Watcher(spool)
    watcher.start()
    acked: dict[int, list[int]] = {}
    for rnd in range(10):
        proc = start_writer(tmp_path, rnd, 0, 64 * 1024, durability, batch)
        time.sleep(rng.uniform(0.02, 0.3))
        proc.send_signal(signal.SIGKILL)
        acked[rnd] = acks_of(proc)
        assert proc.returncode == -signal.SIGKILL
    watcher.stop.set()
    watcher.join(30)
    assert sum(1 for a in acked.values() if a) >= 5, "writers acknowledged (almost) nothing"
    assert watcher.bad == []
    full: list[dict] = []
    torn: list[bytes] = []
    for _, rec, raw in spool.reader(STREAM).records():
        if rec is None:
            torn.append(raw)
        else:
            full.append(rec)
    check_rounds(full, acked)
    assert watcher.records == full  # the live follower saw exactly what is there at the end
    assert watcher.torn == torn
    assert len(torn) <= 10
    segs = spool.segments(STREAM)
    assert len(segs) > 2
    print(f"{sum(map(len, acked.values()))} acked, {len(full)} records, {len(torn)} torn, "
          f"{len(segs)} segments")


def test_writer_process_restart_continues_segment(tmp_path: Path) -> None:
    """A second writer process continues the clean segment the first one left."""
    proc = start_writer(tmp_path, 0, 500, 1 << 20, "none")
    assert proc.stdout.readline()  # at least one ack
    proc.wait(30)
    first = acks_of(proc)
    spool = Spool(tmp_path)
    proc = start_writer(tmp_path, 1, 100, 1 << 20, "none")
    acks_of(proc)
    recs = [rec for _, rec, _ in spool.reader(STREAM).records()]
    assert len(spool.segments(STREAM)) == 1
    assert [r["seq"] for r in recs] == list(range(500)) + list(range(100))
    assert len(first) == 499  # first ack line was consumed above


@pytest.mark.slow
def test_rollover_under_load_reader_in_other_process(tmp_path: Path) -> None:
    """50,000 records rolled every 4 KiB by one process, followed by a reader process with
    small batches: the reader's sequence has no loss and no repetition."""
    n = 50_000
    t0 = time.monotonic()
    reader = subprocess.Popen([sys.executable, str(HELPERS / "spool_follower.py"), str(tmp_path),
                               STREAM, "0:0", "7", str(n - 1)], stdout=subprocess.PIPE)
    followed = Drain(reader)
    writer = start_writer(tmp_path, 0, n, 4096, "none")
    acks = acks_of(writer)
    out = followed.lines(timeout=300)
    elapsed = time.monotonic() - t0
    assert reader.returncode == 0
    assert acks == list(range(n))
    seqs: list[int] = []
    for line in out:
        seqs.extend(int(x) for x in line.split(b" ", 1)[1].split(b","))
    assert seqs == list(range(n))
    segs = Spool(tmp_path).segments(STREAM)
    assert len(segs) > 500 and all(s.size <= 4096 for s in segs)
    print(f"{n} records, {len(segs)} segments, {elapsed:.1f}s")


@pytest.mark.slow
def test_reader_killed_and_restarted_from_saved_positions(tmp_path: Path) -> None:
    """A follower killed at random and restarted from its last committed position (while the
    writer is still appending and rolling) sees every record exactly once."""
    n = 20_000
    rng = random.Random(99)
    writer = start_writer(tmp_path, 0, n, 4096, "none")
    writer_acks = Drain(writer)
    saved = "0:0"
    seqs: list[int] = []
    restarts = 0
    while not seqs or seqs[-1] != n - 1:
        proc = subprocess.Popen([sys.executable, str(HELPERS / "spool_follower.py"),
                                 str(tmp_path), STREAM, saved, str(rng.randint(1, 50)),
                                 str(n - 1)], stdout=subprocess.PIPE)
        time.sleep(rng.uniform(0.05, 0.25))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        restarts += 1
        for line in out.split(b"\n")[:-1]:  # only whole commit lines count
            pos, _, got = line.decode().partition(" ")
            seqs.extend(int(x) for x in got.split(","))
            saved = pos
        assert restarts < 300
    assert [int(x) for x in writer_acks.lines() if x.isdigit()] == list(range(n))
    assert seqs == list(range(n))
    assert restarts > 2


def test_reader_restart_at_every_batch_boundary(tmp_path: Path) -> None:
    """Reopening a reader at each batch's end (the saved position), across roll-overs and a
    torn tail, yields each record once, and the torn tail once."""
    spool = Spool(tmp_path, SpoolSettings(durability="none"))
    with spool.writer(STREAM, segment_max_bytes=1024) as w:
        for i in range(200):
            w.append("test.appended", {"seq": i})
    last = spool.segments(STREAM)[-1].path
    fd = os.open(last, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b'{"v":1,"id":"torn')
    os.close(fd)
    with spool.writer(STREAM, segment_max_bytes=1024) as w:
        for i in range(200, 300):
            w.append("test.appended", {"seq": i})
    pos: Position = START
    seqs: list[int] = []
    torn = 0
    while True:
        with spool.reader(STREAM, pos) as r:
            batch = r.read(3)
        if batch is None:
            break
        seqs.extend(sp.decode(x)["seq"] for x in batch.lines)
        torn += batch.torn is not None
        pos = batch.end
    assert seqs == list(range(300))
    assert torn == 1
