"""Batch leases, the composer's side: claim, mark a window "sending", renew, finish, release.

Inputs: a customer-DB Engine, the composer's name, `now`, settings values (lease, window).
Outputs: rows changed in `mail_batches` and `targets`, and the mail objects (target +
customer + segment) of the window a composer may hand off.

Exactly once rests on two statements here (contract of issue 3):

- claim(): one transaction picks a batch that is "pending", or "claimed" with an expired
  lease (its composer vanished), or "claimed" by this very name (our own restart), of an
  instance that is "executing"; it becomes ours with a fresh lease, and every target of it
  still "sending" becomes "unknown": its previous holder died between committing the window
  and journalling the outcome, so the relay may or may not have it; it is never resent.
  PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED (concurrent claimers take different
  batches without waiting); SQLite: the whole transaction runs under BEGIN IMMEDIATE.
- mark_window(): one transaction renews the lease only while the batch is still ours and
  its instance still "executing", then moves up to `window` targets "batched" -> "sending"
  with a conditional UPDATE ... RETURNING. Only the rows that UPDATE changed may be handed
  off: if two composers ever believe they own one batch, a target still changes once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, case, func, or_, select, update

from connectd.db.customer import Customer, MailBatch, MessageInstance, Segment, Target
from connectd.db.engine import writer

_B = MailBatch.__table__
_T = Target.__table__
_C = Customer.__table__
_S = Segment.__table__
_I = MessageInstance.__table__


@dataclass(frozen=True, slots=True)
class Claim:
    """A batch this composer now holds. `unknown`: targets moved sending -> unknown."""

    batch_id: int
    instance_id: int
    size: int
    attempts: int
    unknown: int


@dataclass(frozen=True, slots=True)
class MailObject:
    """One target to hand off: who, with what merge data, at which attempt."""

    target_id: int
    customer_id: int
    email: str
    attributes: dict[str, Any]
    segment_id: int | None
    segment: str | None  # the segment's name
    attempt: int  # targets.attempts after this window's update


@dataclass(frozen=True, slots=True)
class Window:
    """What mark_window did. `owned` False: the batch is no longer ours (taken over, or its
    instance is no longer executing); `objects` empty while owned: nothing left to send."""

    owned: bool
    objects: list[MailObject]


def _claimable(name: str, now: datetime) -> Any:
    return and_(
        _I.c.status == "executing",
        or_(_B.c.status == "pending",
            and_(_B.c.status == "claimed",
                 or_(_B.c.lease_expires_at < now, _B.c.claimed_by == name))))


def claim(engine: Engine, name: str, lease: float, now: datetime) -> Claim | None:
    """Take one batch for composer `name` (see the module docstring); None if there is none."""
    pick = (select(_B.c.id, _B.c.instance_id, _B.c.size, _B.c.attempts)
            .select_from(_B.join(_I, _I.c.id == _B.c.instance_id))
            .where(_claimable(name, now))
            # our own batch first (a restart resumes it), then oldest first
            .order_by(case((_B.c.claimed_by == name, 0), else_=1), _B.c.id)
            .limit(1)
            .with_for_update(skip_locked=True, of=_B))
    with writer(engine).begin() as conn:
        row = conn.execute(pick).first()
        if row is None:
            return None
        conn.execute(update(_B).where(_B.c.id == row.id).values(
            status="claimed", claimed_by=name, claimed_at=now,
            lease_expires_at=now + timedelta(seconds=lease), attempts=_B.c.attempts + 1))
        unknown = conn.execute(update(_T).where(_T.c.batch_id == row.id, _T.c.status == "sending")
                               .values(status="unknown", updated_at=now)).rowcount
    return Claim(row.id, row.instance_id, row.size, row.attempts + 1, unknown or 0)


def _renew_stmt(batch_id: int, name: str, lease: float, now: datetime) -> Any:
    executing = select(_I.c.id).where(_I.c.status == "executing")
    return (update(_B)
            .where(_B.c.id == batch_id, _B.c.status == "claimed", _B.c.claimed_by == name,
                   _B.c.instance_id.in_(executing))
            .values(lease_expires_at=now + timedelta(seconds=lease)))


def renew(engine: Engine, batch_id: int, name: str, lease: float, now: datetime) -> bool:
    """Extend the lease; False when the batch is no longer ours or its instance stopped."""
    with writer(engine).begin() as conn:
        return conn.execute(_renew_stmt(batch_id, name, lease, now)).rowcount == 1


def mark_window(engine: Engine, batch_id: int, name: str, size: int, lease: float,
                now: datetime) -> Window:
    """Renew the lease and move the next `size` "batched" targets to "sending", committed
    before this returns; the returned objects are exactly the targets this call changed."""
    with writer(engine).begin() as conn:
        # First statement: on PostgreSQL it locks the batch row until commit, so no claimer
        # can take the batch over between our renewal and our window update.
        if conn.execute(_renew_stmt(batch_id, name, lease, now)).rowcount != 1:
            return Window(False, [])
        next_ids = (select(_T.c.id).where(_T.c.batch_id == batch_id, _T.c.status == "batched")
                    .order_by(_T.c.id).limit(size))
        owner = select(_B.c.id).where(_B.c.id == batch_id, _B.c.status == "claimed",
                                      _B.c.claimed_by == name).exists()
        changed = conn.execute(
            update(_T)
            .where(_T.c.batch_id == batch_id, _T.c.status == "batched",
                   _T.c.id.in_(next_ids.scalar_subquery()), owner)
            .values(status="sending", attempts=_T.c.attempts + 1, updated_at=now)
            .returning(_T.c.id)).scalars().all()
        if not changed:
            return Window(True, [])
        return Window(True, _load(conn, list(changed)))


def _load(conn: Any, target_ids: list[int]) -> list[MailObject]:
    """The mail objects of these targets: one query joining targets, customers, segments."""
    rows = conn.execute(
        select(_T.c.id, _T.c.customer_id, _T.c.segment_id, _T.c.attempts, _C.c.email,
               _C.c.attributes, _S.c.name)
        .select_from(_T.join(_C, _C.c.id == _T.c.customer_id)
                     .outerjoin(_S, _S.c.id == _T.c.segment_id))
        .where(_T.c.id.in_(target_ids))
        .order_by(_T.c.id)).all()
    return [MailObject(r[0], r[1], r[4], r[5] or {}, r[2], r[6], r[3]) for r in rows]


def load_mail_objects(engine: Engine, target_ids: list[int]) -> list[MailObject]:
    """The mail objects of `target_ids` (for tools and tests; mark_window returns its own)."""
    with engine.connect() as conn:
        return _load(conn, target_ids)


def remaining(engine: Engine, batch_id: int) -> int:
    """Targets of the batch not yet handed off (status "batched"): the composer's backlog."""
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(_T).where(
            _T.c.batch_id == batch_id, _T.c.status == "batched")).scalar_one()


def finish(engine: Engine, batch_id: int, name: str, now: datetime) -> bool:
    """Batch done (every target handed off or failed); False if it was no longer ours."""
    with writer(engine).begin() as conn:
        return conn.execute(
            update(_B).where(_B.c.id == batch_id, _B.c.status == "claimed",
                             _B.c.claimed_by == name)
            .values(status="done", finished_at=now, lease_expires_at=None)).rowcount == 1


def release(engine: Engine, batch_id: int, name: str) -> bool:
    """Give a batch back ("pending", no owner) so whoever resumes carries on with it."""
    with writer(engine).begin() as conn:
        return conn.execute(
            update(_B).where(_B.c.id == batch_id, _B.c.status == "claimed",
                             _B.c.claimed_by == name)
            .values(status="pending", claimed_by=None, lease_expires_at=None)).rowcount == 1
