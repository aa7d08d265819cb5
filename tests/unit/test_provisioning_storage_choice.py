"""Which QR storage provisioning uses, and how Supabase Storage errors are judged: plain functions."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from esim_common.order_states import OrderStatus
from esim_common.settings import load_settings
from provisioning import domain
from provisioning.main import qr_storage
from provisioning.storage import LocalQrStorage, StorageKind, storage_kind
from provisioning.supabase_storage import (
    BUCKET_MISSING,
    REFUSAL_REASONS,
    REFUSED,
    UNAUTHORIZED,
    SupabaseQrStorage,
    is_retryable,
    refusal_reason,
)

KEY = "service-role-key-0123456789"


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


def test_each_refusal_names_what_an_operator_must_fix():
    assert refusal_reason(403, "Unauthorized") == UNAUTHORIZED
    assert refusal_reason(401, "InternalError") == UNAUTHORIZED  # a gateway that rejects the apikey
    assert refusal_reason(404, "Bucket not found") == BUCKET_MISSING
    assert refusal_reason(404, "not_found") == REFUSED
    assert refusal_reason(415, "invalid_mime_type") == REFUSED


@pytest.mark.parametrize("reason", sorted(REFUSAL_REASONS))
def test_a_storage_refusal_after_zendit_delivered_is_never_refunded(reason):
    # The order is still `purchasing` when storing fails (the transaction rolled back): an operator
    # decides, because the customer may well have the eSIM.
    assert not domain.refund_is_safe(reason, OrderStatus.PURCHASING)
