"""`connectd mail classify FILE... [--json]`: classify received messages offline.

Inputs: message files (raw RFC 5322 bytes, e.g. from <spool>/inbound/new/ or a corpus).
Outputs: one line per file, in the order given: a JSON object with at least file, kind,
recipients, hard, reason, status, customer, instance (--json), or a readable table row.
VERP tokens are verified with the keys of connectd.secrets when a configuration is readable,
so `customer` and `instance` are filled exactly as the processor would fill them. A file that
cannot be read is named on stderr; the others are still classified, and the exit status is 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from connectd import settings
from connectd.core.classify import Classification, classify_reply
from connectd.secrets import SecretsError, load_secrets


@click.group("mail")
def mail_group() -> None:
    """Inbound mail tools."""


def _keys_and_domains() -> tuple[list[str], list[str]]:
    """The VERP keys and reply domains of the configuration, when one is readable; else
    none (the classifier still works; only signed VERP context stays unread)."""
    root = click.get_current_context().find_root().obj
    try:
        st = settings.load(getattr(root, "config", None))
    except (settings.SettingsError, OSError):
        return [], []
    domains = [d for d in (st.receiver.domain, *st.receiver.domains) if d]
    try:
        keys = list(load_secrets(st.paths.secrets).verp_keys)
    except SecretsError:
        keys = []
    return keys, domains


def _row(c: Classification, file: str) -> str:
    rcpts = ",".join(c.recipients) or "-"
    hard = {True: "hard", False: "soft", None: "-"}[c.hard]
    who = f"c{c.customer}/i{c.instance}" if c.customer is not None else "-"
    return f"{file}\t{c.kind}\t{rcpts}\t{hard}\t{c.reason or '-'}\t{c.status or '-'}\t{who}"


@mail_group.command("classify")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path,
                                                                 dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line and file.")
def classify_command(files: tuple[Path, ...], as_json: bool) -> None:
    """Classify each FILE: bounce, autoreply, feedback, delivered, (un)subscribe or human."""
    keys, domains = _keys_and_domains()
    failed = False
    for path in files:
        name = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            click.echo(f"connectd mail classify: {name}: {exc.strerror or exc}", err=True)
            failed = True
            continue
        c = classify_reply(raw, verp_keys=keys, reply_domains=domains)
        if as_json:
            click.echo(json.dumps(c.to_json(name), ensure_ascii=False))
        else:
            click.echo(_row(c, name))
    sys.stdout.flush()
    if failed:
        sys.exit(1)
