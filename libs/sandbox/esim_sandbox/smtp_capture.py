"""An SMTP server on loopback that accepts every message and keeps it, for the demo and the tests.

Each message is written to `<directory>/<UTC timestamp>-<n>.eml` and appended to `messages`. The file
is the raw DATA bytes as received, with two headers prepended that record the SMTP envelope (which
the message's own To/Cc/Bcc headers need not match):

    X-Sandbox-Envelope-From: shop@example.com
    X-Sandbox-Envelope-To: customer@example.com, ops@example.com

Prepending keeps one self-contained file per message that any mail client opens. No AUTH, no TLS.

    python -m esim_sandbox.smtp_capture --port 1025 --dir var/mail
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import logging
import signal
import threading
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

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


class SmtpCapture:
    """Start with `start()`, read `.port`, send mail, inspect `messages` or the `.eml` files, `stop()`."""

    def __init__(self, directory: Path, host: str = LOOPBACK, port: int = 0) -> None:
        self.directory = Path(directory)
        self.messages: list[EmailMessage] = []
        self._arrived = threading.Condition()
        self._controller = _LoopbackController(self, hostname=host, port=port)

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

    # aiosmtpd calls this from the controller's thread once DATA is complete; the client gets
    # the returned reply only afterwards, so a message is on disk before `send` returns.
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
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
            self._arrived.notify_all()
        log.info(
            "captured email",
            extra={"path": str(path), "to": envelope.rcpt_tos, "subject": str(parsed["Subject"] or "")},
        )
        return "250 Message accepted for delivery"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--dir", type=Path, default=Path("var/mail"))
    args = parser.parse_args(argv)

    # aiosmtpd logs every SMTP command at INFO as `mail.log`; our own line per message is enough.
    configure_logging(service="smtp-capture", quiet=(*NOISY_LOGGERS, "mail.log"))
    stopping = threading.Event()

    def on_signal(*_: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with SmtpCapture(args.dir, host=args.host, port=args.port) as capture:
        log.info("smtp capture listening", extra={"host": capture.host, "port": capture.port})
        stopping.wait()


if __name__ == "__main__":
    main()
