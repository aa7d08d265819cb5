"""Which QR storage provisioning uses, the settings that choose it, how Supabase Storage errors are
judged (plain functions, and the client over `httpx.MockTransport`), and how the service's lifespan
verifies the storage and closes its clients. No network.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from esim_common.order_states import OrderStatus
from esim_common.settings import load_settings
from esim_sandbox import storage_emulator
from esim_sandbox.stack import Stack
from provisioning import domain, main
from provisioning.main import create_app, qr_storage
from provisioning.storage import LocalQrStorage, QrStorageError, StorageKind, storage_kind
from provisioning.supabase_storage import (
    REFUSED,
    SIGN,
    UPLOAD,
    QrStorageRefused,
    SupabaseQrStorage,
    Verdict,
    is_retryable,
    judge,
)
from tests.unit.test_events_and_settings import PRODUCTION_SECRETS

KEY = "service-role-key-0123456789"
PROJECT = "https://abc.supabase.co"


# ------------------------------------------------------------------------------------------ the choice
@pytest.mark.parametrize(("url", "key"), [(None, None), ("", ""), ("  ", None)])
def test_without_supabase_settings_the_qr_codes_stay_in_the_local_directory(url, key):
    assert storage_kind(url, key) == StorageKind.LOCAL


def test_with_a_url_and_a_key_the_qr_codes_go_to_supabase_storage():
    assert storage_kind("https://abc.supabase.co", KEY) == StorageKind.SUPABASE


@pytest.mark.parametrize(
    ("url", "key", "missing"),
    [("https://abc.supabase.co", None, "SUPABASE_SERVICE_ROLE_KEY"), (None, KEY, "SUPABASE_URL")],
)
def test_half_a_supabase_configuration_is_refused_naming_what_is_missing_and_never_the_key(url, key, missing):
    with pytest.raises(ValueError, match=f"but {missing} is not") as raised:
        storage_kind(url, key)
    assert KEY not in str(raised.value)


async def test_the_service_builds_the_storage_its_settings_choose(tmp_path):
    local = qr_storage(
        load_settings(qr_storage_dir=str(tmp_path), supabase_url="", supabase_service_role_key="")
    )
    supabase = qr_storage(
        load_settings(
            supabase_url="https://abc.supabase.co",
            supabase_service_role_key=SecretStr(KEY),
            supabase_bucket="qr",
            supabase_signed_url_seconds=60,
        )
    )
    try:
        assert isinstance(local, LocalQrStorage) and local.directory == tmp_path
        assert isinstance(supabase, SupabaseQrStorage)
        assert (supabase.url, supabase.bucket, supabase.signed_url_seconds) == (
            "https://abc.supabase.co",
            "qr",
            60,
        )
    finally:
        await supabase.aclose()


# ------------------------------------------------------------------------------------------ error fates
@pytest.mark.parametrize(
    "statuses",
    [(500, 500), (503, None), (None, 503), (502, 502), (429, 429), (544, 544), ("503", 400)],
    ids=str,
)
def test_server_trouble_and_throttling_are_retried(statuses):
    body, http = statuses
    assert is_retryable(int(body) if body is not None else None, http)


@pytest.mark.parametrize("statuses", [(400, 400), (401, 401), (403, 400), (404, 400), (409, 400), (415, 400)])
def test_client_errors_are_not_retried(statuses):
    assert not is_retryable(*statuses)


@pytest.mark.parametrize(
    ("step", "status", "http_status", "error", "message", "verdict"),
    [
        (UPLOAD, 503, 503, "InternalError", "failure to get a peer", Verdict.TRANSIENT),
        (UPLOAD, 403, 400, "Unauthorized", "invalid signature", Verdict.UNAUTHORIZED),
        (UPLOAD, 401, 401, "InternalError", "Invalid API key", Verdict.UNAUTHORIZED),  # the gateway
        (
            UPLOAD,
            400,
            400,
            "Unauthorized",
            'new row violates row-level security policy for table "objects"',
            Verdict.UNAUTHORIZED,
        ),
        (UPLOAD, 404, 400, "Bucket not found", "Bucket not found", Verdict.BUCKET_MISSING),
        (UPLOAD, 404, 400, "NoSuchBucket", "The specified bucket does not exist", Verdict.BUCKET_MISSING),
        (UPLOAD, 400, 400, "InvalidRequest", "Bucket not found", Verdict.BUCKET_MISSING),
        (SIGN, 404, 400, "not_found", "Object not found", Verdict.TRANSIENT),  # right after our upload
        (SIGN, 404, 400, "NoSuchKey", "The specified key does not exist", Verdict.TRANSIENT),
        (UPLOAD, 404, 400, "not_found", "Object not found", Verdict.REFUSED),
        (
            UPLOAD,
            415,
            400,
            "invalid_mime_type",
            "mime type image/png is not supported",
            Verdict.BUCKET_LIMITS,
        ),
        (
            UPLOAD,
            413,
            400,
            "Payload too large",
            "The object exceeded the maximum size",
            Verdict.BUCKET_LIMITS,
        ),
        (UPLOAD, 400, 413, "InternalError", "Unable to parse error message: <html>", Verdict.BUCKET_LIMITS),
        (UPLOAD, 400, 400, "EntityTooLarge", "too large", Verdict.BUCKET_LIMITS),
        (
            UPLOAD,
            404,
            404,
            "Not Found",
            "Route POST:/storage/v1/storage/v1/object/b/x not found",
            Verdict.WRONG_URL,
        ),
        (
            UPLOAD,
            404,
            404,
            "InternalError",
            "Unable to parse error message: <html>404</html>",
            Verdict.WRONG_URL,
        ),
        (UPLOAD, 301, 301, "InternalError", "Unable to parse error message: ", Verdict.WRONG_URL),
        (UPLOAD, 400, 307, "InternalError", "Moved", Verdict.WRONG_URL),
        (UPLOAD, 409, 400, "Duplicate", "The resource already exists", Verdict.REFUSED),
        (UPLOAD, 400, 400, "InvalidKey", "Invalid key: x", Verdict.REFUSED),
        (UPLOAD, 404, 404, "Not Found", "Not Found", Verdict.REFUSED),
    ],
)
def test_each_storage_error_gets_the_verdict_that_says_what_to_fix(
    step, status, http_status, error, message, verdict
):
    assert judge(step=step, status=status, http_status=http_status, error=error, message=message) == verdict


def test_a_storage_refusal_after_zendit_delivered_is_never_refunded():
    # The order is still `purchasing` when storing fails (the transaction rolled back), whatever the
    # refusal's reason: an operator decides, because the customer may well have the eSIM.
    assert not domain.refund_is_safe(OrderStatus.PURCHASING)


# ------------------------------------------------------------------------------------------ advice
def storage_answering(
    answer: Callable[[httpx.Request], httpx.Response], **options: object
) -> SupabaseQrStorage:
    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    return SupabaseQrStorage(
        url=PROJECT, service_role_key=KEY, bucket="qr", signed_url_seconds=60, http_client=client, **options
    )


def storage_error(status: str, error: str, message: str, *, http: int = 400) -> httpx.Response:
    return httpx.Response(http, json={"statusCode": status, "error": error, "message": message})


async def refusal_of(storage: SupabaseQrStorage) -> QrStorageRefused:
    with pytest.raises(QrStorageRefused) as raised:
        await storage.save("txn_1", b"\x89PNG")
    return raised.value


async def test_a_redirect_is_refused_with_advice_to_check_supabase_url():
    storage = storage_answering(
        lambda r: httpx.Response(301, headers={"location": "https://elsewhere.example"})
    )

    refusal = await refusal_of(storage)

    assert refusal.reason == REFUSED and "301" in str(refusal)
    assert "check SUPABASE_URL" in str(refusal) and "https://<ref>.supabase.co" in str(refusal)


async def test_a_refusal_by_row_level_security_asks_for_the_service_role_key():
    said = 'new row violates row-level security policy for table "objects"'
    refusal = await refusal_of(storage_answering(lambda r: storage_error("400", "Unauthorized", said)))

    assert refusal.reason == "qr_storage_unauthorized" and "SUPABASE_SERVICE_ROLE_KEY" in str(refusal)


async def test_a_refusal_of_any_other_kind_says_what_the_server_said_scrubbed_and_short():
    said = f"header apikey {KEY} is odd " + "x" * 1000
    refusal = await refusal_of(storage_answering(lambda r: storage_error("400", "InvalidRequest", said)))

    assert refusal.reason == REFUSED and "header apikey" in str(refusal)
    assert KEY not in str(refusal) and len(str(refusal)) < 700


async def test_a_missing_object_when_signing_our_own_upload_is_tried_again_later():
    def answer(request: httpx.Request) -> httpx.Response:
        if "/object/sign/" in request.url.path:
            return storage_error("404", "not_found", "Object not found")
        return httpx.Response(200, json={"Id": "1", "Key": "qr/txn_1.png"})

    with pytest.raises(QrStorageError, match="could not sign"):
        await storage_answering(answer).save("txn_1", b"\x89PNG")


# ------------------------------------------------------------------------------------------ the client
async def test_the_storage_closes_the_http_client_it_made_and_leaves_a_given_one_open():
    given = httpx.AsyncClient()
    borrowing = SupabaseQrStorage(
        url=PROJECT, service_role_key=KEY, bucket="qr", signed_url_seconds=60, http_client=given
    )
    owning = SupabaseQrStorage(url=PROJECT, service_role_key=KEY, bucket="qr", signed_url_seconds=60)

    await borrowing.aclose()
    await owning.aclose()

    assert not given.is_closed and owning._http.is_closed
    await given.aclose()


async def test_a_failing_close_does_not_keep_the_other_clients_open(monkeypatch, tmp_path):
    app = create_app(load_settings(qr_storage_dir=str(tmp_path)))
    provisioner = app.state.provisioner
    closed: list[str] = []

    async def refuse_to_start(storage: object) -> None:
        raise RuntimeError("start-up stopped here")

    async def broken_close() -> None:
        closed.append("zendit")
        raise OSError("zendit's client would not close")

    def recording(name: str) -> Callable[[], object]:
        async def close() -> None:
            closed.append(name)

        return close

    monkeypatch.setattr(main, "verify_storage", refuse_to_start)
    monkeypatch.setattr(provisioner.zendit, "aclose", broken_close)
    monkeypatch.setattr(provisioner.stripe, "aclose", recording("stripe"))
    monkeypatch.setattr(provisioner.storage, "aclose", recording("storage"))

    with pytest.raises(OSError, match="would not close") as raised:
        async with app.router.lifespan_context(app):
            pass

    assert closed == ["zendit", "stripe", "storage"]
    assert isinstance(raised.value.__context__, RuntimeError)  # the start-up failure is kept, chained


async def test_the_local_directory_is_verified_writable_and_an_unwritable_one_is_only_an_outage(tmp_path):
    await LocalQrStorage(tmp_path / "new" / "qrcodes", "http://x").verify()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")

    with pytest.raises(QrStorageError, match="QR_STORAGE_DIR"):
        await LocalQrStorage(blocked, "http://x").verify()

    assert (tmp_path / "new" / "qrcodes").is_dir() and list((tmp_path / "new" / "qrcodes").iterdir()) == []


# ------------------------------------------------------------------------------------------ settings
def supabase_settings(url: str, key: str = KEY, **others: object):
    return load_settings(supabase_url=url, supabase_service_role_key=key, **others)


@pytest.mark.parametrize(
    "url",
    [
        "https://abc.supabase.co/storage/v1",
        "https://abc.supabase.co/rest/v1/",
        "https://abc.supabase.co/?apikey=x",
        "https://abc.supabase.co/#storage",
    ],
)
def test_a_supabase_url_with_a_path_or_query_is_refused_asking_for_the_project_url(url):
    with pytest.raises(ValidationError, match=r"must be the project URL, e\.g\. https://<ref>\.supabase\.co"):
        supabase_settings(url)


@pytest.mark.parametrize("url", ["abc.supabase.co", "ftp://abc.supabase.co", "https://", "https://[::1"])
def test_a_supabase_url_that_is_not_an_http_url_is_refused(url):
    with pytest.raises(ValidationError, match="SUPABASE_URL"):
        supabase_settings(url)


def test_the_supabase_url_and_key_are_stripped_of_stray_whitespace():
    settings = supabase_settings(f"  {PROJECT}/ \n", f" {KEY}\n")

    assert settings.supabase_url == f"{PROJECT}/"
    assert settings.supabase_service_role_key.get_secret_value() == KEY


def test_outside_the_sandbox_the_key_may_only_travel_over_https_or_loopback():
    with pytest.raises(ValidationError, match="must use https with ENVIRONMENT=production") as raised:
        supabase_settings("http://abc.supabase.co", **PRODUCTION_SECRETS)
    assert KEY not in str(raised.value)

    for url in (
        "https://abc.supabase.co",
        "http://127.0.0.1:54321",
        "http://localhost:54321",
        "http://[::1]:1",
    ):
        assert supabase_settings(url, **PRODUCTION_SECRETS).supabase_url == url
    assert supabase_settings("http://abc.supabase.co").supabase_url == "http://abc.supabase.co"  # sandbox


@pytest.mark.parametrize(
    ("url", "key", "message"),
    [
        (PROJECT, "   ", "SUPABASE_SERVICE_ROLE_KEY is blank"),
        (PROJECT, "", "SUPABASE_URL is set but SUPABASE_SERVICE_ROLE_KEY is not"),
        ("  ", KEY, "SUPABASE_SERVICE_ROLE_KEY is set but SUPABASE_URL is not"),
        (None, KEY, "SUPABASE_SERVICE_ROLE_KEY is set but SUPABASE_URL is not"),
    ],
)
def test_settings_refuse_a_blank_key_and_half_a_supabase_configuration(url, key, message):
    with pytest.raises(ValidationError, match=message) as raised:
        load_settings(supabase_url=url, supabase_service_role_key=key)
    assert KEY not in str(raised.value)


def test_settings_without_supabase_are_fine_empty_or_unset():
    assert load_settings(supabase_url="", supabase_service_role_key="").supabase_url is None
    assert load_settings(supabase_url=None, supabase_service_role_key=None).supabase_service_role_key is None


# ------------------------------------------------------------------------------------------ the stack
@pytest.mark.parametrize(
    ("extra_env", "bucket", "seconds", "public"),
    [
        ({}, storage_emulator.DEFAULT_BUCKET, "604800", False),
        ({"SUPABASE_SIGNED_URL_SECONDS": "0"}, "esim-qrcodes", "0", True),
        ({"SUPABASE_BUCKET": "qr-test", "SUPABASE_SIGNED_URL_SECONDS": "60"}, "qr-test", "60", False),
    ],
)
def test_a_stack_on_the_storage_emulator_tells_provisioning_the_emulators_bucket_whatever_dot_env_says(
    tmp_path, monkeypatch, extra_env, bucket, seconds, public
):
    stack = Stack(
        database_url="postgresql://x",
        amqp_url="amqp://x",
        workdir=tmp_path,
        storage="supabase",
        extra_env=extra_env,
    )
    (tmp_path / ".env").write_text("SUPABASE_BUCKET=somebody-elses-bucket\nSUPABASE_SIGNED_URL_SECONDS=0\n")
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("SUPABASE_")]:
        monkeypatch.delenv(name)
    for name, value in stack.service_env("provisioning").items():
        monkeypatch.setenv(name, value)

    settings = load_settings()
    command = stack._sandbox_process().command

    assert (settings.supabase_bucket, str(settings.supabase_signed_url_seconds)) == (bucket, seconds)
    assert f"--storage-bucket={bucket}" in command
    assert ("--storage-public-bucket" in command) is public
