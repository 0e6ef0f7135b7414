"""The secrets file (settings.paths.secrets): signing keys made once by `connectd init`.

Inputs: a path. Outputs: `create_secrets` writes a new TOML file with fresh random keys, mode
0600, never replacing an existing one; `load_secrets` reads it into a frozen `Secrets`.

Key lists are newest first: sign with the first, accept any, so a key can be rotated by
prepending a new one and dropping the oldest once nothing signed with it is still in flight.
"""

from __future__ import annotations

import os
import secrets as random
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from connectd.spool import create_file_once


class SecretsError(Exception):
    """The secrets file is missing or unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class Secrets:
    token_keys: tuple[str, ...]  # HMAC keys of tracker link/open/unsubscribe tokens, newest first
    session_keys: tuple[str, ...]  # HMAC keys of web session cookies and CSRF tokens, newest first
    verp_keys: tuple[str, ...]  # HMAC keys that sign VERP return paths (bounces we can trust)


def new_key() -> str:
    """A fresh random 32-byte key, URL-safe base64."""
    return random.token_urlsafe(32)


def render_new() -> str:
    """The text of a new secrets file with fresh keys."""
    return (
        "# connectd secrets, made by `connectd init`. Keep this file mode 0600.\n"
        "# Lists are newest first: to rotate, prepend a new key; drop old ones later.\n"
        f'token_keys = ["{new_key()}"]\n'
        f'session_keys = ["{new_key()}"]\n'
        f'verp_keys = ["{new_key()}"]\n'
    )


def create_secrets(path: Path) -> bool:
    """Write a new secrets file at `path` (mode 0600 from its first byte, so the keys are
    never readable by others) unless one exists; True if written. A concurrent init's file is
    never overwritten."""
    return create_file_once(Path(path), render_new().encode("utf-8"), 0o600)


def loose_mode(path: Path) -> int | None:
    """The file's permission bits when group or others may access it, else None."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    return mode if mode & 0o077 else None


def _keys(path: Path, raw: dict, name: str) -> tuple[str, ...]:
    value = raw.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(k, str) and k for k in value):
        raise SecretsError(f"{path}: {name} must be a non-empty list of strings")
    return tuple(value)


def load_secrets(path: Path) -> Secrets:
    """Read and check the secrets file at `path`."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SecretsError(f"{path}: secrets file not found (run `connectd init`)") from None
    except tomllib.TOMLDecodeError as exc:
        raise SecretsError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise SecretsError(f"{path}: cannot read: {exc.strerror}") from None
    return Secrets(token_keys=_keys(path, raw, "token_keys"),
                   session_keys=_keys(path, raw, "session_keys"),
                   verp_keys=_keys(path, raw, "verp_keys"))
