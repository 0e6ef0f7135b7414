"""Benchmark: the inbound classifier's messages/s on one core, as a ratio to the standard
library's email parser (policy=default) reading the same messages in the same run.

    python bench/classifier.py [--rounds N] [--corpus DIR]

Messages: every .eml of the shared labelled corpus (../shared/corpus/inbound/mail, or --corpus);
when it is absent, a synthetic set built here (DSNs, plain-text bounces, auto-replies, human
replies, an ARF report, in equal parts), so the benchmark runs anywhere. Each timing is the
best of N rounds over all messages, in this process (one core). Reference:
`email.message_from_bytes(raw, policy=email.policy.default)` plus walking its parts, which is
what any classifier built on the modern email API pays before it looks at a byte.

Target (issue 5): >= 1,000 messages/s. Prints the figures, then one line of JSON.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectd.core.classify import classify_reply  # noqa: E402

CORPUS = ROOT / ".." / "shared" / "corpus" / "inbound" / "mail"
TARGET = 1000.0


def synthetic(n: int = 400) -> list[bytes]:
    """A mixed set of inbound mail when the corpus is not there."""
    def dsn(i: int) -> bytes:
        return (f"From: MAILER-DAEMON@mx{i}.example.net\r\nTo: b-x@reply.example.com\r\n"
                "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
                'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
                "\r\n--B\r\nContent-Type: text/plain\r\n\r\nThis is the mail system.\r\n"
                f"<user{i}@example.org>: host mx said: 550 5.1.1 User unknown\r\n\r\n--B\r\n"
                "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
                f"Final-Recipient: rfc822; user{i}@example.org\r\nAction: failed\r\n"
                "Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 User unknown\r\n\r\n--B\r\n"
                "Content-Type: message/rfc822\r\n\r\nFrom: shop@shop.example\r\n"
                f"To: user{i}@example.org\r\nSubject: Offer\r\n\r\n" + "text " * 400
                + "\r\n--B--\r\n").encode()

    def text(i: int) -> bytes:
        return (f"From: MAILER-DAEMON@mx{i}.example.net\r\nTo: shop@shop.example\r\n"
                "Subject: failure notice\r\n\r\nHi. This is the qmail-send program.\r\n"
                "I'm afraid I wasn't able to deliver your message to the following addresses."
                f"\r\n\r\n<user{i}@example.org>:\r\nmailbox is full (#5.2.2)\r\n\r\n"
                "--- Below this line is a copy of the message.\r\n\r\nFrom: shop@shop.example"
                f"\r\nTo: user{i}@example.org\r\n\r\nbody\r\n").encode()

    def auto(i: int) -> bytes:
        return (f"From: person{i}@example.org\r\nTo: news@shop.example\r\n"
                "Subject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\n"
                "I am out of the office until Monday.\r\n").encode()

    def human(i: int) -> bytes:
        return (f"From: person{i}@example.org\r\nTo: news@shop.example\r\nSubject: Re: Offer\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n\r\n"
                "Does it come in blue?\r\n\r\n> quoted offer text\r\n" * 3).encode()

    def arf(i: int) -> bytes:
        return ("From: fbl@isp.example\r\nTo: abuse@shop.example\r\nSubject: report\r\n"
                "MIME-Version: 1.0\r\nContent-Type: multipart/report; "
                'report-type=feedback-report; boundary="F"\r\n\r\n--F\r\nContent-Type: '
                "text/plain\r\n\r\nabuse report\r\n--F\r\nContent-Type: message/feedback-report"
                f"\r\n\r\nFeedback-Type: abuse\r\nOriginal-Rcpt-To: user{i}@example.org\r\n"
                "\r\n--F\r\nContent-Type: message/rfc822\r\n\r\nFrom: shop@shop.example\r\n"
                "Subject: Offer\r\n\r\nbody\r\n--F--\r\n").encode()

    makers = [dsn, text, auto, human, arf]
    return [makers[i % len(makers)](i) for i in range(n)]


def load(corpus: Path) -> tuple[list[bytes], str]:
    files = sorted(corpus.glob("*.eml")) if corpus.is_dir() else []
    if files:
        return [f.read_bytes() for f in files], f"corpus {corpus.resolve()}"
    return synthetic(), "synthetic set (corpus absent)"


def clear_caches() -> None:
    """Forget memoised diagnostic texts, so a round does not profit from the previous one."""
    from connectd.core.classify import reasons
    reasons._reason_from_text.cache_clear()


def best_rate(fn, messages: list[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        clear_caches()
        t = time.perf_counter()
        for raw in messages:
            fn(raw)
        best = min(best, time.perf_counter() - t)
    return len(messages) / best


def stdlib_parse(raw: bytes) -> None:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    for part in msg.walk():
        part.get_content_type()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    args = ap.parse_args()
    messages, origin = load(args.corpus)
    size = sum(map(len, messages))
    print(f"classifier: {len(messages)} messages ({size / 1e6:.1f} MB) from {origin}, "
          f"best of {args.rounds}", flush=True)
    for raw in messages[:50]:  # warm the regex caches and imports
        classify_reply(raw)
    ours = best_rate(classify_reply, messages, args.rounds)
    ref = best_rate(stdlib_parse, messages, args.rounds)
    kinds: dict[str, int] = {}
    for raw in messages:
        k = classify_reply(raw).kind
        kinds[k] = kinds.get(k, 0) + 1
    ratio = ours / ref
    print(f"classify_reply        {ours:>8,.0f} msg/s  ({1e6 / ours:,.0f} us/msg)")
    print(f"stdlib parse+walk     {ref:>8,.0f} msg/s  (email.policy.default)")
    print(f"ratio                 {ratio:>8.2f}   target >= {TARGET:,.0f} msg/s: "
          f"{'met' if ours >= TARGET else 'NOT met'}")
    print(f"kinds: {dict(sorted(kinds.items()))}")
    print(json.dumps({"bench": "classifier", "messages": len(messages), "source": origin,
                      "msgs_per_s": round(ours), "stdlib_msgs_per_s": round(ref),
                      "ratio": round(ratio, 3), "target_met": ours >= TARGET, "kinds": kinds}))


if __name__ == "__main__":
    main()
