"""The manager's preparation (connectd.preparation.prepare) on real SQLite and PostgreSQL:
subscribers -> audience -> first matching segment -> exclusions -> targets, and random splits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, func, insert, select

from connectd.db.customer import (
    AttributeDef,
    Campaign,
    Conversation,
    Customer,
    Message,
    MessageInstance,
    Segment,
    Subscription,
    SuppressionEntry,
    SuppressionList,
    Target,
)
from connectd.db.engine import make_engine, writer
from connectd.preparation import prepare, split_part, split_parts

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(migrated_customer_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_customer_url)
    with engine.begin() as conn:
        conn.execute(insert(AttributeDef), [
            {"name": "country", "type": "string", "created_at": NOW},
            {"name": "age", "type": "integer", "created_at": NOW}])
    yield engine
    engine.dispose()


def add_customers(conn: Connection, people: list[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Insert customers; return local part (lower-cased) -> id."""
    ids = {}
    for email, attrs in people:
        ids[email.split("@")[0].lower()] = conn.execute(
            insert(Customer).values(email=email, email_key=email.lower(), attributes=attrs,
                                    created_at=NOW, updated_at=NOW)
            .returning(Customer.id)).scalar_one()
    return ids


def add_conversation(conn: Connection, name: str, statuses: dict[int, str]) -> int:
    conv = conn.execute(insert(Conversation).values(name=name)
                        .returning(Conversation.id)).scalar_one()
    if statuses:
        conn.execute(insert(Subscription), [
            {"customer_id": cid, "conversation_id": conv, "status": st}
            for cid, st in statuses.items()])
    return conv


def add_campaign(conn: Connection, name: str, conversation: int,
                 segments: list[dict[str, Any]] = (), audience: str | None = None,
                 kind: str = "normal") -> int:
    """A campaign with segments (dicts of Segment columns) and one main message; returns
    the message id."""
    camp = conn.execute(insert(Campaign).values(
        name=name, conversation_id=conversation, audience_filter=audience, kind=kind)
        .returning(Campaign.id)).scalar_one()
    for pos, seg in enumerate(segments, start=1):
        conn.execute(insert(Segment).values(campaign_id=camp, position=pos, **seg))
    return conn.execute(insert(Message).values(campaign_id=camp, name="main")
                        .returning(Message.id)).scalar_one()


def add_instance(conn: Connection, message_id: int, run_key: str = "1") -> int:
    return conn.execute(insert(MessageInstance).values(message_id=message_id, run_key=run_key)
                        .returning(MessageInstance.id)).scalar_one()


def run(engine: Engine, instance_id: int) -> Any:
    with writer(engine).connect() as conn:
        result = prepare(conn, instance_id, NOW)
    return result


def targets(engine: Engine, instance_id: int) -> dict[int, int | None]:
    """customer id -> segment id of the instance's targets."""
    with engine.connect() as conn:
        return dict(conn.execute(select(Target.customer_id, Target.segment_id)
                                 .where(Target.instance_id == instance_id)).all())


def segment_ids(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(select(Segment.name, Segment.id)).all())


PEOPLE = [("de1@a.com", {"country": "DE", "age": 30}), ("de2@a.com", {"country": "DE", "age": 50}),
          ("fr1@b.com", {"country": "FR", "age": 40}), ("us1@c.com", {"country": "US", "age": 20}),
          ("none@c.com", {})]


@pytest.fixture
def world(engine: Engine) -> dict[str, int]:
    """PEOPLE, all active in conversation "deals"."""
    with engine.begin() as conn:
        ids = add_customers(conn, PEOPLE)
        ids["_conv"] = add_conversation(conn, "deals", {i: "active" for i in ids.values()})
    return ids


def test_first_matching_segment_wins(engine: Engine, world: dict[str, int]) -> None:
    """A customer matching two segments lands in the earlier one only."""
    with engine.begin() as conn:
        msg = add_campaign(conn, "c", world["_conv"], [
            {"name": "old", "filter_expr": "age >= 40"},
            {"name": "germans", "filter_expr": 'country = "DE"'}])
        inst = add_instance(conn, msg)
    result = run(engine, inst)
    seg = segment_ids(engine)
    assert targets(engine, inst) == {world["de2"]: seg["old"], world["fr1"]: seg["old"],
                                     world["de1"]: seg["germans"]}
    assert result.segments == {"old": 2, "germans": 1}
    assert result.excluded == {"no_segment": 2}


