"""An SMTP server on loopback that accepts every message and keeps it, for the demo and the tests.

Each message is written to `<directory>/<UTC timestamp>-<n>.eml` and appended to `messages`. The file
is the raw DATA bytes as received, with two headers prepended that record the SMTP envelope (which
the message's own To/Cc/Bcc headers need not match):

    X-Sandbox-Envelope-From: shop@example.com
    X-Sandbox-Envelope-To: customer@example.com, ops@example.com

Prepending keeps one self-contained file per message that any mail client opens.

By default it speaks plain SMTP without AUTH (the sandbox and most tests). For testing a real
provider's setup it can also, optionally:
- speak TLS: `TlsMode.IMPLICIT` (TLS from the first byte, like port 465) or `TlsMode.STARTTLS` (like
  port 587; `require_starttls` refuses mail before the upgrade), with a server `tls_context`;
- require AUTH with one fixed username and password (offered only over TLS, as real servers do; a
  wrong password gets `535`);
- refuse the next N messages with a 4xx/5xx reply of your choice (`refuse_next`).
Every accepted message has a `Delivery` (was the session TLS, who had logged in) in `deliveries`, and
every AUTH attempt a `LoginAttempt` in `logins` (the username only, never the password).

    python -m esim_sandbox.smtp_capture --port 1025 --dir var/mail
    python -m esim_sandbox.smtp_capture --port 1465 --tls implicit --cert-file c.pem --key-file k.pem
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import hmac
import logging
import re
import signal
import ssl
import threading
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from enum import StrEnum
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from esim_common.logging import NOISY_LOGGERS, configure_logging

LOOPBACK = "127.0.0.1"
ENVELOPE_FROM_HEADER = "X-Sandbox-Envelope-From"
ENVELOPE_TO_HEADER = "X-Sandbox-Envelope-To"
# How long `wait_for` polls by default: an email is sent within a second or two of the step before it.
WAIT_TIMEOUT_SECONDS = 10.0

log = logging.getLogger("esim_sandbox.smtp_capture")


class _LoopbackController(Controller):
    """aiosmtpd's Controller, able to listen on port 0: it reads back the port the OS picked before
    making its readiness connection (which would otherwise go to port 0 and fail)."""

    def _trigger_server(self) -> None:
        if self.port == 0 and isinstance(self.server, asyncio.Server):
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class TlsMode(StrEnum):
    PLAIN = "plain"  # no TLS at all (the default)
    IMPLICIT = "implicit"  # TLS from the first byte, like port 465
    STARTTLS = "starttls"  # plain, offering the STARTTLS upgrade, like port 587


@dataclass(frozen=True)
class Delivery:
    """What the server saw of the session that delivered one accepted message."""

    tls_version: str | None  # e.g. "TLSv1.3"; None: the message crossed the wire in clear
    login: str | None  # the username that had authenticated; None without AUTH

    @property
    def tls(self) -> bool:
        return self.tls_version is not None


@dataclass(frozen=True)
class LoginAttempt:
    username: str
    accepted: bool
    tls: bool


_REPLY = re.compile(r"^[45]\d\d[ -]")


def _session_tls_version(server: SMTP) -> str | None:
    """The TLS version of the client's connection, for implicit TLS and after STARTTLS alike."""
    ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
    return ssl_object.version() if ssl_object is not None else None


