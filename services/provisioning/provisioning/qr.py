"""The eSIM QR code: render the LPA string as a PNG, and read it back before anyone relies on it.

Pure functions (bytes in, bytes out). A QR code that does not scan to exactly the activation string is
worse than none — the customer cannot install the eSIM they paid for, and an eSIM profile can often
be downloaded only once — so the rendered image is decoded with zxing-cpp and compared before it is
stored. When it does not read back, Zendit's own image is the fallback, read back the same way
(`codes_in`). zxing-cpp is required: without it nothing can be read back, so every check here raises
`QrDecoderMissing` rather than pass (the service refuses to start without it).
"""

from __future__ import annotations

import io
import logging

import qrcode
from PIL import Image
from qrcode.constants import ERROR_CORRECT_M

log = logging.getLogger("esim.provisioning.qr")

try:  # required (a declared dependency); the import is guarded only so that a missing decoder is
    # reported clearly (`QrDecoderMissing`, and create_app refusing to start), never skipped
    import zxingcpp
except ImportError:  # pragma: no cover - only in an environment built without it
    zxingcpp = None  # type: ignore[assignment]

# M (15% recovery) survives a slightly damaged print or a compressed email image; box 10 / border 4
# (the quiet zone the QR standard requires) keep a ~60-character LPA string at ~450 px: easy to scan.
ERROR_CORRECTION = ERROR_CORRECT_M
BOX_SIZE = 10
BORDER = 4
# qrcode picks a mask by rendering all eight and scoring each in pure Python: ~3 of ~4 ms per code.
# A fixed one costs ~1.3 ms; the read-back still proves every image, and automatic masking is the
# fallback when it fails (`lpa_qr_png`). Mask 3 ((row + column) % 3) decoded as often as automatic
# masking or more from downscaled, blurred, JPEG-compressed renderings of realistic LPA strings.
MASK_PATTERN = 3
AUTOMATIC_MASK = None


class QrVerificationFailed(Exception):
    """The rendered image does not scan to the activation string. A bug, not a retryable failure."""


class QrDecoderMissing(RuntimeError):
    """zxing-cpp is not installed: no QR code can be read back, so none may be vouched for."""

    def __init__(self) -> None:
        super().__init__("zxing-cpp is not installed: QR codes cannot be read back")


def render_png(text: str, *, mask_pattern: int | None = MASK_PATTERN) -> bytes:
    """`text` as a PNG QR code; `mask_pattern=AUTOMATIC_MASK` lets qrcode choose the mask."""
    if not text:
        raise ValueError("nothing to encode")
    code = qrcode.QRCode(
        error_correction=ERROR_CORRECTION, box_size=BOX_SIZE, border=BORDER, mask_pattern=mask_pattern
    )
    code.add_data(text)
    code.make(fit=True)
    buffer = io.BytesIO()
    code.make_image().save(buffer, format="PNG")
    return buffer.getvalue()


def can_decode() -> bool:
    return zxingcpp is not None


def decode_png(png: bytes) -> list[str]:
    """The texts of every QR code zxing-cpp finds in the PNG."""
    if zxingcpp is None:
        raise QrDecoderMissing()
    with Image.open(io.BytesIO(png)) as image:
        return [result.text for result in zxingcpp.read_barcodes(image)]


def codes_in(png: bytes) -> list[str]:
    """Like `decode_png` for an image someone else made: [] when it cannot be read, whatever the
    reason (not an image, a truncated one, a decompression bomb, a decoder error): an image from
    outside holds no code we can vouch for. A missing decoder is ours to fix, and still raised."""
    try:
        return decode_png(png)
    except QrDecoderMissing:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, DecompressionBombError, ...
        log.warning("an image could not be read as a QR code", extra={"error": type(exc).__name__})
        return []


def verify_png(png: bytes, expected: str) -> None:
    """Raise `QrVerificationFailed` unless the PNG holds exactly one QR code reading `expected`, and
    `QrDecoderMissing` when that cannot be checked: an unverified image never passes."""
    decoded = decode_png(png)
    if decoded != [expected]:
        # Never put the decoded texts in the message: they are activation codes.
        raise QrVerificationFailed(
            f"the rendered QR code reads as {len(decoded)} code(s), not the LPA string"
        )


def lpa_qr_png(lpa: str) -> bytes:
    """Render and verify: the PNG that goes to storage and into the customer's email. CPU-bound
    (~3 ms): call it off the event loop."""
    png = render_png(lpa)
    try:
        verify_png(png, lpa)
    except QrVerificationFailed:
        log.warning("the fixed-mask QR code did not read back: rendering it with automatic masking")
        png = render_png(lpa, mask_pattern=AUTOMATIC_MASK)
        verify_png(png, lpa)
    return png
