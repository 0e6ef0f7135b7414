"""Benchmark: end-to-end lag of the running profiler daemon under a steady append load.

    python bench/profiler_lag.py [--rate 5000] [--seconds 20] [--batch-size N] [--keep]

Target (issue): a record appended to a stream is applied by a running profiler within 1 s
(median) and 2 s (p99) while 5,000 records/s are being appended.

Inputs: none (a temporary tree: settings file, migrated SQLite customer and report DBs,
customers and labelled links). Outputs: the figures on stdout, then one line of JSON.

Method: the real daemon runs as a child process (`python -m connectd --config CFG run
profiler`). This process appends `link.clicked` records to `tracker.events` at the target
rate (paced: a small group every 5 ms, catching up to rate x elapsed, through the stream's
ordinary writer with the default durability), and every 50 ms notes a sample: how many records
have been appended so far and the ts of the newest one. A poller thread reads
consumer_positions.records of both databases every 10 ms (that row is committed in the same
transaction as the records' effects); a sample is applied in a database once its `records`
reaches the sample's count, and its lag is (time first seen applied) - (record ts). The poll
period bounds the measurement error (<= ~10 ms, always an over-estimate). "both" is the later
of the two databases. At the end the daemon gets SIGTERM and the effects are checked: every
appended record applied exactly once in each database.
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
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from connectd import settings as settings_mod  # noqa: E402
from connectd.db import migrate  # noqa: E402
from connectd.db.engine import make_engine  # noqa: E402
from connectd.spool import Spool, encode, make_record  # noqa: E402

STREAM = "tracker.events"
TARGET_MEDIAN = 1.0
TARGET_P99 = 2.0
CUSTOMERS = 5000
SAMPLE_EVERY = 0.05
TICK = 0.005
POLL_EVERY = 0.01
DBS = ("customer", "report")


def setup_tree(root: Path, batch_size: int | None) -> tuple[Path, settings_mod.Settings]:
    """Settings file, migrated SQLite DBs, customers 1..CUSTOMERS and links 1..20."""
    from conftest import write_config
    from helpers.profiler_data import add_customers, add_links

    extra = '[log]\nlevel = "info"\n'
    if batch_size:
        extra += f"[profiler]\nbatch_size = {batch_size}\n"
    cfg = write_config(root, extra=extra)
    st = settings_mod.load(cfg, environ={})
    for which, url in (("customer", st.database.customer_url), ("report", st.database.report_url)):
        engine = make_engine(url)
        migrate.upgrade(engine, which)  # type: ignore[arg-type]
        engine.dispose()
    add_customers(st.database.customer_url, range(1, CUSTOMERS + 1))
    add_links(st.database.customer_url,
              {i: [["shoes", "sale", "news", "garden"][i % 4]] for i in range(1, 21)})
    return cfg, st


def db_path(url: str) -> str:
    return url.split("sqlite:///", 1)[1]


class Poller(threading.Thread):
    """Reads consumer_positions.records of both DBs every POLL_EVERY and stamps, per sample,
    the first time it was seen applied."""

    def __init__(self, st: settings_mod.Settings) -> None:
        super().__init__(daemon=True)
        self.paths = {"customer": db_path(st.database.customer_url),
                      "report": db_path(st.database.report_url)}
        self.samples: list[tuple[int, float]] = []  # (records appended incl. this one, ts)
        self.applied_at: dict[str, list[float | None]] = {db: [] for db in DBS}
        self.records = {db: 0 for db in DBS}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def add_sample(self, count: int, ts: float) -> None:
        with self.lock:
            self.samples.append((count, ts))
            for db in DBS:
                self.applied_at[db].append(None)

    def run(self) -> None:
        conns = {db: sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=30,
                                     isolation_level=None) for db, p in self.paths.items()}
        next_ix = {db: 0 for db in DBS}
        while not self.stopping.is_set():
            for db, conn in conns.items():
                row = conn.execute("SELECT records FROM consumer_positions WHERE stream = ? "
                                   "AND consumer LIKE 'profiler.%'", (STREAM,)).fetchone()
                now = time.time()
                self.records[db] = row[0] if row else 0
                with self.lock:
                    i = next_ix[db]
                    while i < len(self.samples) and self.samples[i][0] <= self.records[db]:
                        self.applied_at[db][i] = now
                        i += 1
                    next_ix[db] = i
            time.sleep(POLL_EVERY)
        for conn in conns.values():
            conn.close()

    def all_applied(self) -> bool:
        with self.lock:
            return all(v is not None for db in DBS for v in self.applied_at[db])


def start_daemon(cfg: Path, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - the child writes it; closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "connectd", "--config", str(cfg), "run",
                             "profiler"], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 30
    while b'"started"' not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"profiler did not start:\n{log_path.read_text()}")
        time.sleep(0.02)
    return proc


def append_load(st: settings_mod.Settings, rate: float, seconds: float,
                poller: Poller, warm: int) -> tuple[int, float]:
    """Append at `rate` for `seconds`; returns (records appended, elapsed)."""
    spool = Spool(st.paths.spool, st.spool)
    n = 0
    with spool.writer(STREAM, wait=True) as w:
        t0 = time.monotonic()
        next_sample = t0
        next_tick = t0
        while True:
            now = time.monotonic()
            elapsed = now - t0
            if elapsed >= seconds:
                break
            due = int(rate * elapsed) - n
            if due > 0:
                lines = []
                for k in range(due):
                    c = (n + k) * 7919 % CUSTOMERS + 1
                    lines.append(encode(make_record("link.clicked", {
                        "instance": (n + k) % 8 + 1, "customer": c, "link": (n + k) % 20 + 1,
                        "ua": "bench"})))
                ts = datetime.fromisoformat(
                    lines[-1].split(b'"ts":"', 1)[1][:27].decode()).timestamp()
                w.write_lines(b"".join(lines))
                n += due
                if now >= next_sample:
                    poller.add_sample(warm + n, ts)
                    next_sample += SAMPLE_EVERY
            next_tick += TICK
            time.sleep(max(0.0, next_tick - time.monotonic()))
        elapsed = time.monotonic() - t0
    return n, elapsed


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarise(lags: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(lags), 4), "p99": round(quantile(lags, 0.99), 4),
            "max": round(max(lags), 4), "min": round(min(lags), 4)}


def check_effects(st: settings_mod.Settings, total: int) -> dict[str, int]:
    c = sqlite3.connect(db_path(st.database.customer_url))
    r = sqlite3.connect(db_path(st.database.report_url))
    try:
        return {"click_count": c.execute(
                    "SELECT coalesce(sum(click_count), 0) FROM customer_stats").fetchone()[0],
                "click_facts": r.execute("SELECT count(*) FROM click_facts").fetchone()[0],
                "expected": total}
    finally:
        c.close()
        r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=5000.0, help="records appended per second")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to append")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="profiler.batch_size (default: the settings default)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary tree")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="connectd-lag-"))
    cfg, st = setup_tree(root, args.batch_size)
    spool = Spool(st.paths.spool, st.spool)
    spool.create()
    warm = 10  # the stream exists before the daemon starts (no wait for its rescan)
    with spool.writer(STREAM) as w:
        for i in range(warm):
            w.append("link.clicked", {"instance": 1, "customer": i + 1, "link": 1, "ua": "warm"})
    log_path = root / "profiler.log"
    proc = start_daemon(cfg, log_path)
    poller = Poller(st)
    poller.start()
    try:
        deadline = time.monotonic() + 30
        while min(poller.records.values()) < warm:
            if time.monotonic() > deadline:
                raise SystemExit("warm-up records not applied in 30 s")
            time.sleep(0.02)
        appended, elapsed = append_load(st, args.rate, args.seconds, poller, warm)
        deadline = time.monotonic() + 60
        while not poller.all_applied() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        poller.stopping.set()
        poller.join(5)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)

    figures: dict[str, dict[str, float]] = {}
    samples = poller.samples
    per_db = {db: [a - ts for (_, ts), a in zip(samples, poller.applied_at[db], strict=True)
                   if a is not None] for db in DBS}
    both = [max(a, b) - ts for (_, ts), a, b in zip(samples, poller.applied_at["customer"],
                                                    poller.applied_at["report"], strict=True)
            if a is not None and b is not None]
    unapplied = len(samples) - len(both)
    for name, lags in (*per_db.items(), ("both", both)):
        figures[name] = summarise(lags) if lags else {}
    effects = check_effects(st, warm + appended)
    rate = appended / elapsed
    ratios = {"median": round(figures["both"]["median"] / TARGET_MEDIAN, 3),
              "p99": round(figures["both"]["p99"] / TARGET_P99, 3)} if both else {}
    ok = bool(both) and not unapplied and ratios["median"] <= 1 and ratios["p99"] <= 1
    exact = effects["click_count"] == effects["click_facts"] == effects["expected"]

    print(f"appended {appended} records in {elapsed:.2f} s: {rate:.0f} records/s "
          f"(target {args.rate:.0f}); {len(samples)} samples every {SAMPLE_EVERY * 1000:.0f} ms")
    for name in (*DBS, "both"):
        f = figures[name]
        if f:
            print(f"lag {name:<8} median {f['median']:.3f} s  p99 {f['p99']:.3f} s  "
                  f"max {f['max']:.3f} s  min {f['min']:.3f} s")
    if ratios:
        print(f"ratios to target (both DBs): median {ratios['median']:.3f} x 1 s, "
              f"p99 {ratios['p99']:.3f} x 2 s -> {'PASS' if ok else 'MISS'}")
    print(f"samples never applied: {unapplied}; profiler exit {rc}; exactly once: {exact} "
          f"({effects})")
    print(json.dumps({"bench": "profiler_lag", "rate_target": args.rate,
                      "rate_achieved": round(rate, 1), "seconds": round(elapsed, 2),
                      "records": appended, "samples": len(samples), "unapplied": unapplied,
                      "batch_size": st.profiler.batch_size, "lag": figures,
                      "targets": {"median": TARGET_MEDIAN, "p99": TARGET_P99},
                      "ratios": ratios, "pass": ok, "exactly_once": exact,
                      "daemon_exit": rc}))
    if not args.keep:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"tree kept: {root}", file=sys.stderr)
    return 0 if ok and exact and rc == 0 else 1


if __name__ == "__main__":
    os.environ.pop("CONNECTD_CONFIG", None)
    sys.exit(main())
