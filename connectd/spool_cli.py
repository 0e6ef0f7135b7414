"""`connectd spool` (stub)."""

import click


@click.group("spool")
def spool_group() -> None:
    """Inspect and maintain the event streams."""
