"""The manager (Connect's CM): launched instances -> targets -> batches that composers claim;
retries and completion.

Inputs: the customer DB (message instances, targets, batches, composer heartbeats, campaigns),
settings.manager. Outputs: the same tables, changed one poll at a time by connectd.execution,
and one log line per unit of work ("instance.prepared" from preparation, "batches created",
"retries scheduled", "instance done", "recurring instance created").

Each part of a poll is its own short transaction (BEGIN IMMEDIATE on SQLite), so a manager
killed at any instant leaves every row in a state the next poll (of this manager or another)
carries on from; nothing depends on memory. Any number of managers may run against one
PostgreSQL: the conditional UPDATEs and SKIP LOCKED in connectd.execution keep them from
doing anything twice.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from connectd import execution
from connectd.consumer import transient
from connectd.core.filters import FilterError
from connectd.daemon import Daemon
from connectd.daemons.profiler import check_schema
from connectd.db.engine import make_engine, writer
from connectd.settings import Settings


class Manager(Daemon):
    name = "manager"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # a bad quiet_hours/timezone/retry setting stops us here, before any work
        self.config = execution.ExecutionConfig.from_settings(settings.manager)
        self.engine: Engine | None = None
        self._next_poll = 0.0
        self._outage = False
        self._quiet = False

    def setup(self) -> None:
        engine = make_engine(self.settings.database.customer_url, self.settings.database.echo)
        try:
            check_schema(engine, "customer")  # NotInitialised: `connectd run` exits 78
        except Exception:
            engine.dispose()
            raise
        self.engine = engine

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.dispose()

    def step(self) -> int:
        """One poll (at most every manager.poll_interval while idle); returns the number of
        instances created, prepared and completed, targets retried and batches created."""
        if time.monotonic() < self._next_poll:
            return 0
        try:
            done = self.poll(datetime.now(UTC))
        except OperationalError as exc:
            if not transient(exc):
                raise
            if not self._outage:  # once per outage, not once per poll
                self.log.warning("customer database unavailable; retrying",
                                 error=str(exc.orig).splitlines()[0][:200])
            self._outage = True
            done = 0
        else:
            if self._outage:
                self.log.info("customer database back")
            self._outage = False
        self._next_poll = time.monotonic() + (0.0 if done else self.settings.manager.poll_interval)
        return done

    def poll(self, now: datetime) -> int:
        """Every part of one poll, each in its own transaction."""
        assert self.engine is not None, "setup() first"
        return (self._recurring(now) + self._prepare(now) + self._retries(now)
                + self._batches(now) + self._complete(now))

    # -- the parts ------------------------------------------------------------------------
    def _begin(self) -> Any:
        assert self.engine is not None
        return writer(self.engine).begin()

    def _recurring(self, now: datetime) -> int:
        with self._begin() as conn:
            created = execution.create_recurring(conn, now, self.config.tz)
        for instance_id in created:
            self.log.info("recurring instance created", instance=instance_id)
        return len(created)

    def _prepare(self, now: datetime) -> int:
        assert self.engine is not None
        with self.engine.connect() as conn:
            due = execution.due_instances(conn, now)
        prepared = 0
        for instance_id in due:
            if self._stopping:
                break  # TERM: what is committed stays; the rest waits for the next start
            try:
                with self._begin() as conn:
                    result = execution.prepare_instance(conn, instance_id, now)
            except (ValueError, FilterError) as exc:
                # this instance cannot be prepared as it stands (bad filter, no conversation):
                # say so on the instance; the others go on
                with self._begin() as conn:
                    execution.fail_instance(conn, instance_id, f"preparation failed: {exc}", now)
                self.log.error("instance failed", instance=instance_id, error=str(exc))
                prepared += 1
                continue
            if result is not None:
                prepared += 1
        return prepared

    def _retries(self, now: datetime) -> int:
        with self._begin() as conn:
            result = execution.schedule_retries(conn, now, self.config.retry)
        if result.changed:
            self.log.info("retries scheduled", scheduled=result.scheduled, due=result.due,
                          failed=result.failed)
        return result.changed

    def _batches(self, now: datetime) -> int:
        with self._begin() as conn:
            result = execution.create_batches(conn, now, self.config)
        if result.quiet != self._quiet:
            self._quiet = result.quiet
            self.log.info("quiet hours begin" if result.quiet else "quiet hours end",
                          window=self.settings.manager.quiet_hours)
        if result.batches:
            self.log.info("batches created", batches=result.batches, targets=result.targets,
                          size=result.size, composers=result.live)
        return result.batches

    def _complete(self, now: datetime) -> int:
        with self._begin() as conn:
            completed = execution.complete_instances(conn, now)
            campaigns = execution.complete_campaigns(conn, now)
        for c in completed:
            self.log.info("instance done", instance=c.instance_id, campaign=c.campaign,
                          sent=c.counts["sent"], failed=c.counts["failed"],
                          unknown=c.counts["unknown"], targets=sum(c.counts.values()))
        for campaign_id, name in campaigns:
            self.log.info("campaign done", campaign=name, campaign_id=campaign_id)
        return len(completed) + len(campaigns)
