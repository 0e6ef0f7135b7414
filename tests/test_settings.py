"""connectd.settings: the checkout's defaults, path resolution, environment overrides, and
every kind of bad value ending in a SettingsError that names the key."""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from connectd import settings as settings_mod
from connectd.settings import SettingsError

CHECKOUT = Path(__file__).resolve().parent.parent
CHECKOUT_CONFIG = CHECKOUT / "etc" / "connectd.toml"


def _paths_and_urls(st: settings_mod.Settings) -> list[tuple[str, object]]:
    """Every Path and SQLite-URL setting as (key, value)."""
    return [(k, v) for k, v, _ in settings_mod.describe(st)
            if isinstance(v, Path) or (isinstance(v, str) and v.startswith("sqlite"))]


def _sqlite_file(url: str) -> Path:
    return Path(url.split(":///", 1)[1].partition("?")[0])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    return ipaddress.ip_address(host).is_loopback


@pytest.fixture
def write(tmp_path: Path):
    """write(text) -> a settings file under tmp_path/etc holding `text`."""
    def _write(text: str | bytes) -> Path:
        path = tmp_path / "etc" / "connectd.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path
    return _write


# --- the checkout's defaults --------------------------------------------------------------


def test_checkout_config_keeps_every_file_under_the_checkout() -> None:
    """etc/connectd.toml loads, and every path and SQLite file lies under the checkout."""
    st = settings_mod.load(CHECKOUT_CONFIG, environ={})
    found = _paths_and_urls(st)
    assert len(found) >= 6
    for key, value in found:
        path = value if isinstance(value, Path) else _sqlite_file(str(value))
        assert path.is_absolute(), key
        assert path.is_relative_to(CHECKOUT), f"{key} = {path} is outside {CHECKOUT}"
    assert st.source == CHECKOUT_CONFIG


def test_checkout_config_listens_on_loopback_and_mails_to_the_local_sink() -> None:
    """Every daemon's host and public URL is loopback; the only relay is the local sink."""
    st = settings_mod.load(CHECKOUT_CONFIG, environ={})
    for section in (st.web, st.tracker, st.receiver, st.sink):
        assert _is_loopback(section.host), section
    for url in (st.web.public_url, st.tracker.public_url):
        assert _is_loopback(urlsplit(url).hostname or ""), url
    assert st.sink.enabled is True
    assert st.relay.hosts == (f"{st.sink.host}:{st.sink.port}",)
    ports = [st.web.port, st.tracker.port, st.receiver.port, st.sink.port]
    assert len(set(ports)) == len(ports), "two daemons share a port"


def test_copied_tree_resolves_against_its_own_etc(tmp_path: Path) -> None:
    """A copy of etc/connectd.toml elsewhere points only into the copy, not the checkout."""
    (tmp_path / "etc").mkdir()
    shutil.copy(CHECKOUT_CONFIG, tmp_path / "etc" / "connectd.toml")
    st = settings_mod.load(tmp_path / "etc" / "connectd.toml", environ={})
    assert st.paths.spool == tmp_path.resolve() / "spool"
    assert st.paths.secrets == tmp_path.resolve() / "etc" / "secrets.toml"
    assert st.database.customer_url == f"sqlite:///{tmp_path.resolve()}/spool/customer.db"
    for key, value in _paths_and_urls(st):
        path = value if isinstance(value, Path) else _sqlite_file(str(value))
        assert path.is_relative_to(tmp_path.resolve()), key


