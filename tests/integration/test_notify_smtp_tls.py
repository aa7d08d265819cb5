"""notify's SMTP client against a real SMTP server over real sockets: implicit TLS, STARTTLS, AUTH,
certificates that do not verify, and the password kept out of every text.

The server is the sandbox capture (aiosmtpd) with a certificate from a private CA made by trustme;
SMTP_CA_FILE is that CA's PEM. No broker or database: these are the mailer's own promises. What the
service then does with each fate is in test_notify_smtp_fates.py.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope

from esim_common.settings import load_settings
from esim_sandbox.smtp_capture import TlsMode
from notify.compose import build_message
from notify.mailer import CERTIFICATE_REASON, EmailTransientError, SmtpConfigError, SmtpMailer, SmtpRelayError
from notify.main import create_app
from notify.rendering import RenderedEmail
from tests.fixtures.smtp_capture import SmtpCertificates, StartSmtpCapture

USERNAME = "shop@example.com"


def an_email() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "shop@example.com"
    message["To"] = "ada@example.com"
    message["Subject"] = "Your eSIM is ready"
    message.set_content("Scan the QR code.")
    return message


def mailer(port: int, **options) -> SmtpMailer:
    settings = {
        "host": "127.0.0.1",
        "port": port,
        "username": None,
        "password": None,
        "starttls": False,
        "timeout_seconds": 5.0,
    }
    return SmtpMailer(**(settings | options))


def canary_password() -> str:
    return f"canary-{uuid.uuid4().hex}"


def leaked(secret: str, texts: list[str]) -> list[str]:
    """The texts that contain `secret` as it is or base64-encoded (how AUTH carries it)."""
    forms = (secret, base64.b64encode(secret.encode()).decode())
    return [text for text in texts if any(form in text for form in forms)]


def log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured record in full: message, arguments, `extra` fields and traceback."""
    formatter = logging.Formatter()
    texts = []
    for record in caplog.records:
        texts.append(repr(vars(record)) + record.getMessage())
        if record.exc_info:
            texts.append(formatter.formatException(record.exc_info))
    return texts


def exception_texts(exc: BaseException) -> list[str]:
    """`exc` and everything chained behind it, as str and repr."""
    texts = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return texts


