"""Campaign logic (connectd.campaigns) on real SQLite and PostgreSQL: create (filters,
segments, splits, content), launch, pause/resume, status, list, show and preflight (with a
real local DNS server and a real HTTP server for content)."""

from __future__ import annotations

import dataclasses
import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config
from helpers.dns_server import DnsServer
from sqlalchemy import Engine, func, insert, select, update

from connectd import campaigns
from connectd import settings as settings_mod
from connectd.campaigns import CampaignError, CampaignSpec, SegmentSpec
from connectd.conversations import create_conversation
from connectd.db.customer import (
    AttributeDef,
    Campaign,
    ComposerHeartbeat,
    Content,
    Customer,
    MessageInstance,
    Segment,
    Subscription,
    SuppressionEntry,
    SuppressionList,
    Target,
)
from connectd.db.engine import make_engine
from connectd.preparation import prepare

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PEOPLE = [("ann@x.com", "DE"), ("bob@x.com", "FR"), ("cy@y.org", "DE"), ("dee@y.org", "IT"),
          ("eve@z.net", "DE")]


@pytest.fixture
def settings(tmp_path: Path, migrated_customer_url: str) -> settings_mod.Settings:
    cfg = write_config(tmp_path, customer_url=migrated_customer_url,
                       extra='[web]\npublic_url = "http://content.test:8470/"\n'
                             '[composer]\nrate_global = 2.0\nrate_per_domain = 0.5\n'
                             'domain_rates = ["x.com=0.25"]\nfrom_address = "news@example.com"\n')
    return settings_mod.load(cfg, environ={})


@pytest.fixture
def engine(settings: settings_mod.Settings) -> Iterator[Engine]:
    """Customers PEOPLE (attribute country), all active in conversation 'news'."""
    eng = make_engine(settings.database.customer_url)
    with eng.begin() as conn:
        conn.execute(insert(AttributeDef).values(name="country", type="string", created_at=NOW))
        conn.execute(insert(Customer), [
            {"email": e, "email_key": e, "attributes": {"country": c}, "created_at": NOW,
             "updated_at": NOW} for e, c in PEOPLE])
        conv = create_conversation(conn, "news")
        ids = conn.execute(select(Customer.id)).scalars().all()
        conn.execute(insert(Subscription), [
            {"customer_id": i, "conversation_id": conv, "status": "active", "changed_at": NOW}
            for i in ids])
    yield eng
    eng.dispose()


def make(engine: Engine, settings: settings_mod.Settings, name: str = "spring",
         **kw: Any) -> int:
    fields: dict[str, Any] = {"conversation": "news", "subject": "Hello",
                              "html": "https://cdn.example.com/mail.html"}
    fields.update(kw)
    return campaigns.create(engine, settings, CampaignSpec(name=name, **fields), now=NOW)


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


# --- parsing options ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, name, expr", [
    ('de=country = "DE"', "de", 'country = "DE"'),
    ('country = "DE"', "Segment 2", 'country = "DE"'),
    ('country="DE"', "Segment 2", 'country="DE"'),  # "DE" alone is no filter: all of it is
    ("heavy=clicks >= 3", "heavy", "clicks >= 3"),
])
def test_parse_segment(text: str, name: str, expr: str) -> None:
    """NAME=EXPR names a segment only when the rest is a filter."""
    assert campaigns.parse_segment(text, 2) == SegmentSpec(name, expr)


def test_parse_segment_reports_the_column() -> None:
    """A filter that does not parse is refused with its column and a caret line."""
    with pytest.raises(CampaignError, match=r"--segment 1: bad filter at column 9") as exc:
        campaigns.parse_segment('country ~ "DE"', 1)
    assert "        ^" in str(exc.value)