def test_relative_paths_do_not_depend_on_the_working_directory(write, tmp_path, monkeypatch) -> None:
    """The same file gives the same paths whatever the current directory is."""
    cfg = write('[paths]\nspool = "../spool"\n')
    monkeypatch.chdir("/")
    first = settings_mod.load(cfg, environ={})
    monkeypatch.chdir(tmp_path / "etc")
    assert settings_mod.load(cfg, environ={}) == first
    assert first.paths.spool == tmp_path.resolve() / "spool"


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///db/c.db", "sqlite:///{etc}/db/c.db"),
    ("sqlite:///c.db?timeout=5", "sqlite:///{etc}/c.db?timeout=5"),
    ("sqlite+pysqlite:///c.db", "sqlite+pysqlite:///{etc}/c.db"),
    ("sqlite:////abs/c.db", "sqlite:////abs/c.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("postgresql+psycopg://u@db.example/connectd", "postgresql+psycopg://u@db.example/connectd"),
])
def test_database_urls_resolve_relative_sqlite_files_only(write, tmp_path, url, expected) -> None:
    """Relative SQLite files resolve against the settings file; other URLs stay as written."""
    st = settings_mod.load(write(f'[database]\ncustomer_url = "{url}"\n'), environ={})
    assert st.database.customer_url == expected.format(etc=tmp_path.resolve() / "etc")


