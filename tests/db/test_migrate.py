"""Migrations: both histories reach head, are idempotent, and build exactly the models' schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from connectd.db import migrate
from connectd.db.customer import CustomerBase
from connectd.db.engine import make_engine
from connectd.db.report import ReportBase

METADATA = {"customer": CustomerBase.metadata, "report": ReportBase.metadata}


@pytest.mark.parametrize("which", ["customer", "report"])
def test_upgrade_reaches_head(db_url: str, which: str) -> None:
    """An empty database is at no revision; upgrade brings it to head."""
    engine = make_engine(db_url)
    assert migrate.current(engine, which) is None
    migrate.upgrade(engine, which)
    assert migrate.current(engine, which) == migrate.head(which)
    engine.dispose()


@pytest.mark.parametrize("which", ["customer", "report"])
def test_upgrade_is_idempotent(db_url: str, which: str) -> None:
    """A second upgrade leaves revision and tables as they were."""
    engine = make_engine(db_url)
    migrate.upgrade(engine, which)
    tables = set(inspect(engine).get_table_names())
    migrate.upgrade(engine, which)
    assert migrate.current(engine, which) == migrate.head(which)
    assert set(inspect(engine).get_table_names()) == tables
    engine.dispose()


@pytest.mark.parametrize("which", ["customer", "report"])
def test_migrated_schema_matches_models(db_url: str, which: str) -> None:
    """Alembic finds no difference (tables, columns, types, indexes, constraints) between the
    migrated database and the models."""
    engine = make_engine(db_url)
    migrate.upgrade(engine, which)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True, "version_table": migrate.version_table(which)})
        diff = compare_metadata(ctx, METADATA[which])
    engine.dispose()
    assert diff == []


def test_histories_keep_separate_version_tables(db_url: str) -> None:
    """Each history records its revision in its own table, so neither sees the other's."""
    engine = make_engine(db_url)
    migrate.upgrade(engine, "report")
    assert migrate.current(engine, "customer") is None
    assert migrate.current(engine, "report") == "report_0001"
    assert "alembic_version_report" in inspect(engine).get_table_names()
    assert "alembic_version" not in inspect(engine).get_table_names()
    engine.dispose()


def test_unknown_history_is_refused() -> None:
    """Only the customer and report histories exist."""
    with pytest.raises(ValueError, match="unknown migration history"):
        migrate.head("billing")  # type: ignore[arg-type]


def test_engines_follow_settings(settings) -> None:
    """engines(settings) gives the customer and the report engine, in that order."""
    customer, report = migrate.engines(settings)
    assert customer.url.database == str(settings.paths.spool / "customer.db")
    assert report.url.database == str(settings.paths.spool / "report.db")
    customer.dispose()
    report.dispose()


@pytest.mark.postgres
def test_both_histories_share_one_postgresql_database(pg_url_factory) -> None:
    """Customer and report DB can live in one PostgreSQL database, the report DB in its own
    schema (both have a consumer_positions table), each at its own head."""
    url = pg_url_factory()
    setup = make_engine(url)
    with setup.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA report")
    setup.dispose()
    customer = make_engine(url)
    report = make_engine(url + "?options=-csearch_path%3Dreport")
    migrate.upgrade(customer, "customer")
    migrate.upgrade(report, "report")
    assert migrate.current(customer, "customer") == migrate.head("customer")
    assert migrate.current(report, "report") == migrate.head("report")
    assert "message_facts" in inspect(customer).get_table_names(schema="report")
    customer.dispose()
    report.dispose()


def test_failed_upgrade_leaves_nothing_behind(db_url: str) -> None:
    """An upgrade that fails halfway (a table in the way) rolls back every table it made."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    with pytest.raises(Exception, match="users"):
        migrate.upgrade(engine, "customer")
    assert inspect(engine).get_table_names() == ["users"]
    assert migrate.current(engine, "customer") is None
    engine.dispose()
