"""The processor end to end: mail.received + stored message -> classification, context, the
reply-handler chain, mail to a real SMTP server, archive maildirs, pipes -> processor.events."""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.inbound import CS, DOMAIN, Env, dsn, human, make_env
from helpers.smtp_counter import CountingRelay

from connectd.daemons.processor import Processor, resume_position
from connectd.settings import SettingsError
from connectd.spool import Spool


@pytest.fixture
def relay() -> Iterator[CountingRelay]:
    with CountingRelay(keep_bytes=True) as r:
        yield r


@pytest.fixture
def template_db(migrated_templates) -> str:  # noqa: ANN001
    return migrated_templates("sqlite", "customer")


@pytest.fixture
def env(tmp_path: Path, relay: CountingRelay, template_db: str) -> Env:
    return make_env(tmp_path, relay.port, template_db)


def run(env: Env) -> int:
    return Processor(env.settings).run_until_idle()


def to(relay: CountingRelay, rcpt: str) -> list:
    return [d for d in relay.deliveries if d.rcpt == rcpt]


def test_hard_bounce_via_verp(env: Env, relay: CountingRelay) -> None:
    """A DSN to a signed b-<token> address: one hard mail.bounced for that customer and
    instance, archived under the handler's maildir, nothing forwarded."""
    rid = env.deliver(dsn("ann@example.com", "5.1.1"), rcpt=[env.verp("b", 7, 1)], mail_from="")
    assert run(env) == 1
    (bounced,) = env.records("mail.bounced")
    assert (bounced["hard"], bounced["customer"], bounced["instance"], bounced["address"]) == \
        (True, 1, 7, "ann@example.com")
    (done,) = env.processed()
    assert done["received"] == rid and done["handler"] == "persistent-bounce"
    assert done["actions"] == ["bounce", "archive"] and done["context_via"] == "verp"
    assert env.records()[-1]["type"] == "mail.processed"
    box = env.settings.paths.spool / "archive" / "persistent-bounce" / "new"
    assert [p.name for p in box.iterdir()] == [f"{rid}.connectd"]
    assert relay.deliveries == []


def test_soft_bounce(env: Env) -> None:
    """A 4.x.x DSN is a soft bounce (temporary-bounce handler)."""
    env.deliver(dsn("bob@example.com", "4.2.2", "452 4.2.2 Mailbox full"),
                rcpt=[env.verp("b", 3, 2)], mail_from="")
    run(env)
    (bounced,) = env.records("mail.bounced")
    assert bounced["hard"] is False and bounced["customer"] == 2
    assert env.processed()[0]["handler"] == "temporary-bounce"


def test_reply_from_known_customer_forwarded_with_original(env: Env, relay: CountingRelay) -> None:
    """A person's reply: found by address, forwarded to customer service with the original
    attached as message/rfc822, mail.replied in the history."""
    raw = human("Ann <ann@example.com>", "Where is my order?", "It has not arrived.\n")
    env.deliver(raw)
    run(env)
    (fwd,) = to(relay, CS)
    msg = email.message_from_bytes(fwd.data, policy=email.policy.default)
    parts = list(msg.iter_attachments())
    assert parts and parts[0].get_content_type() == "message/rfc822"
    assert raw.strip() in fwd.data
    assert msg["Reply-To"] == "ann@example.com"
    (replied,) = env.records("mail.replied")
    assert replied["customer"] == 1 and replied["forwarded"] is True
    (done,) = env.processed()
    assert done["handler"] == "unexpected-reply" and done["context_via"] == "address"


def test_unknown_sender_context_not_found(env: Env, relay: CountingRelay) -> None:
    """A reply nobody in the customer DB sent goes to context-not-found: forwarded, no history."""
    env.deliver(human("stranger@else.example", "Hi", "Who are you?\n"))
    run(env)
    assert len(to(relay, CS)) == 1
    assert env.records("mail.replied") == []
    assert env.processed()[0]["handler"] == "context-not-found"


def test_unsubscribe_by_list_unsubscribe_mailto(env: Env) -> None:
    """Mail to unsubscribe-<token>: customer.unsubscribed (conversation scope, via mail)."""
    env.deliver(human("ann@example.com", "unsubscribe", "unsubscribe\n",
                      to=env.verp("unsubscribe", 7, 1)), rcpt=[env.verp("unsubscribe", 7, 1)])
    run(env)
    (unsub,) = env.records("customer.unsubscribed")
    assert (unsub["customer"], unsub["instance"], unsub["scope"], unsub["via"]) == \
        (1, 7, "conversation", "mail")


