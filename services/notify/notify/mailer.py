"""Sending email over SMTP (aiosmtplib): the one boundary where SMTP failures get their fate.

EmailError
 ├─ EmailTransientError (TransientError)  connection refused or lost, timeouts, 4xx replies:
 │                                        the retry tiers send it again
 └─ EmailRejected (PermanentError)        a 5xx reply (no such mailbox, relay denied, bad
                                          credentials) or a missing server feature: retrying
                                          the same message cannot help; the failure path runs
"""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib

from esim_common.errors import PermanentError, TransientError
from esim_common.metrics import observe_provider_call
from esim_common.settings import Settings


class EmailError(Exception):
    """An email was not accepted by the SMTP server."""


class EmailTransientError(EmailError, TransientError):
    pass


class EmailRejected(EmailError, PermanentError):
    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def reason(self) -> str:  # type: ignore[override]
        return f"email_rejected_{self.code}" if self.code else "email_rejected"


def _classify(exc: Exception) -> EmailError:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [refused.code for refused in exc.recipients]
        permanent = [code for code in codes if code >= 500]
        if permanent:
            return EmailRejected(f"recipient refused ({permanent[0]})", code=permanent[0])
        return EmailTransientError(f"recipient deferred ({', '.join(map(str, codes))})")
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 500:
        return EmailRejected(f"SMTP {exc.code}: {exc.message}", code=exc.code)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return EmailTransientError(f"SMTP {exc.code}: {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return EmailRejected(f"SMTP server does not support what we need: {exc}")
    return EmailTransientError(f"SMTP unavailable: {type(exc).__name__}: {exc}")


class SmtpMailer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        starttls: bool,
        timeout_seconds: float,
    ) -> None:
        self._host = host
        self._port = port
        self._username = username or None
        self._password = password or None
        self._starttls = starttls
        self._timeout_seconds = timeout_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpMailer:
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            starttls=settings.smtp_starttls,
            timeout_seconds=settings.smtp_timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"SmtpMailer(host={self._host!r}, port={self._port!r})"

    async def send(self, message: EmailMessage) -> None:
        """Returns once the server accepted the message; raises EmailError otherwise."""
        with observe_provider_call("smtp", "send"):
            try:
                await aiosmtplib.send(
                    message,
                    hostname=self._host,
                    port=self._port,
                    username=self._username,
                    password=self._password,
                    # False, not None: None upgrades whenever the server offers STARTTLS, which
                    # then fails against a server without a certificate we trust.
                    start_tls=self._starttls,
                    timeout=self._timeout_seconds,
                )
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise _classify(exc) from exc
