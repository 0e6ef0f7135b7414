"""`connectd campaign ...` through click's CliRunner (and one real `connectd` process): the
whole create -> preflight -> launch -> pause/resume -> status path, and every error as a
message with exit status 2 (usage) or 1 (anything else), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result
from conftest import write_config
from sqlalchemy import insert, select

from connectd.cli import main
from connectd.conversations import create_conversation
from connectd.db.customer import AttributeDef, Customer, Subscription
from connectd.db.engine import make_engine

CLI = Path(sys.executable).parent / "connectd"
NOW = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def config(tmp_path: Path, migrated_customer_url: str) -> Path:
    """Settings on a migrated DB: 4 customers (country), all active in conversation 'news'."""
    cfg = write_config(tmp_path, customer_url=migrated_customer_url)
    engine = make_engine(migrated_customer_url)
    with engine.begin() as conn:
        conn.execute(insert(AttributeDef).values(name="country", type="string", created_at=NOW))
        conn.execute(insert(Customer), [
            {"email": e, "email_key": e, "attributes": {"country": c}, "created_at": NOW,
             "updated_at": NOW}
            for e, c in [("a@x.com", "DE"), ("b@x.com", "FR"), ("c@y.org", "DE"),
                         ("d@y.org", "IT")]])
        conv = create_conversation(conn, "news")
        conn.execute(insert(Subscription), [
            {"customer_id": i, "conversation_id": conv, "status": "active", "changed_at": NOW}
            for i in conn.execute(select(Customer.id)).scalars()])
    engine.dispose()
    (tmp_path / "mail.html").write_text("<p>Hello [First Name|friend]</p>")
    return cfg


@pytest.fixture
def run(config: Path) -> object:
    runner = CliRunner(env={"CONNECTD_CONFIG": str(config)})

    def invoke(*args: str) -> Result:
        return runner.invoke(main, ["campaign", *args])

    return invoke


def create_args(config: Path, *extra: str) -> list[str]:
    return ["create", "spring", "--conversation", "news", "--subject", "Hi [First Name|you]",
            "--html", str(config.parent.parent / "mail.html"), *extra]


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_whole_path(run: object, config: Path) -> None:
    """create, show, preflight --json, launch, status --json, list, pause, resume."""
    r = run(*create_args(config, "--segment", 'de=country = "DE"', "--leftovers"))  # type: ignore[operator]
    assert r.exit_code == 0, r.output
    r = run("show", "spring", "--json")  # type: ignore[operator]
    shown = orjson.loads(r.stdout)
    assert [s["name"] for s in shown["segments"]] == ["de", "Leftovers"]
    assert shown["messages"][0]["html_url"].endswith("/content/spring/mail.html")
    r = run("preflight", "spring", "--json", "--no-dns")  # type: ignore[operator]
    assert r.exit_code == 0, r.output
    report = orjson.loads(r.stdout)
    assert (report["targets"], report["segments"]) == (4, {"de": 2, "Leftovers": 2})
    r = run("launch", "spring", "--at", "now")  # type: ignore[operator]
    assert r.exit_code == 0 and "launched: instance" in r.output, r.output
    r = run("status", "spring", "--json")  # type: ignore[operator]
    status = orjson.loads(r.stdout)
    assert status["status"] == "running"
    assert status["instances"][0]["status"] == "ready"
    assert status["instances"][0]["counts"]["unknown"] == 0
    r = run("status", "spring")  # type: ignore[operator]
    assert "instance" in r.output and "unknown 0" in r.output
    r = run("list")  # type: ignore[operator]
    assert r.output.splitlines()[1].split()[:4] == ["spring", "normal", "running", "news"]
    assert orjson.loads(run("list", "--json").stdout)[0]["instances"] == 1  # type: ignore[operator]
    assert run("pause", "spring").exit_code == 0  # type: ignore[operator]
    assert orjson.loads(run("status", "spring", "--json").stdout)["status"] == "paused"  # type: ignore[operator]
    assert run("resume", "spring").exit_code == 0  # type: ignore[operator]


def test_bad_filter_shows_column_and_caret(run: object, config: Path) -> None:
    """A bad segment filter: exit 1, the column, the reason and a caret; nothing created."""
    r = run(*create_args(config, "--segment", 'country = "DE"', "--segment", "contry = 1"))  # type: ignore[operator]
    assert r.exit_code == 1
    assert "--segment 2 (Segment 2): bad filter at column 1: unknown attribute 'contry'" in r.output
    assert "  contry = 1\n  ^" in r.output
    no_traceback(r)
    assert orjson.loads(run("list", "--json").stdout) == []  # type: ignore[operator]


@pytest.mark.parametrize("args, code, message", [
    (["create", "x", "--conversation", "news", "--html", "https://a/b"], 2, "--subject"),
    (["create", "x", "--conversation", "news", "--subject", "s"], 2, "--html and/or --text"),
    (["create", "x", "--conversation", "news", "--subject", "s", "--html", "https://a/b",
      "--recurring-cron", "0 9 * * *", "--every-days", "3"], 2, "exclude each other"),
    (["create", "x", "--conversation", "nope", "--subject", "s", "--html", "https://a/b"], 1,
     "no conversation 'nope'"),
    (["create", "x", "--conversation", "news", "--subject", "s", "--html", "https://a/b",
      "--split", "x=50,50"], 1, "no segment named 'x'"),
    (["launch", "ghost"], 1, "no campaign 'ghost'"),
    (["launch", "ghost", "--at", "soon"], 1, "expected \"now\" or an ISO time"),
    (["status", "ghost"], 1, "no campaign 'ghost'"),
    (["pause", "ghost"], 1, "no campaign 'ghost'"),
    (["frobnicate"], 2, "No such command"),
])
def test_errors_are_messages(run: object, args: list[str], code: int, message: str) -> None:
    """Usage errors exit 2, the rest exit 1; each with a message, never a traceback."""
    r = run(*args)  # type: ignore[operator]
    assert r.exit_code == code, r.output
    assert message in r.output
    no_traceback(r)


def test_recurring_launch(run: object, config: Path) -> None:
    """A cron campaign's launch starts its schedule; launching again is refused."""
    assert run(*create_args(config, "--recurring-cron", "0 9 * * *")).exit_code == 0  # type: ignore[operator]
    r = run("launch", "spring", "--at", "2026-03-01T08:00:00Z")  # type: ignore[operator]
    assert r.exit_code == 0, r.output
    assert "first run 2026-03-01T09:00:00Z" in r.output
    r = run("launch", "spring")  # type: ignore[operator]
    assert r.exit_code == 1 and "already running" in r.output


def test_inline_create(run: object, config: Path) -> None:
    """--inline stores the file's text; show reports the _inline URL."""
    assert run(*create_args(config, "--inline")).exit_code == 0  # type: ignore[operator]
    shown = orjson.loads(run("show", "spring", "--json").stdout)  # type: ignore[operator]
    assert "/content/_inline/" in shown["messages"][0]["html_url"]
    assert shown["messages"][0]["inline"] is True


def test_real_process_launch_twice(config: Path) -> None:
    """The installed `connectd` script: launch succeeds, the second launch exits 1 with a
    message and no traceback (what a cron line sees)."""
    env = {**os.environ, "CONNECTD_CONFIG": str(config)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CLI), "campaign", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    done = cli(*create_args(config))
    assert done.returncode == 0, done.stderr
    first = cli("launch", "spring")
    assert first.returncode == 0, first.stderr
    assert "launched: instance" in first.stdout
    second = cli("launch", "spring")
    assert second.returncode == 1
    assert "was already launched" in second.stderr
    assert "Traceback" not in second.stderr
