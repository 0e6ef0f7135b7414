"""Shared fixtures: a self-contained checkout-like tree per test (etc/connectd.toml + spool)."""

from __future__ import annotations

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
def settings(config_path: Path) -> settings_mod.Settings:
    return settings_mod.load(config_path, environ={})
