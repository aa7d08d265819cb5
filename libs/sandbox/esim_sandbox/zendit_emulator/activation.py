"""Fresh eSIM activation data for a DONE purchase, and the QR image Zendit serves for it."""

from __future__ import annotations

import io
import secrets
import uuid
from typing import Any

import qrcode
from PIL import Image
from qrcode.constants import ERROR_CORRECT_M

from esim_common.lpa import lpa_string

SMDP_ADDRESS = "smdp.sandbox.zendit.test"
# ICCIDs start with 89 (telecom) and a country code; 19 digits plus a Luhn check digit = 20.
_ICCID_PREFIX = "8901"
_ICCID_BODY_DIGITS = 19


def _luhn_check_digit(digits: str) -> str:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 0:  # doubled positions, counted from the digit left of the check digit
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str((10 - total % 10) % 10)


def new_iccid() -> str:
    random_digits = _ICCID_BODY_DIGITS - len(_ICCID_PREFIX)
    # One draw for all the digits (uniform, zero-padded): a draw per digit cost ~40 µs per purchase.
    body = f"{_ICCID_PREFIX}{secrets.randbelow(10**random_digits):0{random_digits}d}"
    return body + _luhn_check_digit(body)


def new_confirmation(iccid: str | None = None) -> dict[str, Any]:
    """dto.ESimConfirmation; `iccid` is kept when the purchase added a plan to an existing eSIM."""
    return {
        "iccid": iccid or new_iccid(),
        "smdpAddress": SMDP_ADDRESS,
        "activationCode": secrets.token_hex(16).upper(),
        "externalReferenceId": str(uuid.uuid4()),
        "redemptionInstructions": (
            "Settings > Mobile Data > Add eSIM, then scan the QR code. Keep the eSIM installed: "
            "it can be downloaded only once."
        ),
    }


# What `GET .../qrcode` serves for a purchase (a sandbox control picks it): `real` encodes the purchase's
# LPA string; `wrong` a well-formed LPA string with another activation code (Zendit disagreeing with its
# own confirmation); `blank` a PNG without any code in it (an image nobody can scan).
QR_IMAGES = ("real", "wrong", "blank")


def qr_png(confirmation: dict[str, Any], image: str = "real") -> bytes:
    """The confirmation's LPA string as a PNG QR code (or, for tests, a `wrong` or `blank` one)."""
    buffer = io.BytesIO()
    if image == "blank":
        Image.new("L", (330, 330), 255).save(buffer, format="PNG")
        return buffer.getvalue()
    activation_code = confirmation["activationCode"]
    if image == "wrong":
        activation_code = "WRONG" + activation_code[5:]  # hex codes never start with W
    code = qrcode.QRCode(error_correction=ERROR_CORRECT_M, box_size=10, border=4)
    code.add_data(lpa_string(confirmation["smdpAddress"], activation_code))
    code.make(fit=True)
    code.make_image().save(buffer, format="PNG")
    return buffer.getvalue()
