"""Shared fixtures: a self-contained checkout-like tree per test (etc/connectd.toml + spool),
and databases: `db_url` (SQLite and PostgreSQL), migrated variants, a throwaway PostgreSQL."""

from __future__ import annotations

import getpass
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connectd import settings as settings_mod


def write_config(root: Path, extra: str = "", customer_url: str | None = None,
                 report_url: str | None = None) -> Path:
    """Write root/etc/connectd.toml pointing every path under `root`; return its path."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "spool").mkdir(exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    cfg = root / "etc" / "connectd.toml"
    db = "[database]\n"
    db += f'customer_url = "{customer_url or "sqlite:///../spool/customer.db"}"\n'
    db += f'report_url = "{report_url or "sqlite:///../spool/report.db"}"\n'
    cfg.write_text(
        '[paths]\nspool = "../spool"\nlogs = "../logs"\nsecrets = "secrets.toml"\n'
        'content_root = "../spool/content"\n' + db + extra, encoding="utf-8")
    return cfg


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """A fresh settings file with SQLite databases and a spool under tmp_path."""
    return write_config(tmp_path)


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount_tmpfs(size, inodes=None) -> a fresh tmpfs of that size (e.g. "64k") under
    tmp_path, for full-disk tests; unmounted at the end. Root only: skipped where mounting is
    not allowed."""
    mounted: list[Path] = []

    def mount(size: str, inodes: int | None = None) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        opts = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET (in /tmp:
    AF_UNIX paths are limited to about 107 bytes)."""
    path = Path("/tmp") / f"connectd-notify-{os.getpid()}-{tmp_path.name[-20:]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()
        path.unlink(missing_ok=True)


@pytest.fixture
def settings(config_path: Path) -> settings_mod.Settings:
    return settings_mod.load(config_path, environ={})


# --- PostgreSQL: a throwaway cluster per test session (or CONNECTD_TEST_PG_URL) ----------------


PG_SKIP_REASON = "PostgreSQL tests skipped: no initdb/pg_ctl found and CONNECTD_TEST_PG_URL not set"


def _pg_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's versioned dirs."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cluster:
    """A PostgreSQL cluster in a temp dir, owned by `postgres` when we are root (PostgreSQL
    refuses to run as root)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="connectd-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, user="postgres", group="postgres")
        self.user = "postgres" if self.as_root else getpass.getuser()

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr.strip()}\n{tail}")

    def start(self, shared_buffers: str = "16MB") -> str:
        # trust auth, no fsync, tiny buffers: a test server that starts in about a second.
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8",
                  "--no-sync", "--locale=C")
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c shared_buffers={shared_buffers} "
                "-c max_connections=200")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l",
                  str(self.root / "server.log"), "-o", opts)
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _pg_unavailable(reason: str) -> None:
    # CI must run the PostgreSQL tests: there, a missing server is a failure, not a skip.
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"PostgreSQL required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A URL of a maintenance database on a PostgreSQL server we may CREATE DATABASE on:
    CONNECTD_TEST_PG_URL if set, else a throwaway cluster started for this session."""
    url = os.environ.get("CONNECTD_TEST_PG_URL")
    if url:
        yield url
        return
    bindir = _pg_bindir()
    if bindir is None:
        _pg_unavailable(PG_SKIP_REASON)
    cluster = _Cluster(bindir)
    try:
        url = cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        _pg_unavailable(f"PostgreSQL tests skipped: could not start a test cluster: {exc}")
    try:
        yield url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_url_factory(pg_server: str) -> Iterator[Callable[..., str]]:
    """pg_url_factory() -> the URL of a brand-new empty PostgreSQL database (dropped at the
    end of the session); pg_url_factory(template=NAME) copies database NAME instead."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        version = int(conn.execute(text("SHOW server_version_num")).scalar_one())
    # FILE_COPY (PostgreSQL 15+) copies a small database much faster than the WAL_LOG default.
    strategy = " STRATEGY FILE_COPY" if version >= 150000 else ""
    counter = itertools.count(1)
    created: list[str] = []

    def new_database(template: str | None = None) -> str:
        name = f"connectd_test_{os.getpid()}_{next(counter)}_{uuid.uuid4().hex[:6]}"
        source = f' TEMPLATE "{template}"' if template else ""
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"{source}{strategy}'))
        created.append(name)
        return make_url(pg_server).set(database=name).render_as_string(hide_password=False)

    yield new_database
    # Engines of finished tests may still hold pooled connections; FORCE ends them.
    with admin.connect() as conn:
        for name in reversed(created):
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"),
                        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres)])
def db_backend(request: pytest.FixtureRequest) -> str:
    """"sqlite" or "postgresql": every database fixture of one test uses the same backend."""
    return request.param


