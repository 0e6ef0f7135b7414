"""Batch leases on SQLite and PostgreSQL: claim, takeover, windows, finish, release."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from connectd import batches
from connectd.db.customer import MailBatch, MessageInstance, Target
from connectd.db.engine import make_engine


@pytest.fixture
def engine(migrated_customer_url: str):
    eng = make_engine(migrated_customer_url)
    yield eng
    eng.dispose()


def _statuses(engine, batch_id: int) -> Counter:
    with engine.connect() as conn:
        return Counter(conn.execute(select(Target.status).where(
            Target.batch_id == batch_id)).scalars())


def _batch(engine, batch_id: int):
    with engine.connect() as conn:
        return conn.execute(select(MailBatch).where(MailBatch.id == batch_id)).one()


def test_claim_takes_a_pending_batch_once(engine, migrated_customer_url, outbound_seed):
    """A pending batch is claimed by one composer; a second finds nothing to claim."""
    seed = outbound_seed(migrated_customer_url, 5)
    now = datetime.now(UTC)
    got = batches.claim(engine, "a", 60, now)
    assert got is not None and got.batch_id == seed["batches"][0] and got.attempts == 1
    assert batches.claim(engine, "b", 60, now) is None
    row = _batch(engine, got.batch_id)
    assert (row.status, row.claimed_by) == ("claimed", "a")


def test_window_marks_targets_sending_and_loads_mail_objects(engine, migrated_customer_url,
                                                             outbound_seed):
    """A window moves `size` targets to sending and returns them with customer data."""
    outbound_seed(migrated_customer_url, 5)
    now = datetime.now(UTC)
    c = batches.claim(engine, "a", 60, now)
    w = batches.mark_window(engine, c.batch_id, "a", 3, 60, now)
    assert w.owned and [o.customer_id for o in w.objects] == [1, 2, 3]
    assert w.objects[0].email == "c1@example.com"
    assert w.objects[0].attributes == {"first_name": "Ann1"} and w.objects[0].attempt == 1
    assert _statuses(engine, c.batch_id) == Counter(sending=3, batched=2)
    assert batches.remaining(engine, c.batch_id) == 2


def test_takeover_after_lease_expiry_marks_sending_unknown(engine, migrated_customer_url,
                                                           outbound_seed):
    """A batch whose lease expired is taken over; its in-flight targets become unknown and
    the old holder can mark nothing more."""
    outbound_seed(migrated_customer_url, 6)
    now = datetime.now(UTC)
    a = batches.claim(engine, "a", 60, now)
    batches.mark_window(engine, a.batch_id, "a", 2, 60, now)
    later = now + timedelta(seconds=61)
    b = batches.claim(engine, "b", 60, later)
    assert b is not None and b.batch_id == a.batch_id and b.unknown == 2 and b.attempts == 2
    assert _statuses(engine, a.batch_id) == Counter(unknown=2, batched=4)
    assert not batches.mark_window(engine, a.batch_id, "a", 2, 60, later).owned
    w = batches.mark_window(engine, b.batch_id, "b", 10, 60, later)
    assert [o.customer_id for o in w.objects] == [3, 4, 5, 6]


def test_lease_not_expired_blocks_takeover(engine, migrated_customer_url, outbound_seed):
    """A claimed batch with a live lease is not taken by another composer."""
    outbound_seed(migrated_customer_url, 2)
    now = datetime.now(UTC)
    batches.claim(engine, "a", 60, now)
    assert batches.claim(engine, "b", 60, now + timedelta(seconds=59)) is None


def test_own_restart_resumes_its_batch(engine, migrated_customer_url, outbound_seed):
    """A composer restarted under the same name reclaims its batch at once; what it had in
    flight is unknown, never resent."""
    outbound_seed(migrated_customer_url, 4, batches=2)
    now = datetime.now(UTC)
    first = batches.claim(engine, "a", 60, now)
    batches.mark_window(engine, first.batch_id, "a", 1, 60, now)
    again = batches.claim(engine, "a", 60, now)
    assert again.batch_id == first.batch_id and again.unknown == 1


def test_paused_instance_stops_windows_and_release_gives_back(engine, migrated_customer_url,
                                                              outbound_seed):
    """Pausing the instance ends the lease's use; release() makes the batch pending again."""
    seed = outbound_seed(migrated_customer_url, 4)
    now = datetime.now(UTC)
    c = batches.claim(engine, "a", 60, now)
    with engine.begin() as conn:
        conn.execute(update(MessageInstance).where(MessageInstance.id == seed["instance"])
                     .values(status="paused"))
    assert not batches.mark_window(engine, c.batch_id, "a", 2, 60, now).owned
    assert batches.claim(engine, "b", 60, now) is None  # paused instances are not claimed
    assert batches.release(engine, c.batch_id, "a")
    row = _batch(engine, c.batch_id)
    assert (row.status, row.claimed_by) == ("pending", None)


