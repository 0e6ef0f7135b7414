"""`connectd init` in a fresh tree (SQLite and PostgreSQL), and the secrets file it makes."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner
from conftest import write_config
from sqlalchemy import select
from sqlalchemy.orm import Session

from connectd import settings as settings_mod
from connectd.cli import main
from connectd.db import migrate
from connectd.db.customer import User
from connectd.secrets import SecretsError, create_secrets, load_secrets

CONNECTD = Path(sys.executable).with_name("connectd")


@pytest.fixture
def fresh_tree(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A settings file whose spool, logs and databases do not exist yet; returns its path."""
    if db_backend == "sqlite":
        cfg = write_config(tmp_path)  # SQLite files under ../spool, relative to etc/
    else:
        new_db = request.getfixturevalue("pg_url_factory")
        cfg = write_config(tmp_path, customer_url=new_db(), report_url=new_db())
    shutil.rmtree(tmp_path / "spool")
    shutil.rmtree(tmp_path / "logs")
    return cfg


def run_init(cfg: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--config", str(cfg), "init"], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def admin_password(stdout: str) -> str | None:
    for line in stdout.splitlines():
        if line.startswith("admin password: "):
            return line.split()[2]
    return None


def test_init_creates_everything(fresh_tree: Path) -> None:
    """A first init makes dirs, spool identity, databases at head, secrets 0600, an admin."""
    code, out, err = run_init(fresh_tree)
    assert code == 0, err
    st = settings_mod.load(fresh_tree, environ={})
    for path in (st.paths.spool, st.paths.logs, st.paths.content_root):
        assert path.is_dir()
    assert (st.paths.spool / "spool-id").read_text().strip()
    assert stat.S_IMODE(st.paths.secrets.stat().st_mode) == 0o600
    assert load_secrets(st.paths.secrets).token_keys
    customer, report = migrate.engines(st)
    try:
        assert migrate.current(customer, "customer") == migrate.head("customer")
        assert migrate.current(report, "report") == migrate.head("report")
        with Session(customer) as s:
            admin = s.scalars(select(User)).one()
    finally:
        customer.dispose()
        report.dispose()
    password = admin_password(out)
    assert password and (admin.username, admin.role) == ("admin", "admin")
    assert PasswordHasher().verify(admin.password_hash, password)


def test_second_init_changes_nothing(fresh_tree: Path) -> None:
    """A second init creates nothing, keeps the secrets, and does not show a password."""
    run_init(fresh_tree)
    secrets_path = fresh_tree.parent / "secrets.toml"
    before = secrets_path.read_bytes()
    code, out, err = run_init(fresh_tree)
    assert code == 0, err
    assert admin_password(out) is None
    assert "exists   admin user" in out
    assert not [line for line in out.splitlines() if line.startswith("created")]
    assert secrets_path.read_bytes() == before


def test_existing_loose_secrets_kept_with_warning(config_path: Path) -> None:
    """A pre-existing secrets file is never rewritten; a group/world-readable one is warned about."""
    secrets_path = config_path.parent / "secrets.toml"
    secrets_path.write_text('token_keys = ["mine"]\nsession_keys = ["s"]\nverp_keys = ["v"]\n')
    secrets_path.chmod(0o644)
    code, out, err = run_init(config_path)
    assert code == 0, err
    assert load_secrets(secrets_path).token_keys == ("mine",)
    assert "has mode 0644" in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    """An unreachable PostgreSQL URL: exit 1 and one line naming the database, no traceback."""
    url = f"postgresql+psycopg://nobody@127.0.0.1:{_closed_port()}/connectd"
    cfg = write_config(tmp_path, customer_url=url)
    done = subprocess.run([str(CONNECTD), "--config", str(cfg), "init"], capture_output=True,
                          text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("CONNECTD_")})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("connectd init: customer database ")
    assert "Connection refused" in lines[0] or "connection failed" in lines[0]


def test_unwritable_directory_is_one_clear_line(tmp_path: Path) -> None:
    """A directory that cannot be made (its parent is a file): exit 1, one line naming it."""
    (tmp_path / "blocker").write_text("a file, not a directory\n")
    cfg = write_config(tmp_path, extra="")
    cfg.write_text(cfg.read_text().replace('logs = "../logs"', 'logs = "../blocker/logs"'))
    code, out, err = run_init(cfg)
    assert code == 1
    assert err.strip() == f"connectd init: cannot create logs directory {tmp_path}/blocker/logs: Not a directory"


def test_create_secrets_is_0600_and_never_overwrites(tmp_path: Path) -> None:
    """create_secrets writes once (mode 0600 even under umask 0) and then returns False."""
    path = tmp_path / "etc" / "secrets.toml"
    old = os.umask(0)
    try:
        assert create_secrets(path) is True
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = load_secrets(path)
    assert create_secrets(path) is False
    assert load_secrets(path) == first
    assert len(first.token_keys[0]) >= 43  # 32 random bytes, URL-safe base64
    assert [p.name for p in path.parent.iterdir()] == ["secrets.toml"]  # no temp file left


def test_load_secrets_rejects_missing_keys(tmp_path: Path) -> None:
    """A secrets file without token keys is refused with the file and key named."""
    path = tmp_path / "secrets.toml"
    path.write_text("token_keys = []\n")
    with pytest.raises(SecretsError, match="token_keys must be a non-empty list"):
        load_secrets(path)


def test_init_installs_the_default_reply_handlers_once(config_path: Path) -> None:
    """init writes the default reply-handler chain where processor.handlers points, and never
    overwrites the operator's own file on a later run."""
    from connectd.core.replyrules import load_chain
    from connectd.init import DEFAULT_HANDLERS

    code, out, err = run_init(config_path)
    assert code == 0, err
    target = settings_mod.load(config_path, environ={}).processor.handlers
    assert target.read_bytes() == DEFAULT_HANDLERS.read_bytes()
    assert f"created  reply handlers {target}" in out
    assert load_chain(target)  # the shipped chain is valid
    target.write_text("# mine\n", encoding="utf-8")
    code, out, err = run_init(config_path)
    assert code == 0, err
    assert target.read_text(encoding="utf-8") == "# mine\n"
    assert f"exists   reply handlers {target}" in out
