"""Rendered text into a MIME message.

With a QR code the message is

    multipart/mixed
    ├── multipart/alternative
    │   ├── text/plain
    │   └── multipart/related
    │       ├── text/html            <img src="cid:…">
    │       └── image/png            inline, Content-ID (what the HTML shows)
    └── image/png                    attachment esim-qr-code.png (for printing, or a client without HTML)

so every mail client shows either the text or the HTML with its image, and the PNG is always there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from notify.rendering import RenderedEmail

QR_ATTACHMENT_NAME = "esim-qr-code.png"


@dataclass(frozen=True)
class InlineImage:
    png: bytes
    cid: str  # without angle brackets, as the HTML's `cid:` URL says it


@dataclass(frozen=True)
class Draft:
    """An email that is due but not built: `build` renders it (and finds its QR code) only once
    sent_emails says it still has to go, so a redelivered event costs no rendering or MIME work."""

    recipient: str  # the To address(es), as sent_emails records them
    build: Callable[[], Awaitable[EmailMessage]]


def recipient(to_address: str, to_name: str = "") -> str:
    """The To addresses of `build_message(..., to_address=, to_name=)`, parsed (and refused: a line
    break, an unusable address) as its To header will be, so a bad address fails before the claim."""
    headers = EmailMessage()
    headers["To"] = _to(to_address, to_name)
    return ", ".join(address.addr_spec for address in headers["To"].addresses)


def _to(to_address: str, to_name: str) -> Address | str:
    return Address(display_name=to_name, addr_spec=to_address) if to_name else to_address


def build_message(
    rendered: RenderedEmail,
    *,
    sender: str,
    to_address: str,
    to_name: str = "",
    message_id: str,
    qr: InlineImage | None = None,
) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = rendered.subject
    message["From"] = sender
    message["To"] = _to(to_address, to_name)
    message["Message-ID"] = message_id
    message["Date"] = format_datetime(datetime.now(UTC))
    message.set_content(rendered.text)
    if rendered.html is None:
        return message
    message.add_alternative(rendered.html, subtype="html")
    if qr is not None:
        html_part = message.get_body(preferencelist=("html",))
        if not isinstance(html_part, EmailMessage):  # it was added two lines up
            raise RuntimeError("the HTML part of the message is missing")
        html_part.add_related(
            qr.png, maintype="image", subtype="png", cid=f"<{qr.cid}>", disposition="inline"
        )
        message.add_attachment(qr.png, maintype="image", subtype="png", filename=QR_ATTACHMENT_NAME)
    return message
