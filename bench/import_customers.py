"""Benchmark `connectd customers import`: generated CSV -> fresh SQLite customer DB, via the CLI.

    python bench/import_customers.py [--rows N] [--keep]

Inputs: a row count (default 1,000,000). Outputs: the figures on stdout, then one JSON line.
It generates a CSV (email + 7 attribute columns of mixed types) and a 100,000-row prefix of it
in a temp dir, runs the real command (`connectd --config CFG customers import FILE --json`, a
child process, exactly what users run) into fresh migrated SQLite files, samples the child's
VmRSS from /proc while it runs and takes its peak RSS from wait4(), re-imports the 100k file
onto itself to time the update path, and times a reference: a bare sqlite3 executemany of the
same rows (pre-built in memory, one transaction, same table shape and PRAGMAs).
Target from the issue: 1,000,000 customers in under 60 s, memory flat (peak RSS for 1M close
to the peak for 100k).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / ".venv" / "bin" / "connectd"
HEADER = ["Email", "First Name", "age", "score", "vip", "signup", "last_seen", "city"]
CITIES = ["Amsterdam", "Berlin", "Chicago", "Dublin", "Espoo", "Firenze", "Göteborg", "Hanoi"]


def generate(path: Path, rows: int, seed: int = 1) -> None:
    """Write a CSV of `rows` customers with mixed attribute types."""
    rnd = random.Random(seed)
    d0, t0 = date(2015, 1, 1), datetime(2024, 1, 1, tzinfo=UTC)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(HEADER)
        for i in range(rows):
            w.writerow([
                f"User.{i}@Example{i % 97}.com",
                f"Name{rnd.randrange(100000)}",
                rnd.randrange(18, 99),
                f"{rnd.random() * 1000:.2f}",
                rnd.choice(("yes", "no")),
                (d0 + timedelta(days=rnd.randrange(3650))).isoformat(),
                (t0 + timedelta(seconds=rnd.randrange(31_536_000))).isoformat(),
                rnd.choice(CITIES),
            ])


def make_db(root: Path, name: str) -> Path:
    """A migrated SQLite customer DB and a settings file pointing at it -> the settings path."""
    sys.path.insert(0, str(ROOT))
    from connectd.db import migrate
    from connectd.db.engine import make_engine

    (root / name).mkdir()
    db = root / name / "customer.db"
    engine = make_engine(f"sqlite:///{db}")
    migrate.upgrade(engine, "customer")
    engine.dispose()
    cfg = root / name / "connectd.toml"
    cfg.write_text(f'[paths]\nspool = "{root / name}"\nlogs = "{root / name}"\n'
                   f'[database]\ncustomer_url = "sqlite:///{db}"\n'
                   f'report_url = "sqlite:///{root / name / "report.db"}"\n'
                   '[log]\nlevel = "warning"\n', encoding="utf-8")
    return cfg


def run_import(cfg: Path, csv_path: Path) -> dict:
    """Run the CLI import as a child; -> its JSON summary plus wall time and RSS figures."""
    t0 = time.monotonic()
    child = subprocess.Popen([str(CLI), "--config", str(cfg), "customers", "import",
                              str(csv_path), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples: list[tuple[float, int]] = []

    def sample() -> None:
        status = Path(f"/proc/{child.pid}/status")
        while child.returncode is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        samples.append((time.monotonic() - t0, int(line.split()[1])))
            except (OSError, ValueError):
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # wait4 gives this child's own peak RSS (getrusage(RUSAGE_CHILDREN) mixes all children).
    _pid, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    sampler.join()
    out, err = child.communicate()
    if child.returncode != 0:
        sys.exit(f"import failed ({child.returncode}): {err.decode(errors='replace')}")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    summary["wall"] = wall
    summary["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    summary["rss_samples"] = samples
    return summary


def rss_at(samples: list[tuple[float, int]], fraction: float) -> float:
    """VmRSS (MB) of the sample nearest `fraction` of the run's duration."""
    if not samples:
        return 0.0
    end = samples[-1][0]
    t, kb = min(samples, key=lambda s: abs(s[0] - fraction * end))
    return kb / 1024


