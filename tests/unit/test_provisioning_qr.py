"""The QR code round trip and its local storage: what is stored scans to exactly the LPA string."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import time

import PIL.Image
import PIL.ImageFilter
import pytest
import qrcode
import zxingcpp

from esim_common.lpa import lpa_string
from provisioning import qr
from provisioning.storage import LocalQrStorage, QrStorageError

LPA = lpa_string("smdp.sandbox.zendit.test", "0A1B2C3D4E5F60718293A4B5C6D7E8F9")


def test_a_rendered_lpa_string_decodes_to_exactly_itself():
    png = qr.render_png(LPA)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert qr.decode_png(png) == ["LPA:1$smdp.sandbox.zendit.test$0A1B2C3D4E5F60718293A4B5C6D7E8F9"]


def test_the_stored_png_is_the_verified_rendering():
    assert qr.lpa_qr_png(LPA) == qr.render_png(LPA)
    qr.verify_png(qr.render_png(LPA), LPA)  # raises unless it reads back as exactly the LPA string


def test_an_image_that_reads_differently_is_refused_without_echoing_the_codes():
    other = qr.render_png(lpa_string("smdp.example", "SOMETHINGELSE"))
    with pytest.raises(qr.QrVerificationFailed) as raised:
        qr.verify_png(other, LPA)
    assert "SOMETHINGELSE" not in str(raised.value) and "0A1B2C" not in str(raised.value)


# Realistic activation strings: a short matching id, Zendit's 32 hex digits, a long dashed one, and a
# full LPA string given as the activation code (with the optional OID and confirmation-code flag).
SHORT = lpa_string("smdp.io", "K2-ABC12")  # automatic masking chooses another mask than ours for it
REALISTIC_LPAS = [
    SHORT,
    LPA,
    lpa_string("rsp-prod.oberthur.net", "K2-1ABCDE-2FGHIJ3-KLMNO4PQR-STUVWXYZ0123456789ABCDEFGHIJ"),
    lpa_string(
        "", "LPA:1$consumer.rsp.example-operator.com$1ABCDEF2GHIJKL3MNOPQR4STUVWX5YZ$1.3.6.1.4.1.31746$1"
    ),
]


@pytest.mark.parametrize("lpa", REALISTIC_LPAS, ids=["short", "hex32", "long", "full"])
def test_the_fixed_mask_renders_realistic_lpa_strings_that_scan_even_from_a_degraded_copy(lpa):
    png = qr.render_png(lpa)

    assert qr.decode_png(png) == [lpa]  # no fallback needed
    assert qr.lpa_qr_png(lpa) == png
    # As an email client might show it: about a third of the size, blurred, JPEG-compressed.
    with PIL.Image.open(io.BytesIO(png)) as image:
        small = image.convert("L").resize((image.width * 3 // 10,) * 2, PIL.Image.BILINEAR)
    small = small.filter(PIL.ImageFilter.GaussianBlur(0.8))
    jpeg = io.BytesIO()
    small.save(jpeg, format="JPEG", quality=25)
    with PIL.Image.open(io.BytesIO(jpeg.getvalue())) as degraded:
        assert [result.text for result in zxingcpp.read_barcodes(degraded)] == [lpa]


def test_the_mask_is_fixed_rather_than_searched():
    """qrcode tries all eight masks in pure Python unless one is given (~3 ms of ~4)."""
    fixed = qrcode.QRCode(
        error_correction=qr.ERROR_CORRECTION,
        box_size=qr.BOX_SIZE,
        border=qr.BORDER,
        mask_pattern=qr.MASK_PATTERN,
    )
    fixed.add_data(SHORT)
    fixed.make(fit=True)
    expected = _png(fixed)
    automatic = qr.render_png(SHORT, mask_pattern=qr.AUTOMATIC_MASK)

    assert qr.render_png(SHORT) == expected != automatic
    assert qr.decode_png(automatic) == [SHORT]
    assert fixed.best_mask_pattern() != qr.MASK_PATTERN  # why they differ (this re-renders `fixed`)


def test_a_fixed_mask_image_that_does_not_read_back_is_rendered_again_with_automatic_masking(monkeypatch):
    verify, checked = qr.verify_png, []

    def fails_once(png: bytes, expected: str) -> None:
        checked.append(png)
        if len(checked) == 1:
            raise qr.QrVerificationFailed("made to fail")
        verify(png, expected)

    monkeypatch.setattr(qr, "verify_png", fails_once)

    png = qr.lpa_qr_png(SHORT)

    automatic = qr.render_png(SHORT, mask_pattern=qr.AUTOMATIC_MASK)
    assert checked == [qr.render_png(SHORT), automatic]  # the fixed-mask image, then the one delivered
    assert png == automatic and qr.decode_png(png) == [SHORT]


def test_when_neither_rendering_reads_back_nothing_is_vouched_for(monkeypatch):
    def never(png: bytes, expected: str) -> None:
        raise qr.QrVerificationFailed("made to fail")

    monkeypatch.setattr(qr, "verify_png", never)
    with pytest.raises(qr.QrVerificationFailed):
        qr.lpa_qr_png(LPA)


async def test_rendering_and_reading_back_run_off_the_event_loop(monkeypatch):
    """Other handlers' I/O goes on while a QR code is made: the loop keeps ticking meanwhile."""
    from provisioning.phases import Provisioner

    def slow_render(lpa: str) -> bytes:
        time.sleep(0.3)  # holds whichever thread runs it
        return b"png"

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    monkeypatch.setattr(qr, "lpa_qr_png", slow_render)
    ticking = asyncio.create_task(ticker())
    try:
        assert await Provisioner._our_verified_qr(LPA) == b"png"
    finally:
        ticking.cancel()
    assert ticks >= 10


