"""The profiler: follows every stream of its host's spool and applies each record exactly once
to the customer DB and to the report DB.

Inputs: the spool's streams (woken by watchdog, with a slow poll for dropped inotify events).
Outputs: per database, the appliers' effects and the stream positions, committed together
(connectd.consumer). Each database has its own consumers (`profiler.customer`,
`profiler.report`), so each database's transaction holds its own position.

The two databases are independent, so by default (profiler.parallel) the profiler runs one
worker process per database and supervises them: the decoding and applying of one overlaps
the other's on a second core. One lock per spool and database (<spool>/locks/profiler.DB.lock)
makes sure no two processes ever apply the same spool to the same database, which would
apply records twice.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from connectd import log
from connectd.consumer import Consumer, all_streams
from connectd.daemon import Daemon, signal_workers, stuck_workers
from connectd.db.engine import make_engine
from connectd.settings import Settings
from connectd.spool import Locked, Spool

CONSUMER = "profiler"
DATABASES = ("customer", "report")
_STOP_TIMEOUT = 60.0  # seconds a worker gets to finish its batch after TERM


class NotInitialised(RuntimeError):
    """A database is not at the schema this code needs: `connectd init` has to run."""


class WorkerDied(RuntimeError):
    """A profiler worker process ended without being asked to."""


def consumer_name(db: str) -> str:
    """Each database's consumer has its own name (profiler.customer, profiler.report), so a
    record one of them shunted is, when replayed, applied by that one only."""
    return f"{CONSUMER}.{db}"


class Profiler(Daemon):
    name = "profiler"
    periodic_interval = 5.0

    def __init__(self, settings: Settings, dbs: tuple[str, ...] = DATABASES,
                 heartbeat: Any = None) -> None:
        super().__init__(settings)
        self.dbs = dbs
        self._heartbeat = heartbeat  # a worker's shared monotonic time of its last loop
        self._once = False
        self._workers: dict[str, Any] = {}
        self._beats: dict[str, Any] = {}
        self.consumers: dict[tuple[str, str], Consumer] = {}

    @property
    def _split(self) -> bool:
        return len(self.dbs) > 1 and self.settings.profiler.parallel

    # -- one process per database ---------------------------------------------------------
    def setup(self) -> None:
        if self._split and not self._once:
            self._check_schemas()  # here, so a bad database stops us before any worker starts
            ctx = _mp_context()
            for db in self.dbs:
                beat = ctx.Value("d", time.monotonic(), lock=False)
                proc = ctx.Process(target=_worker_main,
                                   args=(self.settings, db, os.getpid(), beat),
                                   name=f"profiler.{db}", daemon=False)
                proc.start()
                self._workers[db] = proc
                self._beats[db] = beat
                self.log.info("worker started", db=db, pid=proc.pid)
            return
        self._setup_consumers()

    def _check_schemas(self) -> None:
        s = self.settings
        urls = {"customer": s.database.customer_url, "report": s.database.report_url}
        for db in self.dbs:
            engine = make_engine(urls[db])
            try:
                check_schema(engine, db)
            finally:
                engine.dispose()

    def _check_workers(self) -> None:
        for db, proc in self._workers.items():
            if not proc.is_alive():
                raise WorkerDied(f"profiler worker for the {db} DB exited with status "
                                 f"{proc.exitcode}; stopping so the supervisor restarts us")

    def alive(self) -> bool:
        """Ping systemd's watchdog only while every worker's loop goes round: a worker stuck
        (in a database call, say) for 3 watchdog intervals gets the whole profiler
        restarted by systemd."""
        stuck = stuck_workers(self._beats, 3 * self.settings.daemon.watchdog_interval)
        if stuck:
            self.log.warning("worker not responding; not pinging the watchdog", dbs=stuck)
        return not stuck

    def _signal_workers(self, signum: int) -> None:
        signal_workers(self._workers.values(), signum)

    def reload(self) -> None:
        self._signal_workers(signal.SIGHUP)

    def reopen(self) -> None:
        self._signal_workers(signal.SIGUSR1)

    # -- applying -------------------------------------------------------------------------
    def _setup_consumers(self) -> None:
        s = self.settings
        _keep_batch_memory()
        self.spool = Spool(s.paths.spool, s.spool)
        self.spool.create()
        self._locks = [self._lock(db) for db in self.dbs]
        urls = {"customer": s.database.customer_url, "report": s.database.report_url}
        self.engines = {db: make_engine(urls[db], s.database.echo) for db in self.dbs}
        for db, engine in self.engines.items():
            check_schema(engine, db)
        self._stop_watch: Callable[[], None] | None = None
        self._next_scan = 0.0
        self._refresh()
        if not self._once:
            self._stop_watch = self.spool.watch(self.wake)

    def _lock(self, db: str) -> int:
        try:
            return self.spool.lock(consumer_name(db))
        except Locked as exc:
            # a worker of a profiler that was just killed may still be finishing its batch
            self.log.warning("another profiler is applying this spool; waiting for it",
                             db=db, holder_pid=exc.holder)
            return self.spool.lock(consumer_name(db), wait=True)

    def _refresh(self) -> None:
        """Pick up streams created since the last look (a daemon started later)."""
        for stream in all_streams(self.spool, self.settings.profiler.streams):
            for db, engine in self.engines.items():
                if (stream, db) not in self.consumers:
                    consumer = Consumer(
                        self.spool, stream, consumer_name(db), db, engine,  # type: ignore[arg-type]
                        self.settings.profiler.batch_size)
                    # appliers' settings (the soft-bounce rule: connectd.appliers.inbound)
                    consumer.cache["settings"] = self.settings
                    self.consumers[(stream, db)] = consumer
        self._next_scan = time.monotonic() + self.settings.spool.poll_interval

    def step(self) -> int:
        if self._workers:
            self._check_workers()
            return 0
        if self._heartbeat is not None:
            self._heartbeat.value = time.monotonic()
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
        if self._workers:
            self._stop_workers()
            return
        if self._stop_watch:
            self._stop_watch()
        for consumer in self.consumers.values():
            consumer.close()
        for engine in self.engines.values():
            engine.dispose()
        for fd in self._locks:
            os.close(fd)

    def _stop_workers(self) -> None:
        self._signal_workers(signal.SIGTERM)  # each finishes its batch, commits, exits 0
        deadline = time.monotonic() + _STOP_TIMEOUT
        for db, proc in self._workers.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                self.log.warning("worker did not stop in time; killing it", db=db)
                proc.kill()  # its open transaction rolls back: nothing half-applied
                proc.join()

    def run_until_idle(self, max_steps: int | None = None) -> int:
        self._once = True
        if not self._split:
            return super().run_until_idle(max_steps)
        # --once: one process per database, each until its streams are idle
        self._check_schemas()
        ctx = _mp_context()
        with ProcessPoolExecutor(max_workers=len(self.dbs), mp_context=ctx) as pool:
            futures = [pool.submit(_worker_once, self.settings, db, max_steps, os.getpid())
                       for db in self.dbs]
            return sum(f.result() for f in futures)


def check_schema(engine: Any, db: str) -> None:
    """Raise NotInitialised unless database `db` is at its newest migration."""
    from sqlalchemy.exc import SQLAlchemyError

    from connectd.db import migrate

    try:
        at = migrate.current(engine, db)  # type: ignore[arg-type]
    except SQLAlchemyError as exc:
        raise NotInitialised(f"the {db} database ({engine.url.render_as_string()}) cannot be "
                             f"read: {str(getattr(exc, 'orig', exc)).splitlines()[0]}") from None
    want = migrate.head(db)  # type: ignore[arg-type]
    if at != want:
        raise NotInitialised(f"the {db} database ({engine.url.render_as_string()}) is at "
                             f"migration {at or 'none'}, this connectd needs {want}: "
                             "run `connectd init`")


def _worker_main(settings: Settings, db: str, parent: int, heartbeat: Any) -> None:
    """A worker process: the profiler for one database, as a daemon loop of its own."""
    _die_with_parent(parent)
    os.environ.pop("NOTIFY_SOCKET", None)  # the parent talks to systemd, not us
    log.configure(settings.log.level, settings.log.format)
    raise SystemExit(Profiler(settings, dbs=(db,), heartbeat=heartbeat).run())


def _worker_once(settings: Settings, db: str, max_steps: int | None, parent: int) -> int:
    _die_with_parent(parent)
    log.configure(settings.log.level, settings.log.format)
    return Profiler(settings, dbs=(db,)).run_until_idle(max_steps)


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when the parent dies. A profiler that was killed is dead
    as a whole: its workers' open transactions roll back (nothing is half-applied, and the
    records are applied by the next profiler), and their locks are free at once. A clean
    stop goes through the parent, which sends TERM and waits."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the lock still prevents double application
        pass
    if os.getppid() != parent:  # the parent died before we could ask
        os._exit(0)


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest
_TRIM_THRESHOLD = 256 << 20


def _keep_batch_memory() -> None:
    """Keep the memory of one batch for the next (glibc). A batch's buffers (the lines read,
    their array for the decoder: ~10 MB each at 50,000 records) went to fresh pages every
    time: mmapped and unmapped, or the heap top trimmed after each batch and faulted in again,
    which cost more than a tenth of a worker's time (bench/profiler_ingest.py: 230,000 minor
    page faults and 0.8 s of system time per worker; with this 60,000 and 0.5 s, the worker
    3.5 -> 3.1-3.2 s). The heap keeps what a batch needs (the peak memory stays the same);
    other C libraries are left as they are."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


def _mp_context() -> Any:
    """fork where it exists (a worker starts in milliseconds, with the modules already
    imported; the parent has opened nothing yet: no threads, no connections), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")
