"""A tiny authoritative DNS server for tests: zone data (a dict) -> answers on 127.0.0.1.

    records = {"example.com": [("TXT", "v=spf1 ip4:192.0.2.1 -all"), ("MX", "10 mx.example.com.")]}
    with DnsServer(records) as server:
        resolver = server.resolver(lifetime=1.0)

Names are absolute or relative to the root; a name that is a key of the dict but has no record
of the asked type answers NOERROR with no data; any other name answers NXDOMAIN. TXT text that
is not already quoted is quoted for you (and split into 255-byte strings, as DNS requires), so
long DKIM keys can be given as one plain string. UDP and TCP on the same port; an answer too big
for UDP is sent truncated (TC) so the resolver retries over TCP, as a real server would.
`silent=True` (also settable while running) receives queries and never answers, for timeouts.
Built on dnspython's message APIs only; one thread per transport, stopped by `stop()`.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Iterable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

Records = Mapping[str, Iterable[tuple[str, str]]]

_TTL = 60
_UDP_MAX = 512  # no EDNS negotiation here: the classic limit, so big answers exercise TCP


def _quote_txt(text: str) -> str:
    """Presentation form of a TXT value: already-quoted text passes, plain text is chunked."""
    if text.lstrip().startswith('"'):
        return text
    raw = text.encode()
    chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'
                    for c in chunks)


def build_zone(records: Records) -> dict[dns.name.Name, list[dns.rrset.RRset]]:
    """Parse the test's {name: [(type, text)]} into rrsets keyed by absolute name."""
    zone: dict[dns.name.Name, list[dns.rrset.RRset]] = {}
    for name_text, entries in records.items():
        name = dns.name.from_text(name_text)
        by_type: dict[int, dns.rrset.RRset] = {}
        for type_text, value in entries:
            rdtype = dns.rdatatype.from_text(type_text)
            if rdtype == dns.rdatatype.TXT:
                value = _quote_txt(value)
            rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, value, origin=dns.name.root)
            rrset = by_type.setdefault(rdtype, dns.rrset.RRset(name, dns.rdataclass.IN, rdtype))
            rrset.add(rdata, _TTL)
        zone[name] = list(by_type.values())
    return zone


class DnsServer:
    """Serve `records` on 127.0.0.1:<port> (UDP + TCP) from background threads until stop()."""

    def __init__(self, records: Records, *, silent: bool = False) -> None:
        self.zone = build_zone(records)
        self.silent = silent
        self.queries: list[tuple[str, str]] = []  # (name, type) seen, for tests that count
        self._udp, self._tcp = self._bind_pair()
        self.port: int = self._udp.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]

    @staticmethod
    def _bind_pair() -> tuple[socket.socket, socket.socket]:
        """A UDP and a TCP socket on the same free port (retried: the TCP port may be taken)."""
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            return udp, tcp
        raise RuntimeError("no free port for UDP and TCP together")

    def start(self) -> DnsServer:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._udp.close()
        self._tcp.close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def resolver(self, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """A resolver that asks only this server."""
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = ["127.0.0.1"]
        res.port = self.port
        res.lifetime = lifetime
        res.timeout = min(lifetime, 1.0)
        return res

    # -- answering ---------------------------------------------------------------------------

    def answer(self, wire: bytes) -> dns.message.Message | None:
        """The response to one query in wire form (None for garbage, which is dropped)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        self.queries.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
        rrsets = self.zone.get(question.name)
        if rrsets is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        response.answer.extend(r for r in rrsets if r.rdtype == question.rdtype)
        return response

    def _serve_udp(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ)
        while not self._stop.is_set():
            if not sel.select(timeout=0.05):
                continue
            try:
                wire, peer = self._udp.recvfrom(65535)
            except OSError:
                continue
            response = None if self.silent else self.answer(wire)
            if response is None:
                continue
            try:
                out = response.to_wire(max_size=_UDP_MAX)
            except dns.exception.TooBig:
                # Too big for a datagram: truncated and empty, so the client retries over TCP.
                response.answer.clear()
                response.flags |= dns.flags.TC
                out = response.to_wire()
            self._udp.sendto(out, peer)
        sel.close()

    def _serve_tcp(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._tcp, selectors.EVENT_READ)
        while not self._stop.is_set():
            if not sel.select(timeout=0.05):
                continue
            try:
                conn, _ = self._tcp.accept()
            except OSError:
                continue
            with conn:
                self._serve_tcp_conn(conn)
        sel.close()

    def _serve_tcp_conn(self, conn: socket.socket) -> None:
        """One query per connection is all a stub resolver sends; length-prefixed both ways."""
        conn.settimeout(2)
        with contextlib.suppress(OSError):
            size = struct.unpack("!H", _recv_exact(conn, 2))[0]
            wire = _recv_exact(conn, size)
            response = None if self.silent else self.answer(wire)
            if response is None:
                return
            out = response.to_wire()
            conn.sendall(struct.pack("!H", len(out)) + out)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf
