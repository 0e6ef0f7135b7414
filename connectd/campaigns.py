"""Campaigns: a definition (CampaignSpec) -> rows; and launch, pause, resume, status, list,
show and preflight over the customer DB.

Inputs: an Engine on the customer DB, Settings (content root, public URL of the web daemon,
composer rates, DKIM selector), `now`. Outputs: rows in campaigns, segments, contents,
messages and message_instances (launch); plain dicts for status/list/show/preflight (the CLI
prints them as tables or JSON). Errors a user can fix raise CampaignError with the reason.

Create:
- filters (audience and every segment) are parsed and type-checked against attribute_defs;
  a bad one is refused with the option, the column and the reason (and a caret line).
- segments keep their order; "NAME=EXPR" names one (NAME directly followed by "=", and the
  rest must parse as a filter; otherwise the whole text is the filter, so `vip=true` stays a
  filter); unnamed ones are "Segment N". --leftovers adds "Leftovers" last.
- splits: "[SEGMENT=]SPEC", SPEC "equal:N", "P1,P2,..." percentages or one percentage P
  (= P and 100-P); without SEGMENT it applies to every segment (a campaign without segments
  then gets one segment "All").
- content: an http(s) URL is kept as given. A file is copied under
  paths.content_root/<campaign>/ (unless it already lies inside the content root) and served
  by the web daemon: its URL is `{web.public_url}/content/<path relative to the root>`. With
  inline=True the text is stored in contents.html/text and served as
  `{web.public_url}/content/_inline/<content id>.html|.txt`. Files must be UTF-8 text.
- kind "normal" (sent once), or "recurring" with a cron expression (in manager.timezone) or
  every_days N (a daily run that takes only customers last mailed by this campaign N or more
  days ago; the manager creates the instances).

Launch: a normal campaign gets one MessageInstance of its main message (status "ready",
scheduled_at = --at or now, run_key "launch": unique, so a second launch, even a concurrent
one, is refused); a recurring campaign's launch starts its schedule (status "running",
starts_at = --at or now). Pause: campaign "paused" and its ready/executing instances "paused"
(composers stop after their current window); resume puts them back (executing if preparation
had started them, else ready).

Trial (`campaign trial NAME --to ADDR ...`): the campaign's main content, now, to exactly the
given addresses. The campaign's one Message of kind "trial" (created on first use, always with
the main message's content) gets a new MessageInstance per trial (run_key
"trial-<UTC timestamp>"), created "executing" with started_at set and its targets "pending" in
the same transaction, so the manager batches it at once and never prepares it (preparation only
takes "ready" instances, and refuses trial messages). Addresses that are no customer yet become
customers without attributes. Subscriptions, audience and segments are ignored; suppression
lists are not (skipped addresses are reported with the list). A trial works on a campaign in
any status but cancelled/archived (a draft, a paused one) and does not change that status;
its targets belong to another message, so the main launch's "already mailed" exclusion does not
see them. Rendering as another customer (--as) needs the composer to take merge data from a
customer other than the target's; not supported yet.

Preflight prepares the main message into a dry-run instance inside a transaction that is
rolled back (so the counts are exactly what a launch would target now, and nothing is
written), and adds recipient domains, suppression hits, an estimated duration at the
configured rates and measured composer throughput, content reachability and the From
domain's DNS findings (connectd.dnscheck; unreachable DNS is a warning, never a block).
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import Connection, Engine, func, insert, select, update

from connectd import dnscheck, execution, log
from connectd.core import attributes as attrs
from connectd.core import filters as f
from connectd.db.customer import (
    Campaign,
    ComposerHeartbeat,
    Content,
    Conversation,
    Customer,
    Message,
    MessageInstance,
    Segment,
    SuppressionEntry,
    SuppressionList,
    Target,
)
from connectd.db.engine import writer as write_engine
from connectd.preparation import prepare, split_parts
from connectd.segments import compile_filter, load_types
from connectd.settings import Settings

LAUNCH_RUN_KEY = "launch"  # run_key of a normal campaign's one instance (unique per message)
TRIAL_MESSAGE = "trial"  # name and kind of a campaign's one trial message
RUNNING_INSTANCES = ("ready", "preparing", "executing")
_NAME_PREFIX = re.compile(r"\s*([A-Za-z][\w-]{0,99})=(?!=)(.*)", re.DOTALL)
_UNSAFE_DIR_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class CampaignError(Exception):
    """Something a user asked for that cannot be done; the message says why."""


@dataclass(frozen=True)
class SegmentSpec:
    name: str
    filter: str | None = None
    split: Any = None
    leftovers: bool = False


@dataclass(frozen=True)
class CampaignSpec:
    """What `connectd campaign create` was given (see the module notes)."""

    name: str
    conversation: str
    subject: str
    html: str | None = None
    text: str | None = None
    segments: tuple[SegmentSpec, ...] = ()
    audience: str | None = None
    from_address: str | None = None
    cron: str | None = None
    every_days: int | None = None
    inline: bool = False
    description: str = ""


# --- parsing options ---------------------------------------------------------------------------

def _bad_filter(what: str, expression: str, exc: f.FilterError) -> CampaignError:
    caret = "\n".join("  " + line for line in f.caret(expression, exc).splitlines())
    return CampaignError(f"{what}: bad filter at column {exc.position}: {exc.reason}\n{caret}")


def parse_segment(text: str, index: int) -> SegmentSpec:
    """One --segment value (1-based `index`) -> SegmentSpec; the filter is parsed, not typed."""
    match = _NAME_PREFIX.fullmatch(text)
    if match:
        try:
            f.parse(match[2])
            return SegmentSpec(match[1], match[2].strip())
        except f.FilterError:
            pass  # `vip=true`: the whole text is the filter
    try:
        f.parse(text)
    except f.FilterError as exc:
        raise _bad_filter(f"--segment {index}", text, exc) from None
    return SegmentSpec(f"Segment {index}", text.strip())


def parse_split(text: str) -> tuple[str | None, Any]:
    """One --split value -> (segment name or None for all, split spec for Segment.split)."""
    name, sep, spec = text.rpartition("=")
    name = name.strip() if sep else None
    spec = spec.strip()
    if spec.startswith("equal:"):
        value: Any = spec
    else:
        try:
            parts = [float(p) for p in spec.split(",")]
        except ValueError:
            raise CampaignError(f"--split {text!r}: expected equal:N, percentages P1,P2,... "
                                "or one percentage P") from None
        value = {"percent": parts[0] if len(parts) == 1 else parts}
    try:
        split_parts(value)
    except ValueError as exc:
        raise CampaignError(f"--split {text!r}: {exc}") from None
    return name or None, value


def apply_splits(segments: list[SegmentSpec], splits: Sequence[str]) -> list[SegmentSpec]:
    """Segments with each --split applied (a campaign without segments gets one "All")."""
    if splits and not segments:
        segments = [SegmentSpec("All")]
    out = list(segments)
    for text in splits:
        name, spec = parse_split(text)
        hits = [i for i, s in enumerate(out) if name is None or s.name == name]
        if not hits:
            known = ", ".join(s.name for s in out)
            raise CampaignError(f"--split {text!r}: no segment named {name!r} (segments: {known})")
        for i in hits:
            s = out[i]
            out[i] = SegmentSpec(s.name, s.filter, spec, s.leftovers)
    return out


def parse_time(text: str, tz_name: str, now: datetime) -> datetime:
    """--at: "now" or an ISO 8601 time (no offset = in manager.timezone) -> aware UTC."""
    if text.strip().lower() == "now":
        return now
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CampaignError(f"--at {text!r}: expected \"now\" or an ISO time such as "
                            "2026-03-01T09:00 or 2026-03-01T09:00:00+01:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_zone(tz_name))
    return moment.astimezone(UTC)


def _zone(name: str) -> Any:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise CampaignError(f"manager.timezone {name!r} is not a known time zone") from None


# --- create ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    """One body part resolved: its URL now, or later (inline: needs the content id)."""

    kind: str  # "html" or "text"
    url: str | None = None
    inline: str | None = None
    copy_from: Path | None = None
    copy_to: Path | None = None


def _read_text(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise CampaignError(f"--{what} {path}: is a directory, not a file") from None
    except OSError as exc:
        raise CampaignError(f"--{what} {path}: cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CampaignError(f"--{what} {path}: not UTF-8 text (byte {exc.start})") from None


def campaign_dir_name(name: str) -> str:
    """A campaign name as one safe directory name under the content root."""
    return _UNSAFE_DIR_CHARS.sub("-", name).strip("-.") or "campaign"


def content_url(settings: Settings, relative: str) -> str:
    """The web daemon's URL of a file at `relative` (POSIX path) under the content root."""
    return f"{settings.web.public_url.rstrip('/')}/content/{urllib.parse.quote(relative)}"


