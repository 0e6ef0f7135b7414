"""`connectd dkim keygen DOMAIN [--ed25519]`: make a DKIM key for a sender domain.

Inputs: the settings (composer.dkim_dir, composer.dkim_selector), a domain.
Outputs: <dkim_dir>/<domain>.rsa.pem (RSA-2048) or <domain>.ed25519.pem, mode 0600 from its
first byte, never replacing an existing key (a replaced key breaks every signature in
flight until DNS catches up); the DNS TXT record to publish, on stdout. The composer picks
the file up for mail whose From is at that domain.
"""

from __future__ import annotations

import re
import sys

import click

from connectd.core.dkim import generate_key
from connectd.spool import create_file_once

_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+\Z")


@click.group("dkim")
def dkim_group() -> None:
    """DKIM keys of the sender domains."""


@dkim_group.command("keygen")
@click.argument("domain")
@click.option("--ed25519", "ed", is_flag=True,
              help="An Ed25519 key (RFC 8463) instead of RSA-2048; publish both for both.")
def keygen_command(domain: str, ed: bool) -> None:
    """Write a new key for DOMAIN into composer.dkim_dir and print its DNS TXT record."""
    domain = domain.strip().lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise click.BadParameter(f"{domain!r} is not a domain name", param_hint="DOMAIN")
    st = click.get_current_context().obj.settings
    kind = "ed25519" if ed else "rsa"
    selector = f"{st.composer.dkim_selector}-ed" if ed else st.composer.dkim_selector
    path = st.composer.dkim_dir / f"{domain}.{kind}.pem"
    pem, record = generate_key(kind)
    st.composer.dkim_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not create_file_once(path, pem, 0o600):
        click.echo(f"connectd dkim keygen: {path} exists; remove it first to replace the key",
                   err=True)
        sys.exit(1)
    click.echo(f"wrote {path}", err=True)
    # one TXT string holds at most 255 bytes (RFC 1035); an RSA-2048 record needs two
    strings = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
    click.echo(f"{selector}._domainkey.{domain}. IN TXT {strings}")
