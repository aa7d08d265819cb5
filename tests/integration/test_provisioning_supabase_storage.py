"""The provisioning service storing QR codes in Supabase Storage: the real RabbitMQ and Postgres, the
Zendit and Stripe emulators, the Supabase Storage emulator, the service in-process (harness of
test_provisioning_service.py, which runs the app's real lifespan) with SUPABASE_URL and
SUPABASE_SERVICE_ROLE_KEY set. Start-up verifies the storage: a configuration Storage refuses stops
the service before it consumes anything; an outage does not.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from esim_common.order_states import OrderStatus
from esim_sandbox.serve import free_port
from esim_sandbox.storage_emulator import tokens
from provisioning import qr
from provisioning.storage import QrStorageRefused
from tests.fixtures.storage_emulator import StorageEmulator
from tests.integration import test_provisioning_service as svc
from tests.integration.test_provisioning_service import (
    expected_lpa,
    refunds_of,
    wait_for_messages,
    wait_for_status,
    zendit_posts,
    zendit_purchases,
)

pytestmark = [pytest.mark.broker, pytest.mark.db]

start_provisioning = svc.start_provisioning
funded_order = svc.funded_order


def supabase_settings(emulator: StorageEmulator, key: str | None = None) -> dict[str, object]:
    return {
        "supabase_url": emulator.url,
        "supabase_service_role_key": SecretStr(key or emulator.service_role_key),
    }


async def test_a_funded_order_is_provisioned_with_its_qr_code_in_the_bucket_behind_a_signed_url(
    start_provisioning, funded_order, db, zendit_emulator, storage_emulator
):
    service = await start_provisioning(**supabase_settings(storage_emulator))
    txn = await funded_order()

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED)
    announced = await wait_for_messages(service, "notify.order-provisioned", 1)
    fetched = httpx.get(order.qr_code_url)  # as the customer's browser would: no key

    assert order.qr_code_url.startswith(
        f"{storage_emulator.url}/storage/v1/object/sign/esim-qrcodes/{txn}.png?token="
    )
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert qr.decode_png(fetched.content) == [expected_lpa(zendit_emulator, txn)]
    assert storage_emulator.stored(f"{txn}.png") == fetched.content
    # The event names the object, never the signed URL's token (a capability to the activation QR).
    assert [m["qr_code_url"] for m in announced] == [order.qr_code_url.split("?")[0]]
    assert not (Path(service.settings.qr_storage_dir) / f"{txn}.png").exists()
    # The local QR route is not mounted: Supabase serves the images.
    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://provisioning") as client:
        assert (await client.get(f"/qrcodes/{txn}.png")).status_code == 404


async def test_a_storage_outage_is_retried_and_the_order_is_provisioned_once(
    start_provisioning, funded_order, db, zendit_emulator, storage_emulator
):
    service = await start_provisioning(**supabase_settings(storage_emulator))
    txn = await funded_order()
    storage_emulator.control("POST", "faults", {"operation": "upload", "count": 2, "status": 503})
    posts_before = zendit_posts()

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION)
    announced = await wait_for_messages(service, "notify.order-provisioned", 1)

    assert order.status == OrderStatus.PROVISIONED
    # Two 503s from the gateway, then the upload that landed: the retry tiers carried the order.
    assert [op["status"] for op in storage_emulator.operations("upload")] == [503, 503, 200]
    assert zendit_purchases(zendit_emulator, txn) == [txn] and zendit_posts() - posts_before == 1
    assert [m["transaction_id"] for m in announced] == [txn]
    assert qr.decode_png(httpx.get(order.qr_code_url).content) == [expected_lpa(zendit_emulator, txn)]


def logged_text(caplog) -> str:
    return "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)


# ------------------------------------------------------------------------------------------ start-up
async def test_the_service_refuses_to_start_with_a_key_the_project_refuses_naming_the_setting_not_the_key(
    start_provisioning, storage_emulator, caplog
):
    wrong_key = tokens.api_key("service_role", "the-secret-of-some-other-project")

    with caplog.at_level(logging.DEBUG), pytest.raises(QrStorageRefused) as refused:
        await start_provisioning(**supabase_settings(storage_emulator, wrong_key))

    assert refused.value.reason == "qr_storage_unauthorized"
    assert "SUPABASE_SERVICE_ROLE_KEY" in str(refused.value) and wrong_key not in str(refused.value)
    assert "SUPABASE_SERVICE_ROLE_KEY" in logged_text(caplog) and wrong_key not in logged_text(caplog)
    assert [op["operation"] for op in storage_emulator.state.log] == ["bucket"]  # looked, stored nothing


def test_the_service_process_exits_at_start_up_saying_which_setting_to_fix(storage_emulator, tmp_path):
    wrong_key = tokens.api_key("service_role", "the-secret-of-some-other-project")
    env = {name: value for name, value in os.environ.items() if not name.startswith("SUPABASE_")}
    env.update(
        SUPABASE_URL=storage_emulator.url,
        SUPABASE_SERVICE_ROLE_KEY=wrong_key,
        HTTP_PORT=str(free_port()),
        QR_STORAGE_DIR=str(tmp_path / "qrcodes"),
    )

    done = subprocess.run(
        [sys.executable, "-m", "provisioning"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Application startup failed" in output
    assert "SUPABASE_SERVICE_ROLE_KEY" in output and wrong_key not in output
    assert [op["operation"] for op in storage_emulator.state.log] == ["bucket"]


async def test_the_service_refuses_to_start_without_its_bucket(start_provisioning, storage_emulator):
    with pytest.raises(QrStorageRefused) as refused:
        await start_provisioning(**supabase_settings(storage_emulator), supabase_bucket="esim-qr-typo")

    assert refused.value.reason == "qr_storage_bucket_missing" and "SUPABASE_BUCKET" in str(refused.value)


async def test_the_service_starts_while_storage_is_down_and_provisions_once_it_is_back(
    start_provisioning, funded_order, db, zendit_emulator, storage_emulator, caplog
):
    storage_emulator.control("POST", "faults", {"operation": "bucket", "status": 503})

    with caplog.at_level(logging.WARNING):
        service = await start_provisioning(**supabase_settings(storage_emulator))
    txn = await funded_order()
    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION)

    assert [op["status"] for op in storage_emulator.operations("bucket")] == [503]
    assert "could not be checked at start-up" in logged_text(caplog)
    assert order.status == OrderStatus.PROVISIONED
    assert qr.decode_png(httpx.get(order.qr_code_url).content) == [expected_lpa(zendit_emulator, txn)]


# ------------------------------------------------------------------------------------------ refused later
async def test_a_key_supabase_refuses_holds_the_order_for_an_operator_and_never_refunds(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator, storage_emulator, caplog
):
    service = await start_provisioning(**supabase_settings(storage_emulator))
    key = storage_emulator.service_role_key
    # After start-up, the project's JWT secret is rotated: the key the service holds is refused now.
    storage_emulator.state.jwt_secret = "the-projects-new-jwt-secret"
    txn = await funded_order()

    with caplog.at_level(logging.DEBUG):
        await service.publish_funded(txn)
        order = await wait_for_status(
            db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED, OrderStatus.PROVISIONED
        )

    assert order.status == OrderStatus.NEEDS_ATTENTION
    assert order.failure_reason == "qr_storage_unauthorized"
    assert refunds_of(stripe_emulator, order) == []  # Zendit delivered: the money stays, a person decides
    assert zendit_purchases(zendit_emulator, txn) == [txn]
    # Refused for good: no retry tiers spent on it, nothing stored, nobody told the order failed.
    assert [op["status"] for op in storage_emulator.operations("upload")] == [400]
    assert storage_emulator.stored(f"{txn}.png") is None
    assert await service.drain("notify.order-failed") == []
    assert "SUPABASE_SERVICE_ROLE_KEY" in logged_text(caplog)  # the operator is told what to fix ...
    assert key not in logged_text(caplog)  # ... and never shown the key
