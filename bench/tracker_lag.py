"""Benchmark: the profiler following the tracker under the tracker benchmark's load.

    python bench/tracker_lag.py [--duration 10] [--connections 64] [--processes N] [--keep]

Target (issue 4): the profiler keeps up with the tracker benchmark: lag under 2 s p99 while it
runs.

Inputs: none (a temporary tree from bench/tracker.py's `prepare_tree`: SQLite customer and
report DBs, customers, a launched message with links, valid click tokens). Outputs: the
figures on stdout, then one line of JSON.

Method: the real profiler daemon (`python -m connectd --config CFG run profiler`, both
databases, one worker each) starts first; then bench/tracker.py's `run_tracker_load` starts
`connectd run tracker` and drives it with wrk (64 connections, click redirects with valid
tokens, events durably appended). Every 50 ms a sampler notes, per tracker stream
(tracker.events.N), where its newest segment ends (segment, bytes): everything up to there
was written by then. A poller reads the profiler's positions (consumer_positions, committed
with the records' effects) of both databases every 10 ms; a sample is applied in a database
once that database's position for the stream reaches the sample's, and its lag is (time first
seen applied) - (time of the sample). So the lag is from "the hit's record is in the file" to
"its effects are committed", within the poll period (always an over-estimate by <= ~10 ms).
"both" is the later of the two databases. When the load is over, every link.clicked record
must have been applied exactly once (customer_stats click counts and click_facts against the
records in the streams: all of them come from a browser User-Agent before any send is known,
so all are people's clicks).

Everything shares the same cores (wrk, the tracker's workers, the profiler's two workers):
on a 2-core machine the figures say whether the profiler keeps up while the tracker is
saturated, not what it does on a machine of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from connectd import log  # noqa: E402
from connectd import settings as settings_mod  # noqa: E402
from connectd.spool import SEGMENT_SUFFIX  # noqa: E402

TARGET_P99 = 2.0
SAMPLE_EVERY = 0.05
POLL_EVERY = 0.01
DBS = ("customer", "report")
PREFIX = "tracker.events."


def db_path(url: str) -> str:
    return url.split("sqlite:///", 1)[1]


def stream_ends(streams_dir: Path) -> dict[str, tuple[int, int]]:
    """Per tracker stream: (newest segment, its size in bytes)."""
    out: dict[str, tuple[int, int]] = {}
    for d in streams_dir.glob(PREFIX + "*"):
        segs = [int(p.name[:-len(SEGMENT_SUFFIX)]) for p in d.iterdir()
                if p.name.endswith(SEGMENT_SUFFIX) and p.name[:-len(SEGMENT_SUFFIX)].isdigit()]
        if segs:
            last = max(segs)
            try:
                size = (d / f"{last:012d}{SEGMENT_SUFFIX}").stat().st_size
            except FileNotFoundError:
                continue
            out[d.name] = (last, size)
    return out


class Watcher(threading.Thread):
    """Samples the streams' ends every SAMPLE_EVERY and polls both databases' positions
    every POLL_EVERY; stamps each (sample, db) with the first time it was seen applied."""

    def __init__(self, st: settings_mod.Settings) -> None:
        super().__init__(daemon=True)
        self.streams_dir = Path(st.paths.spool) / "streams"
        self.paths = {"customer": db_path(st.database.customer_url),
                      "report": db_path(st.database.report_url)}
        # (time, {stream: (segment, offset)}), and per db the time each was seen applied
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self.applied_at: dict[str, list[float | None]] = {db: [] for db in DBS}
        self.sampling = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        conns = {db: sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=30,
                                     isolation_level=None) for db, p in self.paths.items()}
        next_sample = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if self.sampling.is_set() and now >= next_sample:
                ends = stream_ends(self.streams_dir)
                if ends:
                    with self.lock:
                        self.samples.append((time.monotonic(), ends))
                        for db in DBS:
                            self.applied_at[db].append(None)
                next_sample = now + SAMPLE_EVERY
            for db, conn in conns.items():
                pos = {stream: (seg, off) for stream, seg, off in conn.execute(
                    'SELECT stream, segment, "offset" FROM consumer_positions '
                    "WHERE consumer LIKE 'profiler.%' AND stream LIKE ?", (PREFIX + "%",))}
                seen = time.monotonic()
                with self.lock:
                    stamps = self.applied_at[db]
                    for i, (_, ends) in enumerate(self.samples):
                        if stamps[i] is None and all(pos.get(s, (-1, -1)) >= e
                                                     for s, e in ends.items()):
                            stamps[i] = seen
            time.sleep(POLL_EVERY)
        for conn in conns.values():
            conn.close()

    def pending(self) -> int:
        with self.lock:
            return sum(1 for db in DBS for v in self.applied_at[db] if v is None)


def start_profiler(cfg: Path, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "CONNECTD_CONFIG")}
    env["CONNECTD_LOG_LEVEL"] = "info"  # the tree says "warning"; we wait for "started"
    out = open(log_path, "wb")  # noqa: SIM115 - the child writes it; closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "connectd", "--config", str(cfg), "run",
                             "profiler"], cwd=ROOT, env=env, stdout=out, stderr=out)
    out.close()
    deadline = time.monotonic() + 30
    while b"started" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"profiler did not start:\n{log_path.read_text()}")
        time.sleep(0.02)
    return proc


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarise(lags: list[float]) -> dict[str, float]:
    if not lags:
        return {}
    return {"p50": round(statistics.median(lags), 4), "p99": round(quantile(lags, 0.99), 4),
            "max": round(max(lags), 4)}


def check_effects(st: settings_mod.Settings, recorded: int) -> dict[str, int]:
    c = sqlite3.connect(db_path(st.database.customer_url))
    r = sqlite3.connect(db_path(st.database.report_url))
    try:
        return {"click_count": c.execute(
                    "SELECT coalesce(sum(click_count), 0) FROM customer_stats").fetchone()[0],
                "click_facts": r.execute("SELECT count(*) FROM click_facts").fetchone()[0],
                "people_total": r.execute(
                    "SELECT coalesce(sum(total), 0) FROM event_totals "
                    "WHERE event = 'link.clicked'").fetchone()[0],
                "recorded": recorded}
    finally:
        c.close()
        r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of measured load")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--processes", type=int, default=0, help="tracker workers (0: one per core)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary tree")
    args = ap.parse_args()
    import tracker as tracker_bench

    missing = tracker_bench.missing_tools()
    if "wrk" in missing:
        print("needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    log.configure("warning", "console")
    root = Path(tempfile.mkdtemp(prefix="connectd-tracker-lag-"))
    tree = tracker_bench.prepare_tree(root, processes=args.processes)
    st = tree.settings
    profiler = start_profiler(tree.config, root / "profiler.log")
    watcher = Watcher(st)
    watcher.start()
    t0 = time.monotonic()
    try:
        load = tracker_bench.run_tracker_load(tree, args.duration, args.connections,
                                              while_running=watcher.sampling.set)
        watcher.sampling.clear()  # the load is over: what was sampled must now be applied
        deadline = time.monotonic() + 120
        while watcher.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.stopping.set()
        watcher.join(5)
        profiler.send_signal(signal.SIGTERM)
        rc = profiler.wait(60)
    elapsed = time.monotonic() - t0
    lags = {db: [a - t for (t, _), a in zip(watcher.samples, watcher.applied_at[db],
                                            strict=True) if a is not None] for db in DBS}
    lags["both"] = [max(a, b) - t for (t, _), a, b in zip(
        watcher.samples, watcher.applied_at["customer"], watcher.applied_at["report"],
        strict=True) if a is not None and b is not None]
    unapplied = len(watcher.samples) - len(lags["both"])
    figures = {name: summarise(v) for name, v in lags.items()}
    effects = check_effects(st, load["recorded"])
    exact = effects["click_count"] == effects["click_facts"] == effects["people_total"] \
        == effects["recorded"]
    ok = bool(lags["both"]) and not unapplied and figures["both"]["p99"] < TARGET_P99
    print(f"tracker: {load['requests']} requests in {args.duration:.0f} s, "
          f"{load['rps']:.0f} req/s, p99 {load.get('p99_ms')} ms; {load['recorded']} clicks "
          f"recorded (warm-up included), {load['lost']} lost")
    for name in (*DBS, "both"):
        f = figures[name]
        if f:
            print(f"lag {name:<8} p50 {f['p50']:.3f} s  p99 {f['p99']:.3f} s  max {f['max']:.3f} s")
    print(f"{len(watcher.samples)} samples, {unapplied} never applied; target p99 < "
          f"{TARGET_P99} s -> {'PASS' if ok else 'MISS'}; exactly once: {exact} {effects}; "
          f"profiler exit {rc}; load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({"bench": "tracker_lag", "duration": args.duration,
                      "tracker_rps": round(load["rps"], 1), "tracker_p99_ms": load.get("p99_ms"),
                      "recorded": load["recorded"], "lost": load["lost"],
                      "samples": len(watcher.samples), "unapplied": unapplied, "lag": figures,
                      "target_p99": TARGET_P99, "pass": ok, "exactly_once": exact,
                      "effects": effects, "daemon_exit": rc, "seconds": round(elapsed, 1),
                      "loadavg": round(os.getloadavg()[0], 2)}))
    if args.keep:
        print(f"tree kept: {root}", file=sys.stderr)
    else:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok and exact and rc == 0 else 1


if __name__ == "__main__":
    os.environ.pop("CONNECTD_CONFIG", None)
    sys.exit(main())
