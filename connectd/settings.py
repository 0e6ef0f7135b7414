"""Typed settings: one TOML file (+ CONNECTD_<SECTION>_<KEY> environment overrides) -> frozen objects.

Each field is declared once below with its default and a one-line comment; that declaration is
the documentation (`connectd config show` prints the effective values with those comments).
Relative paths (and relative SQLite URLs) resolve against the directory of the settings file,
so a copied checkout or a test's temporary directory is self-contained.

Errors in the file (unknown section or key, a value of the wrong type or out of range) raise
`SettingsError`, which the CLI turns into exit status 78 (EX_CONFIG) so systemd does not loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

EX_CONFIG = 78
ENV_PREFIX = "CONNECTD_"


class SettingsError(Exception):
    """The settings file or environment holds something unusable; the message names the key.

    `key` is the dotted setting ("web.port") when one setting is at fault, else None."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def setting(default: Any, doc: str) -> Any:
    """Declare a settings field with its default and its one-line documentation."""
    return field(default=default, metadata={"doc": doc})


class DbUrl(str):
    """A SQLAlchemy database URL; relative sqlite paths resolve against the settings file."""


@dataclass(frozen=True)
class PathsSettings:
    spool: Path = setting(Path("../spool"), "event streams, inbound message store, sink mailbox")
    logs: Path = setting(Path("../logs"), "daemon diagnostics when not under systemd/journald")
    secrets: Path = setting(Path("secrets.toml"), "signing keys and passwords (mode 0600), made by init")
    content_root: Path = setting(Path("../spool/content"), "files served by the built-in content server")


@dataclass(frozen=True)
class DatabaseSettings:
    customer_url: DbUrl = setting(DbUrl("sqlite:///../spool/customer.db"), "customer DB (SQLAlchemy URL)")
    report_url: DbUrl = setting(DbUrl("sqlite:///../spool/report.db"), "report DB (SQLAlchemy URL)")
    echo: bool = setting(False, "log every SQL statement (debugging only)")


@dataclass(frozen=True)
class SpoolSettings:
    segment_max_bytes: int = setting(64 * 1024 * 1024, "roll a stream's segment once it reaches this size")
    segment_max_age: float = setting(3600.0, "roll a segment this many seconds after it was started")
    durability: Literal["always", "group", "none"] = setting(
        "group", "fsync after every record (always), every group_commit_ms (group), or never (none)"
    )
    group_commit_ms: int = setting(5, "with durability=group: the longest a written record waits for fsync")
    retention: float = setting(7 * 86400.0, "gc keeps consumed segments at least this many seconds")
    poll_interval: float = setting(1.0, "readers re-check streams this often even without inotify events")


@dataclass(frozen=True)
class ProfilerSettings:
    batch_size: int = setting(50000, "most records applied per database transaction")
    streams: tuple[str, ...] = setting((), "streams to follow; empty = every stream in the spool")
    parallel: bool = setting(True, "one worker process per database (customer, report): two cores")


@dataclass(frozen=True)
class DaemonSettings:
    idle_sleep: float = setting(1.0, "longest sleep of an idle daemon between checks for work")
    watchdog_interval: float = setting(10.0, "how often to ping systemd's watchdog (WATCHDOG=1) at most")
    restart_backoff_max: float = setting(30.0, "connectd up: longest wait before restarting a dead daemon")


@dataclass(frozen=True)
class WebSettings:
    host: str = setting("127.0.0.1", "Conversation Editor, reports, REST API and content server")
    port: int = setting(8470, "HTTP port of the web daemon")
    public_url: str = setting("http://127.0.0.1:8470", "how browsers and composers reach the web daemon")


@dataclass(frozen=True)
class TrackerSettings:
    host: str = setting("127.0.0.1", "tracking server listen address")
    port: int = setting(8471, "tracking server HTTP port")
    public_url: str = setting("http://127.0.0.1:8471", "base of click/open/unsubscribe URLs in mail")
    processes: int = setting(0, "tracker processes sharing the port (0: one per core)")
    ip_truncate: bool = setting(False, "store IPv4 /24 and IPv6 /48 prefixes instead of full client IPs")
    link_refresh: float = setting(10.0, "seconds between refreshes of the in-memory link table")
    cookie_days: int = setting(30, "lifetime of the click cookie conversions are attributed by")
    cookie_domain: str = setting("", "Domain attribute of the click cookie (empty: the tracker's host)")
    trusted_proxies: tuple[str, ...] = setting(
        (), "load balancers (addresses or CIDRs) whose X-Forwarded-For names the real client")