def _png(code: qrcode.QRCode) -> bytes:
    buffer = io.BytesIO()
    code.make_image().save(buffer, format="PNG")
    return buffer.getvalue()


def test_nothing_to_encode_is_an_error():
    with pytest.raises(ValueError):
        qr.render_png("")


async def test_local_storage_writes_the_png_under_its_name_and_returns_its_public_url(tmp_path):
    storage = LocalQrStorage(tmp_path / "qrcodes", "http://127.0.0.1:8082/qrcodes/")
    png = qr.render_png(LPA)

    url = await storage.save("txn_abc", png)
    again = await storage.save("txn_abc", png)  # a redelivery replaces it with the same image

    assert url == again == "http://127.0.0.1:8082/qrcodes/txn_abc.png"
    assert (tmp_path / "qrcodes" / "txn_abc.png").read_bytes() == png
    assert [p.name for p in (tmp_path / "qrcodes").iterdir()] == ["txn_abc.png"]  # no temp files left
    mode = stat.S_IMODE(os.stat(tmp_path / "qrcodes" / "txn_abc.png").st_mode)
    assert mode & 0o077 == 0  # activation codes: readable by the service user only


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", "x" * 129, "txn abc", "txn.png", "..", "\x00"])
async def test_local_storage_refuses_names_that_are_not_transaction_ids(tmp_path, name):
    storage = LocalQrStorage(tmp_path, "http://svc/qrcodes")
    assert storage.path_of(name) is None
    with pytest.raises(ValueError):
        await storage.save(name, b"png")
    assert list(tmp_path.iterdir()) == []


async def test_a_storage_directory_that_cannot_be_written_is_a_transient_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the directory should be")
    storage = LocalQrStorage(blocker, "http://svc/qrcodes")
    with pytest.raises(QrStorageError):
        await storage.save("txn_abc", b"png")


def test_the_service_refuses_to_start_without_a_qr_decoder(monkeypatch):
    """Without zxing-cpp no QR code can be vouched for: every paid purchase would go to an operator."""
    from esim_common.settings import load_settings
    from provisioning import main, qr

    monkeypatch.setattr(qr, "zxingcpp", None)
    with pytest.raises(qr.QrDecoderMissing, match="zxing-cpp"):
        main.create_app(load_settings())
