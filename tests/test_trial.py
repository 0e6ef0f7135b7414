"""Trial sends (connectd.campaigns.trial, `connectd campaign trial`) on real SQLite and
PostgreSQL: exact targets, new customers, suppression, the manager's handling (batched
without preparation, completed, also while paused), and that neither a normal launch nor an
every-N-days run treats a trial copy as the campaign's mail."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from conftest import write_config
from sqlalchemy import Engine, func, insert, select, update
from test_execution import compose, statuses, step

from connectd import campaigns
from connectd import settings as settings_mod
from connectd.campaigns import CampaignError, CampaignSpec
from connectd.cli import main
from connectd.conversations import create_conversation
from connectd.db.customer import (
    Campaign,
    Customer,
    Message,
    MessageInstance,
    Subscription,
    SuppressionEntry,
    SuppressionList,
    Target,
)
from connectd.db.engine import make_engine, writer
from connectd.execution import due_instances
from connectd.preparation import prepare

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
PEOPLE = [("ann@x.com", {"first_name": "Ann"}), ("bob@x.com", {"first_name": "Bob"}),
          ("cy@y.org", {}), ("dee@y.org", {})]


@pytest.fixture
def config(tmp_path: Path, migrated_customer_url: str) -> Path:
    return write_config(tmp_path, customer_url=migrated_customer_url,
                        extra='[web]\npublic_url = "http://content.test:8470/"\n')


@pytest.fixture
def settings(config: Path) -> settings_mod.Settings:
    return settings_mod.load(config, environ={})


@pytest.fixture
def engine(settings: settings_mod.Settings) -> Iterator[Engine]:
    """PEOPLE, all active in 'news'; suppression list 'global' holding bob@x.com (in upper
    case) and the domain blocked.example."""
    eng = make_engine(settings.database.customer_url)
    with eng.begin() as conn:
        conn.execute(insert(Customer), [
            {"email": e, "email_key": e, "attributes": a, "created_at": NOW, "updated_at": NOW}
            for e, a in PEOPLE])
        conv = create_conversation(conn, "news")
        conn.execute(insert(Subscription), [
            {"customer_id": i, "conversation_id": conv, "status": "active", "changed_at": NOW}
            for i in conn.execute(select(Customer.id)).scalars()])
        lst = conn.execute(insert(SuppressionList).values(name="global", created_at=NOW)
                           .returning(SuppressionList.id)).scalar_one()
        conn.execute(insert(SuppressionEntry), [
            {"list_id": lst, "kind": "address", "value": "BOB@x.com", "added_at": NOW},
            {"list_id": lst, "kind": "domain", "value": "blocked.example", "added_at": NOW}])
    yield eng
    eng.dispose()


def make(engine: Engine, settings: settings_mod.Settings, **kw: Any) -> int:
    fields: dict[str, Any] = {"conversation": "news", "subject": "Hello [First Name|you]",
                              "html": "https://cdn.example.com/mail.html"}
    fields.update(kw)
    return campaigns.create(engine, settings, CampaignSpec(name="spring", **fields), now=NOW)


def emails_of(engine: Engine, instance_id: int) -> dict[str, str]:
    """email_key -> target status of an instance."""
    with engine.connect() as conn:
        return dict(conn.execute(select(Customer.email_key, Target.status).join(
            Target, Target.customer_id == Customer.id).where(Target.instance_id == instance_id)).all())


def row(engine: Engine, model: Any, where: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(model).where(where)).one()


def test_trial_targets_exactly_the_addresses(engine: Engine,
                                             settings: settings_mod.Settings) -> None:
    """A draft campaign's trial: a trial message with the main content, an executing
    instance whose pending targets are exactly the allowed addresses (a new one created
    without attributes, suppressed ones skipped with the list), campaign status unchanged."""
    make(engine, settings)
    done = campaigns.trial(engine, "spring", ["Ann@x.com", "bob@x.com", "New@Z.net",
                                              "x@blocked.example", "ann@x.com"], now=NOW)
    assert done.sent_to == ["Ann@x.com", "New@Z.net"]
    assert done.created == ["New@Z.net"]
    assert done.skipped == [
        {"address": "bob@x.com", "reason": "suppressed address (list global)"},
        {"address": "x@blocked.example",
         "reason": "suppressed domain blocked.example (list global)"}]
    assert emails_of(engine, done.instance) == {"ann@x.com": "pending", "new@z.net": "pending"}
    new = row(engine, Customer, Customer.email_key == "new@z.net")
    assert (new.email, new.attributes) == ("New@Z.net", {})
    assert row(engine, Customer, Customer.email_key == "ann@x.com").attributes == \
        {"first_name": "Ann"}
    inst = row(engine, MessageInstance, MessageInstance.id == done.instance)
    assert (inst.status, inst.started_at, inst.scheduled_at) == ("executing", NOW, NOW)
    assert inst.run_key == done.run_key == "trial-20260302T120000.000000Z"
    with engine.connect() as conn:
        messages = {m.kind: m for m in conn.execute(select(Message))}
        assert conn.execute(select(func.count()).select_from(Subscription).where(
            Subscription.customer_id == new.id)).scalar_one() == 0
    assert set(messages) == {"main", "trial"}
    assert messages["trial"].content_id == messages["main"].content_id
    assert row(engine, Campaign, Campaign.name == "spring").status == "ready"
    again = campaigns.trial(engine, "spring", ["new@z.net"], now=NOW + timedelta(seconds=1))
    assert again.created == [] and again.instance != done.instance
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Message)).scalar_one() == 2


@pytest.mark.parametrize(("to", "message"), [
    (["bob@x.com", "y@BLOCKED.example"], "every address is suppressed"),
    (["not an address"], "is not an e-mail address"),
])
def test_trial_refused_writes_nothing(engine: Engine, settings: settings_mod.Settings,
                                      to: list[str], message: str) -> None:
    """Nobody to send to, or a bad address: refused with the reason, nothing written."""
    make(engine, settings)
    with pytest.raises(CampaignError, match=message):
        campaigns.trial(engine, "spring", to, now=NOW)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(MessageInstance)).scalar_one() == 0
        assert conn.execute(select(Message.kind)).scalars().all() == ["main"]


def test_manager_sends_a_trial_without_preparing_it(engine: Engine,
                                                    settings: settings_mod.Settings) -> None:
    """The manager never prepares a trial (not due, prepare() refuses it), batches its
    targets, completes it; the draft campaign stays as it was."""
    make(engine, settings)
    done = campaigns.trial(engine, "spring", ["ann@x.com", "new@z.net"], now=NOW)
    with engine.connect() as conn:
        assert due_instances(conn, NOW + timedelta(days=1)) == []
    with writer(engine).begin() as conn, pytest.raises(ValueError, match="trial send"):
        prepare(conn, done.instance, NOW)
    out = step(engine)
    assert out["prepared"] == []
    assert (out["batches"].batches, out["batches"].targets) == (1, 2)
    assert len(compose(engine)) == 2
    out = step(engine)
    assert [c.instance_id for c in out["completed"]] == [done.instance]
    assert out["campaigns_done"] == []
    assert statuses(engine, done.instance) == {"sent": 2}
    assert row(engine, MessageInstance, MessageInstance.id == done.instance).sent_count == 2
    assert row(engine, Campaign, Campaign.name == "spring").status == "ready"


def test_later_launch_still_mails_trial_recipients(engine: Engine,
                                                   settings: settings_mod.Settings) -> None:
    """A trial's recipients (sent) are not "already mailed" for the main launch: the
    launch targets the whole segment; a new trial customer who never subscribed is not."""
    make(engine, settings)
    trial = campaigns.trial(engine, "spring", ["ann@x.com", "cy@y.org", "new@z.net"], now=NOW)
    step(engine)
    compose(engine)
    step(engine)
    assert statuses(engine, trial.instance) == {"sent": 3}
    launched = campaigns.launch(engine, settings, "spring", NOW, NOW)
    out = step(engine, NOW + timedelta(seconds=1))
    (result,) = out["prepared"]
    assert "already_mailed" not in result.excluded
    assert set(emails_of(engine, launched["instance"])) == {"ann@x.com", "cy@y.org", "dee@y.org"}
    assert result.excluded == {"suppressed_address": 1}  # bob, as always


def test_trial_is_not_recently_mailed_for_every_n_days(engine: Engine,
                                                       settings: settings_mod.Settings) -> None:
    """Every-N-days: a customer who got only a trial copy yesterday is mailed today."""
    make(engine, settings, every_days=7)
    trial = campaigns.trial(engine, "spring", ["ann@x.com"], now=NOW - timedelta(days=1))
    with engine.begin() as conn:
        conn.execute(update(Target).where(Target.instance_id == trial.instance)
                     .values(status="sent"))
        main = conn.execute(select(Message.id).where(Message.kind == "main")).scalar_one()
        inst = conn.execute(insert(MessageInstance).values(
            message_id=main, run_key="2026-03-02", status="ready", scheduled_at=NOW,
            created_at=NOW).returning(MessageInstance.id)).scalar_one()
    with writer(engine).begin() as conn:
        result = prepare(conn, inst, NOW)
    assert "recently_mailed" not in result.excluded
    assert "ann@x.com" in emails_of(engine, inst)


def test_trial_goes_out_while_paused_and_never_holds_the_campaign(
        engine: Engine, settings: settings_mod.Settings) -> None:
    """A trial of a paused campaign is batched (the main instance is not); once the main
    instance is done the campaign is done although a trial failed."""
    make(engine, settings)
    launched = campaigns.launch(engine, settings, "spring", NOW, NOW)
    campaigns.pause(engine, "spring", NOW)
    trial = campaigns.trial(engine, "spring", ["dee@y.org"], now=NOW)
    out = step(engine)
    assert (out["prepared"], out["batches"].targets) == ([], 1)
    assert emails_of(engine, trial.instance) == {"dee@y.org": "batched"}
    assert emails_of(engine, launched["instance"]) == {}
    with engine.begin() as conn:  # the composer could not fetch the content, say
        conn.execute(update(MessageInstance).where(MessageInstance.id == trial.instance)
                     .values(status="failed", error="content gone"))
    campaigns.resume(engine, "spring", NOW)
    for _ in range(5):
        out = step(engine)
        compose(engine)
        if out["campaigns_done"]:
            break
    assert row(engine, Campaign, Campaign.name == "spring").status == "done"


def test_status_and_list_mark_trials(engine: Engine, settings: settings_mod.Settings) -> None:
    """status lists a trial instance with trial: true; list and show count it apart."""
    make(engine, settings)
    campaigns.trial(engine, "spring", ["ann@x.com", "cy@y.org"], now=NOW)
    with engine.connect() as conn:
        (inst,) = campaigns.status(conn, "spring")["instances"]
        (listed,) = campaigns.list_campaigns(conn)
        shown = campaigns.show(conn, "spring")
    assert (inst["trial"], inst["message"], inst["counts"]["pending"]) == (True, "trial", 2)
    assert (listed["instances"], listed["trials"], listed["targets"]) == (0, 1, 0)
    assert (shown["instances"], shown["trials"]) == (0, 1)
    assert [m["kind"] for m in shown["messages"]] == ["main", "trial"]


def test_cli_trial_and_status(engine: Engine, settings: settings_mod.Settings,
                              config: Path) -> None:
    """`campaign trial`: one line per new customer and per skipped address; `status` says
    "trial instance"; a suppressed-only trial exits 1 with the reason, no traceback."""
    make(engine, settings)
    runner = CliRunner(env={"CONNECTD_CONFIG": str(config)})
    r = runner.invoke(main, ["campaign", "trial", "spring", "--to", "ann@x.com",
                             "--to", "new@z.net", "--to", "bob@x.com"])
    assert r.exit_code == 0, r.output
    assert "trial instance" in r.output and "to 2 addresses: ann@x.com, new@z.net" in r.output
    assert "new@z.net: not a customer yet; created without attributes" in r.output
    assert "skipped bob@x.com: suppressed address (list global)" in r.output
    r = runner.invoke(main, ["campaign", "status", "spring"])
    assert "not launched" not in r.output and "\ntrial instance " in r.output, r.output
    status = orjson.loads(runner.invoke(main, ["campaign", "status", "spring", "--json"]).stdout)
    assert [i["trial"] for i in status["instances"]] == [True]
    r = runner.invoke(main, ["campaign", "trial", "spring", "--to", "bob@x.com"])
    assert r.exit_code == 1 and "every address is suppressed" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(main, ["campaign", "trial", "spring"])
    assert r.exit_code == 2 and "--to" in r.output


# --- end to end, real processes ----------------------------------------------------------------

def _instance(url: str, run_key_like: str) -> tuple[str, str | None]:
    """(status, error) of the newest instance whose run_key is LIKE the pattern."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    eng = create_engine(url, poolclass=NullPool)
    try:
        with eng.connect() as conn:
            found = conn.execute(text(
                "SELECT status, error FROM message_instances WHERE run_key LIKE :k "
                "ORDER BY id DESC"), {"k": run_key_like}).first()
    finally:
        eng.dispose()
    return (found.status, found.error) if found else ("none", None)