def inline_url(settings: Settings, content_id: int, kind: str) -> str:
    ext = "html" if kind == "html" else "txt"
    return f"{settings.web.public_url.rstrip('/')}/content/_inline/{content_id}.{ext}"


def _resolve_part(settings: Settings, campaign: str, kind: str, value: str,
                  inline: bool) -> _Part:
    scheme = urllib.parse.urlsplit(value).scheme.lower()
    if scheme in ("http", "https"):
        if inline:
            raise CampaignError(f"--inline stores file contents; --{kind} {value} is a URL")
        return _Part(kind, url=value)
    if scheme and len(scheme) > 1:  # "c:" is no concern on POSIX; ftp:, file: are
        raise CampaignError(f"--{kind} {value}: only http(s) URLs or files are supported")
    path = Path(value).expanduser()
    if not path.is_file():
        raise CampaignError(f"--{kind} {value}: no such file")
    text = _read_text(path, kind)
    if inline:
        return _Part(kind, inline=text)
    root = settings.paths.content_root.resolve()
    real = path.resolve()
    if real.is_relative_to(root):
        return _Part(kind, url=content_url(settings, real.relative_to(root).as_posix()))
    target = root / campaign_dir_name(campaign) / path.name
    return _Part(kind, url=content_url(settings, target.relative_to(root).as_posix()),
                 copy_from=path, copy_to=target)


