"""The QR PNG for an email: the stored one when this process can read it, else rendered again.

The provisioning service stores `<transaction id>.png` under `QR_STORAGE_DIR` when no Supabase
bucket is configured. Wherever it was stored, the code only carries the LPA string, so rendering it
again from the order's activation data gives an equivalent image: notify never depends on the storage.
With Supabase Storage the object is not fetched: its URL may be signed and short-lived, and a fetch
would put a network call (and its failures) in front of every email to save ~1 ms of rendering.
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import qrcode
from qrcode.constants import ERROR_CORRECT_M

from notify.domain import plain_file_name

log = logging.getLogger("esim.notify.qr")

# Medium error correction survives a smudged printout; 8-pixel modules with the standard 4-module
# quiet zone make a ~300 px image that phones read from a screen or paper.
QR_BOX_SIZE = 8
QR_BORDER = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A fixed mask: `qrcode` otherwise builds the symbol with all 8 masks and scores each, in pure Python
# (~3 of the ~4 ms a render takes). Every mask is valid and every reader decodes it (the symbol says
# which). Mask 3, as provisioning uses: from 60 LPA-shaped strings at this size, downscaled, blurred and
# JPEG-compressed 12 ways, zxing-cpp read 531 of 720 with it, 515 with automatic masking. The unit test
# reads codes made with it back.
QR_MASK_PATTERN = 3


def render_qr_png(lpa: str) -> bytes:
    code = qrcode.QRCode(
        error_correction=ERROR_CORRECT_M,
        box_size=QR_BOX_SIZE,
        border=QR_BORDER,
        mask_pattern=QR_MASK_PATTERN,
    )
    code.add_data(lpa)
    code.make(fit=True)
    buffer = io.BytesIO()
    code.make_image().save(buffer, format="PNG")
    return buffer.getvalue()


def _read_stored(directory: Path, transaction_id: str) -> bytes | None:
    name = plain_file_name(transaction_id)
    if name is None:
        return None
    try:
        data = (directory / name).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("stored QR code unreadable, rendering it again", extra={"error": str(exc)})
        return None
    if not data.startswith(PNG_SIGNATURE):
        log.warning("stored QR code is not a PNG, rendering it again")
        return None
    return data


async def qr_png(directory: Path, transaction_id: str, lpa: str) -> bytes:
    stored = await asyncio.to_thread(_read_stored, directory, transaction_id)
    if stored is not None:
        return stored
    return await asyncio.to_thread(render_qr_png, lpa)
