"""`connectd campaign ...`: command-line arguments -> connectd.campaigns -> tables or JSON.

Commands: create, launch, trial, pause, resume, status, list, show, preflight. Every error is one
clear message on stderr and a non-zero exit: 2 for a usage error (click's), 1 otherwise;
never a traceback (CampaignError, database and file errors are turned into messages here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import orjson
from sqlalchemy.exc import SQLAlchemyError

from connectd import campaigns
from connectd.conversations import cli_engine, format_table
from connectd.db.customer import TARGET_STATUSES

F = TypeVar("F", bound=Callable[..., Any])


def _settings() -> Any:
    return click.get_current_context().obj.settings  # connectd.cli.Context


def _friendly(fn: F) -> F:
    """Turn the errors a user can meet into messages with exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except campaigns.CampaignError as exc:
            raise click.ClickException(str(exc)) from None
        except SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise click.ClickException(f"database error: {detail}") from None
        except OSError as exc:
            raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}") from None

    return wrapper  # type: ignore[return-value]


def _json(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


@click.group("campaign")
def campaign_group() -> None:
    """Campaigns: create, launch (now, at a time, or on a schedule), pause, resume, status."""


@campaign_group.command("create")
@click.argument("name")
@click.option("--conversation", required=True, help="The conversation whose subscribers it mails.")
@click.option("--subject", required=True, help="Subject line (merge tags allowed).")
@click.option("--html", "html", metavar="URL_OR_FILE", help="HTML body: an http(s) URL or a file.")
@click.option("--text", "text", metavar="URL_OR_FILE", help="Text body: an http(s) URL or a file.")
@click.option("--segment", "segments", multiple=True, metavar="[NAME=]EXPR",
              help="A segment filter, repeatable, in order: first match wins.")
@click.option("--leftovers", is_flag=True, help="Add a Leftovers segment last (everyone else).")
@click.option("--split", "splits", multiple=True, metavar="[SEGMENT=]SPEC",
              help="Random split: equal:N, P1,P2,... percentages, or P (= P and 100-P); "
                   "without SEGMENT= for every segment.")
@click.option("--audience", metavar="EXPR", help="Filter narrowing the conversation's subscribers.")
@click.option("--from", "from_address", metavar="ADDR",
              help="From address (default: composer.from_address).")
@click.option("--recurring-cron", "cron", metavar="EXPR",
              help="Recurring: a cron expression in manager.timezone, e.g. '0 9 * * mon'.")
@click.option("--every-days", type=int, metavar="N",
              help="Recurring: daily, to customers this campaign last mailed N+ days ago.")
@click.option("--inline", is_flag=True,
              help="Store the files' text in the database (served by the web daemon).")
@click.option("--description", default="", help="A note for people.")
@_friendly
def create_command(name: str, conversation: str, subject: str, html: str | None,
                   text: str | None, segments: tuple[str, ...], leftovers: bool,
                   splits: tuple[str, ...], audience: str | None, from_address: str | None,
                   cron: str | None, every_days: int | None, inline: bool,
                   description: str) -> None:
    """Create campaign NAME (filters are checked now: a bad one is refused with its column).

    Files are copied under paths.content_root/NAME/ and served by `connectd run web`.
    """
    if not html and not text:
        raise click.UsageError("give the content: --html and/or --text")
    if cron and every_days is not None:
        raise click.UsageError("--recurring-cron and --every-days exclude each other")
    specs = [campaigns.parse_segment(s, i) for i, s in enumerate(segments, 1)]
    if leftovers:
        specs.append(campaigns.SegmentSpec("Leftovers", leftovers=True))
    specs = campaigns.apply_splits(specs, splits)
    spec = campaigns.CampaignSpec(
        name=name, conversation=conversation, subject=subject, html=html, text=text,
        segments=tuple(specs), audience=audience, from_address=from_address, cron=cron,
        every_days=every_days, inline=inline, description=description)
    engine = cli_engine()
    try:
        campaigns.create(engine, _settings(), spec)
    finally:
        engine.dispose()
    kind = "recurring" if cron or every_days else "normal"
    click.echo(f"campaign {name!r} created ({kind}, {len(specs)} segments); "
               f"launch it with `connectd campaign launch {name}`")


@campaign_group.command("launch")
@click.argument("name")
@click.option("--at", "at", metavar="TIME", default="now", show_default=True,
              help="ISO time (no offset = manager.timezone) or 'now'.")
@_friendly
def launch_command(name: str, at: str) -> None:
    """Launch campaign NAME (a recurring one: start its schedule). What a cron line calls."""
    settings = _settings()
    now = datetime.now(UTC)
    when = campaigns.parse_time(at, settings.manager.timezone, now)
    engine = cli_engine()
    try:
        done = campaigns.launch(engine, settings, name, when, now)
    finally:
        engine.dispose()
    if done["kind"] == "recurring":
        click.echo(f"campaign {name!r}: schedule {done['schedule']} started "
                   f"{done['starts_at']}; first run {done['first_run']}")
    else:
        click.echo(f"campaign {name!r} launched: instance {done['instance']} scheduled "
                   f"{done['scheduled_at']}")


@campaign_group.command("trial")
@click.argument("name")
@click.option("--to", "to", multiple=True, required=True, metavar="ADDR",
              help="A recipient, repeatable. Unknown addresses become customers.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_friendly
def trial_command(name: str, to: tuple[str, ...], as_json: bool) -> None:
    """Send campaign NAME's content now to the --to addresses as a trial.

    Ignores subscriptions and segments, respects suppression lists; works before launch and
    leaves the campaign's status alone. A running manager and composer send it.
    """
    engine = cli_engine()
    try:
        done = campaigns.trial(engine, name, to)
    finally:
        engine.dispose()
    if as_json:
        _json(done.as_dict())
        return
    n = len(done.sent_to)
    click.echo(f"campaign {name!r}: trial instance {done.instance} ({done.run_key}) to "
               f"{n} address{'es' if n != 1 else ''}: {', '.join(done.sent_to)}")
    for address in done.created:
        click.echo(f"  {address}: not a customer yet; created without attributes")
    for skip in done.skipped:
        click.echo(f"  skipped {skip['address']}: {skip['reason']}")


@campaign_group.command("pause")
@click.argument("name")
@_friendly
def pause_command(name: str) -> None:
    """Pause campaign NAME: no new batches; composers stop after their current window."""
    engine = cli_engine()
    try:
        n = campaigns.pause(engine, name)
    finally:
        engine.dispose()
    click.echo(f"campaign {name!r} paused ({n} instance{'s' if n != 1 else ''})")


@campaign_group.command("resume")
@click.argument("name")
@_friendly
def resume_command(name: str) -> None:
    """Resume campaign NAME where it stopped."""
    engine = cli_engine()
    try:
        n = campaigns.resume(engine, name)
    finally:
        engine.dispose()
    click.echo(f"campaign {name!r} resumed ({n} instance{'s' if n != 1 else ''})")


@campaign_group.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_friendly
def status_command(name: str, as_json: bool) -> None:
    """Where campaign NAME stands: instances, targets per status (unknown included), segments."""
    engine = cli_engine()
    try:
        with engine.connect() as conn:
            found = campaigns.status(conn, name)
    finally:
        engine.dispose()
    if as_json:
        _json(found)
        return
    click.echo(f"campaign {found['campaign']}: {found['kind']}, {found['status']}"
               + (f", schedule {found['schedule']}" if found["schedule"] else ""))
    if not found["instances"]:
        click.echo("  not launched")
    for inst in found["instances"]:
        what = "trial instance" if inst.get("trial") else "instance"
        click.echo(f"\n{what} {inst['id']} ({inst['run_key'] or inst['message']}): "
                   f"{inst['status']}, scheduled {inst['scheduled_at']}"
                   + (f", finished {inst['finished_at']}" if inst["finished_at"] else ""))
        if inst["error"]:
            click.echo(f"  error: {inst['error']}")
        counts = inst["counts"]
        click.echo("  targets " + str(counts.get("targets", 0)) + ": " + ", ".join(
            f"{s} {counts.get(s, 0)}" for s in TARGET_STATUSES))
        if inst["segments"]:
            rows = [[seg, *(str(by.get(s, 0)) for s in TARGET_STATUSES)]
                    for seg, by in inst["segments"].items()]
            table = format_table(["SEGMENT", *(s.upper() for s in TARGET_STATUSES)], rows)
            click.echo("\n".join("  " + line for line in table.splitlines()))


@campaign_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@_friendly
def list_command(as_json: bool) -> None:
    """Every campaign: kind, status, conversation, launches and targets sent."""
    engine = cli_engine()
    try:
        with engine.connect() as conn:
            rows = campaigns.list_campaigns(conn)
    finally:
        engine.dispose()
    if as_json:
        _json(rows)
        return
    click.echo(format_table(
        ["NAME", "KIND", "STATUS", "CONVERSATION", "LAUNCHES", "TARGETS", "SENT", "FAILED",
         "UNKNOWN"],
        [[r["name"], r["kind"], r["status"], r["conversation"] or "-", str(r["instances"]),
          str(r["targets"]), str(r["sent"]), str(r["failed"]), str(r["unknown"])]
         for r in rows]))


@campaign_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_friendly
def show_command(name: str, as_json: bool) -> None:
    """Campaign NAME's definition: audience, segments, schedule, content."""
    engine = cli_engine()
    try:
        with engine.connect() as conn:
            found = campaigns.show(conn, name)
    finally:
        engine.dispose()
    if as_json:
        _json(found)
        return
    click.echo(f"campaign {found['name']}: {found['kind']}, {found['status']}, "
               f"conversation {found['conversation']}")
    for key in ("description", "audience", "from", "cron", "every_n_days", "starts_at"):
        if found[key]:
            click.echo(f"  {key}: {found[key]}")
    for seg in found["segments"]:
        what = "(everyone else)" if seg["leftovers"] else seg["filter"] or "(everyone)"
        split = f"  split {seg['split']}" if seg["split"] else ""
        click.echo(f"  segment {seg['position']} {seg['name']}: {what}{split}")
    for m in found["messages"]:
        click.echo(f"  message {m['name']} ({m['kind']}): subject {m['subject']!r}")
        for key in ("from", "html_url", "text_url"):
            if m[key]:
                click.echo(f"    {key}: {m[key]}")
    click.echo(f"  launches: {found['instances']}")


@campaign_group.command("preflight")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--no-dns", is_flag=True, help="Skip the From domain's DNS checks.")
@_friendly
def preflight_command(name: str, as_json: bool, no_dns: bool) -> None:
    """Check campaign NAME before launch; writes nothing. Warnings never block a launch.

    Counts per segment and recipient domain, suppression hits, an estimated duration at the
    configured rates, content reachability and the From domain's SPF/DKIM/DMARC.
    """
    engine = cli_engine()
    try:
        report = campaigns.preflight(engine, _settings(), name, check_dns=not no_dns)
    finally:
        engine.dispose()
    if as_json:
        _json(report.as_dict())
        return
    _print_preflight(report)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_preflight(report: campaigns.Preflight) -> None:
    click.echo(f"campaign {report.campaign}: {report.targets} would be targeted now")
    for seg, n in report.segments.items():
        parts = report.splits.get(seg)
        click.echo(f"  segment {seg}: {n}" + (f"  (split {parts})" if parts else ""))
    if report.excluded:
        click.echo("  left out: " + ", ".join(f"{k} {v}" for k, v in report.excluded.items()))
    hits = report.suppression_hits
    click.echo(f"  suppression hits: {hits.get('address', 0)} addresses, "
               f"{hits.get('domain', 0)} by domain")
    if report.domains:
        click.echo("  recipient domains:")
        for row in report.domains:
            click.echo(f"    {row['domain']:<40} {row['targets']:>10}")
    est = report.estimate
    notes = [f"limited by {est['limited_by']}"] if est.get("limited_by") else []
    if est.get("throughput_source") == campaigns.NO_COMPOSER:
        notes.append(campaigns.NO_COMPOSER)  # the composers' rate is not part of the estimate
    click.echo(f"  estimated duration: {_duration(est.get('seconds'))}"
               + (f" ({'; '.join(notes)})" if notes else ""))
    for item in report.content:
        state = f"ok ({item['status']})" if item["ok"] else f"FAILS: {item['error']}"
        click.echo(f"  content {item['url']}: {state}")
    if report.dns:
        click.echo(f"  DNS for {report.dns['domain']}:")
        for x in report.dns["findings"]:
            click.echo(f"    {x['level']:<8} {x['check']:<6} {x['message']}")
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