def _copy(part: _Part) -> None:
    assert part.copy_from is not None and part.copy_to is not None
    part.copy_to.parent.mkdir(parents=True, exist_ok=True)
    tmp = part.copy_to.with_name(f".{part.copy_to.name}.{uuid.uuid4().hex[:8]}.tmp")
    shutil.copyfile(part.copy_from, tmp)
    # the web daemon may serve this name at any moment: it must see the old or the whole new
    os.replace(tmp, part.copy_to)


def _check_filter(what: str, expression: str, types: dict[str, str], now: datetime) -> None:
    try:
        compile_filter(f.parse(expression), types, now)
    except f.FilterError as exc:
        raise _bad_filter(what, expression, exc) from None


def _check_spec(spec: CampaignSpec) -> None:
    if not spec.name.strip():
        raise CampaignError("a campaign needs a name")
    if not spec.subject.strip():
        raise CampaignError("--subject must not be empty")
    if "\r" in spec.subject or "\n" in spec.subject:
        raise CampaignError("--subject must be one line (no CR or LF)")
    if len(spec.subject) > 998:
        raise CampaignError("--subject is longer than 998 characters (RFC 5322's line limit)")
    if not spec.html and not spec.text:
        raise CampaignError("give the content: --html and/or --text (a URL or a file)")
    if spec.from_address is not None:
        _, address = parseaddr(spec.from_address)
        if not address or not attrs.is_plausible_email(address) or "\n" in spec.from_address:
            raise CampaignError(f"--from {spec.from_address!r} is not an e-mail address")
    if spec.cron and spec.every_days:
        raise CampaignError("give either a cron expression or --every-days, not both")
    if spec.cron and not croniter.is_valid(spec.cron):
        raise CampaignError(f"--recurring-cron {spec.cron!r} is not a cron expression "
                            "(five fields: minute hour day-of-month month day-of-week)")
    if spec.every_days is not None and spec.every_days < 1:
        raise CampaignError("--every-days must be at least 1")
    names = [s.name for s in spec.segments]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CampaignError(f"segment names must be unique: {', '.join(dupes)}")


def create(engine: Engine, settings: Settings, spec: CampaignSpec,
           now: datetime | None = None) -> int:
    """Validate `spec` and write the campaign (status "ready") -> its id."""
    now = now or datetime.now(UTC)
    _check_spec(spec)
    name = spec.name.strip()
    with write_engine(engine).begin() as conn:
        if conn.execute(select(Campaign.id).where(Campaign.name == name)).scalar() is not None:
            raise CampaignError(f"campaign {name!r} already exists")
        conversation = conn.execute(select(Conversation.id).where(
            Conversation.name == spec.conversation)).scalar()
        if conversation is None:
            raise CampaignError(f"no conversation {spec.conversation!r}; create it with "
                                f"`connectd conversation create {spec.conversation}`")
        types = load_types(conn)
        if spec.audience:
            _check_filter("--audience", spec.audience, types, now)
        for i, seg in enumerate(spec.segments, 1):
            if seg.filter and not seg.leftovers:
                _check_filter(f"--segment {i} ({seg.name})", seg.filter, types, now)
        parts = [_resolve_part(settings, name, kind, value, spec.inline)
                 for kind, value in (("html", spec.html), ("text", spec.text)) if value]
        campaign_id = _insert(conn, spec, name, conversation, parts, settings, now)
        for part in parts:
            if part.copy_from is not None:
                _copy(part)  # last: a refused campaign leaves no files behind
    log.get(campaign=name).info("campaign.created", id=campaign_id,
                                kind="recurring" if spec.cron or spec.every_days else "normal",
                                segments=len(spec.segments))
    return campaign_id


def _insert(conn: Connection, spec: CampaignSpec, name: str, conversation: int,
            parts: list[_Part], settings: Settings, now: datetime) -> int:
    recurring = bool(spec.cron or spec.every_days)
    campaign_id = conn.execute(insert(Campaign).values(
        name=name, description=spec.description, kind="recurring" if recurring else "normal",
        status="ready", conversation_id=conversation, audience_filter=spec.audience or None,
        from_address=spec.from_address, cron=spec.cron, every_n_days=spec.every_days,
        created_at=now, updated_at=now).returning(Campaign.id)).scalar_one()
    for position, seg in enumerate(spec.segments, 1):
        conn.execute(insert(Segment).values(
            campaign_id=campaign_id, position=position, name=seg.name,
            filter_expr=None if seg.leftovers else seg.filter, split=seg.split,
            is_leftovers=seg.leftovers))
    by_kind = {p.kind: p for p in parts}
    html, text = by_kind.get("html"), by_kind.get("text")
    content_id = conn.execute(insert(Content).values(
        name=name, subject=spec.subject, from_address=spec.from_address,
        html_url=html.url if html else None, text_url=text.url if text else None,
        html=html.inline if html else None, text=text.inline if text else None,
        created_at=now, updated_at=now).returning(Content.id)).scalar_one()
    if spec.inline:
        conn.execute(update(Content).where(Content.id == content_id).values(
            html_url=inline_url(settings, content_id, "html") if html else None,
            text_url=inline_url(settings, content_id, "text") if text else None))
    conn.execute(insert(Message).values(campaign_id=campaign_id, name="main", kind="main",
                                        content_id=content_id, created_at=now, updated_at=now))
    return campaign_id


# --- lookups -----------------------------------------------------------------------------------

