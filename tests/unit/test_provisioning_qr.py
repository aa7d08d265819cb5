"""The QR code round trip and its local storage: what is stored scans to exactly the LPA string."""

from __future__ import annotations

import os
import stat

import pytest

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
