"""The SMTP capture stores what a real SMTP client sends, exactly enough to check an email in a test."""

from __future__ import annotations

from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default

import aiosmtplib
import pytest

from esim_sandbox.smtp_capture import ENVELOPE_FROM_HEADER, ENVELOPE_TO_HEADER, SmtpCapture

QR_PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def esim_email() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "shop@example.com"
    message["To"] = "customer@example.com"
    message["Subject"] = "Your eSIM is ready ✓"
    message.set_content("Scan the QR code to install your eSIM.")
    message.add_alternative("<p>Scan the QR code to install your eSIM.</p>", subtype="html")
    message.add_attachment(QR_PNG, maintype="image", subtype="png", filename="esim-qr.png")
    return message


async def send(capture: SmtpCapture, message: EmailMessage, recipients: list[str]) -> None:
    await aiosmtplib.send(
        message, hostname=capture.host, port=capture.port, recipients=recipients, timeout=10
    )


def attachments(message: EmailMessage) -> dict[str, bytes]:
    return {str(part.get_filename()): part.get_content() for part in message.iter_attachments()}


async def test_multipart_email_is_stored_as_an_eml_that_parses_back(smtp_capture: SmtpCapture) -> None:
    await send(smtp_capture, esim_email(), ["customer@example.com", "ops@example.com"])

    [path] = smtp_capture.files
    assert path.name.endswith("-0001.eml")
    stored = BytesParser(policy=default).parsebytes(path.read_bytes())
    assert isinstance(stored, EmailMessage)
    assert stored["Subject"] == "Your eSIM is ready ✓"
    assert stored["To"] == "customer@example.com"
    assert stored[ENVELOPE_FROM_HEADER] == "shop@example.com"
    assert stored[ENVELOPE_TO_HEADER] == "customer@example.com, ops@example.com"
    assert attachments(stored) == {"esim-qr.png": QR_PNG}
    body = stored.get_body(preferencelist=("plain",))
    assert body is not None and "Scan the QR code" in body.get_content()


async def test_messages_are_kept_in_memory_in_arrival_order(smtp_capture: SmtpCapture) -> None:
    first, second = esim_email(), esim_email()
    second.replace_header("Subject", "Refund issued")
    await send(smtp_capture, first, ["customer@example.com"])
    await send(smtp_capture, second, ["customer@example.com"])

    messages = await smtp_capture.wait_for(2)

    assert [m["Subject"] for m in messages] == ["Your eSIM is ready ✓", "Refund issued"]
    assert attachments(messages[0]) == {"esim-qr.png": QR_PNG}
    assert [p.name[-9:] for p in smtp_capture.files] == ["-0001.eml", "-0002.eml"]


async def test_waiting_for_an_email_that_never_comes_times_out(smtp_capture: SmtpCapture) -> None:
    with pytest.raises(TimeoutError, match="got 0"):
        await smtp_capture.wait_for(1, seconds=0.1)