def _campaign(conn: Connection, name: str, lock: bool = False) -> Any:
    query = select(Campaign).where(Campaign.name == name)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()  # two launches of one campaign take turns
    row = conn.execute(query).one_or_none()
    if row is None:
        known = conn.execute(select(Campaign.name).order_by(Campaign.name).limit(20)).scalars().all()
        hint = f" (campaigns: {', '.join(known)})" if known else " (there are none yet)"
        raise CampaignError(f"no campaign {name!r}{hint}")
    return row


def _main_message(conn: Connection, campaign_id: int) -> Any:
    row = conn.execute(select(Message).where(Message.campaign_id == campaign_id,
                                             Message.kind == "main")
                       .order_by(Message.id).limit(1)).one_or_none()
    if row is None:
        raise CampaignError("the campaign has no main message")
    return row


def _instances_of(conn: Connection, campaign_id: int) -> list[Any]:
    return list(conn.execute(
        select(MessageInstance, Message.name.label("message_name"),
               Message.kind.label("message_kind"))
        .join(Message, Message.id == MessageInstance.message_id)
        .where(Message.campaign_id == campaign_id)
        .order_by(MessageInstance.scheduled_at, MessageInstance.id)).all())


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else None


# --- launch, pause, resume -------------------------------------------------------------------

def launch(engine: Engine, settings: Settings, name: str, at: datetime | None = None,
           now: datetime | None = None) -> dict[str, Any]:
    """Launch campaign `name` (module notes) -> what was done, for the CLI."""
    now = now or datetime.now(UTC)
    when = at or now
    with write_engine(engine).begin() as conn:
        campaign = _campaign(conn, name, lock=True)
        if campaign.status in ("cancelled", "archived"):
            raise CampaignError(f"campaign {name!r} is {campaign.status}; it cannot be launched")
        if campaign.status == "paused":
            raise CampaignError(f"campaign {name!r} is paused; `connectd campaign resume "
                                f"{name}` carries on")
        message = _main_message(conn, campaign.id)
        if campaign.kind == "recurring":
            return _start_schedule(conn, settings, campaign, when, now)
        earlier = conn.execute(select(MessageInstance).where(
            MessageInstance.message_id == message.id).order_by(MessageInstance.id)
            .limit(1)).one_or_none()
        if earlier is not None or campaign.status in ("running", "done"):
            when_txt = _iso(earlier.scheduled_at) if earlier else "before"
            raise CampaignError(
                f"campaign {name!r} was already launched (scheduled {when_txt}, "
                f"{earlier.status if earlier else campaign.status}); a normal campaign is "
                "sent once: create a new campaign to send again")
        instance_id = conn.execute(insert(MessageInstance).values(
            message_id=message.id, run_key=LAUNCH_RUN_KEY, status="ready", scheduled_at=when,
            created_at=now).returning(MessageInstance.id)).scalar_one()
        conn.execute(update(Campaign).where(Campaign.id == campaign.id).values(
            status="running", starts_at=when, updated_at=now))
    log.get(campaign=name).info("campaign.launched", instance=instance_id, at=_iso(when))
    return {"campaign": name, "kind": "normal", "instance": instance_id,
            "scheduled_at": _iso(when)}


def _start_schedule(conn: Connection, settings: Settings, campaign: Any, when: datetime,
                    now: datetime) -> dict[str, Any]:
    if campaign.status == "running":
        raise CampaignError(f"recurring campaign {campaign.name!r} is already running (its "
                            f"schedule started {_iso(campaign.starts_at)}); pause it to stop")
    conn.execute(update(Campaign).where(Campaign.id == campaign.id).values(
        status="running", starts_at=when, updated_at=now))
    first = next_occurrence(campaign, when, settings.manager.timezone)
    log.get(campaign=campaign.name).info("campaign.schedule_started", at=_iso(when),
                                         first=_iso(first))
    return {"campaign": campaign.name, "kind": "recurring", "starts_at": _iso(when),
            "schedule": campaign.cron or f"every {campaign.every_n_days} days",
            "first_run": _iso(first)}


def next_occurrence(campaign: Any, start: datetime, tz_name: str) -> datetime | None:
    """The first run of a recurring campaign at or after `start` (every_n_days: daily at the
    local time of `start`, so the first run is `start` itself)."""
    if campaign.every_n_days:
        return start
    if not campaign.cron:
        return None
    local = start.astimezone(_zone(tz_name)) - timedelta(seconds=1)
    return croniter(campaign.cron, local).get_next(datetime).astimezone(UTC)


def pause(engine: Engine, name: str, now: datetime | None = None) -> int:
    """Pause a running campaign -> instances paused. Composers stop after their window."""
    now = now or datetime.now(UTC)
    with write_engine(engine).begin() as conn:
        campaign = _campaign(conn, name, lock=True)
        if campaign.status != "running":
            raise CampaignError(f"campaign {name!r} is {campaign.status}, not running: "
                                "nothing to pause")
        conn.execute(update(Campaign).where(Campaign.id == campaign.id).values(
            status="paused", updated_at=now))
        paused = conn.execute(update(MessageInstance).where(
            MessageInstance.status.in_(RUNNING_INSTANCES),
            MessageInstance.message_id.in_(select(Message.id).where(
                Message.campaign_id == campaign.id))).values(status="paused")).rowcount
    log.get(campaign=name).info("campaign.paused", instances=paused)
    return int(paused)


