"""Alembic environment of the report DB history (run via connectd.db.migrate)."""

from alembic import context

from connectd.db.migrate import run_env
from connectd.db.report import ReportBase

run_env(context, ReportBase.metadata)
