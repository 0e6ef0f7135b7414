"""The SMTP hand-off against real aiosmtpd servers on 127.0.0.1: replies, pipelining,
STARTTLS with a self-signed certificate, connection reuse, drops before and after DATA."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connectd.relay import RelayPool, Reply, dot_stuff

MSG = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\n.dot line\r\nbody\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Farm:
    """aiosmtpd handler: answers by recipient local part, counts sessions and messages.

    defer@ -> 451 at RCPT, reject@ -> 550 at RCPT, late@ -> 452 after DATA, hang@ -> no reply
    after DATA, dropdata@ -> connection closed after DATA, droprcpt@ -> closed at RCPT."""

    def __init__(self, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.sessions = 0
        self.messages: list[tuple[str, list[str], bytes, bool]] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.sessions += 1
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local == "defer":
            return "451 4.7.1 try later"
        if local == "reject":
            return "550 5.1.1 no such user"
        if local == "droprcpt":
            server.transport.close()
            return "250 OK"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        local = envelope.rcpt_tos[0].split("@")[0]
        if local == "hang":
            await asyncio.sleep(5)
        if local == "dropdata":
            server.transport.close()
            return "250 OK"
        if local == "late":
            return "452 4.3.1 insufficient storage"
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                              session.ssl is not None))
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}X"


@pytest.fixture
def farm() -> Iterator[tuple[Farm, int]]:
    handler = Farm()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    yield handler, port
    ctl.stop()


def _send_all(pool: RelayPool, rcpts: list[str], data: bytes = MSG) -> list[Reply]:
    async def go() -> list[Reply]:
        try:
            return list(await asyncio.gather(*(pool.send("b-x@r.example", r, data)
                                               for r in rcpts)))
        finally:
            await pool.close()
    return asyncio.run(go())


def test_sent_with_queue_id_and_dot_stuffing(farm):
    """A 250 reply is "sent", with the queue id parsed; a leading dot arrives intact."""
    handler, port = farm
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{port}"], 1), ["ok@example.com"])
    assert (reply.outcome, reply.code, reply.queue_id) == ("sent", 250, "Q1X")
    assert reply.relay == f"127.0.0.1:{port}" and reply.line.startswith("250 2.0.0 Ok")
    assert handler.messages[0][0] == "b-x@r.example"
    assert b"\r\n.dot line\r\n" in handler.messages[0][2]


@pytest.mark.parametrize("rcpt,outcome,code", [
    ("defer@example.com", "deferred", 451),
    ("reject@example.com", "failed", 550),
    ("late@example.com", "deferred", 452),
])
def test_refusals_map_to_outcomes(farm, rcpt, outcome, code):
    """4xx -> deferred, 5xx -> failed, whether at RCPT or after the data."""
    _, port = farm
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{port}"], 1), [rcpt])
    assert (reply.outcome, reply.code) == (outcome, code)


def test_refusal_leaves_the_session_usable(farm):
    """After a refused recipient the session is reset and carries the next message."""
    handler, port = farm
    replies = _send_all(RelayPool([f"127.0.0.1:{port}"], 1),
                        ["reject@example.com", "a@example.com", "defer@example.com",
                         "b@example.com"])
    assert [r.outcome for r in replies] == ["failed", "sent", "deferred", "sent"]
    assert handler.sessions == 1 and len(handler.messages) == 2


@pytest.mark.parametrize("pipelining", [True, False])
def test_connections_are_reused(pipelining):
    """Twenty messages over two connections open exactly two sessions, with or without
    PIPELINING offered."""
    handler = Farm(pipelining=pipelining)
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        replies = _send_all(RelayPool([f"127.0.0.1:{port}"], 2),
                            [f"r{i}@example.com" for i in range(20)])
    finally:
        ctl.stop()
    assert all(r.outcome == "sent" for r in replies)
    assert handler.sessions == 2 and len(handler.messages) == 20


def test_pipelining_sends_mail_rcpt_data_in_one_write():
    """With PIPELINING offered, MAIL, RCPT and DATA arrive in one packet (one write)."""
    chunks: list[bytes] = []

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-x\r\n250 PIPELINING\r\n")
        data = await reader.read(4096)
        chunks.append(data)
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        while not (await reader.readline()).startswith(b".\r\n"):
            pass
        writer.write(b"250 queued as PIPE1\r\n")
        await reader.readline()  # QUIT
        writer.write(b"221 bye\r\n")
        writer.close()

    async def go() -> Reply:
        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        pool = RelayPool([f"127.0.0.1:{port}"], 1, starttls="off")
        reply = await pool.send("s@x.example", "r@y.example", MSG)
        await pool.close()
        srv.close()
        return reply

    reply = asyncio.run(go())
    assert reply.outcome == "sent" and reply.queue_id == "PIPE1"
    assert chunks[0] == b"MAIL FROM:<s@x.example>\r\nRCPT TO:<r@y.example>\r\nDATA\r\n"


def test_connection_refused_is_deferred():
    """No relay listening: deferred, with the reason."""
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{free_port()}"], 1, timeout=2),
                         ["a@example.com"])
    assert reply.outcome == "deferred" and reply.code == 0 and "cannot open" in reply.text


def test_failover_to_the_next_relay(farm):
    """A dead relay in the list: the connection moves to the next one and the mail goes."""
    handler, port = farm
    pool = RelayPool([f"127.0.0.1:{free_port()}", f"127.0.0.1:{port}"], 1, timeout=2)
    (reply,) = _send_all(pool, ["a@example.com"])
    assert reply.outcome == "sent" and reply.relay == f"127.0.0.1:{port}"


def test_drop_before_data_is_deferred(farm):
    """The relay closes the connection at RCPT: nothing was sent, so deferred."""
    handler, port = farm
    replies = _send_all(RelayPool([f"127.0.0.1:{port}"], 1),
                        ["droprcpt@example.com", "after@example.com"])
    assert replies[0].outcome == "deferred" and "before the message data" in replies[0].text
    assert replies[1].outcome == "sent"  # a fresh session takes the next one


def test_drop_after_data_is_unknown(farm):
    """The relay closes the connection after the data, before its reply: unknown."""
    handler, port = farm
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{port}"], 1), ["dropdata@example.com"])
    assert reply.outcome == "unknown" and "after the message data" in reply.text


def test_timeout_after_data_is_unknown(farm):
    """No reply within relay.timeout after the data: unknown, never resent."""
    handler, port = farm
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{port}"], 1, timeout=0.5),
                         ["hang@example.com"])
    assert reply.outcome == "unknown" and "timed out" in reply.text


# --- STARTTLS ------------------------------------------------------------------------------

def _self_signed(tmp_path: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem", pem


@pytest.fixture
def tls_farm(tmp_path: Path) -> Iterator[tuple[Farm, int, bytes]]:
    cert, key, pem = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    handler = Farm()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, tls_context=server_ctx)
    ctl.start()
    yield handler, port, pem
    ctl.stop()


def test_starttls_required_verifies_the_certificate(tls_farm):
    """relay.starttls = required with a context trusting the certificate: sent over TLS."""
    handler, port, pem = tls_farm
    ctx = ssl.create_default_context(cadata=pem.decode())
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{port}"], 1, starttls="required",
                                   ssl_context=ctx), ["a@example.com"])
    assert reply.outcome == "sent" and handler.messages[0][3] is True


def test_starttls_required_refuses_an_untrusted_certificate(tls_farm):
    """A self-signed certificate fails verification under the default CAs: nothing sent."""
    handler, port, _ = tls_farm
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{port}"], 1, starttls="required", timeout=5),
                         ["a@example.com"])
    assert reply.outcome == "deferred" and handler.messages == []


def test_starttls_opportunistic_upgrades_without_verifying(tls_farm):
    """Opportunistic: the self-signed relay is used, encrypted."""
    handler, port, _ = tls_farm
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{port}"], 1), ["a@example.com"])
    assert reply.outcome == "sent" and handler.messages[0][3] is True


def test_starttls_off_stays_clear(tls_farm):
    """relay.starttls = off: no upgrade even when offered."""
    handler, port, _ = tls_farm
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{port}"], 1, starttls="off"),
                         ["a@example.com"])
    assert reply.outcome == "sent" and handler.messages[0][3] is False


def test_starttls_required_but_not_offered(farm):
    """A relay without STARTTLS under starttls = required: deferred, nothing sent."""
    handler, port = farm
    (reply,) = _send_all(RelayPool([f"127.0.0.1:{port}"], 1, starttls="required"),
                         ["a@example.com"])
    assert reply.outcome == "deferred" and "STARTTLS" in reply.text and not handler.messages


@pytest.mark.parametrize("raw,stuffed", [
    (b"a\r\n.b\r\n", b"a\r\n..b\r\n"),
    (b".a\r\n", b"..a\r\n"),
    (b"a", b"a\r\n"),
])
def test_dot_stuff(raw, stuffed):
    """Lines starting with a dot get another; the data ends with CRLF."""
    assert dot_stuff(raw) == stuffed


# --- pipelining across messages (RFC 2920) -------------------------------------------------

def test_next_message_rides_behind_the_final_dot():
    """With two messages queued on one session, the second's MAIL, RCPT, DATA are written
    with the first's data and "." (one write), and both are sent."""
    chunks: list[bytes] = []

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-x\r\n250 PIPELINING\r\n")
        await reader.readuntil(b"DATA\r\n")
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        chunks.append(await reader.readuntil(b"\r\n.\r\nMAIL"))
        chunks.append(await reader.readuntil(b"DATA\r\n"))
        writer.write(b"250 queued as ONE\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 queued as TWO\r\n")
        await reader.readline()  # QUIT
        writer.write(b"221 bye\r\n")
        writer.close()

    async def go() -> list[Reply]:
        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        pool = RelayPool([f"127.0.0.1:{port}"], 1, starttls="off", timeout=5)
        replies = await asyncio.gather(pool.send("s@x.example", "a@y.example", MSG),
                                       pool.send("s@x.example", "b@y.example", MSG))
        await pool.close()
        srv.close()
        return list(replies)

    replies = asyncio.run(go())
    assert [(r.outcome, r.queue_id) for r in replies] == [("sent", "ONE"), ("sent", "TWO")]
    assert chunks[1] == b" FROM:<s@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"


