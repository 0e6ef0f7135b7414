"""classify_reply on bounce layouts written here after the real MTAs' templates (Postfix,
Sendmail, Exim, qmail, Courier, Exchange/Office 365, Gmail, Yahoo, Domino, Yandex) and on the
SMTP semantics of hard and soft: an unknown mailbox is refused at RCPT TO or says x.1.1; the
same words after DATA, or with no stage at all, are a filter (sisimai's "filtered", soft); a
few receiving services mean something else than their words (au, Yahoo, Orange, Facebook).

The addresses are neutral on purpose (rcpt@...): nothing here can be decided by a local part.
"""

from __future__ import annotations

import pytest

from connectd.core.classify import classify_reply


def text_bounce(sender: str, subject: str, body: str, original_to: str = "rcpt@example.net"
                ) -> bytes:
    """A plain-text bounce with the returned original's headers pasted after the report."""
    return (f"From: {sender}\r\nTo: b-token@reply.example.com\r\nSubject: {subject}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"{body}\r\n"
            "--- Below this line is a copy of the message.\r\n\r\n"
            f"From: shop@shop.example\r\nTo: {original_to}\r\nSubject: Offer\r\n\r\nHello\r\n"
            ).encode()


def dsn_report(text: str, fields: str, sender: str = "MAILER-DAEMON@mx.example.org") -> bytes:
    """A multipart/report with a text part and a delivery-status part written as given."""
    return (f"From: {sender}\r\nTo: b-token@reply.example.com\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n"
            f"--B\r\nContent-Type: text/plain\r\n\r\n{text}\r\n\r\n--B\r\n"
            f"Content-Type: message/delivery-status\r\n\r\n{fields}\r\n\r\n--B\r\n"
            "Content-Type: text/rfc822-headers\r\n\r\nFrom: shop@shop.example\r\n"
            "To: rcpt@example.net\r\nSubject: Offer\r\n\r\n--B--\r\n").encode()


def postfix(rcpt: str, said: str, stage: str, status: str = "5.0.0",
            remote: str = "mx.example.net") -> bytes:
    """Postfix's bounce: the prose, then a DSN whose Diagnostic-Code repeats the reply."""
    text = (f"This is the mail system at host mx.example.org.\r\n\r\n<{rcpt}>: host {remote}"
            f"[192.0.2.1] said:\r\n    {said} (in reply to {stage} command)")
    fields = ("Reporting-MTA: dns; mx.example.org\r\n\r\n"
              f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {status}\r\n"
              f"Remote-MTA: dns; {remote}\r\nDiagnostic-Code: smtp; {said}")
    return dsn_report(text, fields)


def verdict(raw: bytes) -> tuple[str, tuple[str, ...], str | None, bool | None]:
    c = classify_reply(raw)
    return c.kind, c.recipients, c.reason, c.hard


# -- the SMTP stage decides what "unknown user" means ----------------------------------------

def test_unknown_user_at_rcpt_is_a_hard_userunknown() -> None:
    """"550 User unknown" in reply to RCPT TO: the mailbox does not exist (hard)."""
    raw = postfix("rcpt@example.net", "550 <rcpt@example.net>: User unknown", "RCPT TO")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "userunknown", True)


def test_unknown_user_after_data_is_a_soft_filter() -> None:
    """The same words after end of DATA are a content/sender filter (soft)."""
    raw = postfix("rcpt@example.net", "550 <rcpt@example.net>: User unknown", "end of DATA")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "filtered", False)


def test_unknown_user_with_an_address_status_is_hard_whatever_the_stage() -> None:
    """x.1.1 names the mailbox itself: hard even when refused after DATA."""
    raw = postfix("rcpt@example.net", "550 5.1.1 <rcpt@example.net>: User unknown",
                  "end of DATA", status="5.1.1")
    assert verdict(raw)[2:] == ("userunknown", True)


def test_mailbox_disabled_status_with_unknown_user_words_is_filtered() -> None:
    """5.2.1 (mailbox disabled) with "User Unknown" and no stage: filtered (soft)."""
    fields = ("Reporting-MTA: dns; mx.example.org\r\n\r\nFinal-Recipient: rfc822; rcpt@example.net"
              "\r\nAction: failed\r\nStatus: 5.2.1\r\n"
              "Diagnostic-Code: smtp;550 5.2.1 <rcpt@example.net>... User Unknown")
    raw = dsn_report("Your message cannot be delivered to the following recipients:", fields)
    assert verdict(raw)[2:] == ("filtered", False)


