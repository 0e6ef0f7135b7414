"""`connectd init`: make a fresh installation usable; idempotent.

Inputs: the settings. Outputs: the spool (with its identity), logs and content directories,
the SQLite files' directories, both databases migrated to head, the secrets file (0600), the
reply-handler chain (processor.handlers, a copy of the default chain to edit), and an admin user whose random password is printed once. Each step reports whether it created
something or found it already there; a second run changes nothing.

Errors (an unreachable database, an unwritable directory) end with one line on stderr and
exit status 1, never a traceback.
"""

from __future__ import annotations

import secrets as random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from connectd import log
from connectd.settings import Settings

ADMIN_USERNAME = "admin"


class InitError(Exception):
    """A step of init failed; the message is the one line the operator sees."""


@dataclass
class InitReport:
    """What init did: (what, created?) per step, plus the admin password if one was made."""

    steps: list[tuple[str, bool]] = field(default_factory=list)
    admin_password: str | None = None

    def add(self, what: str, created: bool) -> None:
        self.steps.append((what, created))


def _mkdir(path: Path, report: InitReport, what: str) -> None:
    existed = path.is_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InitError(f"cannot create {what} directory {path}: {exc.strerror}") from None
    report.add(f"{what} directory {path}", not existed)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported as written
        return url


def _db_error(which: str, url: str, exc: Exception) -> InitError:
    """One line naming the database and the driver's first line of complaint."""
    orig = getattr(exc, "orig", None) or exc
    detail = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return InitError(f"{which} database {_safe_url(url)}: {detail}")


def _sqlite_dirs(settings: Settings, report: InitReport) -> None:
    dirs: list[Path] = []
    for url in (settings.database.customer_url, settings.database.report_url):
        try:
            parsed = make_url(url)
        except Exception:  # reported with the URL when its engine is made
            continue
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            parent = Path(parsed.database).parent
            if parent not in dirs:
                dirs.append(parent)
    for parent in dirs:
        _mkdir(parent, report, "database")


def _engine(which: str, url: str, echo: bool) -> Engine:
    from connectd.db.engine import make_engine

    try:
        return make_engine(url, echo)
    except Exception as exc:  # a malformed URL or a missing driver: say which URL
        raise InitError(f"{which} database URL {_safe_url(url)} is unusable: {exc}") from None


def _migrate(which: str, url: str, engine: Engine, report: InitReport) -> None:
    from connectd.db import migrate

    try:
        before = migrate.current(engine, which)  # type: ignore[arg-type]
        migrate.upgrade(engine, which)  # type: ignore[arg-type]
        after = migrate.current(engine, which)  # type: ignore[arg-type]
    except SQLAlchemyError as exc:
        raise _db_error(which, url, exc) from None
    change = f"{before or 'empty'} -> {after}" if before != after else f"at {after}"
    report.add(f"{which} database {_safe_url(url)} ({change})", before != after)


def _secrets(path: Path, report: InitReport) -> None:
    from connectd.secrets import create_secrets, loose_mode

    try:
        created = create_secrets(path)
        mode = loose_mode(path)
    except OSError as exc:
        raise InitError(f"cannot create secrets file {path}: {exc.strerror}") from None
    report.add(f"secrets file {path}", created)
    if mode is not None:
        click.echo(f"warning: {path} has mode {mode:04o}; it holds keys, make it 0600 "
                   f"(chmod 600 {path})", err=True)


DEFAULT_HANDLERS = Path(__file__).resolve().parent / "data" / "reply-handlers.toml"


def _handlers(path: Path, report: InitReport) -> None:
    """Install the default reply-handler chain where processor.handlers points, unless a file
    is there (the operator's own chain is never overwritten)."""
    from connectd.spool import create_file_once

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        created = create_file_once(path, DEFAULT_HANDLERS.read_bytes())
    except OSError as exc:
        raise InitError(f"cannot create reply-handler file {path}: {exc.strerror}") from None
    report.add(f"reply handlers {path}", created)


def _admin(engine: Engine, url: str, report: InitReport) -> None:
    """Create the admin user unless a user with the admin role exists."""
    from argon2 import PasswordHasher

    from connectd.db.customer import User
    from connectd.db.engine import writer

    try:
        # writer(): this transaction reads then writes (BEGIN IMMEDIATE on SQLite)
        with Session(writer(engine)) as session, session.begin():
            exists = session.scalar(select(User.id).where(User.role == "admin").limit(1))
            if exists is not None:
                report.add("admin user", False)
                return
            password = random.token_urlsafe(15)
            session.add(User(username=ADMIN_USERNAME, role="admin",
                             password_hash=PasswordHasher().hash(password)))
    except IntegrityError:
        # another init made it between our check and our insert
        report.add("admin user", False)
        return
    except SQLAlchemyError as exc:
        raise _db_error("customer", url, exc) from None
    report.admin_password = password
    report.add(f'admin user "{ADMIN_USERNAME}"', True)


def _spool(settings: Settings, report: InitReport) -> None:
    from connectd.spool import Spool

    existed = (settings.paths.spool / "spool-id").exists()
    try:
        Spool(settings.paths.spool, settings.spool).create()
    except OSError as exc:
        raise InitError(f"cannot create spool {settings.paths.spool}: {exc.strerror}") from None
    report.add(f"spool {settings.paths.spool}", not existed)


def initialize(settings: Settings) -> InitReport:
    """Run every init step; raise InitError with a one-line reason when one fails."""
    report = InitReport()
    _spool(settings, report)
    _mkdir(settings.paths.logs, report, "logs")
    _mkdir(settings.paths.content_root, report, "content")
    _sqlite_dirs(settings, report)
    db = settings.database
    customer = _engine("customer", db.customer_url, db.echo)
    reporting = _engine("report", db.report_url, db.echo)
    try:
        _migrate("customer", db.customer_url, customer, report)
        _migrate("report", db.report_url, reporting, report)
        _secrets(settings.paths.secrets, report)
        _handlers(settings.processor.handlers, report)
        _admin(customer, db.customer_url, report)
    finally:
        customer.dispose()
        reporting.dispose()
    return report


@click.command("init")
def init_command() -> None:
    """Create the spool, databases (migrations), secrets and an admin user; idempotent."""
    from connectd.cli import Context  # here, not at the top: connectd.cli imports this module

    settings = click.get_current_context().find_object(Context).settings
    try:
        report = initialize(settings)
    except InitError as exc:
        click.echo(f"connectd init: {exc}", err=True)
        sys.exit(1)
    for what, created in report.steps:
        click.echo(f"{'created' if created else 'exists '}  {what}")
    if report.admin_password:
        click.echo(f"admin password: {report.admin_password} (shown once; change it after "
                   f'logging in to the web editor as "{ADMIN_USERNAME}")')
    made = sum(1 for _, c in report.steps if c)
    log.get(command="init").debug("init.done", created=made, existing=len(report.steps) - made)