def resume(engine: Engine, name: str, now: datetime | None = None) -> int:
    """Resume a paused campaign -> instances resumed (executing if preparation had started
    them, else ready again)."""
    from sqlalchemy import case

    now = now or datetime.now(UTC)
    with write_engine(engine).begin() as conn:
        campaign = _campaign(conn, name, lock=True)
        if campaign.status != "paused":
            raise CampaignError(f"campaign {name!r} is {campaign.status}, not paused: "
                                "nothing to resume")
        conn.execute(update(Campaign).where(Campaign.id == campaign.id).values(
            status="running", updated_at=now))
        resumed = conn.execute(update(MessageInstance).where(
            MessageInstance.status == "paused",
            MessageInstance.message_id.in_(select(Message.id).where(
                Message.campaign_id == campaign.id))).values(
            status=case((MessageInstance.started_at.is_(None), "ready"),
                        else_="executing"))).rowcount
    log.get(campaign=name).info("campaign.resumed", instances=resumed)
    return int(resumed)


# --- trial sends -------------------------------------------------------------------------------

@dataclass
class TrialResult:
    """What one trial did: the instance, who it goes to, who was created, who was skipped."""

    campaign: str
    instance: int
    run_key: str
    sent_to: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # new customers, no attributes
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"address", "reason"}

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _trial_addresses(addresses: Sequence[str]) -> dict[str, str]:
    """The --to values -> {email_key: address as given}, first spelling kept; CampaignError
    naming a value that is not an address."""
    out: dict[str, str] = {}
    for raw in addresses:
        address = raw.strip()
        if not attrs.is_plausible_email(address):
            raise CampaignError(f"--to {raw!r} is not an e-mail address")
        out.setdefault(attrs.email_key(address), address)
    if not out:
        raise CampaignError("give at least one --to address")
    return out


def _suppression_reasons(conn: Connection, keys: Sequence[str]) -> dict[str, str]:
    """email_key -> why it is suppressed (address first, then domain), for those that are;
    compared lower-cased, exactly as preparation does."""
    domains = {k.partition("@")[2]: k for k in keys}
    value = func.lower(SuppressionEntry.value)
    rows = conn.execute(
        select(SuppressionEntry.kind, value, SuppressionList.name)
        .join(SuppressionList, SuppressionList.id == SuppressionEntry.list_id)
        .where(((SuppressionEntry.kind == "address") & value.in_(list(keys)))
               | ((SuppressionEntry.kind == "domain") & value.in_(list(domains))))
        .order_by(SuppressionEntry.kind, SuppressionList.name)).all()
    found: dict[str, str] = {}
    for kind, val, list_name in rows:  # "address" sorts before "domain": it wins
        if kind == "address":
            found.setdefault(val, f"suppressed address (list {list_name})")
        else:
            for key in keys:
                if key.partition("@")[2] == val:
                    found.setdefault(key, f"suppressed domain {val} (list {list_name})")
    return found


def _trial_message(conn: Connection, campaign_id: int, main: Any, now: datetime) -> int:
    """The campaign's trial message, created on first use; it always carries the main
    message's current content (a trial shows what a launch would send)."""
    found = conn.execute(select(Message.id, Message.content_id).where(
        Message.campaign_id == campaign_id, Message.kind == TRIAL_MESSAGE)
        .order_by(Message.id).limit(1)).one_or_none()
    if found is None:
        return int(conn.execute(insert(Message).values(
            campaign_id=campaign_id, name=TRIAL_MESSAGE, kind=TRIAL_MESSAGE,
            content_id=main.content_id, created_at=now, updated_at=now)
            .returning(Message.id)).scalar_one())
    if found.content_id != main.content_id:
        conn.execute(update(Message).where(Message.id == found.id).values(
            content_id=main.content_id, updated_at=now))
    return int(found.id)


def _trial_customers(conn: Connection, wanted: dict[str, str],
                     now: datetime) -> tuple[dict[str, int], list[str]]:
    """email_key -> customer id for `wanted`, creating (without attributes) those that do
    not exist yet -> (ids, addresses created)."""
    def existing() -> dict[str, int]:
        return dict(conn.execute(select(Customer.email_key, Customer.id).where(
            Customer.email_key.in_(list(wanted)))).all())

    ids = existing()
    missing = [k for k in wanted if k not in ids]
    if not missing:
        return ids, []
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
    # DO NOTHING: an import (or another trial) may add the same address meanwhile; then it is
    # that customer, with its attributes, and not reported as created here
    made = conn.execute(dialect_insert(Customer).values([
        {"email": wanted[k], "email_key": k, "attributes": {}, "created_at": now,
         "updated_at": now} for k in missing])
        .on_conflict_do_nothing(index_elements=["email_key"])
        .returning(Customer.email_key)).scalars().all()
    return existing(), [wanted[k] for k in missing if k in set(made)]