@asynccontextmanager
async def dropping_server() -> AsyncIterator[int]:
    """A TCP server that accepts and closes at once: a TLS handshake that breaks off."""

    async def drop(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- encryption


async def test_implicit_tls_delivers_over_an_encrypted_session(
    start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates
):
    capture = start_smtp_capture(tls=TlsMode.IMPLICIT, tls_context=smtp_certificates.server_context)

    await mailer(capture.port, use_tls=True, ca_file=str(smtp_certificates.ca_file)).send(an_email())

    assert [m["Subject"] for m in capture.messages] == ["Your eSIM is ready"]
    assert capture.deliveries[0].tls


async def test_the_tls_context_is_built_once_not_per_message(
    start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates, monkeypatch
):
    """Loading a CA store parses a file of certificates: once at startup, not for every email."""
    capture = start_smtp_capture(tls=TlsMode.IMPLICIT, tls_context=smtp_certificates.server_context)
    built = []
    create_default_context = ssl.create_default_context
    monkeypatch.setattr(
        ssl, "create_default_context", lambda *a, **kw: built.append(1) or create_default_context(*a, **kw)
    )
    smtp = mailer(capture.port, use_tls=True, ca_file=str(smtp_certificates.ca_file))

    for _ in range(3):
        await smtp.send(an_email())

    assert len(capture.messages) == 3
    assert len(built) == 1


async def test_starttls_delivers_over_an_encrypted_session(
    start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates
):
    capture = start_smtp_capture(tls=TlsMode.STARTTLS, tls_context=smtp_certificates.server_context)

    await mailer(capture.port, starttls=True, ca_file=str(smtp_certificates.ca_file)).send(an_email())

    assert len(capture.messages) == 1
    assert capture.deliveries[0].tls


async def test_starttls_is_negotiated_even_where_the_server_would_accept_plaintext(
    start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates
):
    """The server offers STARTTLS but takes mail without it: only the session record tells whether the
    mailer really upgraded, so a mailer that silently sent in clear fails here."""
    capture = start_smtp_capture(
        tls=TlsMode.STARTTLS, tls_context=smtp_certificates.server_context, require_starttls=False
    )

    await mailer(capture.port, starttls=True, ca_file=str(smtp_certificates.ca_file)).send(an_email())

    [delivery] = capture.deliveries
    assert delivery.tls_version is not None and delivery.tls_version.startswith("TLSv1.")


@pytest.mark.parametrize("mode", [TlsMode.IMPLICIT, TlsMode.STARTTLS])
async def test_a_certificate_from_an_untrusted_ca_is_a_relay_error(
    mode: TlsMode, start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates
):
    """No SMTP_CA_FILE: the system store does not know the private CA. Only an operator can fix
    that, for every email at once: a relay error (notify waits and raises one relay alert)."""
    capture = start_smtp_capture(tls=mode, tls_context=smtp_certificates.server_context)
    options = {"use_tls": True} if mode is TlsMode.IMPLICIT else {"starttls": True}

    with pytest.raises(SmtpRelayError) as rejected:
        await mailer(capture.port, **options).send(an_email())

    assert rejected.value.reason == CERTIFICATE_REASON
    assert "certificate" in str(rejected.value)
    assert capture.messages == []


async def test_a_certificate_for_another_host_name_is_a_relay_error(
    start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates
):
    """The CA is trusted, but the certificate names another host than the one we dial."""
    elsewhere = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    smtp_certificates.ca.issue_cert("smtp.example.com").configure_cert(elsewhere)
    capture = start_smtp_capture(tls=TlsMode.IMPLICIT, tls_context=elsewhere)

    with pytest.raises(SmtpRelayError) as rejected:
        await mailer(capture.port, use_tls=True, ca_file=str(smtp_certificates.ca_file)).send(an_email())

    assert rejected.value.reason == CERTIFICATE_REASON
    assert capture.messages == []


async def test_a_tls_handshake_that_breaks_off_is_retried():
    async with dropping_server() as port:
        with pytest.raises(EmailTransientError):
            await mailer(port, use_tls=True).send(an_email())


async def test_starttls_required_but_not_offered_is_a_relay_error(
    smtp_capture, smtp_certificates: SmtpCertificates
):
    """A plain server (or someone stripping the offer): never fall back to sending in clear."""
    with pytest.raises(SmtpRelayError):
        await mailer(smtp_capture.port, starttls=True, ca_file=str(smtp_certificates.ca_file)).send(
            an_email()
        )

    assert smtp_capture.messages == []


# --------------------------------------------------------------------------- AUTH


def test_notify_refuses_to_start_with_credentials_for_a_remote_server_in_clear():
    settings = load_settings(smtp_host="smtp.example.com", smtp_username=USERNAME, smtp_password="s3cret-pw")

    with pytest.raises(SmtpConfigError, match="SMTP_STARTTLS"):
        create_app(settings)


async def test_the_right_password_logs_in_over_tls_and_delivers(
    start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates
):
    password = canary_password()
    capture = start_smtp_capture(
        tls=TlsMode.STARTTLS, tls_context=smtp_certificates.server_context, credentials=(USERNAME, password)
    )
    smtp = mailer(
        capture.port,
        starttls=True,
        ca_file=str(smtp_certificates.ca_file),
        username=USERNAME,
        password=password,
    )

    await smtp.send(an_email())

    assert [(a.username, a.accepted, a.tls) for a in capture.logins] == [(USERNAME, True, True)]
    assert capture.deliveries[0].login == USERNAME
    assert len(capture.messages) == 1


async def test_a_wrong_password_is_a_535_relay_error_and_the_password_is_in_no_text(
    start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates, caplog
):
    caplog.set_level(logging.DEBUG)
    wrong = canary_password()
    capture = start_smtp_capture(
        tls=TlsMode.IMPLICIT,
        tls_context=smtp_certificates.server_context,
        credentials=(USERNAME, canary_password()),
    )
    smtp = mailer(
        capture.port, use_tls=True, ca_file=str(smtp_certificates.ca_file), username=USERNAME, password=wrong
    )

    with pytest.raises(SmtpRelayError) as rejected:
        await smtp.send(an_email())

    assert rejected.value.code == 535
    assert rejected.value.reason == "smtp_login_refused_535"
    assert capture.logins and not any(attempt.accepted for attempt in capture.logins)
    assert capture.messages == []
    texts = [*exception_texts(rejected.value), repr(smtp), *log_texts(caplog)]
    assert leaked(wrong, texts) == []


async def test_auth_the_server_only_offers_over_tls_is_not_attempted_in_clear(
    start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates
):
    """Loopback may take credentials without TLS; a server that refuses AUTH in clear is a
    configuration to fix (turn TLS on): a relay error, not this recipient's fault."""
    capture = start_smtp_capture(
        tls=TlsMode.STARTTLS,
        tls_context=smtp_certificates.server_context,
        require_starttls=False,
        credentials=(USERNAME, "right-password"),
    )

    with pytest.raises(SmtpRelayError):
        await mailer(capture.port, username=USERNAME, password="right-password").send(an_email())

    assert capture.logins == []


# --------------------------------------------------------------------------- SMTPUTF8


class EnvelopeRecorder:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server, session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


@asynccontextmanager
async def plain_smtp(*, smtputf8: bool) -> AsyncIterator[tuple[int, EnvelopeRecorder]]:
    recorder = EnvelopeRecorder()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(recorder, hostname="127.0.0.1", port=port, enable_SMTPUTF8=smtputf8)
    controller.start()
    try:
        yield port, recorder
    finally:
        controller.stop()


def email_to(address: str) -> EmailMessage:
    return build_message(
        RenderedEmail("Your eSIM is ready", "Scan the QR code.", None),
        sender="shop@example.com",
        to_address=address,
        to_name="José",
        message_id="<utf8-test@example.com>",
    )


async def test_a_non_ascii_address_travels_with_smtputf8_and_an_ascii_one_without():
    async with plain_smtp(smtputf8=True) as (port, server):
        await mailer(port).send(email_to("jose@bücher.example"))
        await mailer(port).send(email_to("jose@example.com"))

    utf8, ascii_only = server.envelopes
    assert utf8.rcpt_tos == ["jose@bücher.example"] and "SMTPUTF8" in utf8.mail_options
    assert "jose@bücher.example" in utf8.original_content.decode("utf-8")
    assert ascii_only.rcpt_tos == ["jose@example.com"] and "SMTPUTF8" not in ascii_only.mail_options


async def test_a_non_ascii_address_to_a_server_without_smtputf8_is_a_relay_error_as_before():
    async with plain_smtp(smtputf8=False) as (port, server):
        with pytest.raises(SmtpRelayError) as refused:
            await mailer(port).send(email_to("jose@bücher.example"))

    assert refused.value.reason == "smtp_relay_unsupported" and server.envelopes == []
