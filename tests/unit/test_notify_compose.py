"""notify.compose: the message as the SMTP server receives it (aiosmtplib flattens it with
email.policy.SMTP) reads back with email.policy.default exactly as it was meant; no line break reaches a
header; the recipient sent_emails records is the To header's, worked out before anything is built."""

from __future__ import annotations

from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP
from email.policy import default as default_policy

import pytest

from notify import emails
from notify.compose import InlineImage, build_message, recipient
from notify.rendering import RenderedEmail
from tests.unit.test_notify_templates import SETTINGS, order

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def on_the_wire(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=SMTP)


def read_back(message: EmailMessage) -> EmailMessage:
    """What the recipient's client reads: the wire bytes, stored with local line ends, parsed."""
    parsed = message_from_bytes(on_the_wire(message).replace(b"\r\n", b"\n"), policy=default_policy)
    assert isinstance(parsed, EmailMessage)
    assert [part.defects for part in parsed.walk()] == [[] for _ in parsed.walk()]
    return parsed


def header_lines(message: EmailMessage) -> dict[str, str]:
    """The message's headers as they are on the wire, unfolded."""
    block = on_the_wire(message).split(b"\r\n\r\n", 1)[0]
    assert block.isascii()  # no 8-bit header: encoded words, not raw UTF-8
    lines = block.replace(b"\r\n ", b" ").decode("ascii").split("\r\n")
    return dict(line.split(": ", 1) for line in lines)


def build(text: str = "t", *, subject: str = "s", name: str = "", html: str | None = None, qr=None):
    return build_message(
        RenderedEmail(subject, text, html),
        sender="Boutique Zoë <shop@example.com>",
        to_address="zoe@example.com",
        to_name=name,
        message_id="<m.1@example.com>",
        qr=qr,
    )


def test_a_non_ascii_name_and_subject_are_rfc2047_encoded_and_read_back_as_they_were():
    name, subject = "Zoë Ådа 李雷", "Votre eSIM est prête · 5 Go"
    message = build(subject=subject, name=name)

    headers = header_lines(message)
    assert all("=?utf-8?" in headers[header] for header in ("Subject", "To", "From"))
    assert headers["To"].endswith(" <zoe@example.com>")
    parsed = read_back(message)
    assert parsed["Subject"] == subject
    [to] = parsed["To"].addresses
    assert (to.display_name, to.addr_spec) == (name, "zoe@example.com")
    assert parsed["From"].addresses[0].display_name == "Boutique Zoë"
    assert parsed["Message-ID"] == "<m.1@example.com>" and parsed["Date"].datetime is not None


async def test_the_esim_email_of_a_customer_with_a_non_ascii_name_reads_back_with_that_name(tmp_path):
    settings = SETTINGS.model_copy(update={"qr_storage_dir": str(tmp_path)})
    draft = emails.esim_delivery_email(order(recipient_name="Zoë Ådа"), settings)
    parsed = read_back(await draft.build())

    assert draft.recipient == "ada@example.com"
    assert parsed["To"].addresses[0].display_name == "Zoë Ådа"
    assert "Hello Zoë Ådа" in parsed.get_body(preferencelist=("plain",)).get_content()


@pytest.mark.parametrize(
    "text",
    [
        "trailing spaces   \nand a tab\t\n= signs =3D everywhere =\n.\n..dots\nFrom the start\n",
        "non-ASCII: Zoë · 李雷 · € 𝄞\n" + "a long line " * 30 + "\n",
        "x" * 1200 + "\nno final newline",
    ],
)
def test_any_text_and_html_read_back_exactly(text):
    html = f"<p>{text}</p>"
    parsed = read_back(build(text, html=html, qr=InlineImage(PNG, "qr.1@example.com")))

    assert parsed.get_body(preferencelist=("plain",)).get_content() == "\n".join(text.splitlines()) + "\n"
    assert parsed.get_body(preferencelist=("html",)).get_content() == "\n".join(html.splitlines()) + "\n"


def test_the_qr_code_is_inline_by_its_content_id_and_attached_byte_for_byte():
    parsed = read_back(
        build("t", html="<img src='cid:qr.1@example.com'>", qr=InlineImage(PNG, "qr.1@example.com"))
    )

    assert [part.get_content_type() for part in parsed.walk()] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "multipart/related", "text/html",
        "image/png", "image/png",
    ]  # fmt: skip
    inline, attached = [part for part in parsed.walk() if part.get_content_type() == "image/png"]
    assert (inline["Content-ID"], inline.get_content_disposition()) == ("<qr.1@example.com>", "inline")
    assert (attached.get_filename(), attached.get_content_disposition()) == ("esim-qr-code.png", "attachment")
    assert inline.get_content() == attached.get_content() == PNG


@pytest.mark.parametrize(
    "changes",
    [
        {"subject": "hello\r\nBcc: someone@example.com"},
        {"subject": "a\nb"},
        {"name": "Ada\r\nBcc: x@example.com"},
    ],
)
def test_a_line_break_can_never_reach_a_header(changes):
    with pytest.raises(ValueError, match=r"linefeed|CR or LF"):  # policy.default's or Address's check
        build(**changes)


@pytest.mark.parametrize(
    ("to_address", "to_name"),
    [("zoe@example.com\r\nBcc: x@example.com", ""), ("zoe@example.com", "Zoë\nBcc: x@example.com")],
)
def test_a_recipient_with_a_line_break_is_refused_before_anything_is_claimed(to_address, to_name):
    with pytest.raises(ValueError, match=r"linefeed|CR or LF"):
        recipient(to_address, to_name)


@pytest.mark.parametrize(
    ("to_address", "to_name", "expected"),
    [
        ("zoe@example.com", "Zoë Ådа", "zoe@example.com"),
        ("Ops <ops@example.com>, b@example.com", "", "ops@example.com, b@example.com"),
    ],
)
def test_the_recipient_recorded_is_the_to_headers_addresses(to_address, to_name, expected):
    message = build_message(
        RenderedEmail("s", "t", None),
        sender="shop@example.com",
        to_address=to_address,
        to_name=to_name,
        message_id="<m@x>",
    )

    assert recipient(to_address, to_name) == expected
    assert ", ".join(address.addr_spec for address in message["To"].addresses) == expected