@dataclass(frozen=True)
class ReceiverSettings:
    host: str = setting("127.0.0.1", "mail receiver (reply domain MX) listen address")
    port: int = setting(8025, "mail receiver SMTP port")
    domain: str = setting("reply.localhost", "the reply domain: VERP bounces, unsubscribe mail and replies go here")
    domains: tuple[str, ...] = setting((), "further domains the receiver accepts mail for (aliases of the reply domain)")
    mailboxes: tuple[str, ...] = setting(
        ("reply", "subscribe", "unsubscribe", "postmaster", "abuse"),
        "local parts accepted besides the signed ones (b-<token>, unsubscribe-<token>, confirm-<token>)")
    max_size: int = setting(25 * 1024 * 1024, "largest message accepted (SIZE extension; 552 past it)")
    tls_cert: Path | None = setting(None, "PEM certificate for STARTTLS (none: STARTTLS not offered)")
    tls_key: Path | None = setting(None, "PEM private key of tls_cert")
    timeout: float = setting(300.0, "seconds an idle SMTP session is kept open")
    processes: int = setting(0, "SMTP worker processes sharing the port (0: one per core; 1: none, SMTP in the receiver itself)")


@dataclass(frozen=True)
class ProcessorSettings:
    handlers: Path = setting(Path("reply-handlers.toml"), "the ordered reply-handler chain (TOML)")
    customer_service: str = setting("service@localhost", "where unexpected replies are forwarded")
    from_address: str = setting("connectd@reply.localhost", "sender of forwards, auto replies and confirmations")
    archive_dir: Path | None = setting(None, "root of the archive maildirs (none: <spool>/archive)")
    pipe_timeout: float = setting(30.0, "seconds a pipe action's command may run before it is killed")
    soft_bounce_limit: int = setting(5, "soft bounces within soft_bounce_days that bounce a customer out")
    soft_bounce_days: float = setting(30.0, "window of soft_bounce_limit; a later open or click resets the count")


@dataclass(frozen=True)
class SinkSettings:
    host: str = setting("127.0.0.1", "local development mail farm (stores mail in a maildir)")
    port: int = setting(8026, "local sink SMTP port")
    enabled: bool = setting(True, "start the sink with `connectd up`")


@dataclass(frozen=True)
class RelaySettings:
    hosts: tuple[str, ...] = setting(("127.0.0.1:8026",), "mail farm SMTP relays as host:port")
    connections: int = setting(4, "SMTP connections per composer (spread over the relays)")
    starttls: Literal["opportunistic", "required", "off"] = setting(
        "opportunistic", "STARTTLS when the relay offers it, always (fail otherwise), or never")
    timeout: float = setting(30.0, "seconds to wait for any one SMTP reply before giving up")
    chunking: bool = setting(True, "use BDAT (RFC 3030 CHUNKING) when a relay offers it")
    depth: int = setting(8, "with BDAT: messages in flight per connection")


@dataclass(frozen=True)
class ManagerSettings:
    poll_interval: float = setting(1.0, "how often to look for ready/due instances and finished batches")
    batch_seconds: float = setting(5.0, "size batches to about this many seconds of a composer's measured rate")
    batch_min: int = setting(50, "smallest batch of mail objects")
    batch_max: int = setting(5000, "largest batch of mail objects")
    backlog: int = setting(2, "batches kept ready per live composer (more: smoother; fewer: quicker pause)")
    composer_timeout: float = setting(60.0, "a composer silent this long is treated as gone")
    quiet_hours: str = setting("", "no new batches in this daily window, e.g. \"22:00-07:00\" (empty: none)")
    timezone: str = setting("UTC", "time zone of quiet_hours and of cron expressions (IANA name)")
    retry_first: float = setting(1800.0, "seconds before the first retry of deferred mail")
    retry_longest: float = setting(86400.0, "retry waits double up to this many seconds")
    retry_attempts: int = setting(10, "hand-offs of one message in all before it is failed")


