"""A real SMTP server on loopback that counts what it is given (the mail farm of the tests).

CountingRelay(rules) runs aiosmtpd in a thread. Every accepted message is kept as a Delivery
(recipient, envelope sender, Message-ID, the raw bytes unless keep_bytes=False). `rules` maps a
recipient domain to a function (attempt number for that recipient, from 1) -> an SMTP reply
string, or None to accept; it is how a test makes one domain defer (4xx) or refuse (5xx).
Refused and deferred attempts are counted too, per recipient.
"""

from __future__ import annotations

import collections
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from aiosmtpd.controller import Controller

Rule = Callable[[int], str | None]
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>]+)>", re.I | re.M)


@dataclass(frozen=True)
class Delivery:
    rcpt: str
    mail_from: str
    message_id: str
    data: bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler:
    def __init__(self, relay: CountingRelay) -> None:
        self.relay = relay

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001, ANN201
        domain = address.rpartition("@")[2].lower()
        rule = self.relay.rules.get(domain)
        with self.relay.lock:
            self.relay.attempts[address.lower()] += 1
            n = self.relay.attempts[address.lower()]
        reply = rule(n) if rule else None
        if reply:
            with self.relay.lock:
                self.relay.refused.append((address.lower(), reply))
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        data = envelope.content if isinstance(envelope.content, bytes) else envelope.content.encode()
        m = _MESSAGE_ID.search(data)
        mid = m.group(1).decode() if m else ""
        with self.relay.lock:
            for rcpt in envelope.rcpt_tos:
                self.relay.deliveries.append(Delivery(
                    rcpt.lower(), envelope.mail_from, mid,
                    data if self.relay.keep_bytes else b""))
            n = len(self.relay.deliveries)
        return f"250 2.0.0 Ok: queued as Q{n:08d}"


class CountingRelay:
    def __init__(self, rules: dict[str, Rule] | None = None, keep_bytes: bool = False) -> None:
        self.rules = rules or {}
        self.keep_bytes = keep_bytes
        self.lock = threading.Lock()
        self.deliveries: list[Delivery] = []
        self.refused: list[tuple[str, str]] = []
        self.attempts: collections.Counter[str] = collections.Counter()
        self.port = free_port()
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port,
                                      data_size_limit=10 * 1024 * 1024)

    def __enter__(self) -> CountingRelay:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    def per_recipient(self) -> collections.Counter[str]:
        with self.lock:
            return collections.Counter(d.rcpt for d in self.deliveries)
