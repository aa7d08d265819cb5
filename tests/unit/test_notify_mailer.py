"""SMTP failures get their fate at one boundary: 5xx is permanent, everything else is retried."""

from __future__ import annotations

import aiosmtplib
import pytest

from esim_common.errors import PermanentError, TransientError
from notify.mailer import EmailRejected, _classify


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPConnectError("connection refused"),
        aiosmtplib.SMTPServerDisconnected("gone"),
        aiosmtplib.SMTPReadTimeoutError("slow"),
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
        aiosmtplib.SMTPResponseException(421, "try later"),
        aiosmtplib.SMTPSenderRefused(451, "greylisted", "shop@example.com"),
        aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(452, "full", "a@example.com")]),
    ],
)
def test_connection_problems_timeouts_and_4xx_replies_are_transient(exc):
    assert isinstance(_classify(exc), TransientError)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(550, "no", "a@example.com")]),
            "email_rejected_550",
        ),
        (aiosmtplib.SMTPDataError(554, "spam"), "email_rejected_554"),
        (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), "email_rejected_535"),
        (aiosmtplib.SMTPNotSupported("STARTTLS"), "email_rejected"),
    ],
)
def test_a_5xx_rejection_is_permanent_with_its_code_as_the_reason(exc, reason):
    classified = _classify(exc)
    assert isinstance(classified, EmailRejected) and isinstance(classified, PermanentError)
    assert classified.reason == reason
