"""Conversations, subscriber import and suppression lists (connectd.conversations) on real
SQLite and PostgreSQL databases, and their commands through click's CliRunner."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from conftest import write_config
from sqlalchemy import Engine, insert, select

from connectd.cli import main
from connectd.conversations import (
    ConversationError,
    classify_suppression,
    create_conversation,
    import_subscriptions,
    import_suppressions,
    list_conversations,
)
from connectd.customers import BadRow
from connectd.db.customer import Customer, CustomerStats, Subscription, SuppressionEntry
from connectd.db.engine import make_engine

NOW = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def engine(migrated_customer_url: str) -> Iterator[Engine]:
    """A migrated customer DB with customers a..e@x.com (ids 1..5) and conversation 'news'."""
    eng = make_engine(migrated_customer_url)
    with eng.begin() as conn:
        conn.execute(insert(Customer), [
            {"email": f"{c.upper()}@x.com", "email_key": f"{c}@x.com", "attributes": {},
             "created_at": NOW, "updated_at": NOW} for c in "abcde"])
        create_conversation(conn, "news", "weekly news")
    yield eng
    eng.dispose()


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(Customer.email_key, Subscription.status)
                                 .join(Subscription, Subscription.customer_id == Customer.id)).all())


def subscribe(engine: Engine, data: bytes, status: str = "active",
              **kw: object) -> tuple[object, list[BadRow]]:
    bad: list[BadRow] = []
    summary = import_subscriptions(engine, io.BytesIO(data), "news", status,
                                   on_bad=bad.append, **kw)  # type: ignore[arg-type]
    return summary, bad


def test_create_refuses_a_taken_name(engine: Engine) -> None:
    """A second conversation with the same name is refused with the reason."""
    with engine.begin() as conn, pytest.raises(ConversationError, match="already exists"):
        create_conversation(conn, "news")


def test_import_by_email_reports_bad_rows_by_line(engine: Engine) -> None:
    """Good rows are subscribed; bad ones are reported with their line and reason."""
    data = (b"Email,name\n"          # 1
            b"A@x.com,Ann\n"         # 2
            b"not-an-address,Bob\n"  # 3 bad
            b"zz@x.com,Zed\n"        # 4 bad: no such customer
            b",Nobody\n"             # 5 bad: missing
            b"b@X.com,Bea\n")        # 6
    summary, bad = subscribe(engine, data)
    assert statuses(engine) == {"a@x.com": "active", "b@x.com": "active"}
    assert [(b.line, b.reason) for b in bad] == [
        (3, "invalid email address 'not-an-address'"),
        (4, "no customer with email 'zz@x.com'"),
        (5, "missing email")]
    assert (summary.inserted, summary.bad, summary.rows) == (2, 3, 5)  # type: ignore[attr-defined]


def test_import_by_customer_id(engine: Engine) -> None:
    """A customer_id column subscribes by id; an unknown or non-numeric id is a bad row."""
    with engine.connect() as conn:
        cid = conn.execute(select(Customer.id).where(Customer.email_key == "c@x.com")).scalar()
    summary, bad = subscribe(engine, f"customer_id\n{cid}\n999999\nabc\n".encode(),
                             status="opting_in")
    assert statuses(engine) == {"c@x.com": "opting_in"}
    assert [b.line for b in bad] == [3, 4]


def test_headerless_address_list(engine: Engine) -> None:
    """A file of bare addresses (no header) imports every line, the first included."""
    subscribe(engine, b"a@x.com\nd@x.com\n")
    assert statuses(engine) == {"a@x.com": "active", "d@x.com": "active"}


def test_opted_out_is_not_resubscribed_unless_forced(engine: Engine) -> None:
    """An import keeps opted-out customers out; --force re-subscribes them."""
    subscribe(engine, b"email\na@x.com\nb@x.com\n", status="opted_out")
    summary, _ = subscribe(engine, b"email\na@x.com\nb@x.com\nc@x.com\n")
    assert statuses(engine) == {"a@x.com": "opted_out", "b@x.com": "opted_out",
                                "c@x.com": "active"}
    assert (summary.kept, summary.inserted) == (2, 1)  # type: ignore[attr-defined]
    subscribe(engine, b"email\na@x.com\n", force=True)
    assert statuses(engine)["a@x.com"] == "active"


def test_bounced_out_or_complained_before_the_conversation_is_not_subscribed(engine: Engine) -> None:
    """A customer the inbound appliers bounced out (hard bounce) or who complained, before
    this conversation existed, is kept out of an import into it; --force subscribes them."""
    with engine.begin() as conn:
        ids = dict(conn.execute(select(Customer.email_key, Customer.id)).all())
        conn.execute(insert(CustomerStats), [
            {"customer_id": ids["a@x.com"], "bounced_out_at": NOW, "last_complaint_at": None},
            {"customer_id": ids["b@x.com"], "bounced_out_at": None, "last_complaint_at": NOW},
            {"customer_id": ids["c@x.com"], "bounced_out_at": None, "last_complaint_at": None}])
    summary, _ = subscribe(engine, b"email\na@x.com\nb@x.com\nc@x.com\n")
    assert statuses(engine) == {"c@x.com": "active"}
    assert (summary.kept, summary.inserted) == (2, 1)  # type: ignore[attr-defined]
    subscribe(engine, b"email\na@x.com\n", force=True)
    assert statuses(engine)["a@x.com"] == "active"


def test_batches_and_duplicates(engine: Engine) -> None:
    """Small batches give the same result; a repeated address counts as a duplicate."""
    summary, bad = subscribe(engine, b"email\na@x.com\nb@x.com\na@x.com\nc@x.com\nd@x.com\n",
                             batch_size=2)
    assert not bad
    assert len(statuses(engine)) == 4
    # the repeat lands in the next batch: it finds its own row there, unchanged
    assert (summary.inserted, summary.unchanged + summary.duplicates) == (4, 1)  # type: ignore[attr-defined]


def test_unknown_conversation_is_refused(engine: Engine) -> None:
    """Importing into a conversation that does not exist names the ones that do."""
    with pytest.raises(ConversationError, match=r"no conversation 'other' \(known: news\)"):
        import_subscriptions(engine, io.BytesIO(b"email\na@x.com\n"), "other", "active")


def test_list_counts_per_status(engine: Engine) -> None:
    """conversation list counts subscribers per status, zeros included."""
    subscribe(engine, b"email\na@x.com\nb@x.com\n")
    subscribe(engine, b"email\nc@x.com\n", status="opted_out")
    with engine.connect() as conn:
        (row,) = list_conversations(conn)
    assert row["subscribers"] == {"active": 2, "opting_in": 0, "opted_out": 1, "bounced_out": 0}


@pytest.mark.parametrize("raw, expected", [
    ("Someone@Example.COM", ("address", "someone@example.com")),
    ("@Example.com", ("domain", "example.com")),
    ("example.org", ("domain", "example.org")),
    ("sub.example.org.", ("domain", "sub.example.org")),
])
def test_classify_suppression(raw: str, expected: tuple[str, str]) -> None:
    """Addresses, "@domain" and bare domains are told apart and lower-cased."""
    assert classify_suppression(raw) == expected


@pytest.mark.parametrize("raw", ["nodot", "a@", "@", "bad domain.com", "x@y"])
def test_classify_suppression_refuses(raw: str) -> None:
    """Values that are neither an address nor a domain are refused."""
    with pytest.raises(ValueError):
        classify_suppression(raw)


def test_suppression_import(engine: Engine) -> None:
    """Lines and CSV records go in lower-cased; comments, blanks and the header are skipped."""
    data = b"email\n# complaints\nBad@X.com,2024-01-01\n\n@Spam.example\nnot valid\nbad@x.com\n"
    bad: list[BadRow] = []
    summary = import_suppressions(engine, io.BytesIO(data), "complaints", "complained",
                                  on_bad=bad.append)
    with engine.connect() as conn:
        rows = set(conn.execute(select(SuppressionEntry.kind, SuppressionEntry.value,
                                       SuppressionEntry.reason)))
    assert rows == {("address", "bad@x.com", "complained"),
                    ("domain", "spam.example", "complained")}
    assert [b.line for b in bad] == [6]
    assert (summary.inserted, summary.duplicates) == (2, 1)
    again = import_suppressions(engine, io.BytesIO(data), "complaints")
    assert (again.inserted, again.existing) == (0, 2)


# --- the commands -----------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, migrated_customer_url: str) -> CliRunner:
    """A CliRunner whose config points at a migrated customer DB with customers a..c@x.com."""
    cfg = write_config(tmp_path, customer_url=migrated_customer_url)
    eng = make_engine(migrated_customer_url)
    with eng.begin() as conn:
        conn.execute(insert(Customer), [
            {"email": f"{c}@x.com", "email_key": f"{c}@x.com", "attributes": {},
             "created_at": NOW, "updated_at": NOW} for c in "abc"])
    eng.dispose()
    return CliRunner(env={"CONNECTD_CONFIG": str(cfg)})


def test_cli_conversation_subscribe_suppression(cli: CliRunner, tmp_path: Path) -> None:
    """create, subscribe import (bad row reported), list and suppression import/list."""
    r = cli.invoke(main, ["conversation", "create", "deals", "--description", "Deals"])
    assert r.exit_code == 0, r.output
    r = cli.invoke(main, ["conversation", "create", "deals"])
    assert r.exit_code == 1 and "already exists" in r.output
    (tmp_path / "subs.csv").write_text("email\na@x.com\nnope\nb@x.com\n")
    r = cli.invoke(main, ["subscribe", "import", str(tmp_path / "subs.csv"),
                          "--conversation", "deals"])
    assert r.exit_code == 0, r.output
    assert "line 3: invalid email address 'nope'" in r.output
    assert "2 subscribed" in r.output
    r = cli.invoke(main, ["conversation", "list", "--json"])
    assert orjson.loads(r.output)[0]["subscribers"]["active"] == 2
    r = cli.invoke(main, ["conversation", "list"])
    assert r.output.splitlines()[1].split() == ["deals", "2", "0", "0", "0"]
    (tmp_path / "supp.txt").write_text("c@x.com\n@example.net\n")
    r = cli.invoke(main, ["suppression", "import", str(tmp_path / "supp.txt"), "--list", "global"])
    assert r.exit_code == 0 and "2 added (1 addresses, 1 domains)" in r.output, r.output
    r = cli.invoke(main, ["suppression", "list", "--json"])
    assert orjson.loads(r.output)[0] | {"created_at": ""} == {
        "name": "global", "description": "", "addresses": 1, "domains": 1, "created_at": ""}


def test_cli_errors_are_messages(cli: CliRunner, tmp_path: Path) -> None:
    """Unknown conversation: exit 1 with a message; missing file: 66; bad --status: 2."""
    (tmp_path / "s.csv").write_text("email\na@x.com\n")
    r = cli.invoke(main, ["subscribe", "import", str(tmp_path / "s.csv"), "--conversation", "x"])
    assert r.exit_code == 1 and "no conversation 'x'" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    r = cli.invoke(main, ["subscribe", "import", str(tmp_path / "missing.csv"),
                          "--conversation", "x"])
    assert r.exit_code == 66 and "cannot open" in r.output
    r = cli.invoke(main, ["subscribe", "import", str(tmp_path / "s.csv"), "--conversation", "x",
                          "--status", "bounced_out"])
    assert r.exit_code == 2


@pytest.mark.slow
def test_subscribe_import_is_fast(engine: Engine, db_backend: str) -> None:
    """200,000 subscribers import at well over 20,000 rows/s (set-based, not row by row)."""
    n = 200_000
    with engine.begin() as conn:
        conn.execute(insert(Customer), [
            {"email": f"u{i}@y.com", "email_key": f"u{i}@y.com", "attributes": {},
             "created_at": NOW, "updated_at": NOW} for i in range(n)])
    data = b"email\n" + b"".join(b"u%d@y.com\n" % i for i in range(n))
    t0 = time.monotonic()
    summary, bad = subscribe(engine, data)
    rate = n / (time.monotonic() - t0)
    print(f"subscribe import {db_backend}: {rate:.0f} rows/s")
    assert not bad and summary.inserted == n  # type: ignore[attr-defined]
    assert rate > 20_000