def _wait(url: str, group: Any, run_key_like: str, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    state: tuple[str, str | None] = ("none", None)
    while time.monotonic() < deadline:
        group.check_alive()
        state = _instance(url, run_key_like)
        if state[0] in ("done", "failed"):
            break
        time.sleep(0.2)
    assert state[0] == "done", (f"{run_key_like}: {state} after {timeout} s\n"
                                + "\n".join(f"--- {n}\n{group.tail(n)}" for n in group.procs))


def _html_of(data: bytes) -> str:
    import email
    from email import policy

    msg = email.message_from_bytes(data, policy=policy.default)
    part = msg.get_body(("html",))
    assert part is not None
    return part.get_content()


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres)])
def test_trial_end_to_end_then_launch(tmp_path: Path, backend: str,
                                      request: pytest.FixtureRequest) -> None:
    """Real manager, composer, web and profiler: `campaign trial` to 3 addresses (one
    suppressed, one new) reaches the counting relay exactly for the 2 allowed, with the
    existing customer's merge data; the later launch still mails everyone targeted, the
    trial's existing recipient included, and neither the new nor the suppressed one."""
    from helpers.smtp_counter import CountingRelay
    from test_outbound_e2e import Daemons, connectd, load_campaign, setup_tree

    customer_url = request.getfixturevalue("pg_url_factory")() if backend == "postgresql" \
        else None
    url = customer_url or f"sqlite:///{tmp_path / 'spool' / 'customer.db'}"
    group = Daemons(tmp_path / "etc" / "connectd.toml", tmp_path / "logs")
    try:
        with CountingRelay(keep_bytes=True) as relay:
            cfg = setup_tree(tmp_path, relay.port, customer_url,
                             extra="[manager]\npoll_interval = 0.2\n")
            aud = load_campaign(cfg, tmp_path, 200)
            member = sorted(aud.expected)[0]
            suppressed = "someone@blocked.example"
            new = "Brand.New@example.com"
            for name in ("profiler", "web", "manager", "composer-1"):
                group.start(name)
            out = connectd(cfg, "campaign", "trial", "spring", "--to", member, "--to", new,
                           "--to", suppressed).stdout
            assert f"skipped {suppressed}: suppressed domain blocked.example" in out, out
            assert f"{new}: not a customer yet" in out, out
            _wait(url, group, "trial-%")
            assert relay.per_recipient() == {member: 1, new.lower(): 1}
            by_rcpt = {d.rcpt: d for d in relay.deliveries}
            first = "Name" + member.split("@")[0][1:]  # c17@... was imported as Name17
            assert f"Hello {first}," in _html_of(by_rcpt[member].data)
            assert "Hello friend," in _html_of(by_rcpt[new.lower()].data)
            status = orjson.loads(connectd(cfg, "campaign", "status", "spring", "--json").stdout)
            assert status["status"] == "ready"  # a trial leaves the campaign a draft
            assert [i["trial"] for i in status["instances"]] == [True]
            connectd(cfg, "campaign", "launch", "spring")
            _wait(url, group, "launch")
            group.stop_all()
    finally:
        for proc in group.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    got = relay.per_recipient()
    launch_ids = {d.message_id for d in relay.deliveries if d.rcpt != new.lower()}
    assert set(got) == aud.expected | {new.lower()}
    assert got[member] == 2 and got[new.lower()] == 1
    assert all(got[e] == 1 for e in aud.expected - {member})
    assert suppressed not in got
    # the trial copy and the launch copy are different messages (instance in the Message-ID)
    assert len(launch_ids) == len(aud.expected) + 1