@pytest.mark.parametrize("text, name, spec", [
    ("equal:3", None, "equal:3"),
    ("A=50,30,20", "A", {"percent": [50.0, 30.0, 20.0]}),
    ("10", None, {"percent": 10.0}),
])
def test_parse_split(text: str, name: str | None, spec: Any) -> None:
    """Splits: equal parts, percentages, one percentage; optionally for one segment."""
    assert campaigns.parse_split(text) == (name, spec)


@pytest.mark.parametrize("text", ["50,40", "equal:0", "half"])
def test_parse_split_refuses(text: str) -> None:
    """Percentages that do not add up to 100, zero parts, or words are refused."""
    with pytest.raises(CampaignError, match="--split"):
        campaigns.parse_split(text)


def test_parse_time() -> None:
    """--at: now, an offset time, and a naive time in manager.timezone."""
    assert campaigns.parse_time("now", "UTC", NOW) == NOW
    assert campaigns.parse_time("2026-03-02T09:00:00+01:00", "UTC", NOW) == \
        datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    assert campaigns.parse_time("2026-07-01T09:00", "Europe/Berlin", NOW) == \
        datetime(2026, 7, 1, 7, 0, tzinfo=UTC)
    with pytest.raises(CampaignError, match="ISO time"):
        campaigns.parse_time("tomorrow", "UTC", NOW)


# --- create ------------------------------------------------------------------------------------

def test_create_writes_segments_in_order(engine: Engine, settings: settings_mod.Settings) -> None:
    """Segments keep their order, Leftovers last, a split on the named one."""
    segments = campaigns.apply_splits(
        [SegmentSpec("de", 'country = "DE"'), SegmentSpec("fr", 'country = "FR"'),
         SegmentSpec("Leftovers", leftovers=True)], ["de=equal:2"])
    cid = make(engine, settings, segments=tuple(segments), audience='email ends with ".com"')
    with engine.connect() as conn:
        rows = conn.execute(select(Segment.position, Segment.name, Segment.filter_expr,
                                   Segment.split, Segment.is_leftovers)
                            .where(Segment.campaign_id == cid).order_by(Segment.position)).all()
        campaign = conn.execute(select(Campaign).where(Campaign.id == cid)).one()
    assert [tuple(r) for r in rows] == [(1, "de", 'country = "DE"', "equal:2", False),
                                        (2, "fr", 'country = "FR"', None, False),
                                        (3, "Leftovers", None, None, True)]
    assert (campaign.kind, campaign.status, campaign.audience_filter) == \
        ("normal", "ready", 'email ends with ".com"')


def test_split_without_segments_makes_one(engine: Engine) -> None:
    """A split on a campaign without segments splits one segment "All"."""
    assert campaigns.apply_splits([], ["20"]) == [SegmentSpec("All", None, {"percent": 20.0})]


@pytest.mark.parametrize("kw, message", [
    ({"audience": "contry = 1"}, r"--audience: bad filter at column 1: unknown attribute "
                                 r"'contry' \(did you mean 'country'\?\)"),
    ({"segments": (SegmentSpec("a", 'country > 3'),)}, r"--segment 1 \(a\): bad filter at column"),
    ({"conversation": "nope"}, "no conversation 'nope'"),
    ({"subject": "a\r\nBcc: x@y.com"}, "one line"),
    ({"html": None}, "--html and/or --text"),
    ({"html": "ftp://x/y.html"}, "only http"),
    ({"html": "/does/not/exist.html"}, "no such file"),
    ({"from_address": "not an address"}, "not an e-mail address"),
    ({"cron": "every tuesday"}, "not a cron expression"),
    ({"every_days": 0}, "at least 1"),
])
def test_create_refuses(engine: Engine, settings: settings_mod.Settings, kw: dict[str, Any],
                        message: str) -> None:
    """Bad definitions are refused with the reason, and nothing is written."""
    with pytest.raises(CampaignError, match=message):
        make(engine, settings, **kw)
    assert count(engine, Campaign) == 0
    assert count(engine, Content) == 0


