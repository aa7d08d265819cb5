"""notify's own QR rendering (no stored PNG readable, e.g. Supabase Storage): one fixed mask, never the
8-mask search, and the code still reads back as exactly the LPA string."""

from __future__ import annotations

import io

import pytest
import qrcode
import zxingcpp
from PIL import Image

from notify import qr

LPAS = [
    "LPA:1$smdp.sample-esim.example$K2-4F7G1X-9QW3ZP",
    "LPA:1$rsp.truphone.com$QRF-BETTERROAMING-PMRDGIR2EARDEIT5",
    "LPA:1$consumer.rsp.world$A1B2C3D4E5F6G7H8I9J0K1L2M3N4O5P6",
    "LPA:1$smdp.io$1",
]


def decoded(png: bytes) -> list[str]:
    return [barcode.text for barcode in zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))]


@pytest.mark.parametrize("lpa", LPAS)
def test_the_rendered_code_uses_one_fixed_mask_and_reads_back_as_the_lpa(lpa, monkeypatch):
    def search_every_mask(self):
        raise AssertionError("rendered by trying all 8 mask patterns")

    monkeypatch.setattr(qrcode.QRCode, "best_mask_pattern", search_every_mask)

    png = qr.render_qr_png(lpa)

    assert png.startswith(qr.PNG_SIGNATURE)
    assert decoded(png) == [lpa]