def test_settings_are_frozen(write) -> None:
    """Neither a section nor a value can be reassigned after loading."""
    st = settings_mod.load(write(""), environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.web.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.web = settings_mod.WebSettings()  # type: ignore[misc]
    assert isinstance(st.relay.hosts, tuple)


def test_empty_file_gives_the_declared_defaults(write) -> None:
    """An empty file is valid: every field takes its declared default."""
    st = settings_mod.load(write(""), environ={})
    assert st.web.port == settings_mod.WebSettings().port
    assert st.daemon == settings_mod.DaemonSettings()
    assert all(doc for _, _, doc in settings_mod.describe(st)), "a setting has no one-line doc"


def test_described_values_are_a_settings_file_that_loads_back(write, tmp_path) -> None:
    """describe() + to_toml_value() render TOML that loads to the same settings."""
    st = settings_mod.load(write('[relay]\nhosts = ["a:25", "b \\"q\\":26"]\n'), environ={})
    lines, section = [], None
    for key, value, _ in settings_mod.describe(st):
        sec, name = key.split(".", 1)
        if sec != section:
            lines.append(f"[{sec}]")
            section = sec
        lines.append(f"{name} = {settings_mod.to_toml_value(value)}")
    again = tmp_path / "again.toml"
    again.write_text("\n".join(lines), encoding="utf-8")
    assert settings_mod.load(again, environ={}) == st


# --- environment overrides ----------------------------------------------------------------


@pytest.mark.parametrize(("var", "text", "section", "key", "expected"), [
    ("CONNECTD_WEB_PORT", "9000", "web", "port", 9000),
    ("CONNECTD_DAEMON_IDLE_SLEEP", "0.25", "daemon", "idle_sleep", 0.25),
    ("CONNECTD_DAEMON_IDLE_SLEEP", "2", "daemon", "idle_sleep", 2.0),
    ("CONNECTD_DATABASE_ECHO", "true", "database", "echo", True),
    ("CONNECTD_SINK_ENABLED", "no", "sink", "enabled", False),
    ("CONNECTD_RELAY_HOSTS", "mx1:25,mx2:2525", "relay", "hosts", ("mx1:25", "mx2:2525")),
    ("CONNECTD_RELAY_HOSTS", '["mx1:25"]', "relay", "hosts", ("mx1:25",)),
    ("CONNECTD_PATHS_SPOOL", "/var/spool/connectd", "paths", "spool", Path("/var/spool/connectd")),
    ("CONNECTD_WEB_HOST", "0.0.0.0", "web", "host", "0.0.0.0"),
    ("CONNECTD_RECEIVER_DOMAIN", "true", "receiver", "domain", "true"),
    ("CONNECTD_LOG_FORMAT", "json", "log", "format", "json"),
    ("CONNECTD_SPOOL_DURABILITY", "always", "spool", "durability", "always"),
])
def test_environment_overrides_file(write, var, text, section, key, expected) -> None:
    """CONNECTD_<SECTION>_<KEY> wins over the file, typed as the setting is typed."""
    cfg = write('[web]\nport = 8470\n[relay]\nhosts = ["file:25"]\n[log]\nformat = "console"\n')
    st = settings_mod.load(cfg, environ={var: text})
    value = getattr(getattr(st, section), key)
    assert value == expected
    assert type(value) is type(expected) or isinstance(value, Path)


def test_relative_path_from_environment_resolves_against_the_file(write, tmp_path) -> None:
    """A relative path in the environment means the same as in the file: next to etc/."""
    st = settings_mod.load(write(""), environ={"CONNECTD_PATHS_SPOOL": "../elsewhere"})
    assert st.paths.spool == tmp_path.resolve() / "elsewhere"


def test_unrelated_environment_variables_are_ignored(write) -> None:
    """CONNECTD_CONFIG and variables of no known section are not settings."""
    env = {"CONNECTD_CONFIG": "/nowhere.toml", "CONNECTD_TEST_PG_URL": "postgresql://x",
           "CONNECTD_WEBX_PORT": "1"}
    assert settings_mod.load(write(""), environ=env) == settings_mod.load(write(""), environ={})


@pytest.mark.parametrize(("env", "names"), [
    ({"CONNECTD_WEB_PORT": "eighty"}, ["CONNECTD_WEB_PORT", "web.port", "integer"]),
    ({"CONNECTD_WEB_PORT": "70000"}, ["CONNECTD_WEB_PORT", "web.port", "TCP port"]),
    ({"CONNECTD_DAEMON_IDLE_SLEEP": "-1"}, ["CONNECTD_DAEMON_IDLE_SLEEP", "negative"]),
    ({"CONNECTD_SINK_ENABLED": "maybe"}, ["CONNECTD_SINK_ENABLED", "sink.enabled"]),
    ({"CONNECTD_LOG_LEVEL": "loud"}, ["CONNECTD_LOG_LEVEL", "log.level", "'loud'"]),
    ({"CONNECTD_WEB_PROT": "9000"}, ["CONNECTD_WEB_PROT", "web.prot"]),
])
def test_bad_environment_value_names_the_variable(write, env, names) -> None:
    """A bad or unknown CONNECTD_<SECTION>_<KEY> is a SettingsError naming the variable."""
    with pytest.raises(SettingsError) as err:
        settings_mod.load(write(""), environ=env)
    for name in names:
        assert name in str(err.value)


def test_default_config_path_follows_connectd_config(monkeypatch, write) -> None:
    """CONNECTD_CONFIG selects the file when no path is given."""
    cfg = write("[web]\nport = 9123\n")
    monkeypatch.setenv("CONNECTD_CONFIG", str(cfg))
    assert settings_mod.default_config_path() == cfg
    assert settings_mod.load(environ={}).web.port == 9123


def test_default_config_path_from_a_checkout_is_etc(monkeypatch) -> None:
    """Without CONNECTD_CONFIG, a checkout uses its own etc/connectd.toml."""
    monkeypatch.delenv("CONNECTD_CONFIG", raising=False)
    assert settings_mod.default_config_path() == CHECKOUT_CONFIG


# --- bad files ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "names"), [
    ("[webb]\nport = 1\n", ["[webb]", "unknown section"]),
    ("web = 3\n", ["[web]", "table"]),
    ("[web]\nprot = 8470\n", ["web.prot", "unknown key"]),
    ('[web]\nport = "8470"\n', ["web.port", "integer"]),
    ("[web]\nport = 84.7\n", ["web.port", "integer"]),
    ("[web]\nport = true\n", ["web.port", "integer"]),
    ("[web]\nport = 65536\n", ["web.port", "65536", "TCP port"]),
    ("[tracker]\nport = -1\n", ["tracker.port", "TCP port"]),
    ("[daemon]\nidle_sleep = -0.5\n", ["daemon.idle_sleep", "negative"]),
    ("[daemon]\nidle_sleep = nan\n", ["daemon.idle_sleep", "finite"]),
    ("[daemon]\nwatchdog_interval = inf\n", ["daemon.watchdog_interval", "finite"]),
    ("[spool]\ngroup_commit_ms = -5\n", ["spool.group_commit_ms", "negative"]),
    ("[spool]\nsegment_max_bytes = 10\n", ["spool.segment_max_bytes", "too small"]),
    ("[profiler]\nbatch_size = 0\n", ["profiler.batch_size"]),
    ('[spool]\ndurability = "sometimes"\n', ["spool.durability", "'sometimes'", "'group'"]),
    ('[log]\nlevel = "INFO"\n', ["log.level", "'INFO'"]),
    ("[database]\necho = 1\n", ["database.echo", "true or false"]),
    ('[database]\ncustomer_url = "customer.db"\n', ["database.customer_url", "URL"]),
    ('[paths]\nspool = ""\n', ["paths.spool", "path"]),
    ('[relay]\nhosts = "a:25"\n', ["relay.hosts", "list"]),
    ("[relay]\nhosts = [25]\n", ["relay.hosts", "string"]),
])
def test_bad_value_in_file_names_the_key(write, text, names) -> None:
    """Unknown sections and keys, wrong types and out-of-range values name what is wrong."""
    cfg = write(text)
    with pytest.raises(SettingsError) as err:
        settings_mod.load(cfg, environ={})
    for name in names:
        assert name in str(err.value)
    assert str(cfg) in str(err.value)


