"""`connectd campaign ...`: create, launch, pause, resume, status, list, show, preflight."""

from __future__ import annotations

import click


@click.group("campaign")
def campaign_group() -> None:
    """Campaigns: create, launch (now, at a time, or on a schedule), pause, resume, status."""
