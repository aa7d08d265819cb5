"""SupabaseQrStorage (the real `supabase` client) against the Supabase Storage emulator over loopback.

What the provisioning service gets back from `save`: a URL that serves the PNG (signed by default,
public when configured and the bucket is public), a transient QrStorageError for outages (retried by
the consumer's tiers), and a permanent QrStorageRefused that names the setting to fix — without ever
carrying the service-role key. What `verify` (start-up) says about the same configurations.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Callable

import httpx
import PIL.Image
import pytest
import zxingcpp

from esim_common.errors import PermanentError, TransientError
from esim_sandbox.serve import free_port
from esim_sandbox.storage_emulator import tokens
from provisioning import qr
from provisioning.storage import QrStorageError
from provisioning.supabase_storage import (
    BUCKET_MISSING,
    BUCKET_PRIVATE,
    REFUSED,
    UNAUTHORIZED,
    QrStorageRefused,
    SupabaseQrStorage,
)
from tests.fixtures.storage_emulator import StorageEmulator

LPA = "LPA:1$smdp.example.com$ACT-0123456789-ABCDEF"
WEEK = 604800


def decode(png: bytes) -> list[str]:
    return [r.text for r in zxingcpp.read_barcodes(PIL.Image.open(io.BytesIO(png)))]


@pytest.fixture
async def make_storage(storage_emulator: StorageEmulator) -> AsyncIterator[Callable[..., SupabaseQrStorage]]:
    made: list[SupabaseQrStorage] = []

    def make(**overrides: object) -> SupabaseQrStorage:
        options: dict = {
            "url": storage_emulator.url,
            "service_role_key": storage_emulator.service_role_key,
            "bucket": storage_emulator.bucket,
            "signed_url_seconds": WEEK,
            **overrides,
        }
        made.append(SupabaseQrStorage(**options))
        return made[-1]

    yield make
    for storage in made:
        await storage.aclose()


def make_public(storage_emulator: StorageEmulator) -> None:
    storage_emulator.state.buckets[storage_emulator.bucket].public = True


async def failure_of(storage: SupabaseQrStorage, name: str = "txn_fail") -> Exception:
    with pytest.raises(Exception) as raised:
        await storage.save(name, qr.lpa_qr_png(LPA))
    return raised.value


# ------------------------------------------------------------------------------------------ stored
async def test_a_saved_qr_code_is_a_private_png_behind_a_signed_url_that_decodes_to_the_lpa(
    make_storage, storage_emulator
):
    storage = make_storage()

    url = await storage.save("txn_abc", qr.lpa_qr_png(LPA))
    served = httpx.get(url)  # no key: what a customer's mail client or browser does

    assert url.startswith(f"{storage_emulator.url}/storage/v1/object/sign/esim-qrcodes/txn_abc.png?token=")
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert decode(served.content) == [LPA]
    [stored] = storage_emulator.control("GET", "state")["objects"]
    assert (stored["bucket"], stored["name"], stored["mimetype"], stored["cacheControl"]) == (
        "esim-qrcodes",
        "txn_abc.png",
        "image/png",
        "max-age=0",
    )
    assert storage_emulator.stored("txn_abc.png") == served.content
    private = httpx.get(f"{storage_emulator.url}/storage/v1/object/public/esim-qrcodes/txn_abc.png")
    assert private.status_code == 400  # the bucket stays private: only the signed URL serves it


async def test_the_signed_url_lives_as_long_as_configured(make_storage, storage_emulator):
    url = await make_storage(signed_url_seconds=120).save("txn_ttl", qr.lpa_qr_png(LPA))

    # `iat` is whole seconds (as Storage's jsonwebtoken writes it): the URL was issued up to a second
    # before the save returned, so it expires between +119 and +120 s of now.
    storage_emulator.control("POST", "clock", {"advanceSeconds": 118})
    still = httpx.get(url)
    storage_emulator.control("POST", "clock", {"advanceSeconds": 3})
    gone = httpx.get(url)

    assert still.status_code == 200
    assert gone.status_code == 400 and gone.json()["message"] == "jwt expired"


async def test_saving_again_replaces_the_same_object_with_the_same_image(make_storage, storage_emulator):
    storage = make_storage()
    png = qr.lpa_qr_png(LPA)

    first = await storage.save("txn_again", png)
    second = await storage.save("txn_again", png)  # a redelivery after a crash before the commit

    [stored] = storage_emulator.control("GET", "state")["objects"]
    assert stored["writes"] == 2 and storage_emulator.stored("txn_again.png") == png
    assert httpx.get(first).content == httpx.get(second).content == png


async def test_with_public_urls_the_url_is_the_public_one_of_a_public_bucket(make_storage, storage_emulator):
    make_public(storage_emulator)

    url = await make_storage(signed_url_seconds=0).save("txn_pub", qr.lpa_qr_png(LPA))

    assert url == f"{storage_emulator.url}/storage/v1/object/public/esim-qrcodes/txn_pub.png"
    assert decode(httpx.get(url).content) == [LPA]


# ------------------------------------------------------------------------------------------ refused
async def test_public_urls_on_a_private_bucket_are_refused_before_anything_is_uploaded(
    make_storage, storage_emulator
):
    failure = await failure_of(make_storage(signed_url_seconds=0))

    assert isinstance(failure, QrStorageRefused) and isinstance(failure, PermanentError)
    assert failure.reason == BUCKET_PRIVATE
    assert "SUPABASE_SIGNED_URL_SECONDS" in str(failure) and "public" in str(failure)
    assert storage_emulator.operations("upload") == []


@pytest.mark.parametrize("which", ["forged", "anon", "garbage"])
async def test_a_key_the_project_does_not_accept_is_refused_for_good_and_never_echoed(
    make_storage, storage_emulator, which
):
    key = {
        "forged": tokens.api_key("service_role", "a-secret-of-another-project"),
        "anon": storage_emulator.anon_key,
        "garbage": "not-a-key",
    }[which]

    failure = await failure_of(make_storage(service_role_key=key))

    assert isinstance(failure, QrStorageRefused) and failure.reason == UNAUTHORIZED
    assert "SUPABASE_SERVICE_ROLE_KEY" in str(failure)
    texts = [str(failure), repr(failure), str(failure.__cause__), repr(failure.__cause__)]
    assert not [text for text in texts if key in text]
    assert storage_emulator.stored("txn_fail.png") is None


async def test_a_missing_bucket_is_refused_with_the_setting_to_fix(make_storage):
    failure = await failure_of(make_storage(bucket="esim-qr-typo"))

    assert isinstance(failure, QrStorageRefused) and failure.reason == BUCKET_MISSING
    assert "'esim-qr-typo'" in str(failure) and "SUPABASE_BUCKET" in str(failure)


async def test_a_bucket_that_refuses_pngs_is_refused_for_good(make_storage, storage_emulator):
    storage_emulator.state.buckets[storage_emulator.bucket].allowed_mime_types = ["image/jpeg"]

    failure = await failure_of(make_storage())

    assert isinstance(failure, QrStorageRefused) and failure.reason == REFUSED
    assert "mime type image/png is not supported" in str(failure)


# ------------------------------------------------------------------------------------------ transient
@pytest.mark.parametrize(
    ("operation", "status"),
    [("upload", 503), ("upload", 502), ("upload", 500), ("upload", 429), ("sign", 503)],
)
async def test_an_outage_is_a_transient_error_and_the_next_save_succeeds(
    make_storage, storage_emulator, operation, status
):
    storage = make_storage()
    storage_emulator.control("POST", "faults", {"operation": operation, "status": status})

    failure = await failure_of(storage, "txn_retry")
    url = await storage.save("txn_retry", qr.lpa_qr_png(LPA))

    assert isinstance(failure, QrStorageError) and isinstance(failure, TransientError)
    assert str(status) in str(failure)
    assert decode(httpx.get(url).content) == [LPA]


async def test_a_storage_that_does_not_answer_in_time_is_a_transient_error(make_storage, storage_emulator):
    storage_emulator.control("POST", "faults", {"operation": "upload", "status": None, "sleepSeconds": 1.0})
    impatient = httpx.AsyncClient(timeout=0.2)

    failure = await failure_of(make_storage(http_client=impatient))

    assert isinstance(failure, QrStorageError) and "did not answer in time" in str(failure)


async def test_a_storage_nobody_listens_on_is_a_transient_error(make_storage):
    failure = await failure_of(make_storage(url=f"http://127.0.0.1:{free_port()}"))

    assert isinstance(failure, QrStorageError) and "could not be reached" in str(failure)


async def test_a_save_is_bounded_as_a_whole_not_only_request_by_request(make_storage, storage_emulator):
    # Each request answers well within its own timeout (10 s); together they outlast the save's bound.
    for operation in ("upload", "sign"):
        storage_emulator.control(
            "POST", "faults", {"operation": operation, "status": None, "sleepSeconds": 1.0}
        )
    storage = make_storage(timeout_seconds=1.5)

    failure = await failure_of(storage, "txn_slow")
    storage_emulator.control("DELETE", "faults")
    url = await storage.save("txn_slow", qr.lpa_qr_png(LPA))

    assert isinstance(failure, QrStorageError) and "within 1.5 s" in str(failure)
    assert decode(httpx.get(url).content) == [LPA]


async def test_an_unexpected_missing_object_on_signing_is_not_mistaken_for_a_refusal(
    make_storage, storage_emulator
):
    # Storage answers NoSuchKey when asked to sign what it has not got (yet): our upload just landed.
    storage = make_storage()
    real_put = storage_emulator.state.put

    def put_then_lose(*args, **kwargs):
        stored = real_put(*args, **kwargs)
        storage_emulator.state.objects.clear()  # a replica that has not seen the write
        return stored

    storage_emulator.state.put = put_then_lose  # type: ignore[method-assign]

    failure = await failure_of(storage, "txn_lag")

    assert isinstance(failure, QrStorageError) and "Object not found" in str(failure)
    assert [op["status"] for op in storage_emulator.operations("sign")] == [400]


# ------------------------------------------------------------------------------------------ advice
async def test_a_url_that_is_not_the_project_url_is_refused_with_advice_to_fix_supabase_url(
    make_storage, storage_emulator
):
    failure = await failure_of(make_storage(url=f"{storage_emulator.url}/storage/v1"))

    assert isinstance(failure, QrStorageRefused) and failure.reason == REFUSED
    assert "Route POST:/storage/v1/storage/v1/object/" in str(failure)
    assert "check SUPABASE_URL" in str(failure) and "without /storage/v1" in str(failure)


async def test_a_bucket_whose_size_limit_refuses_the_png_gets_the_bucket_limits_advice(
    make_storage, storage_emulator
):
    storage_emulator.state.buckets[storage_emulator.bucket].file_size_limit = 100

    failure = await failure_of(make_storage())

    assert isinstance(failure, QrStorageRefused) and failure.reason == REFUSED
    assert "413" in str(failure) and "file size limit" in str(failure)


# ------------------------------------------------------------------------------------------ verify
async def test_verify_passes_for_a_private_bucket_with_signed_urls_and_warns_of_nothing(
    make_storage, storage_emulator, caplog
):
    await make_storage().verify()

    assert [op["status"] for op in storage_emulator.operations("bucket")] == [200]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_verify_warns_when_signed_urls_are_configured_for_a_public_bucket(
    make_storage, storage_emulator, caplog
):
    make_public(storage_emulator)

    await make_storage().verify()

    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "bucket is public" in warning.getMessage() and warning.bucket == storage_emulator.bucket


async def test_after_verify_public_urls_need_no_second_look_at_the_bucket(make_storage, storage_emulator):
    make_public(storage_emulator)
    storage = make_storage(signed_url_seconds=0)

    await storage.verify()
    await storage.save("txn_pub1", qr.lpa_qr_png(LPA))

    assert len(storage_emulator.operations("bucket")) == 1


@pytest.mark.parametrize("which", ["forged", "garbage"])
async def test_verify_refuses_a_key_the_project_does_not_accept_naming_the_setting_not_the_key(
    make_storage, storage_emulator, which
):
    key = {"forged": tokens.api_key("service_role", "another-projects-secret"), "garbage": "not-a-key"}[which]

    with pytest.raises(QrStorageRefused) as raised:
        await make_storage(service_role_key=key).verify()

    assert raised.value.reason == UNAUTHORIZED and "SUPABASE_SERVICE_ROLE_KEY" in str(raised.value)
    assert key not in f"{raised.value} {raised.value!r} {raised.value.__cause__}"


async def test_verify_refuses_a_missing_bucket_naming_the_setting(make_storage):
    with pytest.raises(QrStorageRefused) as raised:
        await make_storage(bucket="esim-qr-typo").verify()

    assert raised.value.reason == BUCKET_MISSING and "SUPABASE_BUCKET" in str(raised.value)


async def test_verify_refuses_public_urls_for_a_private_bucket(make_storage):
    with pytest.raises(QrStorageRefused) as raised:
        await make_storage(signed_url_seconds=0).verify()

    assert raised.value.reason == BUCKET_PRIVATE and "SUPABASE_SIGNED_URL_SECONDS" in str(raised.value)


@pytest.mark.parametrize("outage", ["nobody listens", "gateway 503", "too slow"])
async def test_verify_calls_an_outage_transient(make_storage, storage_emulator, outage):
    if outage == "nobody listens":
        storage = make_storage(url=f"http://127.0.0.1:{free_port()}")
    elif outage == "gateway 503":
        storage_emulator.control("POST", "faults", {"operation": "bucket", "status": 503})
        storage = make_storage()
    else:
        storage_emulator.control(
            "POST", "faults", {"operation": "bucket", "status": None, "sleepSeconds": 1.0}
        )
        storage = make_storage(timeout_seconds=0.3)

    with pytest.raises(QrStorageError):
        await storage.verify()
