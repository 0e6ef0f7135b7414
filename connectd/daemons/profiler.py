"""The profiler: follows every stream of its host's spool and applies each record exactly once
to the customer DB and to the report DB.

Inputs: the spool's streams (woken by watchdog, with a slow poll for dropped inotify events).
Outputs: per database, the appliers' effects and the stream positions, committed together
(connectd.consumer). Two consumers per stream, `profiler.customer` on the customer DB and
`profiler.report` on the report DB, so each database's transaction holds its own position.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from connectd.consumer import Consumer, all_streams
from connectd.daemon import Daemon
from connectd.db.engine import make_engine
from connectd.spool import Spool

CONSUMER = "profiler"


def consumer_name(db: str) -> str:
    """Each database's consumer has its own name (profiler.customer, profiler.report), so a
    record one of them shunted is, when replayed, applied by that one only."""
    return f"{CONSUMER}.{db}"


class Profiler(Daemon):
    name = "profiler"
    periodic_interval = 5.0

    def setup(self) -> None:
        s = self.settings
        self.spool = Spool(s.paths.spool, s.spool)
        self.spool.create()
        self.engines = {"customer": make_engine(s.database.customer_url, s.database.echo),
                        "report": make_engine(s.database.report_url, s.database.echo)}
        self.consumers: dict[tuple[str, str], Consumer] = {}
        self._stop_watch: Callable[[], None] | None = None
        self._next_scan = 0.0
        self._refresh()
        if not self._once:
            self._stop_watch = self.spool.watch(self.wake)

    _once = False

    def _refresh(self) -> None:
        """Pick up streams created since the last look (a daemon started later)."""
        for stream in all_streams(self.spool, self.settings.profiler.streams):
            for db, engine in self.engines.items():
                if (stream, db) not in self.consumers:
                    self.consumers[(stream, db)] = Consumer(
                        self.spool, stream, consumer_name(db), db, engine,  # type: ignore[arg-type]
                        self.settings.profiler.batch_size)
        self._next_scan = time.monotonic() + self.settings.spool.poll_interval

    def step(self) -> int:
        if time.monotonic() >= self._next_scan:
            self._refresh()
        done = 0
        for consumer in self.consumers.values():
            if self._stopping:
                break  # TERM: what is committed stays committed; stop between batches
            t0 = time.monotonic()
            n = consumer.poll()
            if n:
                done += n
                self.log.debug("applied", stream=consumer.stream, db=consumer.db, records=n,
                               ms=round((time.monotonic() - t0) * 1000, 1))
        return done

    def teardown(self) -> None:
        if self._stop_watch:
            self._stop_watch()
        for consumer in self.consumers.values():
            consumer.close()
        for engine in self.engines.values():
            engine.dispose()

    def run_until_idle(self, max_steps: int | None = None) -> int:
        self._once = True
        return super().run_until_idle(max_steps)
