"""What notify does with each SMTP fate, end to end: the real broker (private topology), this test's
database, and the sandbox SMTP capture over real sockets, with TLS and AUTH where the case needs them.

    4xx (421, 451) ──► retry tiers (1 s, 3 s, ...) ──► sent once the server takes it
    5xx, 535 login refused, certificate that fails verification ──► no retry: the order goes to
        needs_attention, order.failed(step=delivery) is published, and one operator alert is raised
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from esim_common.order_repository import get_order
from esim_common.order_states import OrderStatus
from esim_common.service import ServiceContext
from esim_sandbox.smtp_capture import SmtpCapture, TlsMode
from notify.mailer import CERTIFICATE_REASON
from tests.fixtures.smtp_capture import SmtpCertificates, StartSmtpCapture
from tests.integration.test_notify_delivery import (
    provisioned_event,
    provisioned_order,
    published,
    queue_depth,
    running_notify,
    wait_until,
)
from tests.integration.test_notify_smtp_tls import leaked, log_texts

pytestmark = [pytest.mark.broker, pytest.mark.db]

USERNAME = "shop@example.com"


def retried(ctx: ServiceContext) -> float:
    """How many times the eSIM email's message went to a retry tier."""
    queue = ctx.topology.queue("notify.order-provisioned").name
    value = REGISTRY.get_sample_value("esim_messages_processed_total", {"queue": queue, "outcome": "retried"})
    return value or 0.0


async def dead_lettered(ctx: ServiceContext) -> int:
    return await queue_depth(ctx, ctx.topology.queue("notify.order-provisioned").dlq)


async def status_is(db: asyncpg.Pool, txn: str, status: OrderStatus) -> bool:
    order = await get_order(db, txn)
    return order is not None and order.status is status


async def email_status(db: asyncpg.Pool, txn: str, template: str) -> str | None:
    return await db.fetchval(
        "SELECT status FROM sent_emails WHERE transaction_id = $1 AND template = $2", txn, template
    )


def delivery_alerts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The operator alerts raised because the eSIM email failed for good (notify's on_delivery_failed)."""
    return [
        record
        for record in caplog.records
        if getattr(record, "alert", None) == "operator" and record.funcName == "on_delivery_failed"
    ]


async def database_dump(db: asyncpg.Pool, txn: str) -> list[str]:
    rows = []
    for table in ("esim_purchases", "order_transitions", "sent_emails"):
        found = await db.fetch(
            f"SELECT row_to_json(t)::text AS row FROM {table} t WHERE transaction_id = $1", txn
        )
        rows += [record["row"] for record in found]
    return rows


# --------------------------------------------------------------------------- accepted


async def test_the_esim_email_goes_out_over_implicit_tls_with_a_login(
    service_settings, db, start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates
):
    password = f"pw-{uuid.uuid4().hex}"
    capture = start_smtp_capture(
        tls=TlsMode.IMPLICIT, tls_context=smtp_certificates.server_context, credentials=(USERNAME, password)
    )
    settings = service_settings.model_copy(
        update={
            "smtp_port": capture.port,
            "smtp_tls": True,
            "smtp_ca_file": str(smtp_certificates.ca_file),
            "smtp_username": USERNAME,
            "smtp_password": SecretStr(password),
        }
    )
    txn = await provisioned_order(db, Path(settings.qr_storage_dir))
    async with running_notify(settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: status_is(db, txn, OrderStatus.DELIVERED))

    [delivery] = capture.deliveries
    assert delivery.tls and delivery.login == USERNAME
    assert capture.messages[0]["To"].addresses[0].addr_spec == "ada@example.com"


@pytest.mark.parametrize("reply", ["421 4.3.2 Service shutting down", "451 4.3.0 Try again later"])
async def test_a_server_deferring_twice_gets_the_email_on_the_third_attempt_once(
    reply: str, service_settings, db, smtp_capture: SmtpCapture
):
    smtp_capture.refuse_next(2, reply)
    txn = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: status_is(db, txn, OrderStatus.DELIVERED))
        retries = retried(ctx)
        dead = await dead_lettered(ctx)

    assert smtp_capture.refused == [reply, reply]
    assert len(smtp_capture.messages) == 1
    assert retries == 2  # through the retry tiers, once per deferral
    assert dead == 0
    assert await email_status(db, txn, "esim_delivery") == "sent"