def trial(engine: Engine, name: str, addresses: Sequence[str],
          now: datetime | None = None) -> TrialResult:
    """Send campaign `name`'s main content now to `addresses` as a trial (module notes).

    One transaction: the trial message (on first use), unknown addresses as new customers,
    an instance "executing" (so the manager batches it without preparation) and its targets
    "pending". Subscriptions, audience and segments are ignored, suppression lists are not.
    The campaign's status is left as it is (a draft can be trialled). CampaignError when the
    campaign cannot send or every address is suppressed (nothing is written then)."""
    now = now or datetime.now(UTC)
    wanted = _trial_addresses(addresses)
    with write_engine(engine).begin() as conn:
        campaign = _campaign(conn, name, lock=True)
        if campaign.status in ("cancelled", "archived"):
            raise CampaignError(f"campaign {name!r} is {campaign.status}; it sends nothing")
        main = _main_message(conn, campaign.id)
        if main.content_id is None:
            raise CampaignError(f"campaign {name!r} has no content to send")
        suppressed = _suppression_reasons(conn, list(wanted))
        skipped = [{"address": wanted[k], "reason": suppressed[k]} for k in wanted
                   if k in suppressed]
        allowed = {k: v for k, v in wanted.items() if k not in suppressed}
        if not allowed:
            raise CampaignError("every address is suppressed: " + "; ".join(
                f"{s['address']}: {s['reason']}" for s in skipped))
        message_id = _trial_message(conn, campaign.id, main, now)
        ids, created = _trial_customers(conn, allowed, now)
        run_key = f"trial-{now.astimezone(UTC):%Y%m%dT%H%M%S.%fZ}"
        # executing from the start, started_at set: the manager's due/prepare step only takes
        # "ready" instances, so the exact target list below is never replaced by a segment
        instance_id = conn.execute(insert(MessageInstance).values(
            message_id=message_id, run_key=run_key, status="executing", scheduled_at=now,
            started_at=now, created_at=now, target_count=len(ids))
            .returning(MessageInstance.id)).scalar_one()
        conn.execute(insert(Target), [
            {"instance_id": instance_id, "customer_id": cid, "segment_id": None,
             "status": "pending", "updated_at": now} for cid in ids.values()])
    result = TrialResult(campaign.name, int(instance_id), run_key,
                         sent_to=list(allowed.values()), created=created, skipped=skipped)
    log.get(campaign=name).info("campaign.trial", instance=instance_id, to=len(ids),
                                created=len(created), skipped=len(skipped))
    return result


# --- status, list, show ------------------------------------------------------------------------

def _counts(conn: Connection, instance_id: int) -> dict[str, int]:
    return execution.instance_counts(conn, instance_id)


def _segment_counts(conn: Connection, instance_id: int) -> dict[str, dict[str, int]]:
    names = dict(conn.execute(select(Segment.id, Segment.name).join(
        Message, Message.campaign_id == Segment.campaign_id).join(
        MessageInstance, MessageInstance.message_id == Message.id).where(
        MessageInstance.id == instance_id)).all())
    out: dict[str, dict[str, int]] = {}
    for seg, status, n in conn.execute(
            select(Target.segment_id, Target.status, func.count())
            .where(Target.instance_id == instance_id)
            .group_by(Target.segment_id, Target.status)):
        out.setdefault(names.get(seg, "(none)"), {})[status] = int(n)
    return out


def status(conn: Connection, name: str) -> dict[str, Any]:
    """A campaign's state: each instance's status, targets per status (unknown included),
    per segment, and the error of a failed instance; trial sends are instances with
    "trial": true."""
    campaign = _campaign(conn, name)
    instances = []
    for inst in _instances_of(conn, campaign.id):
        instances.append({
            "id": inst.id, "message": inst.message_name, "run_key": inst.run_key,
            "trial": inst.message_kind == TRIAL_MESSAGE,
            "status": inst.status, "scheduled_at": _iso(inst.scheduled_at),
            "started_at": _iso(inst.started_at), "finished_at": _iso(inst.finished_at),
            "error": inst.error, "counts": _counts(conn, inst.id),
            "segments": _segment_counts(conn, inst.id)})
    return {"campaign": campaign.name, "kind": campaign.kind, "status": campaign.status,
            "schedule": campaign.cron or (f"every {campaign.every_n_days} days"
                                          if campaign.every_n_days else None),
            "starts_at": _iso(campaign.starts_at), "instances": instances}


def list_campaigns(conn: Connection) -> list[dict[str, Any]]:
    """Every campaign with its conversation, instances and targets sent/failed/unknown
    (trial sends not included: "trials" counts them)."""
    totals: dict[int, dict[str, int]] = {}
    for campaign_id, st, n in conn.execute(
            select(Message.campaign_id, Target.status, func.count())
            .join(MessageInstance, MessageInstance.message_id == Message.id)
            .join(Target, Target.instance_id == MessageInstance.id)
            .where(Message.kind != TRIAL_MESSAGE)
            .group_by(Message.campaign_id, Target.status)):
        totals.setdefault(campaign_id, {})[st] = int(n)
    launches: dict[int, int] = {}
    trials: dict[int, int] = {}
    for campaign_id, kind, n in conn.execute(
            select(Message.campaign_id, Message.kind, func.count(MessageInstance.id))
            .join(MessageInstance, MessageInstance.message_id == Message.id)
            .group_by(Message.campaign_id, Message.kind)):
        into = trials if kind == TRIAL_MESSAGE else launches
        into[campaign_id] = into.get(campaign_id, 0) + int(n)
    rows = []
    for c in conn.execute(
            select(Campaign, Conversation.name.label("conversation_name"))
            .outerjoin(Conversation, Conversation.id == Campaign.conversation_id)
            .order_by(Campaign.created_at, Campaign.id)).all():
        t = totals.get(c.id, {})
        conversation = c.conversation_name
        rows.append({"name": c.name, "kind": c.kind, "status": c.status,
                     "conversation": conversation, "instances": int(launches.get(c.id, 0)),
                     "trials": int(trials.get(c.id, 0)),
                     "targets": sum(t.values()), "sent": t.get("sent", 0),
                     "failed": t.get("failed", 0), "unknown": t.get("unknown", 0),
                     "starts_at": _iso(c.starts_at), "created_at": _iso(c.created_at)})
    return rows