def test_leftovers_catch_the_rest_whatever_their_position(engine: Engine,
                                                          world: dict[str, int]) -> None:
    """A Leftovers segment (even at position 1) takes everyone no other segment matched."""
    with engine.begin() as conn:
        msg = add_campaign(conn, "c", world["_conv"], [
            {"name": "rest", "is_leftovers": True},
            {"name": "germans", "filter_expr": 'country = "DE"'}])
        inst = add_instance(conn, msg)
    result = run(engine, inst)
    seg = segment_ids(engine)
    got = targets(engine, inst)
    assert got[world["de1"]] == got[world["de2"]] == seg["germans"]
    assert {got[world[k]] for k in ("fr1", "us1", "none")} == {seg["rest"]}
    assert result.segments == {"germans": 2, "rest": 3}
    assert result.excluded == {}


def test_no_segments_targets_whole_audience_filtered(engine: Engine,
                                                     world: dict[str, int]) -> None:
    """Without segments the audience filter alone decides; segment_id stays NULL."""
    with engine.begin() as conn:
        msg = add_campaign(conn, "c", world["_conv"], audience="age < 45")
        inst = add_instance(conn, msg)
    result = run(engine, inst)
    assert targets(engine, inst) == {world["de1"]: None, world["fr1"]: None, world["us1"]: None}
    assert result.segments == {"(all)": 3}
    assert result.excluded == {"audience": 2}


def test_audience_filter_applies_before_segments(engine: Engine, world: dict[str, int]) -> None:
    """Customers outside the audience are not caught by Leftovers."""
    with engine.begin() as conn:
        msg = add_campaign(conn, "c", world["_conv"], [{"name": "rest", "is_leftovers": True}],
                           audience='country in ("DE", "FR")')
        inst = add_instance(conn, msg)
    run(engine, inst)
    assert set(targets(engine, inst)) == {world["de1"], world["de2"], world["fr1"]}


def test_only_active_subscribers_are_targeted(engine: Engine) -> None:
    """opting_in, opted_out and bounced_out subscribers and non-subscribers get nothing."""
    with engine.begin() as conn:
        ids = add_customers(conn, [(f"{s}@x.com", {}) for s in
                                   ("active", "optingin", "optedout", "bounced", "stranger")])
        conv = add_conversation(conn, "deals", {
            ids["active"]: "active", ids["optingin"]: "opting_in",
            ids["optedout"]: "opted_out", ids["bounced"]: "bounced_out"})
        inst = add_instance(conn, add_campaign(conn, "c", conv))
    result = run(engine, inst)
    assert set(targets(engine, inst)) == {ids["active"]}
    assert result.excluded == {"opting_in": 1, "opted_out": 1, "bounced_out": 1}


def test_unsubscribing_from_one_conversation_leaves_the_other(engine: Engine) -> None:
    """Opted out of "news" still gets the "deals" campaign, and not the "news" one."""
    with engine.begin() as conn:
        ids = add_customers(conn, [("ann@x.com", {}), ("bob@x.com", {})])
        deals = add_conversation(conn, "deals", {ids["ann"]: "active", ids["bob"]: "active"})
        news = add_conversation(conn, "news", {ids["ann"]: "opted_out", ids["bob"]: "active"})
        deals_inst = add_instance(conn, add_campaign(conn, "d", deals))
        news_inst = add_instance(conn, add_campaign(conn, "n", news))
    run(engine, deals_inst)
    run(engine, news_inst)
    assert set(targets(engine, deals_inst)) == {ids["ann"], ids["bob"]}
    assert set(targets(engine, news_inst)) == {ids["bob"]}