@pytest.mark.parametrize(("text", "problem"), [
    ("[web\nport = 1\n", "not valid TOML"),
    ('[web]\nhost = "unterminated\n', "not valid TOML"),
    (b'[web]\nhost = "caf\xe9"\n', "not UTF-8"),
])
def test_unreadable_file_is_a_settings_error(write, text, problem) -> None:
    """Invalid TOML and non-UTF-8 bytes are SettingsErrors naming the file, not tracebacks."""
    cfg = write(text)
    with pytest.raises(SettingsError) as err:
        settings_mod.load(cfg, environ={})
    assert problem in str(err.value)
    assert str(cfg) in str(err.value)


def test_missing_file_is_a_settings_error(tmp_path: Path) -> None:
    """A settings file that does not exist is named, with how to choose another."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match="not found") as err:
        settings_mod.load(missing, environ={})
    assert str(missing) in str(err.value)


def test_directory_instead_of_file_is_a_settings_error(tmp_path: Path) -> None:
    """A directory given as the settings file is reported, not a traceback."""
    with pytest.raises(SettingsError, match="cannot read"):
        settings_mod.load(tmp_path, environ={})


def test_checkout_config_is_valid_toml_with_only_known_keys() -> None:
    """Every section and key written in etc/connectd.toml is a declared setting."""
    raw = tomllib.loads(CHECKOUT_CONFIG.read_text(encoding="utf-8"))
    declared = {key for key, _, _ in settings_mod.describe(settings_mod.Settings())}
    for section, table in raw.items():
        for key in table:
            assert f"{section}.{key}" in declared


@pytest.mark.parametrize("section,key,value", [
    ("relay", "connections", "0"), ("composer", "window", "0"), ("composer", "processes", "0"),
    ("manager", "batch_min", "0"), ("manager", "retry_attempts", "0"),
    ("manager", "batch_max", "10"),
])
def test_outbound_settings_ranges(tmp_path: Path, section: str, key: str, value: str) -> None:
    """Counts that must be at least 1 (and batch_max >= batch_min) are refused naming the key."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(SettingsError) as err:
        settings_mod.load(cfg, environ={})
    assert err.value.key == f"{section}.{key}"


def test_relay_needs_a_host(tmp_path: Path) -> None:
    """An empty relay list is refused: the composers would have nowhere to send."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[relay]\nhosts = []\n")
    with pytest.raises(SettingsError, match="relay.hosts"):
        settings_mod.load(cfg, environ={})
