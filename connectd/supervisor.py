"""`connectd up` (stub)."""

import click


@click.command("up")
def up_command() -> None:
    """Start every daemon in the foreground."""
    raise click.ClickException("not implemented yet")
