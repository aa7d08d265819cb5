"""Sending email over SMTP (aiosmtplib): the one boundary where SMTP failures get their fate.

EmailError
 ├─ EmailTransientError (TransientError)  connection refused or lost, timeouts, a TLS handshake that
 │   │                                    broke off, 4xx replies: the same email is tried again later
 │   └─ SmtpRelayError                    the relay refuses everyone, not this recipient: login refused
 │                                        (535, 530), a certificate that fails verification, STARTTLS
 │                                        or AUTH not offered, 5xx to EHLO, MAIL FROM or the greeting.
 │                                        An operator must fix the relay (or its settings); the emails
 │                                        wait for that rather than fail order by order
 └─ EmailRejected (PermanentError)        this recipient or message is refused: 5xx to RCPT TO, or
                                          550/552/553/554 to DATA. Retrying the same message cannot
                                          help; the failure path runs and an operator is alerted

Connection security is one of three modes: implicit TLS (`SMTP_TLS`, port 465), STARTTLS
(`SMTP_STARTTLS`, port 587; the upgrade is required, never skipped), or neither (the sandbox capture on
loopback). Certificates are always verified, against SMTP_CA_FILE when set and the system store
otherwise. Credentials are never sent over an unencrypted connection except to a loopback host:
`SmtpMailer` refuses to be built that way, so notify refuses to start rather than leak the password or
fail every order one by one. The password is kept out of repr, logs and exception texts.
"""

from __future__ import annotations

import ipaddress
import ssl
from email.message import EmailMessage

import aiosmtplib
from pydantic import SecretStr

from esim_common.errors import PermanentError, TransientError
from esim_common.logging import redact
from esim_common.metrics import observe_provider_call
from esim_common.settings import Settings

# The order's failure reason when the server's certificate does not verify (untrusted CA, expired,
# wrong host name): only an operator can fix that (SMTP_CA_FILE, SMTP_HOST, or the provider's cert).
CERTIFICATE_REASON = "smtp_certificate_invalid"


class EmailError(Exception):
    """An email was not accepted by the SMTP server."""


class EmailTransientError(EmailError, TransientError):
    #: short code for the order's failure reason when notify gives up waiting.
    reason: str = "smtp_unavailable"


class SmtpRelayError(EmailTransientError):
    """The relay itself is failing or misconfigured: every email would fail the same way until an
    operator fixes it, so emails wait (they are not the recipients' fault)."""

    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or (f"smtp_relay_refused_{code}" if code else "smtp_relay_refused")


class EmailRejected(EmailError, PermanentError):
    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self._reason = reason

    @property
    def reason(self) -> str:  # type: ignore[override]
        if self._reason:
            return self._reason
        return f"email_rejected_{self.code}" if self.code else "email_rejected"


# DATA replies that refuse this message or mailbox (RFC 5321: mailbox unavailable, storage exceeded,
# name not allowed, transaction failed - the usual spam/policy verdict); other 5xx to DATA are relay faults.
RECIPIENT_DATA_CODES = frozenset({550, 552, 553, 554})


class SmtpConfigError(ValueError):
    """The SMTP settings are unsafe or unusable; raised when the mailer is built (notify's startup)."""


def _certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind `exc`, if any. aiosmtplib raises it bare during
    STARTTLS but wraps it in SMTPConnectError for implicit TLS, so the cause chain is searched."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:  # a chain can loop back on itself
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        chain.append(current)
        current = current.__cause__ or current.__context__
    return None