def test_finish_only_by_the_holder(engine, migrated_customer_url, outbound_seed):
    """finish() marks the batch done for its holder and refuses anyone else."""
    outbound_seed(migrated_customer_url, 1)
    now = datetime.now(UTC)
    c = batches.claim(engine, "a", 60, now)
    assert not batches.finish(engine, c.batch_id, "b", now)
    assert batches.finish(engine, c.batch_id, "a", now)
    assert _batch(engine, c.batch_id).status == "done"


def test_two_claimers_never_hand_off_the_same_target(migrated_customer_url, outbound_seed):
    """Two composers racing over eight batches (with leases short enough to be taken over
    mid-batch) together hand off every target, none twice."""
    seed = outbound_seed(migrated_customer_url, 400, batches=8)
    handed: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def composer(name: str) -> None:
        eng = make_engine(migrated_customer_url)
        try:
            while True:
                now = datetime.now(UTC)
                c = batches.claim(eng, name, 0.005, now)  # tiny lease: takeovers happen
                if c is None:
                    return
                while True:
                    w = batches.mark_window(eng, c.batch_id, name, 7, 0.005, datetime.now(UTC))
                    if not w.owned:
                        break
                    if not w.objects:
                        batches.finish(eng, c.batch_id, name, datetime.now(UTC))
                        break
                    with lock:
                        handed.extend(o.target_id for o in w.objects)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=composer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(handed) == len(set(handed))
    eng = make_engine(migrated_customer_url)
    with eng.connect() as conn:
        statuses = Counter(conn.execute(select(Target.status)).scalars())
    eng.dispose()
    # handed-off targets are "sending" or (after a takeover) "unknown"; none left behind
    assert statuses["batched"] == 0
    assert statuses["sending"] + statuses["unknown"] == len(seed["targets"]) == len(handed)


def test_mail_objects_carry_attributes_as_stored(engine, migrated_customer_url, outbound_seed,
                                                 db_backend):
    """Attributes come back equal to what was stored: nested, non-ASCII, null; on SQLite
    also NaN, which the standard library writes and orjson alone would refuse."""
    attrs = {1: {"name": "Zoë ✓", "n": 1.5, "tags": ["a", {"b": None}]}, 2: {}, 3: None}
    seed = outbound_seed(migrated_customer_url, 3,
                         attributes=lambda i: attrs[i] if attrs[i] is not None else {})
    with engine.begin() as conn:
        if db_backend == "sqlite":
            conn.exec_driver_sql("UPDATE customers SET attributes = 'null' WHERE id = 3")
            conn.exec_driver_sql(
                "UPDATE customers SET attributes = '{\"x\": NaN}' WHERE id = 2")
    objs = batches.load_mail_objects(engine, seed["targets"])
    assert objs[0].attributes == attrs[1]
    assert objs[2].attributes == {}
    if db_backend == "sqlite":
        nan = objs[1].attributes["x"]
        assert list(objs[1].attributes) == ["x"] and nan != nan  # NaN
