"""`connectd customers import|export` against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import migrated_url, write_config
from sqlalchemy import Engine, func, select

from connectd.customers import BadRow, ImportFailed, export_csv, import_csv
from connectd.db.customer import AttributeDef, Customer
from connectd.db.engine import make_engine

CLI = Path(sys.executable).parent / "connectd"

MIXED = (
    b"email,name,age:integer\n"               # 1
    b"good1@x.com,Ann,30\n"                   # 2
    b"not-an-email,Bob,31\n"                  # 3 bad: email syntax
    b"good2@x.com,Cy\n"                       # 4 bad: 2 fields
    b"good3@x.com,Dee,old\n"                  # 5 bad: not an integer
    b"good4@x.com,E\xffe,33\n"                # 6 bad: not UTF-8
    b",Fay,34\n"                              # 7 bad: no email
    b'good5@x.com,"Multi\n'                   # 8 (record spans 8-9)
    b'line",35\n'                             # 9
    b"\n"                                     # 10 blank: ignored
    b"good6@x.com,Gus,36\n"                   # 11
    b'good7@x.com,"Hal\n'                     # 12 bad: 2 fields, spans 12-13
    b'"\n'                                    # 13
)
MIXED_BAD = [
    (3, "invalid email address 'not-an-email'"),
    (4, "expected 3 fields, got 2"),
    (5, "age: not an integer: 'old'"),
    (6, "bytes that are not UTF-8 in field 2"),
    (7, "missing email"),
    (12, "expected 3 fields, got 2"),
]


@pytest.fixture
def engine(migrated_customer_url: str) -> Iterator[Engine]:
    """An engine on a migrated, empty customer DB."""
    eng = make_engine(migrated_customer_url)
    yield eng
    eng.dispose()


def run_import(engine: Engine, data: bytes, **kw: object) -> tuple[object, list[BadRow]]:
    """import_csv over in-memory bytes -> (summary, bad rows)."""
    bad: list[BadRow] = []
    summary = import_csv(engine, io.BytesIO(data), on_bad=bad.append, **kw)  # type: ignore[arg-type]
    return summary, bad


def stored(engine: Engine) -> dict[str, tuple[str, dict]]:
    """email_key -> (email, attributes) of every customer."""
    with engine.connect() as conn:
        rows = conn.execute(select(Customer.email_key, Customer.email, Customer.attributes))
        return {key: (email, attrs) for key, email, attrs in rows}


def definitions(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(AttributeDef.name, AttributeDef.type)).all())


def test_good_rows_imported_with_inferred_types(engine: Engine) -> None:
    """Every row of a clean file is stored with its values parsed to the inferred types."""
    data = (b"\xef\xbb\xbfEMAIL,First Name,age,score,vip,signup,seen,zip\n"
            b"a@x.com,Ann,30,1.5,yes,2024-01-02,2024-01-02T10:00:00Z,0123\n"
            b"b@x.com,Bob,41,2,no,2023-12-31,2024-01-03 11:00:00+01:00,9999\n")
    summary, bad = run_import(engine, data)
    assert bad == []
    assert (summary.rows, summary.inserted, summary.updated) == (2, 2, 0)
    assert definitions(engine) == {"first_name": "string", "age": "integer", "score": "number",
                                   "vip": "boolean", "signup": "date", "seen": "datetime",
                                   "zip": "string"}
    assert stored(engine)["b@x.com"] == ("b@x.com", {
        "first_name": "Bob", "age": 41, "score": 2.0, "vip": False, "signup": "2023-12-31",
        "seen": "2024-01-03T10:00:00+00:00", "zip": "9999"})


def test_bad_rows_reported_good_rows_kept(engine: Engine) -> None:
    """A file mixing bad rows imports every good row and reports each bad one by line."""
    summary, bad = run_import(engine, MIXED)
    assert [(b.line, b.reason) for b in bad] == MIXED_BAD
    assert sorted(stored(engine)) == ["good1@x.com", "good5@x.com", "good6@x.com"]
    assert stored(engine)["good5@x.com"][1] == {"name": "Multi\nline", "age": 35}
    assert (summary.rows, summary.inserted, summary.bad) == (9, 3, 6)
    assert bad[3].raw == "good4@x.com,E\\xffe,33"


def test_upsert_merges_attributes(engine: Engine) -> None:
    """A second import updates given values, keeps the others and counts updates."""
    run_import(engine, b"email,city,age\na@x.com,Oslo,30\nb@x.com,Rome,40\n")
    with engine.connect() as conn:
        before = conn.execute(select(Customer.updated_at).where(
            Customer.email_key == "a@x.com")).scalar_one()
    summary, bad = run_import(engine, b"email,age,vip\na@x.com,31,yes\nc@x.com,,no\n")
    assert bad == []
    assert (summary.inserted, summary.updated, summary.duplicates) == (1, 1, 0)
    assert stored(engine) == {
        "a@x.com": ("a@x.com", {"city": "Oslo", "age": 31, "vip": True}),
        "b@x.com": ("b@x.com", {"city": "Rome", "age": 40}),
        "c@x.com": ("c@x.com", {"vip": False}),
    }
    with engine.connect() as conn:
        after = conn.execute(select(Customer.updated_at).where(
            Customer.email_key == "a@x.com")).scalar_one()
    assert after > before


@pytest.mark.parametrize("batch_size", [10_000, 1])
def test_email_case_insensitive_dedupe(engine: Engine, batch_size: int) -> None:
    """A@X.com then a@x.com is one customer; the later row wins, merged onto the earlier."""
    summary, _ = run_import(engine, b"email,age,city\nA@X.com,30,Oslo\nb@x.com,1,\n"
                                    b"a@x.com,31,\n", batch_size=batch_size)
    assert stored(engine) == {"a@x.com": ("a@x.com", {"age": 31, "city": "Oslo"}),
                              "b@x.com": ("b@x.com", {"age": 1})}
    assert (summary.rows, summary.inserted, summary.updated, summary.duplicates) == (3, 2, 0, 1)


def test_declared_types_override_inference(engine: Engine) -> None:
    """--type and a header suffix decide the type whatever the values look like."""
    summary, bad = run_import(engine, b"email,zip,code:string,n\na@x.com,0042,17,5\n",
                              declared={"zip": "integer", "n": "number"})
    assert bad == []
    assert summary.types == {"zip": "integer", "code": "string", "n": "number"}
    assert stored(engine)["a@x.com"][1] == {"zip": 42, "code": "17", "n": 5.0}


def test_existing_definition_wins_over_inference(engine: Engine) -> None:
    """A column already defined keeps its type; values not of it are bad rows."""
    run_import(engine, b"email,level\na@x.com,3\n")
    summary, bad = run_import(engine, b"email,level\nb@x.com,high\nc@x.com,4\n")
    assert definitions(engine) == {"level": "integer"}
    assert [(b.line, b.reason) for b in bad] == [(2, "level: not an integer: 'high'")]
    assert summary.inserted == 1


def test_declared_type_contradicting_definition_fails(engine: Engine) -> None:
    """Declaring another type for a defined attribute stops the import before any write."""
    run_import(engine, b"email,level\na@x.com,3\n")
    with pytest.raises(ImportFailed, match="already integer"):
        run_import(engine, b"email,level:string\nb@x.com,high\n")
    assert sorted(stored(engine)) == ["a@x.com"]


@pytest.mark.parametrize("data, message", [
    (b"name,age\nAnn,3\n", "no email column"),
    (b"", "empty"),
    (b"email,Age,age\n", "both attribute 'age'"),
    (b"email,1st\n", "must start with a letter"),
])
def test_unusable_header_fails(engine: Engine, data: bytes, message: str) -> None:
    """A header without an email column, or with bad or clashing names, fails the import."""
    with pytest.raises(ImportFailed, match=message):
        run_import(engine, data)


def test_export_round_trips_an_import(engine: Engine, tmp_path: Path) -> None:
    """Exporting, then importing the export into an empty DB, gives the same customers."""
    data = (b"email,name,age,score,vip,since,seen\n"
            b"A@x.com,\"Smith, Ann\",30,0.1,yes,2024-01-02,2024-01-02T10:00:00Z\n"
            b"b@x.com,\"Multi\nline \"\"q\"\"\",,1e20,no,,\n"
            b"c@x.com,,,,,,\n")
    run_import(engine, data)
    out = io.StringIO()
    assert export_csv(engine, out, batch_size=2) == 3
    other = make_engine(migrated_url(f"sqlite:///{tmp_path / 'other.db'}", "customer"))
    try:
        _, bad = run_import(other, out.getvalue().encode())
        assert bad == []
        assert stored(other) == stored(engine)
        assert definitions(other) == definitions(engine)
    finally:
        other.dispose()
    assert out.getvalue().splitlines()[0] == ("email,age:integer,name:string,score:number,"
                                              "seen:datetime,since:date,vip:boolean")


# --- the command line, as users run it ---------------------------------------------------


def cli(cfg: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), "--config", str(cfg), "customers", *args], input=stdin,
                          capture_output=True, timeout=120)


def test_cli_import_reports_and_summarises(migrated_customer_url: str, tmp_path: Path) -> None:
    """The command prints each bad line on stderr, writes --errors, exits 0, sums up."""
    cfg = write_config(tmp_path, customer_url=migrated_customer_url)
    src, errors = tmp_path / "in.csv", tmp_path / "bad.csv"
    src.write_bytes(MIXED)
    done = cli(cfg, "import", str(src), "--errors", str(errors), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["rows"], summary["inserted"], summary["bad"]) == (9, 3, 6)
    err = done.stderr.decode()
    for line, reason in MIXED_BAD:
        assert f"line {line}: {reason}" in err
    with open(errors, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["line", "reason", "raw"]
    assert [(int(r[0]), r[1]) for r in rows[1:]] == MIXED_BAD


def test_cli_strict_exits_1_after_importing(migrated_customer_url: str, tmp_path: Path) -> None:
    """--strict exits 1 when a row was bad, with the good rows imported."""
    cfg = write_config(tmp_path, customer_url=migrated_customer_url)
    src = tmp_path / "in.csv"
    src.write_bytes(MIXED)
    done = cli(cfg, "import", str(src), "--strict")
    assert done.returncode == 1
    assert b"3 inserted" in done.stdout
    engine = make_engine(migrated_customer_url)
    try:
        assert len(stored(engine)) == 3
    finally:
        engine.dispose()


def test_cli_exit_codes_for_unusable_input(tmp_path: Path) -> None:
    """A missing file exits 66, a header without email 65, each with a message."""
    cfg = write_config(tmp_path, customer_url=migrated_url(
        f"sqlite:///{tmp_path / 'c.db'}", "customer"))
    missing = cli(cfg, "import", str(tmp_path / "nope.csv"))
    assert missing.returncode == 66
    assert b"cannot open" in missing.stderr
    (tmp_path / "x.csv").write_text("name\nAnn\n")
    no_email = cli(cfg, "import", str(tmp_path / "x.csv"))
    assert no_email.returncode == 65
    assert b"no email column" in no_email.stderr


def test_cli_export_round_trip(migrated_customer_url: str, tmp_path: Path) -> None:
    """import from stdin, export to a file and to stdout: the same CSV both ways."""
    cfg = write_config(tmp_path, customer_url=migrated_customer_url)
    assert cli(cfg, "import", "-", stdin=b"email,n\nb@x.com,2\na@x.com,1\n").returncode == 0
    to_stdout = cli(cfg, "export")
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert to_stdout.stdout == b"email,n:integer\nb@x.com,2\na@x.com,1\n"
    assert cli(cfg, "export", str(tmp_path / "out.csv")).returncode == 0
    assert (tmp_path / "out.csv").read_bytes() == to_stdout.stdout


def test_cli_killed_import_keeps_batches_and_reruns(migrated_customer_url: str,
                                                    tmp_path: Path) -> None:
    """SIGKILL mid-import keeps whole committed batches; re-running completes it exactly."""
    cfg = write_config(tmp_path, customer_url=migrated_customer_url)
    src = tmp_path / "big.csv"
    rows = 60_000
    src.write_text("email,n\n" + "".join(f"u{i}@x.com,{i}\n" for i in range(rows)))
    engine = make_engine(migrated_customer_url)
    try:
        child = subprocess.Popen([str(CLI), "--config", str(cfg), "customers", "import",
                                  str(src), "--batch-size", "1000"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        count, deadline = 0, time.monotonic() + 60
        while count == 0 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            with engine.connect() as conn:
                count = conn.execute(select(func.count()).select_from(Customer)).scalar_one()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        with engine.connect() as conn:
            kept = conn.execute(select(func.count()).select_from(Customer)).scalar_one()
        assert 0 < kept < rows, "the import was not caught mid-way"
        assert kept % 1000 == 0
        done = cli(cfg, "import", str(src), "--json")
        assert done.returncode == 0
        summary = json.loads(done.stdout)
        assert (summary["inserted"], summary["updated"]) == (rows - kept, kept)
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Customer)).scalar_one() == rows
    finally:
        engine.dispose()