def test_create_refuses_a_taken_name(engine: Engine, settings: settings_mod.Settings) -> None:
    """A second campaign with the same name is refused."""
    make(engine, settings)
    with pytest.raises(CampaignError, match="already exists"):
        make(engine, settings)


def _content(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Content)).one()


def test_url_content_is_kept(engine: Engine, settings: settings_mod.Settings) -> None:
    """An http(s) URL is stored as given."""
    make(engine, settings, text="http://cdn.example.com/t.txt")
    row = _content(engine)
    assert (row.html_url, row.text_url, row.html) == (
        "https://cdn.example.com/mail.html", "http://cdn.example.com/t.txt", None)


def test_file_content_is_copied_under_the_root(engine: Engine, settings: settings_mod.Settings,
                                               tmp_path: Path) -> None:
    """A file outside the root is copied to content_root/<campaign>/ and served by URL."""
    src = tmp_path / "work" / "mail.html"
    src.parent.mkdir()
    src.write_text("<p>Hi</p>")
    make(engine, settings, name="Spring Sale/2026", html=str(src))
    copied = settings.paths.content_root / "Spring-Sale-2026" / "mail.html"
    assert copied.read_text() == "<p>Hi</p>"
    assert _content(engine).html_url == "http://content.test:8470/content/Spring-Sale-2026/mail.html"
    assert not [p for p in copied.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_file_inside_the_root_is_not_copied(engine: Engine, settings: settings_mod.Settings) -> None:
    """A file already under the content root keeps its place; its URL is relative to it."""
    inside = settings.paths.content_root / "shared" / "a b.html"
    inside.parent.mkdir(parents=True)
    inside.write_text("<p>x</p>")
    make(engine, settings, html=str(inside))
    assert _content(engine).html_url == "http://content.test:8470/content/shared/a%20b.html"
    assert not (settings.paths.content_root / "spring").exists()


def test_inline_content(engine: Engine, settings: settings_mod.Settings, tmp_path: Path) -> None:
    """--inline stores the text in the row and points the URLs at /content/_inline/<id>."""
    (tmp_path / "m.html").write_text("<p>Grüße</p>", encoding="utf-8")
    (tmp_path / "m.txt").write_text("Grüße", encoding="utf-8")
    make(engine, settings, html=str(tmp_path / "m.html"), text=str(tmp_path / "m.txt"),
         inline=True)
    row = _content(engine)
    assert (row.html, row.text) == ("<p>Grüße</p>", "Grüße")
    assert row.html_url == f"http://content.test:8470/content/_inline/{row.id}.html"
    assert row.text_url == f"http://content.test:8470/content/_inline/{row.id}.txt"


def test_non_utf8_file_is_refused(engine: Engine, settings: settings_mod.Settings,
                                  tmp_path: Path) -> None:
    """Content must be UTF-8 text: a Latin-1 file is refused with the byte offset."""
    (tmp_path / "l1.html").write_bytes("<p>Gr\xfc\xdfe</p>".encode("latin-1"))
    with pytest.raises(CampaignError, match=r"not UTF-8 text \(byte 5\)"):
        make(engine, settings, html=str(tmp_path / "l1.html"))


# --- launch, pause, resume ------------------------------------------------------------------

def instances(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(MessageInstance).order_by(MessageInstance.id)).all()


def campaign_row(engine: Engine, name: str = "spring") -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Campaign).where(Campaign.name == name)).one()


def test_launch_once(engine: Engine, settings: settings_mod.Settings) -> None:
    """Launch makes one ready instance at --at and sets the campaign running; a second
    launch is refused with a clear message and adds nothing."""
    make(engine, settings)
    at = NOW + timedelta(hours=2)
    done = campaigns.launch(engine, settings, "spring", at, NOW)
    (inst,) = instances(engine)
    assert (inst.status, inst.scheduled_at, inst.run_key) == ("ready", at, "launch")
    assert done["instance"] == inst.id
    assert campaign_row(engine).status == "running"
    with pytest.raises(CampaignError, match="already launched"):
        campaigns.launch(engine, settings, "spring", None, NOW)
    assert len(instances(engine)) == 1


