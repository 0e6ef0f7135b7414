"""The `connectd` command line (click). Other tools script against it: keep it stable.

Each area owns its commands in its own module; this module holds the top-level group, the
--config option, and the translation of a settings error into exit status 78 (EX_CONFIG).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from connectd import log, settings


class Context:
    """What every command gets: the settings path, loaded on first use."""

    def __init__(self, config: Path | None) -> None:
        self.config = config
        self._settings: settings.Settings | None = None

    @property
    def settings(self) -> settings.Settings:
        if self._settings is None:
            try:
                self._settings = settings.load(self.config)
            except settings.SettingsError as exc:
                click.echo(f"connectd: bad configuration: {exc}", err=True)
                sys.exit(settings.EX_CONFIG)
            log.configure(self._settings.log.level, self._settings.log.format)
        return self._settings


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config", type=click.Path(path_type=Path), envvar="CONNECTD_CONFIG",
              help="Settings file (default: the checkout's etc/connectd.toml, else "
                   "/etc/connectd/connectd.toml). Also CONNECTD_CONFIG.")
@click.version_option(package_name="connectd")
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """connectd: two-way e-mail conversations with customers.

    Small daemons linked by append-only event logs in a spool directory. Start everything
    on a laptop with `connectd init && connectd up`; under systemd, one unit per daemon.
    """
    ctx.obj = Context(config)


@main.group("config")
def config_group() -> None:
    """Inspect the effective settings."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="One JSON object of key -> value.")
@pass_ctx
def config_show(ctx: Context, as_json: bool) -> None:
    """Print every setting's effective value (file + environment), with what it means."""
    st = ctx.settings
    rows = settings.describe(st)
    if as_json:
        import orjson
        click.echo(orjson.dumps({k: (list(v) if isinstance(v, tuple) else str(v)
                                     if not isinstance(v, (bool, int, float)) else v)
                                 for k, v, _ in rows}).decode())
        return
    click.echo(f"# effective settings from {st.source}")
    section = None
    for key, value, doc in rows:
        sec, name = key.split(".", 1)
        if sec != section:
            click.echo(f"\n[{sec}]")
            section = sec
        click.echo(f"{name} = {settings.to_toml_value(value)}  # {doc}")


def _register() -> None:
    """Attach the commands each area owns."""
    from connectd.campaign_cli import campaign_group
    from connectd.conversations import conversation_group, subscribe_group, suppression_group
    from connectd.customers import customers_group
    from connectd.daemons import run_command
    from connectd.dkim_cli import dkim_group
    from connectd.init import init_command
    from connectd.mail_cli import mail_group
    from connectd.segments import segment_group
    from connectd.spool_cli import spool_group
    from connectd.supervisor import up_command

    for cmd in (init_command, up_command, run_command, customers_group, spool_group, segment_group):
        main.add_command(cmd)
    for cmd in (conversation_group, subscribe_group, suppression_group, campaign_group,
                dkim_group, mail_group):
        main.add_command(cmd)


_register()