def test_drop_after_data_retries_the_message_queued_behind(farm):
    """Lost after the data with the next message's commands written behind it: the first is
    unknown; the second, never answered, goes again on a fresh session and is sent once."""
    handler, port = farm
    replies = _send_all(RelayPool([f"127.0.0.1:{port}"], 1),
                        ["dropdata@example.com", "after@example.com", "third@example.com"])
    assert [r.outcome for r in replies] == ["unknown", "sent", "sent"]
    assert [m[1] for m in handler.messages] == [["after@example.com"], ["third@example.com"]]


async def _scripted(replies_after_data: bytes, port_box: list[int]) -> asyncio.Server:
    """A relay that takes one message, then answers `replies_after_data` to the "." and the
    commands pipelined behind it, and closes."""
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        await reader.readline()
        writer.write(b"250-x\r\n250 PIPELINING\r\n")
        await reader.readuntil(b"DATA\r\n")
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        await reader.readuntil(b"DATA\r\n")
        writer.write(replies_after_data)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    port_box.append(srv.sockets[0].getsockname()[1])
    return srv


def test_drop_after_the_next_mail_was_answered_is_deferred():
    """The first message's reply and the next one's MAIL reply arrive, then the connection
    ends: the first is sent, the second deferred (its data never went), not resent."""
    async def go() -> list[Reply]:
        box: list[int] = []
        srv = await _scripted(b"250 queued as ONE\r\n250 ok\r\n", box)
        pool = RelayPool([f"127.0.0.1:{box[0]}"], 1, starttls="off", timeout=5)
        replies = await asyncio.gather(pool.send("s@x.example", "a@y.example", MSG),
                                       pool.send("s@x.example", "b@y.example", MSG))
        await pool.close()
        srv.close()
        return list(replies)

    first, second = asyncio.run(go())
    assert (first.outcome, first.queue_id) == ("sent", "ONE")
    assert second.outcome == "deferred" and "before the message data" in second.text