def test_launch_unknown_campaign(engine: Engine, settings: settings_mod.Settings) -> None:
    """An unknown name lists the campaigns that exist."""
    make(engine, settings)
    with pytest.raises(CampaignError, match=r"no campaign 'x' \(campaigns: spring\)"):
        campaigns.launch(engine, settings, "x", None, NOW)


def test_recurring_launch_starts_the_schedule(engine: Engine,
                                              settings: settings_mod.Settings) -> None:
    """A recurring campaign's launch sets it running from --at; no instance yet (the manager
    makes them); launching again is refused."""
    make(engine, settings, cron="0 9 * * *")
    done = campaigns.launch(engine, settings, "spring", NOW, NOW)
    row = campaign_row(engine)
    assert (row.kind, row.status, row.starts_at, row.cron) == ("recurring", "running", NOW,
                                                               "0 9 * * *")
    assert done["first_run"] == "2026-03-02T09:00:00Z"
    assert instances(engine) == []
    with pytest.raises(CampaignError, match="already running"):
        campaigns.launch(engine, settings, "spring", None, NOW)


def test_every_days_is_recurring(engine: Engine, settings: settings_mod.Settings) -> None:
    """--every-days N makes a recurring campaign with every_n_days = N."""
    make(engine, settings, every_days=7)
    row = campaign_row(engine)
    assert (row.kind, row.every_n_days, row.cron) == ("recurring", 7, None)


def test_pause_and_resume(engine: Engine, settings: settings_mod.Settings) -> None:
    """Pause: campaign and instances paused; resume: executing again if preparation had
    started, else ready."""
    make(engine, settings)
    campaigns.launch(engine, settings, "spring", None, NOW)
    (inst,) = instances(engine)
    with engine.begin() as conn:
        prepare(conn, inst.id, NOW)
    assert campaigns.pause(engine, "spring", NOW) == 1
    assert (campaign_row(engine).status, instances(engine)[0].status) == ("paused", "paused")
    with pytest.raises(CampaignError, match="paused; `connectd campaign resume"):
        campaigns.launch(engine, settings, "spring", None, NOW)
    with pytest.raises(CampaignError, match="not running"):
        campaigns.pause(engine, "spring", NOW)
    assert campaigns.resume(engine, "spring", NOW) == 1
    assert (campaign_row(engine).status, instances(engine)[0].status) == ("running", "executing")
    with pytest.raises(CampaignError, match="not paused"):
        campaigns.resume(engine, "spring", NOW)


def test_resume_before_preparation_is_ready_again(engine: Engine,
                                                  settings: settings_mod.Settings) -> None:
    """An instance paused before the manager prepared it goes back to ready."""
    make(engine, settings)
    campaigns.launch(engine, settings, "spring", NOW + timedelta(days=1), NOW)
    campaigns.pause(engine, "spring", NOW)
    campaigns.resume(engine, "spring", NOW)
    assert instances(engine)[0].status == "ready"


# --- status, list, show ------------------------------------------------------------------------

def test_status_counts_per_status_and_segment(engine: Engine,
                                              settings: settings_mod.Settings) -> None:
    """status: targets per status (unknown included) and per segment; a failed instance's
    error."""
    make(engine, settings, segments=(SegmentSpec("de", 'country = "DE"'),
                                     SegmentSpec("Leftovers", leftovers=True)))
    campaigns.launch(engine, settings, "spring", None, NOW)
    (inst,) = instances(engine)
    with engine.begin() as conn:
        prepare(conn, inst.id, NOW)
        ids = conn.execute(select(Target.id).order_by(Target.id)).scalars().all()
        conn.execute(update(Target).where(Target.id == ids[0]).values(status="sent"))
        conn.execute(update(Target).where(Target.id == ids[1]).values(status="unknown"))
        conn.execute(update(MessageInstance).values(
            status="failed", error="content http://x/ answered 503"))
    with engine.connect() as conn:
        found = campaigns.status(conn, "spring")
    (one,) = found["instances"]
    assert one["status"] == "failed" and one["error"] == "content http://x/ answered 503"
    counts = one["counts"]
    assert (counts["targets"], counts["sent"], counts["unknown"], counts["pending"]) == (5, 1, 1, 3)
    assert {seg: sum(by.values()) for seg, by in one["segments"].items()} == \
        {"de": 3, "Leftovers": 2}
    with engine.connect() as conn:
        (row,) = campaigns.list_campaigns(conn)
    assert (row["name"], row["targets"], row["sent"], row["unknown"], row["instances"]) == \
        ("spring", 5, 1, 1, 1)


def test_show(engine: Engine, settings: settings_mod.Settings) -> None:
    """show: the definition as stored."""
    make(engine, settings, segments=(SegmentSpec("de", 'country = "DE"'),),
         from_address="Shop <shop@example.com>")
    with engine.connect() as conn:
        found = campaigns.show(conn, "spring")
    assert found["conversation"] == "news"
    assert found["segments"][0]["filter"] == 'country = "DE"'
    (message,) = found["messages"]
    assert (message["subject"], message["from"], message["html_url"]) == (
        "Hello", "Shop <shop@example.com>", "https://cdn.example.com/mail.html")


# --- preflight ---------------------------------------------------------------------------------

@pytest.fixture
def http_content() -> Iterator[str]:
    """A real HTTP server: /ok.html answers 200, anything else 404. Yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            ok = self.path == "/ok.html"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<p>ok</p>" if ok else b"missing")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


DNS_ZONE = {
    "example.com": [("TXT", "v=spf1 ip4:192.0.2.1 -all")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
}


def test_preflight_counts_without_writing(engine: Engine, settings: settings_mod.Settings,
                                          http_content: str) -> None:
    """Counts per segment and domain, suppression hits, a duration estimate, content and DNS
    findings; no instance and no target is left behind."""
    make(engine, settings, html=f"{http_content}/ok.html", text=f"{http_content}/gone.txt",
         segments=(SegmentSpec("de", 'country = "DE"'), SegmentSpec("Leftovers", leftovers=True)))
    with engine.begin() as conn:
        lst = conn.execute(insert(SuppressionList).values(name="s", created_at=NOW)
                           .returning(SuppressionList.id)).scalar_one()
        conn.execute(insert(SuppressionEntry), [
            {"list_id": lst, "kind": "address", "value": "bob@x.com", "added_at": NOW},
            {"list_id": lst, "kind": "domain", "value": "z.net", "added_at": NOW}])
    with DnsServer(DNS_ZONE) as dns_server:
        report = campaigns.preflight(engine, settings, "spring", NOW,
                                     resolver=dns_server.resolver())
    assert report.targets == 3
    assert report.segments == {"de": 2, "Leftovers": 1}
    assert report.suppression_hits == {"address": 1, "domain": 1}
    assert report.domains == [{"domain": "y.org", "targets": 2}, {"domain": "x.com", "targets": 1}]
    # y.org: 2 at 0.5/s = 4 s; x.com: 1 at 0.25/s = 4 s; global: 3 at 2/s = 1.5 s
    assert report.estimate["seconds"] == 4.0
    assert [c["ok"] for c in report.content] == [True, False]
    assert report.content[1]["status"] == 404
    assert any("gone.txt cannot be fetched" in w for w in report.warnings)
    assert report.dns["domain"] == "example.com"
    levels = {x["check"]: x["level"] for x in report.dns["findings"]}
    # SPF found, no DKIM key published for selector "connectd": an error finding (advice only)
    assert (levels["spf"], levels["dkim"]) == ("ok", "error")
    assert any(w.startswith("DNS dkim:") for w in report.warnings)
    assert count(engine, MessageInstance) == 0
    assert count(engine, Target) == 0


def test_preflight_dns_unreachable_is_a_warning(engine: Engine,
                                                settings: settings_mod.Settings) -> None:
    """A DNS server that never answers gives a warning, and the preflight still completes."""
    make(engine, settings)
    with DnsServer({}, silent=True) as dns_server:
        report = campaigns.preflight(engine, settings, "spring", NOW,
                                     resolver=dns_server.resolver(lifetime=0.5))
    assert report.targets == 5
    (finding,) = report.dns["findings"]
    assert (finding["level"], finding["check"]) == ("warning", "dns")
    assert "DNS unreachable" in finding["message"]


def heartbeat(engine: Engine, name: str, throughput: float, seen: datetime = NOW) -> None:
    with engine.begin() as conn:
        conn.execute(insert(ComposerHeartbeat).values(
            name=name, host="h", pid=1, started_at=seen, last_seen=seen, throughput=throughput))


def test_estimate_uses_measured_throughput(engine: Engine, settings: settings_mod.Settings) -> None:
    """Live composers' summed throughput is part of the estimate when it is the tightest limit."""
    heartbeat(engine, "composer-1@h", 0.6)
    heartbeat(engine, "composer-2@h", 0.6)
    with engine.connect() as conn:
        throughput, source = campaigns.composer_throughput(conn, NOW, 60.0)
    assert (throughput, source) == (1.2, "live composers")
    est = campaigns.estimate_duration(60, {"x.com": 2, "y.org": 3}, settings, throughput)
    assert est["seconds"] == 50.0 and est["limited_by"] == "composer throughput 1/s"


