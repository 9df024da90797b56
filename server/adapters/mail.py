"""Sending mail: SMTP through aiosmtplib when SMTP_URL is set, else a log line (development).

Callers never send directly: mail is queued in the `mail_outbox` table in the transaction that
decides to send it, and a background task hands it to one of these senders (server/services/accounts.py).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from email.message import EmailMessage
from typing import Protocol

import aiosmtplib
import structlog

log = structlog.get_logger(__name__)

SMTP_TIMEOUT = 30.0


class MailError(Exception):
    """The mail was not accepted; the outbox retries it later."""


@dataclasses.dataclass(frozen=True, slots=True)
class Mail:
    """One plain-text message."""

    recipient: str
    subject: str
    body: str


class MailSender(Protocol):
    """Anything that delivers a Mail or raises MailError."""

    async def send(self, mail: Mail) -> None:
        """Deliver the mail; MailError when it was not accepted."""


class LogSender:
    """Development: mail is a log line. It shows the body (with any link in it), since in dev that is
    the only way to follow the link; never run production without SMTP_URL."""

    def __init__(self, sender: str) -> None:
        self._sender = sender

    async def send(self, mail: Mail) -> None:
        """Log the recipient, subject and body."""
        log.warning("mail_sent_dev", recipient=mail.recipient, subject=mail.subject, body=mail.body,
                    note="SMTP_URL is unset: this mail was only logged")


class SmtpSender:
    """SMTP (STARTTLS when the server offers it) or SMTPS, with the URL's credentials."""

    def __init__(self, url: str, sender: str, timeout: float = SMTP_TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        self._implicit_tls = parts.scheme == "smtps"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (465 if self._implicit_tls else 587)
        self._username = urllib.parse.unquote(parts.username) if parts.username else None
        self._password = urllib.parse.unquote(parts.password) if parts.password else None
        self._sender = sender
        self._timeout = timeout

    def __repr__(self) -> str:  # never the password
        return f"SmtpSender({self._host}:{self._port})"

    async def send(self, mail: Mail) -> None:
        """Hand the message to the SMTP server."""
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = self._sender, mail.recipient, mail.subject
        message.set_content(mail.body)
        try:
            await aiosmtplib.send(message, hostname=self._host, port=self._port, username=self._username,
                                  password=self._password, use_tls=self._implicit_tls,
                                  start_tls=False if self._implicit_tls else None, timeout=self._timeout)
        except (aiosmtplib.SMTPException, OSError) as exc:
            # The class and the server's words, never the message (it may hold a link with a token).
            raise MailError(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        log.info("mail_sent", recipient=mail.recipient, subject=mail.subject, host=self._host)


def create_sender(smtp_url: str | None, sender: str) -> MailSender:
    """SMTP when configured, else the development log sender."""
    return SmtpSender(smtp_url, sender) if smtp_url else LogSender(sender)
