"""Reading an upload the way Storage does (`fileUploadFromRequest`).

    multipart/form-data   the file part's bytes and type (a `contentType` field wins over it);
                          the `cacheControl` field (seconds) becomes `max-age=<seconds>`, else `no-cache`
    anything else         the raw body, the request's Content-Type (default application/octet-stream)
                          and Cache-Control (default `no-cache`)

storage3 always sends multipart (`files={"file": (name, bytes, content_type)}`, `data={"cacheControl"}`).
A small parser of our own, because python-multipart is not installed and email.parser mangles binary.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from . import errors


@dataclass(frozen=True)
class Upload:
    data: bytes
    mime_type: str
    cache_control: str


def _boundary(content_type: str) -> bytes:
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise errors.no_content()
    return boundary.encode()


def _parts(body: bytes, boundary: bytes) -> list[tuple[Message, bytes]]:
    """(headers, content) of each part. Delimiters are CRLF + `--boundary`, so content keeps its bytes."""
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary)
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, separator, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            raise errors.no_content()
        headers = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip()] = value.strip()
        parts.append((headers, content))
    return parts


def read_upload(content_type: str, cache_control: str | None, body: bytes) -> Upload:
    if not content_type.lower().startswith("multipart/form-data"):
        return Upload(body, content_type or "application/octet-stream", cache_control or "no-cache")
    fields: dict[str, str] = {}
    file: tuple[bytes, str] | None = None
    for headers, content in _parts(body, _boundary(content_type)):
        name = headers.get_param("name", header="content-disposition")
        if headers.get_param("filename", header="content-disposition") is not None:
            if file is None:  # Storage takes the first file; the route allows only one
                file = (content, headers.get_content_type() if "content-type" in headers else "text/plain")
        elif isinstance(name, str):
            fields[name] = content.decode("utf-8", "replace")
    if file is None:
        raise errors.no_content()
    data, part_type = file
    seconds = fields.get("cacheControl")
    return Upload(
        data, fields.get("contentType") or part_type, f"max-age={seconds}" if seconds else "no-cache"
    )
