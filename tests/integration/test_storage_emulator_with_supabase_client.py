"""The Supabase Storage emulator driven by the real `supabase` client (storage3) over loopback HTTP.

Whatever the provisioning service relies on is checked here the way the client sees it: uploads and
upserts, downloads, public URLs only for public buckets, signed URLs that expire and cannot be
tampered with, keys that are refused, and the error shapes storage3 parses (HTTP 400 with the real
status in the body; gateway answers for outages).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from storage3.exceptions import StorageApiError
from supabase import AsyncClient, AsyncClientOptions

from esim_sandbox.storage_emulator import tokens
from tests.fixtures.storage_emulator import StorageEmulator

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + b"\r\n--not-a-boundary\r\n"  # binary-hostile bytes
OTHER_PNG = b"\x89PNG\r\n\x1a\nsecond version"
AS_PNG = {"content-type": "image/png", "cache-control": "0"}
UPSERT = {**AS_PNG, "upsert": "true"}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


@pytest.fixture
def supabase_with(storage_emulator: StorageEmulator, http: httpx.AsyncClient) -> Callable[[str], AsyncClient]:
    def make(key: str) -> AsyncClient:
        return AsyncClient(storage_emulator.url, key, AsyncClientOptions(httpx_client=http))

    return make


@pytest.fixture
def supabase(storage_emulator: StorageEmulator, supabase_with) -> AsyncClient:
    return supabase_with(storage_emulator.service_role_key)


async def refused(call) -> StorageApiError:
    with pytest.raises(StorageApiError) as raised:
        await call
    return raised.value


# ------------------------------------------------------------------------------------------ objects
async def test_an_upload_is_stored_byte_for_byte_with_its_type_and_downloads_the_same(
    supabase, storage_emulator, http
):
    files = supabase.storage.from_("esim-qrcodes")

    uploaded = await files.upload("txn_1.png", PNG, AS_PNG)
    downloaded = await files.download("txn_1.png")
    direct = await http.get(
        f"{storage_emulator.url}/storage/v1/object/esim-qrcodes/txn_1.png",
        headers={"Authorization": f"Bearer {storage_emulator.service_role_key}"},
    )

    assert uploaded.full_path == "esim-qrcodes/txn_1.png"
    assert downloaded == PNG == storage_emulator.stored("txn_1.png")
    assert direct.headers["content-type"] == "image/png"
    assert direct.headers["cache-control"] == "max-age=0"  # Storage turns the seconds into max-age


async def test_an_existing_object_is_replaced_only_with_upsert(supabase, storage_emulator):
    files = supabase.storage.from_("esim-qrcodes")
    await files.upload("txn_2.png", PNG, AS_PNG)

    duplicate = await refused(files.upload("txn_2.png", OTHER_PNG, AS_PNG))
    kept = await files.download("txn_2.png")
    await files.upload("txn_2.png", OTHER_PNG, UPSERT)
    await files.update("txn_2.png", OTHER_PNG, AS_PNG)  # PUT always replaces

    assert (duplicate.status, duplicate.code, duplicate.message) == (
        "409",
        "Duplicate",
        "The resource already exists",
    )
    assert kept == PNG
    assert await files.download("txn_2.png") == OTHER_PNG
    [summary] = storage_emulator.control("GET", "state")["objects"]
    assert summary["writes"] == 3


async def test_a_missing_object_or_bucket_answers_like_storage(supabase, http, storage_emulator):
    missing_object = await refused(supabase.storage.from_("esim-qrcodes").download("nope.png"))
    missing_bucket = await refused(supabase.storage.from_("no-such-bucket").upload("a.png", PNG, AS_PNG))
    raw = await http.post(
        f"{storage_emulator.url}/storage/v1/object/no-such-bucket/a.png",
        headers={"Authorization": f"Bearer {storage_emulator.service_role_key}"},
        files={"file": ("a.png", PNG, "image/png")},
    )

    assert (missing_object.status, missing_object.code, missing_object.message) == (
        "404",
        "not_found",
        "Object not found",
    )
    assert (missing_bucket.status, missing_bucket.message) == ("404", "Bucket not found")
    # Storage's HTTP status is 400 for every non-internal error; the real one is in the body.
    assert raw.status_code == 400
    assert raw.json() == {
        "statusCode": "404",
        "code": "NoSuchBucket",
        "error": "Bucket not found",
        "message": "Bucket not found",
    }


# ------------------------------------------------------------------------------------------ buckets
async def test_buckets_are_created_read_and_made_public_through_the_client(supabase):
    await supabase.storage.create_bucket("receipts", options={"public": False})
    duplicate = await refused(supabase.storage.create_bucket("receipts"))
    private = await supabase.storage.get_bucket("receipts")
    await supabase.storage.update_bucket("receipts", {"public": True})
    public = await supabase.storage.get_bucket("receipts")
    missing = await refused(supabase.storage.get_bucket("nope"))

    assert (duplicate.status, duplicate.code) == ("409", "Duplicate")
    assert private.public is False and public.public is True
    assert {b.id for b in await supabase.storage.list_buckets()} == {"esim-qrcodes", "receipts"}
    assert (missing.status, missing.code) == ("404", "Bucket not found")


async def test_a_bucket_that_only_takes_jpegs_refuses_a_png(supabase):
    await supabase.storage.create_bucket("photos", options={"allowed_mime_types": ["image/jpeg"]})

    wrong_type = await refused(supabase.storage.from_("photos").upload("a.png", PNG, AS_PNG))

    assert (wrong_type.status, wrong_type.message) == ("415", "mime type image/png is not supported")


# ------------------------------------------------------------------------------------------ URLs
async def test_a_public_url_serves_the_object_only_while_the_bucket_is_public(supabase, http):
    files = supabase.storage.from_("esim-qrcodes")
    await files.upload("txn_3.png", PNG, AS_PNG)
    url = await files.get_public_url("txn_3.png")

    while_private = await http.get(url)
    await supabase.storage.update_bucket("esim-qrcodes", {"public": True})
    while_public = await http.get(url)  # no key: a public URL works in an <img> or a mail client

    assert url.endswith("/storage/v1/object/public/esim-qrcodes/txn_3.png")
    assert while_private.status_code == 400 and while_private.json()["message"] == "Bucket not found"
    assert while_public.status_code == 200 and while_public.content == PNG
    assert while_public.headers["content-type"] == "image/png"


async def test_a_signed_url_serves_a_private_object_without_a_key_until_it_expires(
    supabase, http, storage_emulator
):
    files = supabase.storage.from_("esim-qrcodes")
    await files.upload("txn_4.png", PNG, AS_PNG)

    signed = (await files.create_signed_url("txn_4.png", 60))["signedURL"]
    fresh = await http.get(signed)
    storage_emulator.control("POST", "clock", {"advanceSeconds": 61})
    expired = await http.get(signed)

    assert "/storage/v1/object/sign/esim-qrcodes/txn_4.png?token=" in signed
    assert fresh.status_code == 200 and fresh.content == PNG
    assert expired.status_code == 400
    assert expired.json()["statusCode"] == "400" and expired.json()["message"] == "jwt expired"


async def test_a_tampered_or_borrowed_signed_url_token_is_refused(supabase, http, storage_emulator):
    files = supabase.storage.from_("esim-qrcodes")
    await files.upload("txn_5.png", PNG, AS_PNG)
    await files.upload("txn_6.png", OTHER_PNG, AS_PNG)
    signed = (await files.create_signed_url("txn_5.png", 60))["signedURL"]
    base, _, token = signed.partition("?token=")
    header, claims, signature = token.split(".")
    forged_claims = tokens.sign({"url": "esim-qrcodes/txn_6.png", "exp": 2**40}, "guessed-secret").split(".")[
        1
    ]

    tampered = await http.get(f"{base}?token={header}.{forged_claims}.{signature}")
    flipped = await http.get(f"{base}?token={header}.{claims}.{signature[:-2]}xx")
    borrowed = await http.get(f"{base.replace('txn_5', 'txn_6')}?token={token}")  # txn_5's token, txn_6
    no_token = await http.get(base)

    assert [r.status_code for r in (tampered, flipped, borrowed, no_token)] == [400] * 4
    assert tampered.json()["message"] == flipped.json()["message"] == "invalid signature"
    assert borrowed.json()["message"] == "Invalid signature"
    assert no_token.json()["message"] == "querystring must have required property 'token'"


async def test_signing_a_missing_object_is_refused(supabase):
    missing = await refused(supabase.storage.from_("esim-qrcodes").create_signed_url("ghost.png", 60))

    assert (missing.status, missing.message) == ("404", "Object not found")


# ------------------------------------------------------------------------------------------ keys
async def test_a_wrong_missing_or_anon_key_is_refused_and_stores_nothing(
    supabase_with, storage_emulator, http
):
    forged = tokens.api_key("service_role", "not-the-project-secret")
    files_forged = supabase_with(forged).storage.from_("esim-qrcodes")
    files_garbage = supabase_with("not-a-jwt").storage.from_("esim-qrcodes")
    files_anon = supabase_with(storage_emulator.anon_key).storage.from_("esim-qrcodes")

    wrong = await refused(files_forged.upload("txn_7.png", PNG, UPSERT))
    garbage = await refused(files_garbage.upload("txn_7.png", PNG, UPSERT))
    anon = await refused(files_anon.upload("txn_7.png", PNG, UPSERT))
    anon_bucket = await refused(supabase_with(storage_emulator.anon_key).storage.get_bucket("esim-qrcodes"))
    missing = await http.post(
        f"{storage_emulator.url}/storage/v1/object/esim-qrcodes/txn_7.png",
        files={"file": ("txn_7.png", PNG, "image/png")},
    )

    assert (wrong.status, wrong.code, wrong.message) == ("403", "Unauthorized", "invalid signature")
    assert (garbage.status, garbage.message) == ("403", "jwt malformed")
    assert (anon.status, anon.message) == (
        "403",
        'new row violates row-level security policy for table "objects"',
    )
    assert (anon_bucket.status, anon_bucket.message) == ("404", "Bucket not found")  # hidden by RLS
    assert missing.status_code == 400 and missing.json()["message"] == "jwt must be provided"
    assert storage_emulator.stored("txn_7.png") is None


# ------------------------------------------------------------------------------------------ outages
async def test_an_injected_outage_answers_like_the_gateway_then_service_resumes(supabase, storage_emulator):
    files = supabase.storage.from_("esim-qrcodes")
    storage_emulator.control("POST", "faults", {"operation": "upload", "count": 2, "status": 503})

    first = await refused(files.upload("txn_8.png", PNG, UPSERT))
    second = await refused(files.upload("txn_8.png", PNG, UPSERT))
    await files.upload("txn_8.png", PNG, UPSERT)

    # The gateway's body is not a Storage error: storage3 keeps the HTTP status and says so.
    assert first.status == second.status == 503 and first.code == "InternalError"
    assert storage_emulator.stored("txn_8.png") == PNG
    assert [op["status"] for op in storage_emulator.operations("upload")] == [503, 503, 200]


async def test_a_slow_upload_fault_makes_the_client_time_out(storage_emulator):
    storage_emulator.control("POST", "faults", {"operation": "upload", "status": None, "sleepSeconds": 1.0})
    async with httpx.AsyncClient(timeout=0.2) as impatient:
        client = AsyncClient(
            storage_emulator.url,
            storage_emulator.service_role_key,
            AsyncClientOptions(httpx_client=impatient),
        )
        with pytest.raises(httpx.TimeoutException):
            await client.storage.from_("esim-qrcodes").upload("txn_9.png", PNG, UPSERT)


def test_reset_brings_back_the_starting_buckets_empty(storage_emulator):
    storage_emulator.state.put("esim-qrcodes", "x.png", PNG, "image/png", "no-cache", upsert=True)
    storage_emulator.control("POST", "faults", {"operation": "*", "status": 500})

    state = storage_emulator.control("POST", "reset")

    assert [b["id"] for b in state["buckets"]] == ["esim-qrcodes"] and state["buckets"][0]["public"] is False
    assert state["objects"] == [] and state["faults"] == [] and state["operations"] == []