def test_suppressed_addresses_and_domains_case_insensitive(engine: Engine) -> None:
    """Address and domain entries in any case keep matching customers out."""
    with engine.begin() as conn:
        ids = add_customers(conn, [("Ann@Example.com", {}), ("bob@blocked.ORG", {}),
                                   ("cy@ok.net", {}), ("dee@sub.blocked.org", {})])
        conv = add_conversation(conn, "deals", {i: "active" for i in ids.values()})
        lst = conn.execute(insert(SuppressionList).values(name="dnm")
                           .returning(SuppressionList.id)).scalar_one()
        conn.execute(insert(SuppressionEntry), [
            {"list_id": lst, "kind": "address", "value": "ANN@example.COM"},
            {"list_id": lst, "kind": "domain", "value": "Blocked.org"}])
        inst = add_instance(conn, add_campaign(conn, "c", conv))
    result = run(engine, inst)
    # a domain entry covers that exact domain, not its subdomains
    assert set(targets(engine, inst)) == {ids["cy"], ids["dee"]}
    assert result.excluded == {"suppressed_address": 1, "suppressed_domain": 1}


def test_rerun_adds_nothing(engine: Engine, world: dict[str, int]) -> None:
    """A second prepare of the same instance inserts no rows and reports them as targeted."""
    with engine.begin() as conn:
        msg = add_campaign(conn, "c", world["_conv"], [{"name": "all", "is_leftovers": True}])
        inst = add_instance(conn, msg)
    first = run(engine, inst)
    second = run(engine, inst)
    assert first.added == 5 and second.added == 0
    assert second.excluded == {"already_targeted": 5}
    assert second.total_targets == len(targets(engine, inst)) == 5


def test_rerun_picks_up_new_subscribers_only(engine: Engine, world: dict[str, int]) -> None:
    """A customer subscribing between two runs is added once, in the right segment."""
    with engine.begin() as conn:
        msg = add_campaign(conn, "c", world["_conv"], [{"name": "de", "filter_expr":
                                                        'country = "DE"'}])
        inst = add_instance(conn, msg)
    run(engine, inst)
    with engine.begin() as conn:
        new = add_customers(conn, [("de3@a.com", {"country": "DE"})])["de3"]
        conn.execute(insert(Subscription).values(customer_id=new, conversation_id=world["_conv"],
                                                 status="active"))
    result = run(engine, inst)
    assert result.segments == {"de": 1}
    assert set(targets(engine, inst)) == {world["de1"], world["de2"], new}


def test_already_mailed_by_another_instance_of_a_normal_campaign(engine: Engine,
                                                                 world: dict[str, int]) -> None:
    """A relaunch of a once-only message skips everyone the first launch targeted (unless
    that target failed); a recurring campaign mails them again."""
    with engine.begin() as conn:
        msg = add_campaign(conn, "once", world["_conv"])
        again = add_campaign(conn, "weekly", world["_conv"], kind="recurring")
        first, weekly1 = add_instance(conn, msg, "1"), add_instance(conn, again, "1")
    run(engine, first)
    run(engine, weekly1)
    with engine.begin() as conn:
        conn.execute(Target.__table__.update()
                     .where(Target.instance_id == first, Target.customer_id == world["us1"])
                     .values(status="failed"))
        second, weekly2 = add_instance(conn, msg, "2"), add_instance(conn, again, "2")
    result = run(engine, second)
    assert set(targets(engine, second)) == {world["us1"]}
    assert result.excluded == {"already_mailed": 4}
    assert run(engine, weekly2).added == 5


def test_message_limited_to_one_segment(engine: Engine, world: dict[str, int]) -> None:
    """A message with segment_id targets only that segment's (first-match) customers."""
    with engine.begin() as conn:
        msg = add_campaign(conn, "c", world["_conv"], [
            {"name": "old", "filter_expr": "age >= 40"},
            {"name": "germans", "filter_expr": 'country = "DE"'}])
        seg = dict(conn.execute(select(Segment.name, Segment.id)).all())
        conn.execute(Message.__table__.update().where(Message.id == msg)
                     .values(segment_id=seg["germans"]))
        inst = add_instance(conn, msg)
    result = run(engine, inst)
    assert targets(engine, inst) == {world["de1"]: seg["germans"]}
    assert result.excluded == {"no_segment": 2, "other_segment": 2}


def test_instance_status_goes_to_executing_with_count(engine: Engine,
                                                      world: dict[str, int]) -> None:
    """After prepare the instance is executing, started, and knows its target count."""
    with engine.begin() as conn:
        inst = add_instance(conn, add_campaign(conn, "c", world["_conv"]))
    run(engine, inst)
    with engine.connect() as conn:
        row = conn.execute(select(MessageInstance).where(MessageInstance.id == inst)).one()
    assert (row.status, row.target_count, row.started_at) == ("executing", 5, NOW)