def test_mta_own_directory_verdict_is_hard() -> None:
    """No remote reply code: the reporting MTA judged the address itself (Domino, Exchange)."""
    raw = text_bounce(
        "Postmaster <postmaster@notes.example.net>", "DELIVERY FAILURE: User rcpt not listed",
        "Your message\r\n\r\n  Subject: Offer\r\n\r\nwas not delivered to:\r\n\r\n"
        "  rcpt@example.net\r\n\r\nbecause:\r\n\r\n"
        "  User rcpt (rcpt@example.net) not listed in Domino Directory\r\n")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "userunknown", True)


def test_qmail_does_not_like_recipient_is_the_rcpt_stage() -> None:
    """qmail-send says "does not like recipient" for an RCPT refusal: hard userunknown."""
    raw = text_bounce(
        "MAILER-DAEMON@mx.example.org", "failure notice",
        "Hi. This is the qmail-send program at mx.example.org.\r\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
        "<rcpt@example.net>:\r\n192.0.2.7 does not like recipient.\r\n"
        "Remote host said: 550 sorry, no mailbox here by that name\r\n"
        "Giving up on 192.0.2.7.\r\n")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "userunknown", True)


def test_qmail_full_mailbox_after_data_is_soft() -> None:
    """qmail's "failed after I sent the message" with a quota error: mailboxfull (soft)."""
    raw = text_bounce(
        "MAILER-DAEMON@mx.example.org", "failure notice",
        "Hi. This is the qmail-send program at mx.example.org.\r\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n\r\n"
        "<rcpt@example.net>:\r\n192.0.2.7 failed after I sent the message.\r\n"
        "Remote host said: 552 5.2.2 Quota exceeded\r\n")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "mailboxfull", False)


# -- receiving services that mean something else than their words -----------------------------

def test_au_filter_answer_without_address_is_filtered() -> None:
    """au (KDDI) answers "550 : User unknown" from its reception filter: soft."""
    raw = postfix("rcpt@ezweb.ne.jp", "550 : User unknown", "end of DATA",
                  remote="lsean.ezweb.ne.jp")
    assert verdict(raw)[2:] == ("filtered", False)


def test_au_unknown_mailbox_echoes_the_address() -> None:
    """au's real unknown mailbox: "550 <addr>: User unknown": hard."""
    raw = postfix("rcpt@ezweb.ne.jp", "550 <rcpt@ezweb.ne.jp>: User unknown", "end of DATA",
                  remote="lsean.ezweb.ne.jp")
    assert verdict(raw)[2:] == ("userunknown", True)


def test_yahoo_unknown_account_after_data_is_hard() -> None:
    """Yahoo refuses an unknown account after DATA ("dd This user doesn't have..."): hard."""
    raw = text_bounce(
        "Mail Delivery Subsystem <MAILER-DAEMON@mx.example.org>",
        "Returned mail: see transcript for details",
        "   ----- The following addresses had permanent fatal errors -----\r\n"
        "<rcpt@yahoo.com>\r\n    (reason: 554 delivery error: dd This user doesn't have a "
        "yahoo.com account (rcpt@yahoo.com) [0] - mta1.mail.ne1.yahoo.com)\r\n\r\n"
        "   ----- Transcript of session follows -----\r\n"
        "... while talking to mta6.am0.yahoodns.net.:\r\n>>> DATA\r\n"
        "<<< 554 delivery error: dd This user doesn't have a yahoo.com account\r\n",
        original_to="rcpt@yahoo.com")
    assert verdict(raw) == ("bounce", ("rcpt@yahoo.com",), "userunknown", True)


