"""`connectd customers` (stub, to be implemented: CSV import/export)."""

import click


@click.group("customers")
def customers_group() -> None:
    """Import and export customers."""