def show(conn: Connection, name: str) -> dict[str, Any]:
    """A campaign's definition: audience, segments, schedule, messages and their content."""
    c = _campaign(conn, name)
    found = _instances_of(conn, c.id)
    conversation = conn.execute(select(Conversation.name).where(
        Conversation.id == c.conversation_id)).scalar()
    segments = [{"position": s.position, "name": s.name, "filter": s.filter_expr,
                 "split": s.split, "leftovers": s.is_leftovers}
                for s in conn.execute(select(Segment).where(Segment.campaign_id == c.id)
                                      .order_by(Segment.position))]
    messages = []
    for m in conn.execute(
            select(Message.name, Message.kind, Content.subject, Content.from_address,
                   Content.html_url, Content.text_url,
                   (Content.html.is_not(None) | Content.text.is_not(None)).label("inline"))
            .outerjoin(Content, Content.id == Message.content_id)
            .where(Message.campaign_id == c.id).order_by(Message.id)).all():
        messages.append({
            "name": m.name, "kind": m.kind, "subject": m.subject,
            "from": m.from_address or c.from_address, "html_url": m.html_url,
            "text_url": m.text_url, "inline": bool(m.inline)})
    return {"name": c.name, "description": c.description, "kind": c.kind, "status": c.status,
            "conversation": conversation, "audience": c.audience_filter,
            "from": c.from_address, "cron": c.cron, "every_n_days": c.every_n_days,
            "starts_at": _iso(c.starts_at), "created_at": _iso(c.created_at),
            "segments": segments, "messages": messages,
            "instances": sum(i.message_kind != TRIAL_MESSAGE for i in found),
            "trials": sum(i.message_kind == TRIAL_MESSAGE for i in found)}


# --- preflight ---------------------------------------------------------------------------------

@dataclass
class Preflight:
    campaign: str
    targets: int = 0
    segments: dict[str, int] = field(default_factory=dict)
    splits: dict[str, list[int]] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    suppression_hits: dict[str, int] = field(default_factory=dict)
    domains: list[dict[str, Any]] = field(default_factory=list)
    estimate: dict[str, Any] = field(default_factory=dict)
    content: list[dict[str, Any]] = field(default_factory=list)
    dns: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _domain_counts(conn: Connection, instance_id: int) -> dict[str, int]:
    position = func.strpos if conn.dialect.name == "postgresql" else func.instr
    domain = func.substr(Customer.email_key, position(Customer.email_key, "@") + 1)
    return {d: int(n) for d, n in conn.execute(
        select(domain, func.count()).select_from(Target)
        .join(Customer, Customer.id == Target.customer_id)
        .where(Target.instance_id == instance_id).group_by(domain))}


def _dry_run(engine: Engine, campaign_name: str, now: datetime) -> tuple[Any, Any, Any, dict[str, int]]:
    """Prepare the main message into a throwaway instance, read the results, roll back."""
    with write_engine(engine).connect() as conn:
        tx = conn.begin()
        try:
            campaign = _campaign(conn, campaign_name)
            message = _main_message(conn, campaign.id)
            content = conn.execute(select(Content).where(
                Content.id == message.content_id)).one_or_none()
            instance_id = conn.execute(insert(MessageInstance).values(
                message_id=message.id, run_key=f"preflight-{uuid.uuid4().hex}", status="ready",
                scheduled_at=now, created_at=now).returning(MessageInstance.id)).scalar_one()
            try:
                result = prepare(conn, instance_id, now)
            except f.FilterError as exc:
                raise CampaignError(f"a filter of the campaign no longer compiles: {exc}") from None
            except ValueError as exc:
                raise CampaignError(str(exc)) from None
            domains = _domain_counts(conn, instance_id)
        finally:
            tx.rollback()  # a preflight writes nothing
    return campaign, content, result, domains


NO_COMPOSER = "no composer measured yet"
MIN_THROUGHPUT = 1.0  # messages/s; below it a measurement says nothing (idle or starting)


def composer_throughput(conn: Connection, now: datetime, timeout: float) -> tuple[float, str]:
    """(messages/s, where from): the sum over the live composers (connectd.execution's
    notion: a heartbeat within manager.composer_timeout); (0.0, NO_COMPOSER) when none is
    live or together they measure under MIN_THROUGHPUT (idle composers report ~0)."""
    live = conn.execute(select(func.coalesce(func.sum(ComposerHeartbeat.throughput), 0.0))
                        .where(execution.live_composer(now, timeout))).scalar_one()
    if live and live >= MIN_THROUGHPUT:
        return float(live), "live composers"
    return 0.0, NO_COMPOSER


