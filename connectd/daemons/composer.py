"""The composer (MC): claims batches, renders each mail object, signs it, hands it to the relays.

Inputs: batches in the customer DB (connectd.batches), the launch's content by URL
(connectd.content), DKIM keys in composer.dkim_dir, secrets (token and VERP keys), relays.
Outputs: mail handed to the mail farm; per outcome one `composer.sent` record (plus one
`composer.content` for mail the relay took, or may have taken: sent, unknown) on the streams
`composer.sent.<N>` / `composer.content.<N>`; batch and target state; a heartbeat row.

One step = one window (composer.window targets):
1. mark the window "sending" and renew the lease, committed (batches.mark_window); only
   the targets that update changed are handed off, so nobody gets a second copy even if
   two composers believe they hold the batch;
2. per target: render (sandboxed Jinja2 + merge tags) -> links rewritten to signed tracker
   URLs + open pixel -> MIME bytes (List-Unsubscribe + Post, VERP, stable Message-ID) ->
   DKIM (RSA and/or Ed25519 per From domain; no key = unsigned, logged once) -> rate
   limit -> relay, in groups of YIELD_EVERY messages (composed, then signed, then handed
   off). The hand-offs run in an asyncio loop (uvloop): each message is written as soon as
   a session has room, and the loop reads the relays' replies after each group, or after
   each hand-off while more messages wait than there are sessions;
3. append the outcome records (one write per stream) before the next window is marked.
A kill between 1 and 3 leaves targets "sending"; whoever claims the batch next marks them
"unknown" (never resent). Content that cannot be fetched or rendered fails the instance
with the reason and sends nothing.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite

from connectd import batches, log
from connectd.batches import Claim, MailObject
from connectd.content import LINK_MARKS, ContentError, ContentStore, LaunchContent, fail_instance
from connectd.core import render
from connectd.core.dkim import DkimSigner
from connectd.core.mime import build_parts, join_message, message_id_for
from connectd.core.tokens import sign_token, sign_tokens, sign_verp
from connectd.daemon import Daemon
from connectd.db.customer import ComposerHeartbeat
from connectd.db.engine import make_engine, writer
from connectd.ratelimit import RateLimiter
from connectd.relay import RelayPool, Reply
from connectd.secrets import load_secrets
from connectd.settings import Settings
from connectd.spool import Spool, encode, make_record, now_ts

THROUGHPUT_WINDOW = 30.0  # seconds of recent windows the heartbeat's messages/s is measured over


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # faster sockets and scheduling: the hand-off is on the hot path
        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()


# Messages composed (and signed) between turns of the event loop, where relay replies are
# read and the next writes made; a turn per message cost ~60 us more CPU per message
# (bench/composer.py: 1.5-2x the system calls, each read and write carrying less). While more
# messages wait for a session than there are sessions, a turn follows each hand-off, so the
# relays stay fed.
YIELD_EVERY = 8

# A message composed but not signed: ((header fields, body, second, From domain), VERP
# sender, recipient domain, Message-ID, subject, tracked links)
Draft = tuple[tuple[list[str], bytes, int, str], str, str, str, str, int]


def load_signers(dkim_dir: Path, domain: str, selector: str,
                 body: str = "simple") -> list[DkimSigner]:
    """The DKIM signers of `domain`: <domain>.rsa.pem (selector) and <domain>.ed25519.pem
    (<selector>-ed), whichever exist; `body`: the body canonicalisation."""
    out = []
    for suffix, sel in (("rsa", selector), ("ed25519", f"{selector}-ed")):
        path = Path(dkim_dir) / f"{domain}.{suffix}.pem"
        if path.exists():
            out.append(DkimSigner(sel, domain, path.read_bytes(), body_canonicalization=body))
    return out


class Composer(Daemon):
    name = "composer"
    periodic_interval = 5.0

    def __init__(self, settings: Settings, instance: int = 1) -> None:
        super().__init__(settings)
        self.instance = instance
        self.composer_name = f"composer-{instance}@{socket.gethostname()}"
        self.log = log.get(daemon=self.name, composer=self.composer_name)
        self.batch: Claim | None = None
        self._signers: dict[str, list[DkimSigner]] = {}
        # (when the window ended, messages, seconds it took), for the heartbeat's throughput
        self._done: collections.deque[tuple[float, int, float]] = collections.deque()
        self._rate = 0.0  # the last rate measured; kept while idle
        self._counts: collections.Counter[str] = collections.Counter()

    # -- lifecycle ------------------------------------------------------------------------
    def setup(self) -> None:
        s = self.settings
        self.engine = make_engine(s.database.customer_url, echo=s.database.echo)
        self.secrets = load_secrets(s.paths.secrets)
        spool = Spool(s.paths.spool, s.spool)
        spool.create()
        self.sent_writer = spool.writer(f"composer.sent.{self.instance}")
        self.content_writer = spool.writer(f"composer.content.{self.instance}")
        self.contents = ContentStore(self.engine, s.composer.content_timeout,
                                     s.composer.from_address)
        self.limiter = RateLimiter(self.engine, s.composer.rate_global,
                                   s.composer.rate_per_domain, s.composer.domain_rates)
        self.loop = _new_loop()
        self.pool = RelayPool(s.relay.hosts, s.relay.connections, s.relay.starttls,
                              s.relay.timeout, chunking=s.relay.chunking, depth=s.relay.depth)
        self._tracker = s.tracker.public_url.rstrip("/")
        self._token_key = self.secrets.token_keys[0]
        self._verp_key = self.secrets.verp_keys[0]
        self._second = (0, datetime.now(UTC))
        self._heartbeat()
        # Modules, settings and pools live as long as the process: out of the collector's
        # sight, its full collections (every ~100 windows) do not walk them again each time.
        gc.collect()
        gc.freeze()

    def teardown(self) -> None:
        if getattr(self, "engine", None) is None:
            return
        if self.batch is not None:
            # a clean stop gives the batch back at once instead of after the lease
            batches.release(self.engine, self.batch.batch_id, self.composer_name)
            self.batch = None
        if getattr(self, "loop", None) is not None:
            self.loop.run_until_complete(self.pool.close())
            self.loop.close()
        for w in (getattr(self, "sent_writer", None), getattr(self, "content_writer", None)):
            if w is not None:
                w.close()
        self.engine.dispose()

    def periodic(self) -> None:
        self._heartbeat()
        self.sent_writer.tick()
        self.content_writer.tick()

    # -- one window -----------------------------------------------------------------------
    def step(self) -> int:
        if self.batch is None:
            self.batch = batches.claim(self.engine, self.composer_name,
                                       self.settings.composer.lease, datetime.now(UTC))
            if self.batch is None:
                return 0
            self._counts.clear()
            self.log.info("batch.claimed", batch=self.batch.batch_id,
                          instance=self.batch.instance_id, size=self.batch.size,
                          attempts=self.batch.attempts, unknown=self.batch.unknown)
        claim = self.batch
        try:
            content = self.contents.get(claim.instance_id)
        except ContentError as exc:
            self._content_failed(claim, exc.reason)
            return 1
        c = self.settings.composer
        began = time.monotonic()
        window = batches.mark_window(self.engine, claim.batch_id, self.composer_name, c.window,
                                     c.lease, datetime.now(UTC))
        if not window.owned or not window.objects:
            self._end_batch(claim, finished=window.owned)
            return 1
        outcomes = self.loop.run_until_complete(self._hand_off(claim, content, window.objects))
        self._journal(claim, content, outcomes)
        ended = time.monotonic()
        self._done.append((ended, len(outcomes), ended - began))
        return len(outcomes)

    def _content_failed(self, claim: Claim, reason: str) -> None:
        fail_instance(self.engine, claim.instance_id, reason)
        batches.release(self.engine, claim.batch_id, self.composer_name)
        self.contents.forget(claim.instance_id)
        self.log.error("content.failed", instance=claim.instance_id, error=reason)
        self.batch = None

    def _end_batch(self, claim: Claim, finished: bool) -> None:
        if finished:
            batches.finish(self.engine, claim.batch_id, self.composer_name, datetime.now(UTC))
            event = "batch.done"
        else:
            # paused, failed or taken over: give it back if it is still ours
            batches.release(self.engine, claim.batch_id, self.composer_name)
            event = "batch.released"
        self.log.info(event, batch=claim.batch_id, instance=claim.instance_id,
                      **dict(self._counts))
        self.batch = None

    # -- the hand-off ---------------------------------------------------------------------
    async def _hand_off(self, claim: Claim, content: LaunchContent,
                        objects: list[MailObject]) -> list[tuple[MailObject, Any, Reply]]:
        """Compose and send every object; (object, composed or None, reply) in order.

        In groups of YIELD_EVERY: the group's messages are composed, then signed, then handed
        to the relays, then the loop takes a turn (sooner while more messages wait than
        there are sessions). Signing a group's messages one after the other, rather than
        each between its composing and its hand-off, keeps OpenSSL's and the composing
        code's working sets in the CPU caches: measured 30-40 us less CPU per message."""
        pending: list[tuple[MailObject, Any, Any]] = []
        renewed = time.monotonic()
        lease = self.settings.composer.lease
        sessions = self.pool.sessions
        for start in range(0, len(objects), YIELD_EVERY):
            drafts = []
            for obj in objects[start:start + YIELD_EVERY]:
                try:
                    drafts.append((obj, self._compose(content, obj)))
                except (render.RenderError, ValueError) as exc:
                    reason = exc.reason if isinstance(exc, render.RenderError) else str(exc)
                    pending.append((obj, None, Reply("failed", 0, f"not sent: {reason}", "")))
            signed = []
            for obj, draft in drafts:
                try:
                    signed.append((obj, (self._sign(draft), *draft[1:])))
                except ValueError as exc:
                    pending.append((obj, None, Reply("failed", 0, f"not sent: {exc}", "")))
            for obj, composed in signed:
                if self.limiter.enabled:
                    while (wait := self.limiter.take(composed[2])) > 0:
                        await asyncio.sleep(wait)
                        if time.monotonic() - renewed > lease / 3:  # a slow rate must not lose us the lease
                            batches.renew(self.engine, claim.batch_id, self.composer_name,
                                          lease, datetime.now(UTC))
                            renewed = time.monotonic()
                # the future of the reply; no task per message (the pool writes it at once
                # when a session has room, else as one frees up)
                pending.append((obj, composed,
                                self.pool.submit(composed[1], obj.email, composed[0])))
                if self.pool.queued > sessions:
                    await asyncio.sleep(0)  # the relays are behind: let them catch up
            await asyncio.sleep(0)  # let replies and writes of earlier messages proceed
        out = []
        for obj, composed, result in pending:
            reply = result if isinstance(result, Reply) else await result
            out.append((obj, composed, reply))
        return out

    def _signers_for(self, domain: str) -> list[DkimSigner]:
        got = self._signers.get(domain)
        if got is None:
            c = self.settings.composer
            got = self._signers[domain] = load_signers(c.dkim_dir, domain, c.dkim_selector,
                                                        c.dkim_body)
            if not got:
                self.log.warning("dkim.no_key", domain=domain, dkim_dir=str(c.dkim_dir),
                                 note="mail from this domain goes unsigned")
        return got

    def _compose(self, content: LaunchContent, obj: MailObject) -> Draft:
        """One mail object -> its unsigned Draft: ((header fields, body, second, From
        domain), VERP sender, recipient domain, Message-ID, subject, tracked links);
        `_sign` makes the message bytes of it."""
        inst, cust = content.instance_id, obj.customer_id
        data = obj.attributes
        if "email" not in data:
            data = {**data, "email": obj.email}
        r = render.render(content.subject, content.html, content.text, data)
        key = self._token_key
        tracker = self._tracker
        made: dict[int, str] = {}  # link id -> its signed URL: HTML and text share them

        def click_url(lid: int) -> str:
            url = made.get(lid)
            if url is None:
                url = made[lid] = f"{tracker}/c/{sign_token(key, inst, cust, lid, kind='c')}"
            return url

        html = r.html
        links = 0
        order = content.link_order
        if html is not None and content.marked:
            # split at the marks: [text, link index, text, ...], the indexes become URLs
            parts = LINK_MARKS.split(html)
            marks = parts[1::2]
            # the HTML's link ids signed in one go (the text part's are mostly the same)
            lids = list({order[int(i)] for i in marks if i != "o"})
            for lid, token in zip(lids, sign_tokens(key, (inst, cust), lids, "c"), strict=True):
                made[lid] = f"{tracker}/c/{token}"
            opened = f"{tracker}/o/{sign_token(key, inst, cust, kind='o')}"
            parts[1::2] = [opened if i == "o" else click_url(order[int(i)]) for i in marks]
            pixels = marks.count("o")
            links += len(marks) - pixels
            html = "".join(parts)
            if not pixels:  # the template's own logic left the pixel out: add it here
                html = render.add_open_pixel(html, opened)
        elif html is not None:
            by_url = content.links

            def tracked(i: int, url: str) -> str:
                nonlocal links
                lid = by_url.get(url)
                if lid is None and i < len(order):
                    lid = order[i]  # a personalised URL: the template's link at that place
                if lid is None:
                    return url
                links += 1
                return click_url(lid)

            html, _ = render.rewrite_links(html, tracked)
            html = render.add_open_pixel(
                html, f"{tracker}/o/{sign_token(key, inst, cust, kind='o')}")
        text = r.text
        if text is not None and content.text_marked:
            parts = LINK_MARKS.split(text)
            marks = parts[1::2]
            parts[1::2] = [click_url(order[int(i)]) for i in marks]
            links += len(marks)
            text = "".join(parts)
        bounce_domain = self.settings.receiver.domain
        verp = sign_verp(self._verp_key, inst, cust)
        from_domain = content.from_addr.rpartition("@")[2].lower()
        mid = message_id_for(inst, cust, from_domain)
        fields, body = build_parts(
            from_addr=content.from_addr, from_name=content.from_name, to_addr=obj.email,
            subject=r.subject, html=html, text=text, message_id=mid,
            return_path=f"b-{verp}@{bounce_domain}",
            list_unsubscribe_mailto=f"unsubscribe-{verp}@{bounce_domain}",
            list_unsubscribe_url=f"{tracker}/u/{sign_token(key, inst, cust, kind='u')}",
            date=self._date(now := int(time.time())))
        return ((fields, body, now, from_domain), f"b-{verp}@{bounce_domain}",
                obj.email.rpartition("@")[2].lower(), mid, r.subject, links)

    def _sign(self, draft: Draft) -> bytes:
        """A Draft -> the message bytes, with a DKIM signature per key of its From domain."""
        fields, body, now, from_domain = draft[0]
        signatures = b""
        for signer in self._signers_for(from_domain):
            # each signature covers the fields, not an earlier signature (RFC 6376 5.4: the
            # signers choose; DKIM-Signature is not in h=): the order does not matter
            signatures = signer.sign_fields(fields, body, now) + signatures
        return join_message(fields, body, signatures)

    def _date(self, now: int) -> datetime:
        """The Date of mail made in second `now`: one datetime per second (the header has
        no finer ones), so mime formats it once a second instead of once a message."""
        if self._second[0] != now:
            self._second = (now, datetime.fromtimestamp(now, UTC))
        return self._second[1]

    # -- the journal ----------------------------------------------------------------------
    def _journal(self, claim: Claim, content: LaunchContent,
                 outcomes: list[tuple[MailObject, Any, Reply]]) -> None:
        sent, detail = [], []
        ts = now_ts()  # the records of a window are written together, at this time
        for obj, composed, reply in outcomes:
            self._counts[reply.outcome] += 1
            sent.append(encode(make_record("composer.sent", {
                "instance": claim.instance_id, "customer": obj.customer_id,
                "batch": claim.batch_id, "attempt": obj.attempt, "outcome": reply.outcome,
                "reply": reply.line, "queue_id": reply.queue_id, "relay": reply.relay,
                "composer": self.composer_name}, ts=ts)))
            if composed is not None and reply.outcome in ("sent", "unknown"):
                msg, _, domain, mid, subject, links = composed
                detail.append(encode(make_record("composer.content", {
                    "instance": claim.instance_id, "customer": obj.customer_id,
                    "message_id": mid[1:-1], "subject": subject, "size": len(msg),
                    "links": links, "domain": domain, "content_hash": content.hash,
                    "segment": obj.segment_id}, ts=ts)))
        if detail:
            self.content_writer.write_lines(b"".join(detail))
        # the sent records last: a reader that sees an outcome finds its detail already there
        self.sent_writer.write_lines(b"".join(sent))

    # -- heartbeat ------------------------------------------------------------------------
    def throughput(self) -> float:
        """What this composer can do, in messages per second while it works: the messages of
        the windows of the last THROUGHPUT_WINDOW seconds over the time those windows took
        (rate-limit waits included). Idle time does not count, so a composer that waited for
        work is not reported as slow; with no recent window the last figure stands. The
        manager sizes batches by it and preflight estimates durations by it."""
        now = time.monotonic()
        while self._done and self._done[0][0] < now - THROUGHPUT_WINDOW:
            self._done.popleft()
        busy = sum(t for _, _, t in self._done)
        if busy > 0:
            self._rate = sum(n for _, n, _ in self._done) / busy
        return self._rate

    def _heartbeat(self) -> None:
        now = datetime.now(UTC)
        backlog = batches.remaining(self.engine, self.batch.batch_id) if self.batch else 0
        values = {"name": self.composer_name, "host": socket.gethostname(), "pid": os.getpid(),
                  "started_at": now, "last_seen": now, "throughput": self.throughput(),
                  "backlog": backlog}
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(ComposerHeartbeat).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["name"], set_={
            k: stmt.excluded[k] for k in ("host", "pid", "last_seen", "throughput", "backlog")})
        with writer(self.engine).begin() as conn:
            conn.execute(stmt)