class SmtpCapture:
    """Start with `start()`, read `.port`, send mail, inspect `messages` or the `.eml` files, `stop()`."""

    def __init__(
        self,
        directory: Path,
        host: str = LOOPBACK,
        port: int = 0,
        *,
        tls: TlsMode = TlsMode.PLAIN,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = True,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        if (tls is TlsMode.PLAIN) != (tls_context is None):
            raise ValueError("a server tls_context goes with TlsMode.IMPLICIT or TlsMode.STARTTLS, and only")
        self.directory = Path(directory)
        self.messages: list[EmailMessage] = []
        self.deliveries: list[Delivery] = []  # one per message, same order
        self.logins: list[LoginAttempt] = []
        self.refused: list[str] = []  # replies given by `refuse_next`, in order
        self._refusals: deque[str] = deque()
        self._credentials = credentials
        self._arrived = threading.Condition()
        options: dict[str, Any] = {}
        if tls is TlsMode.IMPLICIT:
            options["ssl_context"] = tls_context
        elif tls is TlsMode.STARTTLS:
            options.update(tls_context=tls_context, require_starttls=require_starttls)
        if credentials is not None:
            # AUTH is offered only over TLS. aiosmtpd counts only STARTTLS as TLS for that, so an
            # implicit-TLS session (encrypted from the first byte) lifts its check. Mail without a
            # login is refused in handle_MAIL rather than with aiosmtpd's auth_required, which warns
            # on every connection once its TLS check is lifted.
            options.update(authenticator=self._authenticate, auth_require_tls=tls is not TlsMode.IMPLICIT)
        self._controller = _LoopbackController(self, hostname=host, port=port, **options)

    @property
    def host(self) -> str:
        return str(self._controller.hostname)

    @property
    def port(self) -> int:
        return int(self._controller.port)

    def start(self) -> SmtpCapture:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SmtpCapture:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def refuse_next(self, count: int, reply: str = "451 4.3.0 Try again later") -> None:
        """Answer the next `count` messages with `reply` (a 4xx or 5xx line) after DATA, keeping none."""
        if not _REPLY.match(reply):
            raise ValueError(f"not a 4xx/5xx SMTP reply: {reply!r}")
        with self._arrived:
            self._refusals.extend([reply] * count)

    @property
    def files(self) -> list[Path]:
        """The stored messages, oldest first."""
        return sorted(self.directory.glob("*.eml"))

    async def wait_for(self, count: int, seconds: float = WAIT_TIMEOUT_SECONDS) -> list[EmailMessage]:
        """Wait until at least `count` messages have arrived (for mail sent by another process)."""

        def wait() -> bool:
            with self._arrived:
                return self._arrived.wait_for(lambda: len(self.messages) >= count, seconds)

        # Messages arrive on the controller's thread, so the wait is a thread-side condition.
        if not await asyncio.to_thread(wait):
            raise TimeoutError(f"expected {count} emails within {seconds} s, got {len(self.messages)}")
        with self._arrived:
            return list(self.messages)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self._credentials is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    # aiosmtpd calls this from the controller's thread once DATA is complete; the client gets
    # the returned reply only afterwards, so a message is on disk before `send` returns.
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._arrived:
            if self._refusals:
                reply = self._refusals.popleft()
                self.refused.append(reply)
                return reply
        raw = envelope.original_content or b""
        envelope_headers = (
            f"{ENVELOPE_FROM_HEADER}: {envelope.mail_from}\r\n"
            f"{ENVELOPE_TO_HEADER}: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        data = envelope_headers + raw
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        with self._arrived:
            n = len(self.messages) + 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            path = self.directory / f"{stamp}-{n:04d}.eml"
            path.write_bytes(data)
            self.messages.append(parsed)
            self.deliveries.append(Delivery(_session_tls_version(server), _login(session)))
            self._arrived.notify_all()
        log.info(
            "captured email",
            extra={"path": str(path), "to": envelope.rcpt_tos, "subject": str(parsed["Subject"] or "")},
        )
        return "250 Message accepted for delivery"

    # aiosmtpd's `authenticator` callback (PLAIN and LOGIN both hand over a LoginPassword).
    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self._credentials is not None
        username, password = self._credentials
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        given = auth_data.login.decode(errors="replace")
        accepted = hmac.compare_digest(auth_data.login, username.encode()) & hmac.compare_digest(
            auth_data.password, password.encode()
        )
        with self._arrived:
            self.logins.append(LoginAttempt(given, accepted, _session_tls_version(server) is not None))
        # A failure with handled=False makes aiosmtpd answer "535 5.7.8 Authentication credentials invalid".
        return AuthResult(success=accepted, handled=False, auth_data=given if accepted else None)


def _login(session: Session) -> str | None:
    return str(session.auth_data) if session.authenticated else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--dir", type=Path, default=Path("var/mail"))
    parser.add_argument("--tls", type=TlsMode, choices=list(TlsMode), default=TlsMode.PLAIN)
    parser.add_argument("--cert-file", help="PEM certificate chain of the server (with --tls)")
    parser.add_argument("--key-file", help="PEM private key of the server (with --tls)")
    args = parser.parse_args(argv)
    context = None
    if args.tls is not TlsMode.PLAIN:
        if not args.cert_file:
            parser.error("--tls needs --cert-file (and --key-file unless the key is in it)")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert_file, args.key_file)

    # aiosmtpd logs every SMTP command at INFO as `mail.log`; our own line per message is enough.
    configure_logging(service="smtp-capture", quiet=(*NOISY_LOGGERS, "mail.log"))
    stopping = threading.Event()

    def on_signal(*_: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with SmtpCapture(args.dir, host=args.host, port=args.port, tls=args.tls, tls_context=context) as capture:
        log.info(
            "smtp capture listening",
            extra={"host": capture.host, "port": capture.port, "tls": args.tls.value},
        )
        stopping.wait()


if __name__ == "__main__":
    main()