def test_message_id_context_needs_matching_sender(env: Env) -> None:
    """An unsigned In-Reply-To gives the instance only when the sender is that customer."""
    env.deliver(human("ann@example.com", "Re: Spring sale", "Nice\n",
                      headers={"In-Reply-To": "<i7.c1@shop.example>"}))
    env.deliver(human("bob@example.com", "Re: Spring sale", "Nice\n",
                      headers={"In-Reply-To": "<i7.c1@shop.example>"}))
    run(env)
    first, second = env.processed()
    assert (first["customer"], first["instance"], first["context_via"]) == (1, 7, "message-id")
    assert (second["customer"], second["instance"], second["context_via"]) == (2, None, "address")


SUBSCRIBE_CHAIN = """
[[handler]]
name = "confirm"
verp = ["confirm"]
actions = ["confirm"]

[[handler]]
name = "subscribe"
kind = ["subscribe"]
actions = [{ subscribe = "news" }]
"""


def test_double_opt_in(tmp_path: Path, relay: CountingRelay, template_db: str) -> None:
    """subscribe -> customer.subscribed(confirmed false) + a confirmation whose Reply-To is
    confirm-<token>; the reply to it -> customer.subscribed(confirmed true)."""
    env = make_env(tmp_path, relay.port, template_db, SUBSCRIBE_CHAIN)
    env.deliver(human("new@example.org", "subscribe", "subscribe\n", to=f"subscribe@{DOMAIN}"),
                mail_from="new@example.org")
    run(env)
    (pending,) = env.records("customer.subscribed")
    assert (pending["confirmed"], pending["address"], pending["conversation"]) == \
        (False, "new@example.org", 1)
    (mail,) = to(relay, "new@example.org")
    msg = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert msg["Auto-Submitted"] == "auto-replied" and mail.mail_from in ("", "<>")
    confirm_addr = str(msg["Reply-To"])
    assert re.fullmatch(rf"confirm-[a-z2-7]+@{re.escape(DOMAIN)}", confirm_addr)
    # someone else replying to the same address confirms nothing
    env.deliver(human("evil@example.org", "Re: confirm", "yes\n", to=confirm_addr),
                rcpt=[confirm_addr], mail_from="evil@example.org")
    env.deliver(human("new@example.org", "Re: Please confirm", "yes\n", to=confirm_addr),
                rcpt=[confirm_addr], mail_from="new@example.org")
    run(env)
    subs = env.records("customer.subscribed")
    assert [(s["confirmed"], s["address"]) for s in subs] == \
        [(False, "new@example.org"), (True, "new@example.org")]
    assert subs[1]["conversation"] == 1


CUSTOM_CHAIN = """
[[handler]]
name = "price"
subject_keywords = ["price"]
actions = [{ reply = { text = "Dear {{ sender }}, prices: see {{ subject }}.", subject = "Prices" } },
           { set_attribute = { name = "asked_price", value = true } }, { event = "asked-price" },
           { pipe = ["PIPE"] }]

[[handler]]
name = "failing"
subject_keywords = ["fail"]
actions = [{ pipe = ["/bin/sh", "-c", "echo broken >&2; exit 3"] }]

[[handler]]
name = "bounces"
kind = ["bounce"]
actions = ["bounce"]
"""