# --------------------------------------------------------------------------- rejected for good


async def test_a_550_puts_the_order_in_front_of_an_operator_without_retrying(
    service_settings, db, smtp_capture: SmtpCapture, caplog
):
    caplog.set_level(logging.INFO)
    smtp_capture.refuse_next(1, "550 5.7.1 Message rejected as spam")
    txn = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: status_is(db, txn, OrderStatus.NEEDS_ATTENTION))
        [alert] = await smtp_capture.wait_for(1)  # the operator email still goes out
        retries = retried(ctx)
        failed = await published(ctx, "reconcile.order-failed")

    order = await get_order(db, txn)
    assert order.failure_reason == "email_failed: email_rejected_550"
    assert retries == 0
    assert [(event["step"], event["transaction_id"]) for event in failed] == [("delivery", txn)]
    assert alert["To"] == service_settings.service_owner_email
    assert len(delivery_alerts(caplog)) == 1


async def test_a_wrong_smtp_password_is_one_operator_alert_and_is_never_written_anywhere(
    service_settings, db, start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates, caplog
):
    caplog.set_level(logging.DEBUG)
    wrong = f"canary-{uuid.uuid4().hex}"
    capture = start_smtp_capture(
        tls=TlsMode.STARTTLS,
        tls_context=smtp_certificates.server_context,
        credentials=(USERNAME, f"right-{uuid.uuid4().hex}"),
    )
    settings = service_settings.model_copy(
        update={
            "smtp_port": capture.port,
            "smtp_starttls": True,
            "smtp_ca_file": str(smtp_certificates.ca_file),
            "smtp_username": USERNAME,
            "smtp_password": SecretStr(wrong),
        }
    )
    txn = await provisioned_order(db, Path(settings.qr_storage_dir))
    async with running_notify(settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: status_is(db, txn, OrderStatus.NEEDS_ATTENTION))
        # The operator email goes through the same broken login: wait until it failed too.
        await wait_until(lambda: _is_failed(db, txn, "operator_alert"))
        retries = retried(ctx)
        dead = await dead_lettered(ctx)
        failed = await published(ctx, "reconcile.order-failed")

    order = await get_order(db, txn)
    assert order.failure_reason == "email_failed: email_rejected_535"
    assert retries == 0 and dead == 0
    assert [(event["step"], event["transaction_id"]) for event in failed] == [("delivery", txn)]
    assert len(delivery_alerts(caplog)) == 1
    assert capture.logins and not any(attempt.accepted for attempt in capture.logins)
    assert all(attempt.tls for attempt in capture.logins)  # the password only ever crossed TLS
    assert capture.messages == []
    texts = [*log_texts(caplog), *map(json.dumps, failed), *await database_dump(db, txn)]
    assert leaked(wrong, texts) == []


async def test_an_untrusted_server_certificate_is_not_retried(
    service_settings, db, start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates
):
    """No SMTP_CA_FILE and a certificate from a private CA: an operator must fix the configuration."""
    capture = start_smtp_capture(tls=TlsMode.STARTTLS, tls_context=smtp_certificates.server_context)
    settings = service_settings.model_copy(update={"smtp_port": capture.port, "smtp_starttls": True})
    txn = await provisioned_order(db, Path(settings.qr_storage_dir))
    async with running_notify(settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: status_is(db, txn, OrderStatus.NEEDS_ATTENTION))
        retries = retried(ctx)

    order = await get_order(db, txn)
    assert order.failure_reason == f"email_failed: {CERTIFICATE_REASON}"
    assert retries == 0
    assert capture.messages == []


async def _is_failed(db: asyncpg.Pool, txn: str, template: str) -> bool:
    return await email_status(db, txn, template) == "failed"