@pytest.mark.parametrize(("said", "reason", "hard"), [
    ("550 5.1.1 Adresse d au moins un destinataire invalide. Invalid recipient. OFR_416 [416]",
     "userunknown", True),
    ("552 5.1.1 Boite du destinataire pleine. Recipient overquota. OFR_417 [417]",
     "mailboxfull", False),
    ("550 5.5.0 Le compte du destinataire est bloque. LPN007_426", "suspend", False),
])
def test_orange_numbered_codes(said: str, reason: str, hard: bool) -> None:
    """Orange / La Poste carry the reason in their OFR/LPN code, whatever the status says."""
    raw = postfix("rcpt@orange.fr", said, "RCPT TO", remote="smtp-in.orange.fr")
    assert verdict(raw)[2:] == (reason, hard)


def test_facebook_recipient_preferences_is_filtered() -> None:
    """Facebook's RCP-P2 (recipient preferences) with status 5.1.1 is a filter, not unknown."""
    fields = ("Reporting-MTA: dns; 10.0.0.1\r\nArrival-Date: Thu, 1 Jan 2015 00:00:00 -0700\r\n"
              "Diagnostic-Code: smtp; 550 5.1.1 RCP-P2 http://postmaster.facebook.com/"
              "response_codes Refused due to recipient preferences\r\nStatus: 5.1.1\r\n"
              "Final-Recipient: rfc822; rcpt@facebook.com\r\nAction: failed")
    raw = dsn_report("This message was created automatically by Facebook.", fields,
                     sender="mailer-daemon@mx.facebook.com")
    assert verdict(raw) == ("bounce", ("rcpt@facebook.com",), "filtered", False)


# -- recipients: which address, and never the wrong one -----------------------------------------

def test_dsn_reports_the_original_recipient_before_aliasing() -> None:
    """Original-Recipient is the address the sender wrote (ours); Final-Recipient an alias."""
    fields = ("Reporting-MTA: dns; mx.example.org\r\n\r\n"
              "Original-Recipient: rfc822;rcpt@example.net\r\n"
              "Final-Recipient: rfc822;mbox1234@store.example.net\r\nAction: failed\r\n"
              "Status: 5.2.2\r\nDiagnostic-Code: smtp; 552 5.2.2 Mailbox full")
    raw = dsn_report("Delivery has failed.", fields)
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "mailboxfull", False)


def test_report_contact_address_is_never_bounced() -> None:
    """"For further assistance, please contact <help@isp>" repeated in a translation: not it."""
    raw = text_bounce(
        "MAILER-DAEMON@mx.example.org (Mail Delivery System)",
        "Undelivered Mail Returned to Sender",
        "This is the Postfix program at host mx.example.org.\r\n"
        "For further assistance, please contact <help@isp.example>\r\n"
        "Si le probleme persiste, ecrivez a\r\n<help@isp.example>\r\n\r\n"
        "<rcpt@example.net>: host mx.example.net[192.0.2.1] said: 550 5.1.1 User unknown "
        "(in reply to RCPT TO command)\r\n")
    assert verdict(raw)[1] == ("rcpt@example.net",)


def test_gateway_notice_wrapping_a_report_reads_the_inner_report() -> None:
    """A filtering gateway returns the MTA's report as its attached 'original'."""
    inner = postfix("rcpt@example.net", "550 5.1.1 <rcpt@example.net>: User unknown", "RCPT TO")
    raw = (b"From: Mail Delivery Subsystem <MAILER-DAEMON@gw.example.org>\r\n"
           b"To: b-token@reply.example.com\r\nSubject: Returned mail: User unknown\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"O\"\r\n\r\n"
           b"--O\r\nContent-Type: text/plain\r\n\r\n"
           b"The original message was received at Thu Oct 13 15:22:22 2015\r\n"
           b"----- The following addresses had permanent delivery errors -----\r\n\r\n"
           b"--O\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--O--\r\n")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "userunknown", True)


def test_exim_undisclosed_alias_reports_the_alias() -> None:
    """Exim: "an undisclosed address (generated from a@b)": the address the sender used."""
    raw = text_bounce(
        "Mail Delivery System <Mailer-Daemon@mx.example.org>",
        "Mail delivery failed: returning message to sender",
        "This message was created automatically by mail delivery software.\r\n\r\n"
        "A message that you sent could not be delivered to one or more of its\r\n"
        "recipients. This is a permanent error. The following address(es) failed:\r\n\r\n"
        "  an undisclosed address\r\n    (generated from rcpt@example.net)\r\n")
    assert verdict(raw)[:2] == ("bounce", ("rcpt@example.net",))


