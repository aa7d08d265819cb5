"""Every email template filled with sample data (`notify.samples`), for an operator to look at.

    python -m notify preview [TEMPLATE] [--format text|html|eml] [--out DIR]
    GET /preview                                  the templates, with a link per format (notify.routes)
    GET /preview/{template}?format=html|text|eml  one of them (html by default)

The emails are built exactly as the service sends them, without a database, a broker or an SMTP server.
`html` shows the HTML part with its inline images as `data:` URIs, so that a browser displays the QR
code; `text` the subject, sender, recipient and plain-text part; `eml` the whole MIME message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Literal, get_args

from esim_common.settings import Settings
from notify.samples import SAMPLES, UnknownTemplate, sample_email

Format = Literal["html", "text", "eml"]
FORMATS: tuple[str, ...] = get_args(Format)
FILE_EXTENSIONS = {"html": "html", "text": "txt", "eml": "eml"}


class NoHtmlPart(LookupError):
    def __init__(self, template: str) -> None:
        super().__init__(f"template {template!r} has no HTML part; use format=text")


def as_text(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    text = body.get_content() if body is not None else ""
    return f"Subject: {message['Subject']}\nFrom: {message['From']}\nTo: {message['To']}\n\n{text}"


def as_html(message: EmailMessage, template: str) -> str:
    """The HTML part, its `cid:` images replaced by `data:` URIs (a browser cannot resolve a cid)."""
    body = message.get_body(preferencelist=("html",))
    if body is None:
        raise NoHtmlPart(template)
    html: str = body.get_content()
    for part in message.walk():
        content_id = part["Content-ID"]
        if content_id and part.get_content_maintype() == "image":
            data = base64.b64encode(part.get_content()).decode("ascii")
            uri = f"data:{part.get_content_type()};base64,{data}"
            html = html.replace(f"cid:{str(content_id).strip('<>')}", uri)
    return html


async def render_preview(template: str, fmt: str, settings: Settings) -> str | bytes:
    """Raises UnknownTemplate or NoHtmlPart."""
    message = await sample_email(template, settings)
    if fmt == "html":
        return as_html(message, template)
    if fmt == "eml":
        return message.as_bytes()
    return as_text(message)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("template", nargs="?", help=f"one of: {', '.join(SAMPLES)} (default: all)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="text", help="default: text")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="write <template>.<txt|html|eml> files here instead"
    )


def run_cli(args: argparse.Namespace, settings: Settings) -> int:
    """Print (or write) the previews; 2 with a message listing the valid names for an unknown one."""
    names = [args.template] if args.template else list(SAMPLES)
    try:
        rendered = asyncio.run(_render_all(names, args.fmt, settings))
    except (UnknownTemplate, NoHtmlPart) as exc:
        print(f"python -m notify preview: error: {exc}", file=sys.stderr)
        return 2
    for name, content in rendered:
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"{name}.{FILE_EXTENSIONS[args.fmt]}"
            path.write_bytes(data)
            print(path)
            continue
        if len(rendered) > 1:
            sys.stdout.write(f"==> {name} ({args.fmt}) <==\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(data if data.endswith(b"\n") else data + b"\n")
        sys.stdout.buffer.flush()
    return 0


async def _render_all(names: list[str], fmt: str, settings: Settings) -> list[tuple[str, str | bytes]]:
    return [(name, await render_preview(name, fmt, settings)) for name in names]
