"""Alembic environment of the customer DB history (run via connectd.db.migrate)."""

from alembic import context

from connectd.db.customer import CustomerBase
from connectd.db.migrate import run_env

run_env(context, CustomerBase.metadata)