@pytest.fixture
def db_url(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database URL: a SQLite file under tmp_path, or a new PostgreSQL database.
    Parametrised: each test using it runs as [sqlite] and [postgresql]."""
    if db_backend == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("pg_url_factory")()


def migrated_url(url: str, which: str) -> str:
    """Bring the (empty) database at `url` to the head of the `which` migration history."""
    from connectd.db import migrate
    from connectd.db.engine import make_engine

    engine = make_engine(url)
    try:
        migrate.upgrade(engine, which)  # type: ignore[arg-type]
    finally:
        engine.dispose()  # also checkpoints SQLite's WAL into the file, so it can be copied
    return url


@pytest.fixture(scope="session")
def migrated_templates(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], str]:
    """(backend, which) -> a database at head, made once per session, to copy from: a SQLite
    file path, or a PostgreSQL database name (a CREATE DATABASE ... TEMPLATE source)."""
    from sqlalchemy.engine import make_url

    made: dict[tuple[str, str], str] = {}
    root = tmp_path_factory.mktemp("migrated-templates")

    def template(backend: str, which: str) -> str:
        key = (backend, which)
        if key not in made:
            if backend == "sqlite":
                path = root / f"{which}.db"
                migrated_url(f"sqlite:///{path}", which)
                made[key] = str(path)
            else:
                # looked up only now, so SQLite-only runs never start PostgreSQL
                url = migrated_url(request.getfixturevalue("pg_url_factory")(), which)
                made[key] = str(make_url(url).database)
        return made[key]

    return template


def _migrated_copy(db_backend: str, which: str, request: pytest.FixtureRequest,
                   tmp_path: Path) -> str:
    template = request.getfixturevalue("migrated_templates")(db_backend, which)
    if db_backend == "sqlite":
        path = tmp_path / f"{which}.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    return request.getfixturevalue("pg_url_factory")(template=template)


@pytest.fixture
def migrated_customer_url(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh customer DB at head (a copy of a once-migrated template), on db_backend."""
    return _migrated_copy(db_backend, "customer", request, tmp_path)


@pytest.fixture
def migrated_report_url(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh report DB at head, on db_backend; a separate database from
    migrated_customer_url, so a test may use both side by side."""
    return _migrated_copy(db_backend, "report", request, tmp_path)


# --- outbound: a launched instance with targets in one batch (composer engineer) --------------


def seed_outbound(url: str, customers: int = 10, *, html_url: str | None = "http://127.0.0.1:9/h",
                  text_url: str | None = None, subject: str = "Hello [First Name|friend]",
                  from_address: str | None = "news@example.com", batches: int = 1,
                  attributes: Callable[[int], dict] | None = None,
                  email: Callable[[int], str] | None = None) -> dict:
    """Insert customers 1..N, a running campaign with one main message and content (by URL),
    an instance "executing", targets "batched" split over `batches` pending batches.
    Returns {"instance": id, "message": id, "batches": [ids], "targets": [ids]}."""
    from datetime import UTC, datetime

    from sqlalchemy import insert, select

    from connectd.db import customer as m
    from connectd.db.engine import make_engine

    now = datetime.now(UTC)
    attributes = attributes or (lambda i: {"first_name": f"Ann{i}"})
    email = email or (lambda i: f"c{i}@example.com")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(m.Customer), [
                {"id": i, "email": email(i), "email_key": email(i).lower(),
                 "attributes": attributes(i), "created_at": now, "updated_at": now}
                for i in range(1, customers + 1)])
            conv = conn.execute(insert(m.Conversation).values(name="news").returning(
                m.Conversation.id)).scalar_one()
            camp = conn.execute(insert(m.Campaign).values(
                name="spring", status="running", conversation_id=conv,
                from_address=from_address).returning(m.Campaign.id)).scalar_one()
            content = conn.execute(insert(m.Content).values(
                subject=subject, html_url=html_url, text_url=text_url).returning(
                m.Content.id)).scalar_one()
            msg = conn.execute(insert(m.Message).values(
                campaign_id=camp, name="main", kind="main", content_id=content).returning(
                m.Message.id)).scalar_one()
            inst = conn.execute(insert(m.MessageInstance).values(
                message_id=msg, status="executing", scheduled_at=now, started_at=now,
                target_count=customers).returning(m.MessageInstance.id)).scalar_one()
            per = -(-customers // batches)
            batch_ids = []
            for b in range(batches):
                ids = range(b * per + 1, min(customers, (b + 1) * per) + 1)
                bid = conn.execute(insert(m.MailBatch).values(
                    instance_id=inst, status="pending", size=len(ids)).returning(
                    m.MailBatch.id)).scalar_one()
                batch_ids.append(bid)
                if ids:
                    conn.execute(insert(m.Target), [
                        {"instance_id": inst, "customer_id": i, "batch_id": bid,
                         "status": "batched", "updated_at": now} for i in ids])
            targets = conn.execute(select(m.Target.id).where(
                m.Target.instance_id == inst).order_by(m.Target.id)).scalars().all()
    finally:
        engine.dispose()
    return {"instance": inst, "message": msg, "batches": batch_ids, "targets": list(targets),
            "content": content, "campaign": camp}


@pytest.fixture
def outbound_seed() -> Callable[..., dict]:
    """seed_outbound(url, customers=10, ...) -> ids of a launched instance with one batch."""
    return seed_outbound