@pytest.mark.parametrize(("throughput", "seen_ago"), [(0.0, 0), (0.4, 0), (900.0, 61)],
                         ids=["idle", "under-1", "not-live"])
def test_no_composer_measured_is_no_limit(engine: Engine, settings: settings_mod.Settings,
                                          throughput: float, seen_ago: int) -> None:
    """An idle composer (0/s, under 1/s) or one not live (heartbeat older than
    manager.composer_timeout) gives "no composer measured yet", not a 0/s limit."""
    heartbeat(engine, "composer-1@h", throughput, NOW - timedelta(seconds=seen_ago))
    make(engine, settings)
    report = campaigns.preflight(engine, settings, "spring", NOW, check_dns=False)
    est = report.estimate
    assert est["throughput_source"] == campaigns.NO_COMPOSER
    assert est["throughput"] == 0.0
    assert "composer" not in (est["limited_by"] or "")
    # 5 targets at rate_global 2/s = 2.5 s; x.com 2 at 0.25/s = 8 s: the domain limits
    assert (est["seconds"], est["limited_by"]) == (8.0, "x.com at 0.25/s")
    unlimited = dataclasses.replace(settings, composer=dataclasses.replace(
        settings.composer, rate_global=0.0, rate_per_domain=0.0, domain_rates=[]))
    assert campaigns.estimate_duration(5, {"x.com": 5}, unlimited, 0.4)["seconds"] is None


def test_preflight_cli_says_no_composer_measured(engine: Engine, settings: settings_mod.Settings,
                                                 tmp_path: Path) -> None:
    """`campaign preflight` prints "no composer measured yet", never "composer throughput 0/s"."""
    from click.testing import CliRunner

    from connectd.cli import main

    heartbeat(engine, "composer-1@h", 0.2, datetime.now(UTC))
    make(engine, settings)
    cfg = tmp_path / "etc" / "connectd.toml"
    result = CliRunner(env={"CONNECTD_CONFIG": str(cfg)}).invoke(
        main, ["campaign", "preflight", "spring", "--no-dns"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "estimated duration" in x)
    assert "no composer measured yet" in line and "0/s" not in line, line