def reference(root: Path, csv_path: Path) -> tuple[int, float]:
    """Bare sqlite3: the same rows, pre-built, one executemany, one transaction -> (rows, s)."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    rows = []
    with open(csv_path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        names = [h.lower().replace(" ", "_") for h in next(reader)][1:]
        for rec in reader:
            values = dict(zip(names, rec[1:], strict=True))
            rows.append((rec[0], rec[0].lower(), orjson.dumps(values).decode(), now, now))
    conn = sqlite3.connect(root / "reference.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, email VARCHAR(320) NOT NULL, "
                 "email_key VARCHAR(320) NOT NULL UNIQUE, attributes JSON NOT NULL, "
                 "created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL)")
    t0 = time.monotonic()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO customers (email, email_key, attributes, created_at, "
                     "updated_at) VALUES (?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    seconds = time.monotonic() - t0
    conn.close()
    return len(rows), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (prints its path)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-import-"))
    small_rows = min(100_000, args.rows)

    t0 = time.monotonic()
    big, small = tmp / "customers.csv", tmp / "customers-100k.csv"
    generate(big, args.rows)
    with open(big, encoding="utf-8") as src, open(small, "w", encoding="utf-8") as dst:
        for _ in range(small_rows + 1):
            dst.write(src.readline())
    print(f"generated {args.rows} rows ({big.stat().st_size / 1e6:.0f} MB) "
          f"in {time.monotonic() - t0:.1f} s under {tmp}")

    small_run = run_import(make_db(tmp, "small"), small)
    print(f"import {small_rows} rows: {small_run['elapsed']:.1f} s, "
          f"peak RSS {small_run['peak_rss_mb']:.0f} MB")
    update_run = run_import(tmp / "small" / "connectd.toml", small)
    assert update_run["updated"] == small_rows, update_run
    print(f"re-import {small_rows} rows (all updates, JSON merged in SQL): "
          f"{update_run['elapsed']:.1f} s ({update_run['rows_per_s']:.0f} rows/s)")

    run = run_import(make_db(tmp, "big"), big)
    assert run["inserted"] == args.rows and run["bad"] == 0, run
    print(f"import {args.rows} rows: {run['elapsed']:.1f} s in the command, "
          f"{run['wall']:.1f} s wall (with interpreter start), {run['rows_per_s']:.0f} rows/s")
    print("VmRSS over the run: " + ", ".join(
        f"{int(f * 100)}% {rss_at(run['rss_samples'], f):.0f} MB" for f in (.25, .5, .75, 1.0))
          + f"; peak {run['peak_rss_mb']:.0f} MB (100k-row import: "
            f"{small_run['peak_rss_mb']:.0f} MB)")

    ref_rows, ref_s = reference(tmp, big)
    ratio = run["elapsed"] / ref_s
    print(f"reference (bare sqlite3 executemany, rows pre-built, one transaction): "
          f"{ref_s:.1f} s ({ref_rows / ref_s:.0f} rows/s); ours is {ratio:.1f}x that")
    if args.rows >= 1_000_000:
        print(f"target 1,000,000 in < 60 s: {'met' if run['wall'] < 60 else 'MISSED'}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "bench": "import_customers", "rows": args.rows, "seconds": round(run["elapsed"], 2),
        "wall_seconds": round(run["wall"], 2), "rows_per_s": round(run["rows_per_s"]),
        "update_rows_per_s": round(update_run["rows_per_s"]),
        "reference_seconds": round(ref_s, 2), "reference_rows_per_s": round(ref_rows / ref_s),
        "ratio": round(ratio, 2), "peak_rss_mb": round(run["peak_rss_mb"], 1),
        "peak_rss_mb_100k": round(small_run["peak_rss_mb"], 1)}))


if __name__ == "__main__":
    main()