def custom_env(tmp_path: Path, relay: CountingRelay, template_db: str) -> Env:
    script = tmp_path / "keyword.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        env | grep ^CONNECTD_ | sort > {tmp_path}/env.txt
        cat > {tmp_path}/stdin.eml
        """))
    script.chmod(0o755)
    return make_env(tmp_path, relay.port, template_db, CUSTOM_CHAIN.replace("PIPE", str(script)))


def test_custom_actions_reply_attribute_event_pipe(tmp_path: Path, relay: CountingRelay,
                                                   template_db: str) -> None:
    """reply (template, Auto-Submitted), set_attribute, event and pipe (stdin + env) all run."""
    env = custom_env(tmp_path, relay, template_db)
    raw = human("ann@example.com", "What is the price?", "Tell me\n")
    env.deliver(raw, mail_from="ann@example.com")
    run(env)
    (reply,) = to(relay, "ann@example.com")
    msg = email.message_from_bytes(reply.data, policy=email.policy.default)
    assert msg["Subject"] == "Prices" and msg["Auto-Submitted"] == "auto-replied"
    assert "Dear ann@example.com, prices: see What is the price?." in msg.get_content()
    (attr,) = env.records("customer.attribute_set")
    assert (attr["customer"], attr["name"], attr["value"]) == (1, "asked_price", True)
    (event,) = env.records("event.triggered")
    assert event["name"] == "asked-price" and event["customer"] == 1
    envtxt = (tmp_path / "env.txt").read_text()
    assert "CONNECTD_CUSTOMER=1\n" in envtxt and "CONNECTD_HANDLER=price\n" in envtxt
    assert "CONNECTD_KIND=human\n" in envtxt and "CONNECTD_INSTANCE=\n" in envtxt
    assert (tmp_path / "stdin.eml").read_bytes() == raw
    (done,) = env.processed()
    assert done["actions"] == ["reply", "set_attribute", "event", "pipe"] and done["errors"] == []


def test_failing_action_recorded_and_message_kept(tmp_path: Path, relay: CountingRelay,
                                                  template_db: str) -> None:
    """A pipe that exits non-zero: its error in mail.processed, the message forwarded and
    archived anyway."""
    env = custom_env(tmp_path, relay, template_db)
    rid = env.deliver(human("ann@example.com", "this will fail", "x\n"))
    run(env)
    (done,) = env.processed()
    assert any("exit status 3" in e and "broken" in e for e in done["errors"])
    assert done["actions"] == ["forward", "archive"]
    assert len(to(relay, CS)) == 1
    assert (env.settings.paths.spool / "archive" / "failing" / "new" / f"{rid}.connectd").exists()


def test_no_handler_accepts_forwards(tmp_path: Path, relay: CountingRelay, template_db: str) -> None:
    """A message no handler accepts is forwarded to customer service."""
    env = custom_env(tmp_path, relay, template_db)
    env.deliver(human("bob@example.com", "hello", "just saying hi\n"))
    run(env)
    (done,) = env.processed()
    assert done["handler"] == "" and "forward" in done["actions"]
    assert len(to(relay, CS)) == 1


def test_no_reply_to_automatic_sender(tmp_path: Path, relay: CountingRelay, template_db: str) -> None:
    """The reply action never answers an Auto-Submitted message (RFC 3834: no loops)."""
    env = custom_env(tmp_path, relay, template_db)
    env.deliver(human("ann@example.com", "price", "x\n", headers={"Auto-Submitted": "auto-replied"}))
    run(env)
    assert to(relay, "ann@example.com") == []
    assert any(e.startswith("reply: skipped") for e in env.processed()[0]["errors"])


def test_bad_handler_file_is_settings_error(tmp_path: Path, relay: CountingRelay) -> None:
    """A bad handler file stops the processor at start with the handler and key named."""
    env = make_env(tmp_path, relay.port, None, '[[handler]]\nname = "oops"\nkind = "bonce"\nactions = []\n')
    with pytest.raises(SettingsError, match="'oops'.*'kind'"):
        Processor(env.settings)


def test_cli_bad_handler_file_exits_78(tmp_path: Path, relay: CountingRelay) -> None:
    """`connectd run processor` exits 78 on a bad handler file (once registered by the lead)."""
    from connectd.daemons import DAEMONS
    if "processor" not in DAEMONS:
        pytest.skip("processor not registered in connectd.daemons yet")
    env = make_env(tmp_path, relay.port, None, '[[handler]]\nname = "oops"\nactions = ["x"]\n')
    done = subprocess.run([sys.executable, "-m", "connectd", "--config",
                           str(env.settings.source), "run", "processor", "--once"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78 and "oops" in done.stderr


def test_database_down_waits_then_processes(env: Env) -> None:
    """With the customer DB unreadable the message waits (nothing written, nothing lost) and
    is processed once the DB is back."""
    db = env.settings.paths.spool / "customer.db"
    db.rename(db.with_suffix(".away"))
    db.mkdir()  # sqlite cannot open a directory: an OperationalError, like a server that is down
    env.deliver(human("ann@example.com", "Hi", "hello\n"))
    proc = Processor(env.settings)
    proc.setup()
    try:
        assert proc.step() == 0
        assert env.processed() == []
        db.rmdir()
        db.with_suffix(".away").rename(db)
        proc._retry_at = 0.0  # skip the back-off wait
        assert proc.step() == 1
    finally:
        proc.teardown()
    (done,) = env.processed()
    assert done["customer"] == 1


def test_relay_down_waits(tmp_path: Path, template_db: str) -> None:
    """A relay that cannot be reached: the message is retried later, never marked done."""
    from helpers.smtp_counter import free_port
    port = free_port()
    env = make_env(tmp_path, port, template_db)
    env.deliver(human("stranger@else.example", "Hi", "hello\n"))
    assert run(env) == 0
    assert env.processed() == []
    with CountingRelay(keep_bytes=True) as relay:
        env2 = make_env(tmp_path / "again", relay.port, template_db)
        # same spool and store, new relay: point the settings at it
        settings = env.settings.__class__(**{**env.settings.__dict__, "relay": env2.settings.relay})
        assert Processor(settings).run_until_idle() == 1
        assert len(to(relay, CS)) == 1


def test_restart_resumes_after_last_processed(env: Env) -> None:
    """A new processor goes on after the last mail.processed: each message exactly once."""
    ids = [env.deliver(dsn(f"c{i}@example.com"), mail_from="") for i in range(3)]
    assert run(env) == 3
    ids += [env.deliver(dsn(f"d{i}@example.com"), mail_from="") for i in range(2)]
    assert resume_position(Spool(env.settings.paths.spool)).offset > 0
    assert run(env) == 2
    assert run(env) == 0
    assert [p["received"] for p in env.processed()] == ids


KILLER_CHAIN = """
[[handler]]
name = "killer"
subject_keywords = ["kill"]
actions = ["forward", { pipe = ["/bin/sh", "-c", "test -e MARK || { touch MARK; kill -9 $PPID; sleep 5; }"] }, { event = "survived" }]