def test_gmail_text_bounce() -> None:
    """Gmail's "Address not found" with the remote 5.1.1: hard userunknown."""
    raw = text_bounce(
        "Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
        "Delivery Status Notification (Failure)",
        "** Address not found **\r\n\r\nYour message wasn't delivered to rcpt@example.net "
        "because the address couldn't be found, or is unable to receive mail.\r\n\r\n"
        "The response from the remote server was:\r\n550 5.1.1 The email account that you "
        "tried to reach does not exist.\r\n")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "userunknown", True)


def test_office365_recipient_not_found() -> None:
    """Office 365's RESOLVER.ADR.RecipientNotFound (5.1.10 at Microsoft): hard."""
    raw = text_bounce(
        "Microsoft Outlook <postmaster@outlook.com>", "Undeliverable: Offer",
        "Your message to rcpt@example.net couldn't be delivered.\r\n"
        "rcpt wasn't found at example.net.\r\n\r\nDiagnostic information for administrators:"
        "\r\n\r\nGenerating server: AM0PR01MB1234.eurprd01.prod.outlook.com\r\n\r\n"
        "rcpt@example.net\r\nRemote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound;"
        " Recipient not found by SMTP address lookup'\r\n")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "userunknown", True)


def test_yahoo_full_mailbox_is_soft() -> None:
    """Yahoo's "Sorry, we were unable to deliver your message" with a full mailbox: soft."""
    raw = text_bounce(
        "MAILER-DAEMON@yahoo.com", "Failure Notice",
        "Sorry, we were unable to deliver your message to the following address.\r\n\r\n"
        "<rcpt@example.net>:\r\nRemote host said: 552 1 Requested mail action aborted, "
        "mailbox full [RCPT_TO]\r\n")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "mailboxfull", False)


def test_yandex_disabled_account_is_soft() -> None:
    """Yandex: the mailbox exists but is disabled: suspend (soft)."""
    raw = text_bounce(
        "mailer-daemon@yandex.ru", "Undelivered Mail Returned to Sender",
        "This is the mail system at host forward1.mail.yandex.net.\r\n\r\n"
        "<rcpt@yandex.ru>: host mx.yandex.ru[77.88.21.249] said: 550 5.2.1 Mailbox "
        "rcpt@yandex.ru is disabled (in reply to RCPT TO command)\r\n",
        original_to="rcpt@yandex.ru")
    assert verdict(raw) == ("bounce", ("rcpt@yandex.ru",), "suspend", False)


def test_courier_transcript_rcpt_refusal() -> None:
    """Courier's ">>> RCPT TO:<a@b>" / "<<< 550 5.1.1 ..." transcript: hard."""
    raw = text_bounce(
        "Courier mail server at mx.example.org <@>", "NOTICE: mail delivery status.",
        "This is a delivery status notification from mx.example.org,\r\n"
        "running the Courier mail server, version 0.76.\r\n\r\n"
        "The original message was received on Thu, 1 Jan 2015 00:00:00 +0900\r\n\r\n"
        "                        UNDELIVERABLE MAIL\r\n\r\n"
        "Your message to the following recipients cannot be delivered:\r\n\r\n"
        "<rcpt@example.net>:\r\n    mx.example.net [192.0.2.1]:\r\n"
        ">>> RCPT TO:<rcpt@example.net>\r\n<<< 550 5.1.1 <rcpt@example.net>... User Unknown\r\n")
    assert verdict(raw) == ("bounce", ("rcpt@example.net",), "userunknown", True)


def test_aol_screen_names_take_the_reporting_domain() -> None:
    """AOL lists failed recipients by bare screen name: the format says the domain is AOL's."""
    raw = text_bounce(
        '"Mail Delivery Subsystem" <MAILER-DAEMON@aol.com>', "Mail Delivery Problem",
        "Your mail to the following recipients could not be delivered because they are not "
        "accepting mail from shop@shop.example:\r\n\trcptname\r\n")
    assert verdict(raw)[:2] == ("bounce", ("rcptname@aol.com",))