@dataclass(frozen=True)
class ComposerSettings:
    processes: int = setting(1, "composer processes `connectd up` starts on this host (--instance 1..N)")
    window: int = setting(50, "in-flight window: targets marked sending per commit (at most this many unknown after a kill)")
    lease: float = setting(60.0, "seconds a claimed batch stays claimed without renewal before another composer may take it")
    rate_global: float = setting(0.0, "messages per second for all composers together (0: unlimited)")
    rate_per_domain: float = setting(0.0, "default messages per second per recipient domain, all composers together (0: unlimited)")
    domain_rates: tuple[str, ...] = setting((), "per-domain exceptions as \"domain=rate\", e.g. [\"gmail.com=50\"]")
    from_address: str = setting("connectd@localhost", "From address when a campaign has none")
    content_timeout: float = setting(10.0, "seconds to fetch a message's content by URL")
    dkim_dir: Path = setting(Path("dkim"), "DKIM keys: <domain>.rsa.pem and/or <domain>.ed25519.pem")
    dkim_selector: str = setting("connectd", "DKIM selector (the rsa key); ed25519 uses <selector>-ed")
    dkim_body: Literal["simple", "relaxed"] = setting("simple", "DKIM body canonicalisation: simple (c=relaxed/simple, as dkimpy and Amazon SES sign; no white-space pass over each body) or relaxed")


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = setting("info", "diagnostic log level")
    format: Literal["auto", "json", "console"] = setting("auto", "auto = readable on a terminal, JSON otherwise")


