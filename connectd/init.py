"""`connectd init` (stub, to be implemented: dirs, migrations, secrets, admin user)."""

import click


@click.command("init")
def init_command() -> None:
    """Create the spool, databases (migrations), secrets and an admin user; idempotent."""
    raise click.ClickException("not implemented yet")
