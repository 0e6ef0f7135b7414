"""The daemons and `connectd run NAME` (stub)."""

import click


@click.command("run")
@click.argument("name")
@click.option("--once", is_flag=True)
def run_command(name: str, once: bool) -> None:
    """Run one daemon in the foreground."""
    raise click.ClickException("not implemented yet")