@dataclass(frozen=True)
class Settings:
    paths: PathsSettings = field(default_factory=PathsSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    profiler: ProfilerSettings = field(default_factory=ProfilerSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    web: WebSettings = field(default_factory=WebSettings)
    tracker: TrackerSettings = field(default_factory=TrackerSettings)
    receiver: ReceiverSettings = field(default_factory=ReceiverSettings)
    processor: ProcessorSettings = field(default_factory=ProcessorSettings)
    sink: SinkSettings = field(default_factory=SinkSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    manager: ManagerSettings = field(default_factory=ManagerSettings)
    composer: ComposerSettings = field(default_factory=ComposerSettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: Path | None = field(default=None, compare=False)  # the file these came from


SECTIONS: dict[str, type] = {
    name: hint for name, hint in typing.get_type_hints(Settings).items() if name != "source"
}


def default_config_path() -> Path:
    """The checkout's etc/connectd.toml when running from a checkout, else /etc/connectd/."""
    env = os.environ.get("CONNECTD_CONFIG")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / "etc" / "connectd.toml"
    if checkout.exists():
        return checkout
    return Path("/etc/connectd/connectd.toml")


def load(path: Path | str | None = None, environ: typing.Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file at `path` (default: see default_config_path), apply environment
    overrides, validate every value, and return frozen Settings."""
    path = Path(path) if path is not None else default_config_path()
    environ = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{path}: settings file not found (set --config or CONNECTD_CONFIG)") from None
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 by definition; a latin-1 file must not end in a traceback
        raise SettingsError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    base = path.resolve().parent
    sections: dict[str, Any] = {}
    for name, raw_section in raw.items():
        if name not in SECTIONS:
            raise SettingsError(f"{path}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
        if not isinstance(raw_section, dict):
            raise SettingsError(f"{path}: [{name}] must be a table")
    for name, cls in SECTIONS.items():
        values = dict(raw.get(name, {}))
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in hints:
                raise SettingsError(f"{path}: unknown key {name}.{key} "
                                    f"(known: {', '.join(sorted(hints))})", key=f"{name}.{key}")
        from_env: dict[str, str] = {}  # dotted key -> the variable that set it
        prefix = f"{ENV_PREFIX}{name.upper()}_"
        for env_key, env_value in environ.items():
            if env_key.startswith(prefix):
                key = env_key[len(prefix):].lower()
                if key not in hints:
                    raise SettingsError(f"environment: {env_key} names no setting {name}.{key} "
                                        f"(known: {', '.join(sorted(hints))})", key=f"{name}.{key}")
                values[key] = _from_env(env_value, hints[key])
                from_env[f"{name}.{key}"] = f"{env_key}={env_value!r}"
        try:
            sections[name] = _build(cls, name, values, base)
        except SettingsError as exc:
            origin = from_env.get(exc.key or "", str(path))
            raise SettingsError(f"{origin}: {exc}", key=exc.key) from None
    return Settings(**sections, source=path.resolve())


def _from_env(text: str, hint: Any) -> Any:
    """Environment values are TOML values when they parse as one (numbers, booleans, arrays),
    else plain strings, so `CONNECTD_WEB_PORT=9000` and `CONNECTD_WEB_HOST=0.0.0.0` both work.
    A text setting (string, path, URL, choice) takes the text as it is, so a domain `true`
    or a directory `2024` is not turned into a boolean or a number first; a list setting also
    takes comma-separated text (`CONNECTD_RELAY_HOSTS=mx1:25,mx2:25`)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if typing.get_origin(hint) is tuple and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if _is_text(hint) and not isinstance(value, str):
        return text
    return value


def _is_text(hint: Any) -> bool:
    if typing.get_origin(hint) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(hint))
    return hint in (str, Path, DbUrl)


def _build(cls: type, section: str, values: dict[str, Any], base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce(f"{section}.{f.name}", hints[f.name], values[f.name])
        else:
            kwargs[f.name] = f.default
        kwargs[f.name] = _resolve(kwargs[f.name], base)
    obj = cls(**kwargs)
    _check_ranges(section, obj)
    return obj


def _coerce(key: str, hint: Any, value: Any) -> Any:
    try:
        return _coerce_value(key, hint, value)
    except SettingsError as exc:
        exc.key = key
        raise


def _coerce_value(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise SettingsError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            raise SettingsError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce_value(key, item, v) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise SettingsError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            # nan/inf pass every range check and then break sleeps and timers at run time
            raise SettingsError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise SettingsError(f"{key}: expected a path string, got {value!r}")
        return Path(value)
    if hint is DbUrl:
        if not isinstance(value, str) or "://" not in value:
            raise SettingsError(f"{key}: expected a database URL such as sqlite:///path or "
                                f"postgresql+psycopg://user@host/db, got {value!r}")
        return DbUrl(value)
    if hint is str:
        if not isinstance(value, str):
            raise SettingsError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(hint, types.UnionType) and set(typing.get_args(hint)) == {Path, type(None)}:
        # optional paths: "" (what `config show` prints for unset) = None
        return None if value == "" else _coerce_value(key, Path, value)
    raise SettingsError(f"{key}: unsupported setting type {hint!r}")  # pragma: no cover


_SQLITE_URL = re.compile(r"sqlite(\+\w+)?:///")  # sqlite:/// and sqlite+pysqlite:///


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else (base / value).resolve()
    match = _SQLITE_URL.match(value) if isinstance(value, DbUrl) else None
    if match:
        db_path, _, query = value[match.end():].partition("?")
        if db_path and db_path != ":memory:" and not db_path.startswith("/"):
            resolved = (base / db_path).resolve()
            return DbUrl(f"{match.group(0)}{resolved}" + (f"?{query}" if query else ""))
    return value


def _check_ranges(section: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{section}.{f.name}"
        if f.name == "port" and not (0 <= value <= 65535):
            raise SettingsError(f"{key}: {value} is not a TCP port (0-65535)", key=key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name != "port" and value < 0:
            raise SettingsError(f"{key}: must not be negative, got {value}", key=key)
    if section == "spool" and obj.segment_max_bytes < 1024:
        raise SettingsError(f"spool.segment_max_bytes: {obj.segment_max_bytes} is too small "
                            "(at least 1024)", key="spool.segment_max_bytes")
    if section == "profiler" and obj.batch_size < 1:
        raise SettingsError("profiler.batch_size: must be at least 1", key="profiler.batch_size")
    at_least_one = {"relay": ("connections", "depth"), "composer": ("window", "processes"),
                    "manager": ("batch_min", "retry_attempts"),
                    "receiver": ("max_size",), "processor": ("soft_bounce_limit",)}
    for name in at_least_one.get(section, ()):
        if getattr(obj, name) < 1:
            raise SettingsError(f"{section}.{name}: must be at least 1", key=f"{section}.{name}")
    if section == "manager" and obj.batch_max < obj.batch_min:
        raise SettingsError("manager.batch_max: must be at least manager.batch_min",
                            key="manager.batch_max")
    if section == "tracker":
        import ipaddress
        for entry in obj.trusted_proxies:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise SettingsError(f"tracker.trusted_proxies: {entry!r} is not an IP address "
                                    "or CIDR", key="tracker.trusted_proxies") from None
    if section == "receiver" and (obj.tls_cert is None) != (obj.tls_key is None):
        raise SettingsError("receiver.tls_cert and receiver.tls_key: set both (STARTTLS) or "
                            "neither", key="receiver.tls_cert")
    if section == "relay" and not obj.hosts:
        raise SettingsError("relay.hosts: name at least one relay as host:port", key="relay.hosts")


def describe(settings: Settings) -> list[tuple[str, Any, str]]:
    """(key, effective value, doc) for every setting, in declaration order: `config show`."""
    rows = []
    for name in SECTIONS:
        section = getattr(settings, name)
        for f in dataclasses.fields(section):
            rows.append((f"{name}.{f.name}", getattr(section, f.name), f.metadata.get("doc", "")))
    return rows


def to_toml_value(value: Any) -> str:
    """Render a setting value as TOML (for `config show`)."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(to_toml_value(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