def test_unsolicited_421_ends_the_session(farm):
    """A 421 while idle (the relay's idle timeout) closes the session; the next message
    opens a new one and is sent."""
    handler, port = farm

    async def go() -> list[Reply]:
        pool = RelayPool([f"127.0.0.1:{port}"], 1)
        first = await pool.send("s@x.example", "a@example.com", MSG)
        conn = pool._conns[0]
        assert conn.proto is not None
        conn.proto.data_received(b"421 4.4.2 idle timeout\r\n")
        second = await pool.send("s@x.example", "b@example.com", MSG)
        await pool.close()
        return [first, second]

    replies = asyncio.run(go())
    assert [r.outcome for r in replies] == ["sent", "sent"] and handler.sessions == 2


# --- CHUNKING / BDAT (RFC 3030): aiosmtpd has none, so a small server of our own ------------

class BdatFarm:
    """Offers PIPELINING and CHUNKING; answers by recipient local part as Farm does, plus
    dropbdat@ (closes after reading the chunk, before its reply). Records each message's
    raw chunk and every command line."""

    def __init__(self, chunking: bool = True) -> None:
        self.chunking = chunking
        self.sessions = 0
        self.commands: list[bytes] = []
        self.messages: list[tuple[str, bytes]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        writer.write(b"220 bdat ESMTP\r\n")
        rcpt = b""
        ok = False
        try:
            while line := await reader.readline():
                cmd = line.rstrip(b"\r\n")
                self.commands.append(cmd)
                verb = cmd.split(b" ", 1)[0].upper()
                if verb == b"EHLO":
                    ext = b"250-PIPELINING\r\n" + (b"250-CHUNKING\r\n" if self.chunking else b"")
                    writer.write(b"250-bdat\r\n" + ext + b"250 8BITMIME\r\n")
                elif verb in (b"RSET", b"MAIL"):
                    rcpt, ok = b"", False
                    writer.write(b"250 ok\r\n")
                elif verb == b"RCPT":
                    rcpt = cmd.split(b"<", 1)[1].split(b"@", 1)[0]
                    ok = rcpt not in (b"defer", b"reject")
                    writer.write({b"defer": b"451 4.7.1 later\r\n",
                                  b"reject": b"550 5.1.1 no\r\n"}.get(rcpt, b"250 ok\r\n"))
                elif verb == b"BDAT":
                    n = int(cmd.split()[1])
                    chunk = await reader.readexactly(n)
                    if rcpt == b"dropbdat":
                        writer.close()
                        return
                    if not ok:
                        writer.write(b"554 5.5.1 no valid recipients\r\n")
                        continue
                    self.messages.append((rcpt.decode(), chunk))
                    writer.write(b"250 2.0.0 queued as B%d\r\n" % len(self.messages))
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    body = await reader.readuntil(b"\r\n.\r\n")
                    self.messages.append((rcpt.decode(), body))
                    writer.write(b"250 2.0.0 queued as D%d\r\n" % len(self.messages))
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"500 what\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()


def _bdat_send(farm: BdatFarm, rcpts: list[str], data: bytes = MSG, **kw) -> list[Reply]:
    async def go() -> list[Reply]:
        srv = await asyncio.start_server(farm.serve, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        pool = RelayPool([f"127.0.0.1:{port}"], 1, starttls="off", timeout=5, **kw)
        try:
            return list(await asyncio.gather(*(pool.send("s@x.example", r, data)
                                               for r in rcpts)))
        finally:
            await pool.close()
            srv.close()
    return asyncio.run(go())


def test_bdat_when_chunking_is_offered():
    """CHUNKING offered: each message goes as one BDAT LAST chunk, bytes as given (no
    dot-stuffing, no "."), all on one session; no DATA command."""
    farm = BdatFarm()
    replies = _bdat_send(farm, ["a@example.com", "b@example.com", "c@example.com"])
    assert [(r.outcome, r.queue_id) for r in replies] == [
        ("sent", "B1"), ("sent", "B2"), ("sent", "B3")]
    assert [m for m in farm.messages] == [("a", MSG), ("b", MSG), ("c", MSG)]
    assert f"BDAT {len(MSG)} LAST".encode() in farm.commands
    assert not any(c.startswith(b"DATA") for c in farm.commands) and farm.sessions == 1


def test_bdat_refusals_map_to_outcomes_and_keep_the_session():
    """With BDAT: 5xx at RCPT failed, 4xx deferred, and the next messages on the same
    session are sent."""
    farm = BdatFarm()
    replies = _bdat_send(farm, ["reject@example.com", "a@example.com", "defer@example.com",
                                "b@example.com"])
    assert [(r.outcome, r.code) for r in replies] == [
        ("failed", 550), ("sent", 250), ("deferred", 451), ("sent", 250)]
    assert [m[0] for m in farm.messages] == ["a", "b"] and farm.sessions == 1


def test_bdat_lost_after_the_chunk_is_unknown():
    """The relay closes after reading a chunk, before its reply: unknown, never resent; a
    message whose chunk went behind it on the same session is unknown too (it may have
    been read), one not yet written goes on a new session."""
    farm = BdatFarm()
    replies = _bdat_send(farm, ["dropbdat@example.com", "next@example.com"], depth=2)
    assert [r.outcome for r in replies] == ["unknown", "unknown"]
    assert "after the message data" in replies[0].text
    farm = BdatFarm()
    replies = _bdat_send(farm, ["dropbdat@example.com", "next@example.com"], depth=1)
    assert [r.outcome for r in replies] == ["unknown", "sent"]
    assert farm.messages == [("next", MSG)] and farm.sessions == 2


def test_data_when_chunking_is_not_offered_or_disabled():
    """Without CHUNKING in EHLO, or with chunking=False, the DATA path is used."""
    farm = BdatFarm(chunking=False)
    replies = _bdat_send(farm, ["a@example.com", "b@example.com"])
    assert [r.queue_id for r in replies] == ["D1", "D2"]
    farm = BdatFarm()
    replies = _bdat_send(farm, ["a@example.com"], chunking=False)
    assert replies[0].queue_id == "D1" and not any(c.startswith(b"BDAT") for c in farm.commands)


def test_submit_returns_the_reply_future_without_a_task(farm):
    """submit() queues at once and returns a future per message; with the loop yielding
    only now and then, all are sent in order on the pool's sessions."""
    handler, port = farm

    async def go() -> list[Reply]:
        pool = RelayPool([f"127.0.0.1:{port}"], 2)
        futs = []
        for i in range(12):
            futs.append(pool.submit("s@x.example", f"r{i}@example.com", MSG))
            if i % 4 == 3:
                await asyncio.sleep(0)
        assert all(isinstance(f, asyncio.Future) for f in futs)
        replies = [await f for f in futs]
        await pool.close()
        return replies

    replies = asyncio.run(go())
    assert [r.outcome for r in replies] == ["sent"] * 12
    assert sorted(m[1][0] for m in handler.messages) == sorted(
        f"r{i}@example.com" for i in range(12)) and handler.sessions == 2


def test_unexpected_error_while_opening_defers_instead_of_hanging(tls_farm):
    """An error open() does not expect (here: a bogus ssl_context) defers the message with
    the reason; nothing waits forever."""
    handler, port, _ = tls_farm
    pool = RelayPool([f"127.0.0.1:{port}"], 1, starttls="required", timeout=5,
                     ssl_context="not a context")  # type: ignore[arg-type]
    (reply,) = _send_all(pool, ["a@example.com"])
    assert reply.outcome == "deferred" and "cannot open" in reply.text
    assert handler.messages == []
