"""The daemons, and `connectd run NAME`.

DAEMONS lists the daemons that exist in this build, in the order `connectd up` starts them;
later issues add theirs (web, manager, composer, tracker, receiver, processor, sink).
"""

from __future__ import annotations

import sys

import click

DAEMONS: dict[str, str] = {
    "sink": "local development mail farm: stores every message in a maildir",
    "profiler": "applies every event stream to the customer and report databases",
    "web": "content server (files under paths.content_root, inline content)",
    "manager": "prepares launched messages into targets and batches; retries; completion",
    "composer": "claims batches, renders, signs and hands mail to the relays (--instance N)",
    "tracker": "HTTP: click redirects, open pixel, unsubscribe, conversions (never needs the DB)",
    "receiver": "SMTP for the reply domain: stores each message durably, then receiver.events",
    "processor": "classifies received mail, runs the reply-handler chain -> processor.events",
}


def _daemon_class(name: str) -> type:
    if name == "sink":
        from connectd.daemons.sink import Sink
        return Sink
    if name == "profiler":
        from connectd.daemons.profiler import Profiler
        return Profiler
    if name == "web":
        from connectd.daemons.web import Web
        return Web
    if name == "manager":
        from connectd.daemons.manager import Manager
        return Manager
    if name == "composer":
        from connectd.daemons.composer import Composer
        return Composer
    if name == "tracker":
        from connectd.daemons.tracker import Tracker
        return Tracker
    if name == "receiver":
        from connectd.daemons.receiver import Receiver
        return Receiver
    if name == "processor":
        from connectd.daemons.processor import Processor
        return Processor
    raise KeyError(name)


@click.command("run")
@click.argument("name", type=click.Choice(sorted(DAEMONS)), metavar="NAME")
@click.option("--once", is_flag=True,
              help="Work until there is nothing left to do, then exit (for cron and tests).")
@click.option("--instance", type=click.IntRange(1, 999), default=1, show_default=True,
              help="composer only: which composer of this host (names its streams and lease).")
def run_command(name: str, once: bool, instance: int) -> None:
    """Run one daemon (NAME) in the foreground, as systemd and `connectd up` do.

    \b
    Daemons in this build:
    """
    from connectd.daemon import DaemonFailed
    from connectd.daemons.profiler import NotInitialised, WorkerDied
    from connectd.settings import EX_CONFIG, SettingsError

    ctx = click.get_current_context().obj
    cls = _daemon_class(name)
    try:
        # constructors check their own settings (quiet hours, time zone, key files, ...)
        daemon = cls(ctx.settings, instance=instance) if name == "composer" else cls(ctx.settings)
        if once:
            n = daemon.run_until_idle()
            click.echo(f"{name}: {n} items done", err=True)
            return
        sys.exit(daemon.run())
    except (NotInitialised, SettingsError) as exc:
        # not a crash to restart from: systemd's RestartPreventExitStatus=78 stops the loop
        click.echo(f"connectd run {name}: {exc}", err=True)
        sys.exit(EX_CONFIG)
    except (WorkerDied, DaemonFailed) as exc:  # logged why; the supervisor restarts us
        click.echo(f"connectd run {name}: {exc}", err=True)
        sys.exit(1)


run_command.help = (run_command.help or "") + "".join(
    f"\b\n      {n:<10} {d}\n" for n, d in DAEMONS.items())