def domain_rates(settings: Settings) -> dict[str, float]:
    out = {}
    for item in settings.composer.domain_rates:
        domain, _, rate = item.partition("=")
        try:
            out[domain.strip().lower()] = float(rate)
        except ValueError:
            continue
    return out


def estimate_duration(total: int, domains: dict[str, int], settings: Settings,
                      throughput: float) -> dict[str, Any]:
    """Seconds a send of `total` takes at the tightest of: the global rate, each domain's
    rate, the composers' measured throughput (only from MIN_THROUGHPUT up: an idle
    composer's ~0/s is no limit). None when nothing limits (no rates, no measurement)."""
    limits: list[tuple[float, str]] = []
    c = settings.composer
    if c.rate_global > 0:
        limits.append((total / c.rate_global, f"rate_global {c.rate_global:g}/s"))
    exceptions = domain_rates(settings)
    worst: tuple[float, str] | None = None
    for domain, n in domains.items():
        rate = exceptions.get(domain, c.rate_per_domain)
        if rate > 0 and (worst is None or n / rate > worst[0]):
            worst = (n / rate, f"{domain} at {rate:g}/s")
    if worst:
        limits.append(worst)
    if throughput >= MIN_THROUGHPUT:
        limits.append((total / throughput, f"composer throughput {throughput:.0f}/s"))
    if not limits or total == 0:
        return {"seconds": 0.0 if total == 0 else None, "limited_by": None,
                "throughput": throughput}
    seconds, by = max(limits)
    return {"seconds": round(seconds, 1), "limited_by": by, "throughput": throughput}


def check_content(url: str, timeout: float) -> dict[str, Any]:
    """GET `url` as a composer would -> {"url", "ok", "status" or "error"}."""
    request = urllib.request.Request(url, headers={"User-Agent": "connectd-preflight"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            response.read(1)
            return {"url": url, "ok": True, "status": response.status}
    except urllib.error.HTTPError as exc:
        return {"url": url, "ok": False, "status": exc.code, "error": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"url": url, "ok": False, "error": str(reason)}


def sender_domain(campaign: Any, content: Any, settings: Settings) -> str:
    address = campaign.from_address or (content.from_address if content else None) \
        or settings.composer.from_address
    return parseaddr(address)[1].rpartition("@")[2].lower()


def preflight(engine: Engine, settings: Settings, name: str, now: datetime | None = None, *,
              resolver: Any = None, check_dns: bool = True, top: int = 20) -> Preflight:
    """Everything worth knowing before a launch (module notes); writes nothing."""
    now = now or datetime.now(UTC)
    campaign, content, result, domains = _dry_run(engine, name, now)
    report = Preflight(campaign=campaign.name, targets=result.added, segments=result.segments,
                       splits=result.splits, excluded=result.excluded)
    report.suppression_hits = {"address": result.excluded.get("suppressed_address", 0),
                               "domain": result.excluded.get("suppressed_domain", 0)}
    ranked = sorted(domains.items(), key=lambda kv: (-kv[1], kv[0]))
    report.domains = [{"domain": d, "targets": n} for d, n in ranked[:top]]
    if len(ranked) > top:
        report.domains.append({"domain": f"({len(ranked) - top} others)",
                               "targets": sum(n for _, n in ranked[top:])})
    with engine.connect() as conn:
        throughput, source = composer_throughput(conn, now, settings.manager.composer_timeout)
    report.estimate = estimate_duration(result.added, domains, settings, throughput)
    report.estimate["throughput_source"] = source
    if report.estimate["seconds"] is None:
        report.warnings.append(f"no duration estimate: no rate limit configured and "
                               f"{NO_COMPOSER}")
    if result.added == 0:
        report.warnings.append("nobody would be targeted now")
    for url in (content.html_url, content.text_url) if content else ():
        if url:
            found = check_content(url, settings.composer.content_timeout)
            report.content.append(found)
            if not found["ok"]:
                report.warnings.append(f"content {url} cannot be fetched ({found['error']}); "
                                       "a launch now would fail")
    if check_dns:
        report.dns = _dns(campaign, content, settings, resolver)
        report.warnings += [f"DNS {x['check']}: {x['message']}" for x in report.dns["findings"]
                            if x["level"] != "ok"]
    return report


def _dns(campaign: Any, content: Any, settings: Settings, resolver: Any) -> dict[str, Any]:
    domain = sender_domain(campaign, content, settings)
    selector = settings.composer.dkim_selector
    selectors = [selector]
    if (settings.composer.dkim_dir / f"{domain}.ed25519.pem").exists():
        selectors.append(f"{selector}-ed")
    if resolver is None:
        try:
            import dns.resolver

            resolver = dns.resolver.Resolver()
            resolver.lifetime = 5.0  # a preflight must not hang on a dead resolver
        except Exception:  # noqa: BLE001 - no resolv.conf: check_sender_domain reports it
            resolver = None
    found = dnscheck.check_sender_domain(domain, selectors, resolver=resolver)
    return {"domain": found.domain,
            "findings": [{"level": x.level, "check": x.check, "message": x.message}
                         for x in found.findings]}
