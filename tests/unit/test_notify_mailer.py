"""SMTP failures get their fate at one boundary: a refused recipient (5xx to RCPT, 550/552/553/554 to
DATA) is permanent; a relay refusing everyone (login, certificate, STARTTLS/AUTH missing, 5xx to EHLO or
MAIL FROM) is a relay error that waits for an operator; everything else is retried. Unsafe SMTP
settings are refused when the mailer is built, before notify consumes anything."""

from __future__ import annotations

import ssl

import aiosmtplib
import pytest

from esim_common.errors import PermanentError, TransientError
from esim_common.settings import Settings
from notify.mailer import (
    CERTIFICATE_REASON,
    EmailRejected,
    EmailTransientError,
    SmtpConfigError,
    SmtpMailer,
    SmtpRelayError,
    _classify,
)


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
        (aiosmtplib.SMTPDataError(550, "no such user"), "email_rejected_550"),
        (aiosmtplib.SMTPDataError(552, "mailbox full"), "email_rejected_552"),
        (aiosmtplib.SMTPDataError(553, "name not allowed"), "email_rejected_553"),
    ],
)
def test_a_refused_recipient_is_permanent_with_its_code_as_the_reason(exc, reason):
    classified = _classify(exc)
    assert isinstance(classified, EmailRejected) and isinstance(classified, PermanentError)
    assert classified.reason == reason


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), "smtp_login_refused_535"),
        (
            aiosmtplib.SMTPSenderRefused(530, "authentication required", "shop@example.com"),
            "smtp_login_refused_530",
        ),
        (
            aiosmtplib.SMTPSenderRefused(553, "sender not allowed", "shop@example.com"),
            "smtp_relay_refused_553",
        ),
        (aiosmtplib.SMTPHeloError(501, "bad EHLO"), "smtp_relay_refused_501"),
        (aiosmtplib.SMTPConnectResponseError(554, "no service"), "smtp_relay_refused_554"),
        (aiosmtplib.SMTPDataError(503, "bad sequence"), "smtp_relay_refused_503"),
        (aiosmtplib.SMTPNotSupported("STARTTLS"), "smtp_relay_unsupported"),
    ],
)
def test_a_relay_refusing_everyone_is_a_relay_error_that_waits(exc, reason):
    classified = _classify(exc)
    assert isinstance(classified, SmtpRelayError) and isinstance(classified, TransientError)
    assert not isinstance(classified, PermanentError)
    assert classified.reason == reason


# --------------------------------------------------------------------------- TLS, AUTH and secrets


def certificate_error(message: str = "certificate verify failed") -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, message)
    error.verify_message = "unable to get local issuer certificate"
    return error


def wrapped(cause: BaseException, exc: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    "exc",
    [
        certificate_error(),  # STARTTLS: aiosmtplib lets the ssl error through as it is
        # implicit TLS: aiosmtplib wraps it, as it does a refused connection
        wrapped(
            certificate_error(), aiosmtplib.SMTPConnectError("Error connecting: certificate verify failed")
        ),
    ],
)
def test_a_certificate_that_fails_verification_is_a_relay_error(exc):
    classified = _classify(exc)
    assert isinstance(classified, SmtpRelayError)
    assert classified.reason == CERTIFICATE_REASON
    assert "unable to get local issuer certificate" in str(classified)


@pytest.mark.parametrize(
    "exc",
    [
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        wrapped(ConnectionResetError(104, "reset"), aiosmtplib.SMTPConnectError("Error connecting: reset")),
        aiosmtplib.SMTPServerDisconnected("Connection reset while upgrading transport"),
        aiosmtplib.SMTPTimeoutError("Timed out while upgrading transport"),
    ],
)
def test_a_tls_handshake_that_breaks_off_is_transient(exc):
    assert isinstance(_classify(exc), EmailTransientError)


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPException("SMTP STARTTLS extension not supported by server."),
        aiosmtplib.SMTPException("The SMTP AUTH extension is not supported by this server."),
        aiosmtplib.SMTPException("No suitable authentication method found."),
    ],
)
def test_a_server_without_starttls_or_auth_is_a_relay_error(exc):
    assert isinstance(_classify(exc), SmtpRelayError)


def test_a_temporary_auth_failure_is_transient():
    assert isinstance(
        _classify(aiosmtplib.SMTPAuthenticationError(454, "4.7.0 try later")), EmailTransientError
    )


def test_the_password_is_scrubbed_from_what_the_server_said():
    password = "hunter2-canary-password"
    exc = aiosmtplib.SMTPAuthenticationError(535, f"bad credentials for {password}")

    classified = _classify(exc, secrets=(password,))

    assert isinstance(classified, SmtpRelayError) and classified.code == 535
    assert password not in str(classified) and password not in repr(classified)


def mailer(**options) -> SmtpMailer:
    settings = {
        "host": "smtp.example.com",
        "port": 587,
        "username": None,
        "password": None,
        "starttls": False,
        "timeout_seconds": 5.0,
    }
    return SmtpMailer(**(settings | options))


def test_a_password_without_a_user_name_is_refused_at_startup():
    with pytest.raises(SmtpConfigError, match="SMTP_USERNAME") as refused:
        mailer(password="s3cret-canary", starttls=True)
    assert "s3cret-canary" not in str(refused.value)


def test_credentials_are_refused_over_a_plaintext_connection_to_another_host():
    with pytest.raises(SmtpConfigError, match="SMTP_STARTTLS") as refused:
        mailer(username="shop", password="s3cret-canary")

    assert "s3cret-canary" not in str(refused.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_credentials_over_plaintext_are_allowed_to_a_loopback_relay(host):
    mailer(host=host, username="shop", password="s3cret-canary")


@pytest.mark.parametrize("host", ["smtp.example.com", "10.0.0.5", "localhost.example.com"])
@pytest.mark.parametrize("mode", [{"starttls": True}, {"use_tls": True}])
def test_credentials_over_tls_are_allowed_to_any_host(host, mode):
    mailer(host=host, username="shop", password="s3cret-canary", **mode)


def test_settings_with_credentials_in_clear_build_no_mailer():
    settings = Settings(smtp_host="smtp.example.com", smtp_username="shop", smtp_password="s3cret-canary")

    with pytest.raises(SmtpConfigError):
        SmtpMailer.from_settings(settings)


def test_implicit_tls_and_starttls_together_are_refused():
    with pytest.raises(SmtpConfigError):
        mailer(use_tls=True, starttls=True)


def test_a_ca_file_without_a_tls_mode_is_refused():
    with pytest.raises(SmtpConfigError, match="SMTP_CA_FILE"):
        mailer(ca_file="/etc/ssl/certs/ca-certificates.crt")


def test_an_unreadable_ca_file_is_refused_at_startup(tmp_path):
    with pytest.raises(SmtpConfigError, match="SMTP_CA_FILE"):
        mailer(starttls=True, ca_file=str(tmp_path / "missing.pem"))


def test_the_tls_context_verifies_certificates_and_host_names():
    context = mailer(starttls=True)._tls_context

    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert mailer()._tls_context is None  # plain: no TLS at all


def test_the_password_is_not_in_the_mailers_repr_or_attributes():
    smtp = mailer(username="shop", password="s3cret-canary", starttls=True)

    assert "s3cret-canary" not in repr(smtp)
    assert "s3cret-canary" not in repr(vars(smtp))
