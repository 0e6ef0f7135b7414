"""Auto-replies (RFC 3834 and the many non-standard ways) and subscribe/unsubscribe requests.

Inputs: the decoded top-level headers, subject and body text. Outputs: `autoreply_reason`
("vacation", "challenge", "autoreply") or None; `request_kind` ("unsubscribe" / "subscribe")
or None.
"""

from __future__ import annotations

import re

from connectd.core.classify.parse import Parsed

# Subjects of out-of-office and other automatic answers, in the languages customers write.
_SUBJECT = re.compile(
    r"out of (?:the )?office|\booo\b|auto(?:matic|mated)?[- ]?(?:reply|response|antwort|answer"
    r"|respuesta|réponse|reponse|risposta|resposta|svar|vastaus|odpowiedź|odpověď)"
    r"|autoreply|autoresponder|vacation|on holiday|on leave|away from (?:the|my) (?:office|desk)"
    r"|abwesen|außer haus|ausser haus|nicht im büro|urlaub|abwesenheit"
    r"|absence|absent|en congé|en vacances|hors du bureau|réponse automatique"
    r"|fuera de la oficina|ausente|ausencia|respuesta automática|vacaciones"
    r"|fuori ufficio|assente|risposta automatica|in ferie"
    r"|fora do escritório|ausente do escritório|resposta automática|férias"
    r"|afwezig|niet aanwezig|automatisch antwoord|buiten kantoor"
    r"|frånvarande|automatiskt svar|fraværende|automatisk svar|poissa|lomalla"
    r"|nieobecn|automatyczna odpowiedź|mimo kancelář|nepřítomn"
    r"|不在|自動応答|自動返信|休暇|自动回复|休假|외출|부재|자동 응답"
    r"|отсутств|автоответ|в отпуске|автоматический ответ"
    r"|thank you for (?:your|contacting)|we have received your|ticket (?:received|#)"
    r"|request received|your message has been received".lower())
_BODY = re.compile(
    r"(?:i am|i'm|i will be|i'll be) (?:currently )?(?:out of (?:the )?office|away|on (?:vacation"
    r"|holiday|leave|annual leave|parental leave|sick leave)|travell?ing|not in the office"
    r"|unavailable|absent)|out of (?:the )?office (?:until|from|till)|limited access to (?:my )?e-?mail"
    r"|bin (?:ich )?(?:bis|vom|derzeit|zur zeit|momentan)?.{0,40}(?:abwesend|nicht im büro|im urlaub)"
    r"|ich bin .{0,40}(?:abwesend|nicht erreichbar|im urlaub)|keinen zugriff auf (?:meine )?e-?mails"
    r"|je suis (?:actuellement )?(?:absent|en congé|en vacances|hors du bureau)"
    r"|estoy (?:fuera|de vacaciones|ausente)|sono (?:fuori|assente|in ferie)"
    r"|estou (?:fora|de férias|ausente)|ik ben (?:afwezig|met vakantie|niet aanwezig)"
    r"|不在にして|休暇を|自動返信|自動応答|我(?:正在)?休假|自动回复"
    r"|this is an automatic(?:ally generated)? (?:reply|response|message)"
    r"|this (?:is an? |)(?:auto-?reply|automated (?:reply|response))"
    r"|will (?:respond|reply|get back to you) (?:to your (?:e-?mail|message) )?(?:as soon as|when|upon)"
    r"|please (?:contact|email|e-mail) .{0,80} (?:in my absence|while i am away|for urgent)"
    r"|back in the office|return(?:ing)? (?:to the office )?on".lower())
_CHALLENGE = re.compile(
    r"verify (?:that )?you are (?:a )?(?:human|real|person)|challenge[- ]response"
    r"|please (?:verify|confirm) (?:your|that you)|(?:spam|junk) (?:protection|filter).{0,80}"
    r"(?:verify|confirm|reply)|held (?:pending|until) .{0,40}(?:verif|confirm)"
    r"|my spam blocker|sender verification|approve (?:your|this) (?:message|email)"
    r"|boxbe|spamarrest|mailblocks|choicemail|sorting your e-?mail".lower())

_UNSUB = re.compile(
    r"^\s*(?:unsubscribe|unsub|remove me|remove|stop|opt[- ]?out|cancel(?: subscription)?"
    r"|abmelden|austragen|désabonner|desabonner|désinscrire|desinscrire|darse de baja|baja"
    r"|cancelar suscripción|disiscrivi|cancella|uitschrijven|afmelden|avregistrera"
    r"|配信停止|退订|取消订阅|отписаться)\b[\s.!]*(?:me\b)?", re.I)
_SUB = re.compile(
    r"^\s*(?:subscribe|sign me up|anmelden|abonnieren|s'abonner|abonner|suscribir"
    r"|suscribirse|iscrivi|aanmelden|inschrijven|購読|订阅|подписаться)\b", re.I)


def autoreply_reason(parsed: Parsed, subject: str, body: str) -> tuple[str, bool] | None:
    """Why the message is an automatic answer ("vacation", "challenge", "autoreply") and
    whether its words say so (True) or only a header does (False: bounces carry the same
    Auto-Submitted header); None when nothing says so."""
    auto = parsed.get("Auto-Submitted").lower()
    precedence = parsed.get("Precedence").lower().strip()
    flagged = (
        auto.startswith("auto-replied") or auto.startswith("auto-generated")
        or any(parsed.get(h) for h in ("X-Autoreply", "X-Autorespond", "X-Autoresponder",
                                       "X-Auto-Response-Suppress-Reply", "X-Vacation",
                                       "X-AutoReply-From", "X-Mail-Autoreply",
                                       "X-Cr-Hashedpuzzle", "X-Challenge"))
        or precedence in ("auto_reply", "auto-reply", "autoreply")
        or parsed.get("X-POST-MessageClass").lower().startswith("9; autoresponder")
        or "autoreply" in parsed.get("X-Mailer").lower()
        or "vacation" in parsed.get("X-Mailer").lower())
    # the patterns are lower case and compiled without re.I: matching lowered text is ~2x faster
    head = body[:3000].lower()
    subject = subject.lower()
    if _CHALLENGE.search(subject) or _CHALLENGE.search(head):
        if flagged or precedence in ("bulk", "junk") or re.search(r"verif|confirm", subject):
            return "challenge", True
    if _SUBJECT.search(subject):
        return "vacation", True
    if _BODY.search(head[:1500]):
        return "vacation", True
    if flagged:
        return "autoreply", False
    return None


def request_kind(subject: str, body: str) -> str | None:
    """"unsubscribe" / "subscribe" when the subject or first body line asks for it, else None."""
    first = ""
    for line in body.splitlines()[:20]:
        if line.strip() and not line.startswith(">"):
            first = line.strip()
            break
    clean_subject = re.sub(r"^\s*(?:(?:re|aw|sv|fw|fwd|wg|tr|vs)\s*:\s*)+", "", subject, flags=re.I)
    for text in (clean_subject, first):
        if len(text) > 80:
            text = text[:80]
        if _UNSUB.match(text):
            return "unsubscribe"
    for text in (clean_subject, first):
        if _SUB.match(text[:80]):
            return "subscribe"
    return None