def _classify(exc: BaseException, *, secrets: tuple[str, ...] = ()) -> EmailError:
    """The fate of one aiosmtplib/socket error; `secrets` are scrubbed from the text we keep."""

    def text(message: str) -> str:
        return redact(message, secrets)

    certificate = _certificate_failure(exc)
    if certificate is not None:
        detail = certificate.verify_message or str(certificate)
        return SmtpRelayError(
            text(f"SMTP server certificate failed verification: {detail}"), reason=CERTIFICATE_REASON
        )
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [refused.code for refused in exc.recipients]
        permanent = [code for code in codes if code >= 500]
        if permanent:
            return EmailRejected(f"recipient refused ({permanent[0]})", code=permanent[0])
        return EmailTransientError(f"recipient deferred ({', '.join(map(str, codes))})")
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code < 500:
        return EmailTransientError(text(f"SMTP {exc.code}: {exc.message}"))
    if isinstance(exc, aiosmtplib.SMTPDataError) and exc.code in RECIPIENT_DATA_CODES:
        return EmailRejected(text(f"SMTP {exc.code}: {exc.message}"), code=exc.code)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError) or (
        isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 530
    ):
        return SmtpRelayError(
            text(f"SMTP login refused ({exc.code}: {exc.message}); check SMTP_USERNAME and SMTP_PASSWORD"),
            code=exc.code,
            reason=f"smtp_login_refused_{exc.code}",
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        # 5xx to the greeting, EHLO, MAIL FROM or an odd DATA code: the relay refuses our account or
        # sender, whoever the recipient is.
        return SmtpRelayError(text(f"SMTP {exc.code}: {exc.message}"), code=exc.code)
    if isinstance(
        exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError | aiosmtplib.SMTPTimeoutError
    ):
        return EmailTransientError(text(f"SMTP unavailable: {type(exc).__name__}: {exc}"))
    if isinstance(exc, aiosmtplib.SMTPException):
        # SMTPNotSupported and aiosmtplib's bare SMTPException: the server lacks what we require
        # (STARTTLS not offered, AUTH not offered, no usable AUTH mechanism).
        return SmtpRelayError(
            text(f"SMTP server does not support what we need: {exc}"), reason="smtp_relay_unsupported"
        )
    # Sockets, timeouts and TLS handshakes that broke off (ssl.SSLError other than verification).
    return EmailTransientError(text(f"SMTP unavailable: {type(exc).__name__}: {exc}"))


def is_loopback(host: str) -> bool:
    """Only a literal loopback address or `localhost`: a name that merely resolves to one today is
    not trusted with plaintext credentials (DNS can change under us)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name: against `ca_file` alone
    when given (a private relay's CA), the system store otherwise."""
    try:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise SmtpConfigError(
            f"SMTP_CA_FILE={ca_file!r} is not a readable PEM file of CA certificates: {exc}"
        ) from exc


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
        use_tls: bool = False,
        ca_file: str | None = None,
    ) -> None:
        if use_tls and starttls:
            raise SmtpConfigError(
                "SMTP_TLS (implicit TLS, port 465) and SMTP_STARTTLS (port 587) exclude each other"
            )
        if password and not username:
            raise SmtpConfigError(
                "SMTP_PASSWORD is set but SMTP_USERNAME is not: without a user name no login is attempted "
                "and the relay would refuse every email. Set SMTP_USERNAME too (or unset SMTP_PASSWORD)."
            )
        encrypted = use_tls or starttls
        if ca_file and not encrypted:
            raise SmtpConfigError(
                "SMTP_CA_FILE is set but neither SMTP_TLS nor SMTP_STARTTLS is: the connection would not "
                "be encrypted at all. Set the TLS mode your SMTP server speaks."
            )
        if (username or password) and not encrypted and not is_loopback(host):
            raise SmtpConfigError(
                f"SMTP_USERNAME/SMTP_PASSWORD are set but the connection to {host} is not encrypted: the "
                "password would cross the network in clear. Set SMTP_STARTTLS=true (port 587) or "
                "SMTP_TLS=true (port 465); only a loopback SMTP_HOST may take credentials without TLS."
            )
        self._host = host
        self._port = port
        self._username = username or None
        self._password = SecretStr(password) if password else None
        self._use_tls = use_tls
        self._starttls = starttls
        self._timeout_seconds = timeout_seconds
        # Built once: loading the CA store per message would cost a file read and parse each time.
        self._tls_context = tls_context(ca_file) if encrypted else None

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpMailer:
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            starttls=settings.smtp_starttls,
            use_tls=settings.smtp_tls,
            ca_file=settings.smtp_ca_file,
            timeout_seconds=settings.smtp_timeout_seconds,
        )

    @property
    def security(self) -> str:
        return "tls" if self._use_tls else "starttls" if self._starttls else "plain"

    def __repr__(self) -> str:
        return f"SmtpMailer(host={self._host!r}, port={self._port!r}, security={self.security!r})"

    async def send(self, message: EmailMessage) -> None:
        """Returns once the server accepted the message; raises EmailError otherwise."""
        password = self._password.get_secret_value() if self._password else None
        with observe_provider_call("smtp", "send"):
            try:
                await aiosmtplib.send(
                    message,
                    hostname=self._host,
                    port=self._port,
                    username=self._username,
                    password=password,
                    use_tls=self._use_tls,
                    # A bool, never None: None upgrades only when the server offers STARTTLS, so a
                    # man in the middle who strips the offer would get the password in clear.
                    start_tls=self._starttls,
                    tls_context=self._tls_context,
                    timeout=self._timeout_seconds,
                )
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise _classify(exc, secrets=(password,) if password else ()) from exc
