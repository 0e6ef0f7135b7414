"""The top-level `connectd` command: help texts, `config show`, --config / CONNECTD_CONFIG, and
a bad configuration ending every settings-loading command with status 78 (EX_CONFIG)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import write_config

from connectd import cli
from connectd import settings as settings_mod

CONNECTD = Path(sys.executable).parent / "connectd"
EX_CONFIG = 78


def _env(**extra: str) -> dict[str, str]:
    """The test process's environment without any CONNECTD_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTD_")}
    env.update(extra)
    return env


def connectd(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `connectd` script as a user would."""
    return subprocess.run([str(CONNECTD), *args], capture_output=True, text=True, timeout=60,
                          env=_env(**env), stdin=subprocess.DEVNULL)


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    """A settings file with one misspelt key."""
    path = tmp_path / "bad" / "connectd.toml"
    path.parent.mkdir()
    path.write_text("[web]\nprot = 8470\n", encoding="utf-8")
    return path


def test_installed_script_exists() -> None:
    """The venv holds the `connectd` console script the other tests run."""
    assert CONNECTD.exists()


# --- help ---------------------------------------------------------------------------------


def test_top_level_help_lists_every_command() -> None:
    """`connectd --help` exits 0, describes connectd and lists each command."""
    done = connectd("--help")
    assert done.returncode == 0, done.stderr
    assert "two-way e-mail conversations" in done.stdout
    assert "--config" in done.stdout and "CONNECTD_CONFIG" in done.stdout
    for name in ("config", "init", "up", "run", "spool", "customers"):
        assert f"\n  {name} " in done.stdout, name


def test_version_exits_zero() -> None:
    """`connectd --version` prints the package version."""
    done = connectd("--version")
    assert done.returncode == 0
    assert "0." in done.stdout


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(_command_paths(command, (*prefix, name)))
    return paths


@pytest.mark.parametrize("path", _command_paths(cli.main), ids=" ".join)
def test_every_command_help_describes_itself(path: tuple[str, ...]) -> None:
    """`connectd <command> --help` exits 0 with a usage line and a description."""
    result = CliRunner().invoke(cli.main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main {' '.join(path)}") or \
        result.output.startswith(f"Usage: connectd {' '.join(path)}")
    description = result.output.split("\n\n", 2)[1].strip()
    assert len(description) > 10, f"{' '.join(path)} has no help text"


def test_group_help_in_a_real_process() -> None:
    """`connectd config --help` names its subcommand, through the installed script."""
    done = connectd("config", "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: connectd config" in done.stdout
    assert "show" in done.stdout


# --- bad configuration -> 78 --------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("config", "show"),
    ("config", "show", "--json"),
    ("run", "profiler"),
    ("run", "profiler", "--once"),
    ("spool", "status"),
    ("init",),
    ("up",),
], ids=" ".join)
def test_bad_config_exits_78_naming_the_key(bad_config: Path, args: tuple[str, ...]) -> None:
    """Every command that loads settings exits 78 with the key on stderr and no traceback."""
    done = connectd("--config", str(bad_config), *args)
    assert done.returncode == EX_CONFIG, (done.stdout, done.stderr)
    assert "web.prot" in done.stderr
    assert str(bad_config) in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_bad_config_from_connectd_config_exits_78(bad_config: Path) -> None:
    """CONNECTD_CONFIG pointing at a bad file is as fatal as --config."""
    done = connectd("config", "show", CONNECTD_CONFIG=str(bad_config))
    assert done.returncode == EX_CONFIG
    assert "web.prot" in done.stderr and "Traceback" not in done.stderr


def test_bad_environment_value_exits_78_naming_the_variable(config_path: Path) -> None:
    """A bad CONNECTD_<SECTION>_<KEY> exits 78 naming the variable and the setting."""
    done = connectd("--config", str(config_path), "config", "show", CONNECTD_WEB_PORT="eighty")
    assert done.returncode == EX_CONFIG
    assert "CONNECTD_WEB_PORT" in done.stderr and "web.port" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("text", "problem"), [
    (None, "not found"),
    ("[web\n", "not valid TOML"),
    ("[web]\nport = 99999\n", "web.port"),
    ('[log]\nlevel = "loud"\n', "log.level"),
], ids=["missing", "toml", "range", "literal"])
def test_unusable_config_exits_78(tmp_path: Path, text: str | None, problem: str) -> None:
    """A missing file, invalid TOML and out-of-range values all exit 78 with the problem."""
    path = tmp_path / "connectd.toml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    done = connectd("--config", str(path), "config", "show")
    assert done.returncode == EX_CONFIG
    assert problem in done.stderr and "Traceback" not in done.stderr


# --- config show --------------------------------------------------------------------------


def test_config_show_prints_effective_values_with_env_overrides(config_path: Path,
                                                                tmp_path: Path) -> None:
    """`config show` prints file values, environment overrides and each setting's meaning."""
    done = connectd("--config", str(config_path), "config", "show", CONNECTD_WEB_PORT="9123",
                    CONNECTD_RELAY_HOSTS="mx1:25,mx2:25")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# effective settings from {config_path.resolve()}")
    web = done.stdout.split("[web]\n", 1)[1].split("\n\n", 1)[0]
    assert "port = 9123  # HTTP port of the web daemon" in web
    assert 'hosts = ["mx1:25", "mx2:25"]' in done.stdout
    assert f'spool = "{tmp_path.resolve() / "spool"}"' in done.stdout


def test_config_show_output_is_a_settings_file(config_path: Path, tmp_path: Path) -> None:
    """What `config show` prints loads back as settings equal to the effective ones."""
    done = connectd("--config", str(config_path), "config", "show", CONNECTD_DAEMON_IDLE_SLEEP="0.5")
    assert done.returncode == 0, done.stderr
    shown = tmp_path / "shown.toml"
    shown.write_text(done.stdout, encoding="utf-8")
    effective = settings_mod.load(config_path, environ={"CONNECTD_DAEMON_IDLE_SLEEP": "0.5"})
    assert settings_mod.load(shown, environ={}) == effective


def test_config_show_json(config_path: Path, tmp_path: Path) -> None:
    """`config show --json` is one JSON object of every key -> effective value."""
    done = connectd("--config", str(config_path), "config", "show", "--json",
                    CONNECTD_SINK_ENABLED="false", CONNECTD_DAEMON_IDLE_SLEEP="0.5")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    keys = [k for k, _, _ in settings_mod.describe(settings_mod.Settings())]
    assert sorted(shown) == sorted(keys)
    assert shown["sink.enabled"] is False
    assert shown["daemon.idle_sleep"] == 0.5
    assert shown["web.port"] == 8470
    assert shown["relay.hosts"] == ["127.0.0.1:8026"]
    assert shown["paths.spool"] == str(tmp_path.resolve() / "spool")
    assert shown["database.customer_url"] == f"sqlite:///{tmp_path.resolve()}/spool/customer.db"


def test_connectd_config_selects_the_file(tmp_path: Path) -> None:
    """CONNECTD_CONFIG chooses the settings file when --config is not given."""
    cfg = tmp_path / "custom.toml"
    cfg.write_text("[tracker]\nport = 9444\n", encoding="utf-8")
    done = connectd("config", "show", "--json", CONNECTD_CONFIG=str(cfg))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tracker.port"] == 9444


def test_config_option_wins_over_connectd_config(config_path: Path, bad_config: Path) -> None:
    """--config takes precedence over CONNECTD_CONFIG."""
    done = connectd("--config", str(config_path), "config", "show", "--json",
                    CONNECTD_CONFIG=str(bad_config))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["web.port"] == 8470


def test_checkout_default_config_is_used_without_options() -> None:
    """From a checkout, with neither --config nor CONNECTD_CONFIG, etc/connectd.toml is used."""
    done = connectd("config", "show")
    checkout = Path(cli.__file__).resolve().parent.parent
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# effective settings from {checkout / 'etc' / 'connectd.toml'}")


def test_run_with_a_bad_daemon_setting_exits_78(tmp_path: Path) -> None:
    """A setting a daemon checks itself (manager.quiet_hours) stops `run` with 78, no traceback."""
    cfg = write_config(tmp_path, extra='[manager]\nquiet_hours = "25:00-07:00"\n')
    proc = subprocess.run([sys.executable, "-m", "connectd", "--config", str(cfg), "run", "manager"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr
    assert "quiet_hours" in proc.stderr
    assert "Traceback" not in proc.stderr