def test_bad_filter_writes_nothing(engine: Engine, world: dict[str, int]) -> None:
    """A segment filter that does not compile leaves no targets and the instance ready."""
    from connectd.core.filters import FilterError

    with engine.begin() as conn:
        inst = add_instance(conn, add_campaign(conn, "c", world["_conv"], [
            {"name": "ok", "filter_expr": "age > 3"}, {"name": "bad", "filter_expr": "nope > 1"}]))
    with pytest.raises(FilterError):
        run(engine, inst)
    assert targets(engine, inst) == {}
    with engine.connect() as conn:
        assert conn.execute(select(MessageInstance.status)
                            .where(MessageInstance.id == inst)).scalar_one() == "ready"


@pytest.mark.parametrize(("spec", "parts"), [
    ({"parts": 3}, [100 / 3] * 3), ("equal:2", [50.0, 50.0]), ("50,30,20", [50.0, 30.0, 20.0]),
    ({"percent": 10, "seed": "x"}, [10.0, 90.0]), ({"percent": [25, 75]}, [25.0, 75.0]),
    (None, None)])
def test_split_specs(spec: Any, parts: list[float] | None) -> None:
    """Split specs in their accepted spellings -> percentages."""
    assert split_parts(spec) == parts


@pytest.mark.parametrize("spec", [{"percent": [50, 30]}, "equal:0", {"percent": [-10, 110]},
                                  {"colour": "red"}])
def test_bad_split_specs_refused(spec: Any) -> None:
    """Percentages not adding up to 100, zero parts, unknown keys: ValueError."""
    with pytest.raises(ValueError):
        split_parts(spec)


def test_random_split_proportions_and_determinism(engine: Engine) -> None:
    """A 50/30/20 split of 3,000 customers comes out within 3 points of each share, the same
    as split_part() computes, and the same again for another instance with the same seed."""
    spec = {"percent": [50, 30, 20], "seed": "launch-1"}
    with engine.begin() as conn:
        conn.execute(insert(Customer), [
            {"email": f"u{i}@x.com", "email_key": f"u{i}@x.com", "attributes": {},
             "created_at": NOW, "updated_at": NOW} for i in range(3000)])
        ids = conn.execute(select(Customer.id)).scalars().all()
        conv = add_conversation(conn, "deals", {i: "active" for i in ids})
        msg = add_campaign(conn, "c", conv, [{"name": "ab", "split": spec}], kind="recurring")
        one, two = add_instance(conn, msg, "1"), add_instance(conn, msg, "2")
    first, second = run(engine, one), run(engine, two)
    assert sum(first.splits["ab"]) == first.segments["ab"] == 3000
    for got, share in zip(first.splits["ab"], (0.5, 0.3, 0.2), strict=True):
        assert abs(got / 3000 - share) < 0.03
    expected = Counter(split_part(i, spec, one) for i in ids)
    assert first.splits["ab"] == [expected[p] for p in range(3)]
    assert second.splits == first.splits


def test_split_seed_defaults_to_instance() -> None:
    """Without a seed, two instances split independently: about half the customers change
    halves."""
    spec = {"parts": 2}
    moved = sum(split_part(i, spec, 1) != split_part(i, spec, 2) for i in range(1, 2001))
    assert 800 < moved < 1200


def test_counts_match_rows(engine: Engine, world: dict[str, int]) -> None:
    """PrepResult's per-segment counts equal the rows stored per segment."""
    with engine.begin() as conn:
        msg = add_campaign(conn, "c", world["_conv"], [
            {"name": "de", "filter_expr": 'country = "DE"', "split": "equal:2"},
            {"name": "rest", "is_leftovers": True}])
        inst = add_instance(conn, msg)
    result = run(engine, inst)
    seg = segment_ids(engine)
    with engine.connect() as conn:
        stored = dict(conn.execute(select(Target.segment_id, func.count())
                                   .where(Target.instance_id == inst)
                                   .group_by(Target.segment_id)).all())
    assert {name: stored.get(seg[name], 0) for name in result.segments} == result.segments
    assert sum(result.splits["de"]) == result.segments["de"] == 2
    assert result.total_targets == sum(stored.values()) == 5