[[handler]]
name = "bounces"
kind = ["bounce"]
actions = ["bounce"]

[[handler]]
name = "rest"
actions = ["archive"]
"""


def _spawn(env: Env) -> subprocess.Popen[bytes]:
    code = ("import sys; from connectd import settings; from connectd.daemons.processor import "
            "Processor; sys.exit(Processor(settings.load(sys.argv[1], environ={})).run_until_idle() >= 0 and 0)")
    return subprocess.Popen([sys.executable, "-c", code, str(env.settings.source)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_mid_message_redoes_it_once(tmp_path: Path, relay: CountingRelay, template_db: str) -> None:
    """SIGKILL in the middle of a message's actions (after its forward): the restarted
    processor does that message again (forward sent twice: the documented window), its
    records once, and nothing before or after it twice or never."""
    mark = tmp_path / "killed.mark"
    env = make_env(tmp_path, relay.port, template_db, KILLER_CHAIN.replace("MARK", str(mark)))
    ids = [env.deliver(dsn("a@example.com"), mail_from=""),
           env.deliver(human("ann@example.com", "please kill", "x\n")),
           env.deliver(dsn("b@example.com"), mail_from="")]
    first = _spawn(env)
    assert first.wait(60) == -signal.SIGKILL
    assert mark.exists()
    assert [p["received"] for p in env.processed()] == ids[:1]
    second = _spawn(env)
    assert second.wait(60) == 0, second.stderr.read()
    assert [p["received"] for p in env.processed()] == ids
    assert len(env.records("event.triggered")) == 1
    assert len(env.records("mail.bounced")) == 2
    forwards = to(relay, CS)
    assert len(forwards) == 2 and forwards[0].message_id == forwards[1].message_id


@pytest.mark.slow
def test_kill_at_random_loses_and_repeats_nothing(env: Env) -> None:
    """SIGKILL at random moments over 150 messages: every message ends with exactly one
    mail.processed (none skipped, none twice) and one mail.bounced."""
    ids = [env.deliver(dsn(f"r{i}@example.com"), mail_from="") for i in range(150)]
    kills = 0
    for _ in range(40):
        proc = _spawn(env)
        time.sleep(0.3 + (kills % 5) * 0.15)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(30)
        if len(env.processed()) == len(ids):
            break
    assert kills >= 3  # the test killed processors mid-run, not only idle ones
    proc = _spawn(env)
    assert proc.wait(120) == 0
    assert [p["received"] for p in env.processed()] == ids
    assert sorted(b["address"] for b in env.records("mail.bounced")) == \
        sorted(f"r{i}@example.com" for i in range(150))


ARF = (
    b"From: feedback@fbl.example.net\r\nTo: abuse@reply.example\r\nSubject: FW: Spring sale\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <arf1@fbl.example.net>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; "
    b"boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
    b"--B\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
    b"User-Agent: fbl/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: bob@example.com\r\n"
    b"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: news@shop.example\r\n"
    b"To: bob@example.com\r\nSubject: Spring sale\r\n\r\n--B--\r\n")


def test_complaint_without_context_names_the_complaining_address(env: Env) -> None:
    """An ARF report with no signed context still opts out the address it reports."""
    env.deliver(ARF, rcpt=[f"abuse@{DOMAIN}"], mail_from="")
    run(env)
    (complained,) = env.records("mail.complained")
    assert complained["address"] == "bob@example.com" and complained["customer"] is None
    assert env.processed()[0]["errors"] == []


def test_bounce_of_several_recipients_leaves_them_to_their_addresses(env: Env) -> None:
    """A bounce naming two recipients on one VERP address: neither record is pinned to the
    VERP customer (the applier finds each by address); one recipient keeps the customer."""
    two = dsn("ann@example.com", "5.1.1").replace(
        b"Final-Recipient: rfc822; ann@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 <ann@example.com>: Recipient address rejected: "
        b"User unknown\r\n",
        b"Final-Recipient: rfc822; ann@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n"
        b"Final-Recipient: rfc822; ann.alias@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n")
    env.deliver(two, rcpt=[env.verp("b", 7, 1)], mail_from="")
    run(env)
    bounced = env.records("mail.bounced")
    assert sorted(b["address"] for b in bounced) == ["ann.alias@example.org", "ann@example.com"]
    assert {b["customer"] for b in bounced} == {None}
    assert {b["instance"] for b in bounced} == {7}
