"""What notify does with each SMTP fate, end to end: the real broker (private topology), this test's
database, and the sandbox SMTP capture over real sockets, with TLS and AUTH where the case needs them.

    4xx (421, 451), connection refused ──► wait (1 s, then 3 s, then 10 s) ──► sent once the server
        takes it, however long the outage, up to EMAIL_GIVE_UP_SECONDS after the QR was stored
    the relay refusing everyone (535 login refused, a certificate that fails verification) ──► the
        same wait, and one `smtp_relay_failing` alert (log line + gauge), not one per order
    give-up age passed ──► needs_attention, order.failed(step=delivery), one operator alert
    the recipient refused (5xx to RCPT TO, 550/552/553/554 to DATA) ──► needs_attention at once
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiosmtpd.controller import Controller
from prometheus_client import REGISTRY
from pydantic import SecretStr

from esim_common import outbox
from esim_common.order_repository import get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.service import ServiceContext
from esim_sandbox.serve import free_port
from esim_sandbox.smtp_capture import SmtpCapture, TlsMode
from notify.handlers import delivery_failed_event
from notify.main import create_app
from tests.fixtures.notify import running_notify
from tests.fixtures.smtp_capture import SmtpCertificates, StartSmtpCapture
from tests.integration.test_notify_delivery import (
    SelectiveSmtp,
    provisioned_event,
    provisioned_order,
    published,
    queue_depth,
    wait_until,
)
from tests.integration.test_notify_smtp_tls import leaked, log_texts

pytestmark = [pytest.mark.broker, pytest.mark.db]

USERNAME = "shop@example.com"


def settled(ctx: ServiceContext, outcome: str) -> float:
    queue = ctx.topology.queue("notify.order-provisioned").name
    value = REGISTRY.get_sample_value("esim_messages_processed_total", {"queue": queue, "outcome": outcome})
    return value or 0.0


def retried(ctx: ServiceContext) -> float:
    """How many times the eSIM email's message went to a retry tier (attempts used up)."""
    return settled(ctx, "retried")


def deferred(ctx: ServiceContext) -> float:
    """How many times the eSIM email's message was parked to wait (CheckAgainLater: no attempt used)."""
    return settled(ctx, "deferred")


def relay_alerts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "alert", None) == "smtp_relay_failing"]


async def stored_long_ago(db: asyncpg.Pool, txn: str, seconds: int) -> None:
    await db.execute(
        "UPDATE esim_purchases SET qr_stored_at = now() - make_interval(secs => $2) "
        "WHERE transaction_id = $1",
        txn,
        seconds,
    )


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
        waits = deferred(ctx)
        dead = await dead_lettered(ctx)

    assert smtp_capture.refused == [reply, reply]
    assert len(smtp_capture.messages) == 1
    assert waits == 2 and retries == 0  # it waited, once per deferral, using up no attempt
    assert dead == 0
    assert await email_status(db, txn, "esim_delivery") == "sent"


async def test_an_smtp_outage_longer_than_the_retry_tiers_still_ends_in_one_email(
    service_settings, db, smtp_capture: SmtpCapture
):
    """Five deferrals: more than the 3 retry tiers, which used to end in needs_attention after ~14 s."""
    settings = service_settings.model_copy(update={"email_give_up_seconds": 120})
    smtp_capture.refuse_next(5, "421 4.3.2 Service shutting down")
    txn = await provisioned_order(db, Path(settings.qr_storage_dir))
    async with running_notify(settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: status_is(db, txn, OrderStatus.DELIVERED), seconds=40)
        waits = deferred(ctx)
        dead = await dead_lettered(ctx)
        failed = await published(ctx, "reconcile.order-failed")

    assert len(smtp_capture.refused) == 5
    assert len(smtp_capture.messages) == 1
    assert waits == 5 and dead == 0 and failed == []


async def test_past_the_give_up_age_an_smtp_outage_puts_the_order_in_front_of_an_operator(
    service_settings, db, smtp_capture: SmtpCapture, caplog
):
    caplog.set_level(logging.INFO)
    settings = service_settings.model_copy(update={"email_give_up_seconds": 600})
    smtp_capture.refuse_next(1, "421 4.3.2 Service shutting down")
    txn = await provisioned_order(db, Path(settings.qr_storage_dir))
    await stored_long_ago(db, txn, 601)
    async with running_notify(settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: status_is(db, txn, OrderStatus.NEEDS_ATTENTION))
        [alert] = await smtp_capture.wait_for(1)  # the operator email (the 421 was for the first try)
        waits, retries = deferred(ctx), retried(ctx)
        failed = await published(ctx, "reconcile.order-failed")

    order = await get_order(db, txn)
    assert order.failure_reason == "email_failed: smtp_unavailable"
    assert waits == 0 and retries == 0
    assert [(event["step"], event["transaction_id"]) for event in failed] == [("delivery", txn)]
    assert alert["To"] == settings.service_owner_email
    assert len(delivery_alerts(caplog)) == 1


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


async def test_a_recipient_refused_at_rcpt_puts_the_order_in_front_of_an_operator_at_once(
    service_settings, db, caplog
):
    caplog.set_level(logging.INFO)
    handler = SelectiveSmtp(rejected={"ada@example.com"})
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        settings = service_settings.model_copy(update={"smtp_port": controller.port})
        txn = await provisioned_order(db, Path(settings.qr_storage_dir))
        async with running_notify(settings) as ctx:
            await ctx.publisher.publish(provisioned_event(txn))
            await wait_until(lambda: status_is(db, txn, OrderStatus.NEEDS_ATTENTION))
            await wait_until(lambda: _is_sent(db, txn, "operator_alert"))
            waits, retries = deferred(ctx), retried(ctx)
    finally:
        controller.stop()

    order = await get_order(db, txn)
    assert order.failure_reason == "email_failed: email_rejected_550"
    assert waits == 0 and retries == 0
    assert [message["To"] for message in handler.accepted] == [settings.service_owner_email]
    assert len(delivery_alerts(caplog)) == 1 and relay_alerts(caplog) == []


async def test_a_wrong_smtp_password_waits_with_one_relay_alert_and_is_never_written_anywhere(
    service_settings, db, start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates, caplog
):
    caplog.set_level(logging.DEBUG)
    wrong = f"canary-{uuid.uuid4().hex}"
    right = f"right-{uuid.uuid4().hex}"
    capture = start_smtp_capture(
        tls=TlsMode.STARTTLS, tls_context=smtp_certificates.server_context, credentials=(USERNAME, right)
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
    ctx = create_app(settings).state.ctx
    await ctx.start()
    try:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: _at_least(lambda: deferred(ctx), 3))  # three logins refused, waited
        retries = retried(ctx)
        dead = await dead_lettered(ctx)
        failed = await published(ctx, "reconcile.order-failed")
        relay_failing = REGISTRY.get_sample_value("esim_smtp_relay_failing")
    finally:
        await ctx.stop()  # the message stays parked on the broker

    assert await status_is(db, txn, OrderStatus.PROVISIONED)  # waiting, not in front of an operator
    assert retries == 0 and dead == 0 and failed == []
    assert delivery_alerts(caplog) == []
    [alert] = relay_alerts(caplog)  # one alert for the relay, not one per attempt or per order
    assert alert.reason == "smtp_login_refused_535"
    assert relay_failing == 1
    assert len(capture.logins) >= 3 and not any(attempt.accepted for attempt in capture.logins)
    assert all(attempt.tls for attempt in capture.logins)  # the password only ever crossed TLS
    assert capture.messages == []
    texts = [*log_texts(caplog), *await database_dump(db, txn)]
    assert leaked(wrong, texts) == []

    # The operator fixes SMTP_PASSWORD and restarts notify: the waiting email goes out, once.
    fixed = settings.model_copy(update={"smtp_password": SecretStr(right)})
    async with running_notify(fixed):
        await wait_until(lambda: status_is(db, txn, OrderStatus.DELIVERED))
    assert len(capture.messages) == 1
    assert REGISTRY.get_sample_value("esim_smtp_relay_failing") == 0


async def test_an_untrusted_server_certificate_waits_for_an_operator_to_fix_the_relay(
    service_settings, db, start_smtp_capture: StartSmtpCapture, smtp_certificates: SmtpCertificates, caplog
):
    """No SMTP_CA_FILE and a certificate from a private CA: every email would fail the same way, so
    the order waits (one relay alert) instead of going to needs_attention."""
    caplog.set_level(logging.INFO)
    capture = start_smtp_capture(tls=TlsMode.STARTTLS, tls_context=smtp_certificates.server_context)
    settings = service_settings.model_copy(update={"smtp_port": capture.port, "smtp_starttls": True})
    txn = await provisioned_order(db, Path(settings.qr_storage_dir))
    async with running_notify(settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: _at_least(lambda: deferred(ctx), 2))
        retries = retried(ctx)

    assert await status_is(db, txn, OrderStatus.PROVISIONED)
    assert retries == 0
    assert [alert.reason for alert in relay_alerts(caplog)] == ["smtp_certificate_invalid"]
    assert capture.messages == []


async def _is_failed(db: asyncpg.Pool, txn: str, template: str) -> bool:
    return await email_status(db, txn, template) == "failed"


async def _is_sent(db: asyncpg.Pool, txn: str, template: str) -> bool:
    return await email_status(db, txn, template) == "sent"


async def _at_least(value, minimum: float) -> bool:
    return value() >= minimum


async def test_an_order_failed_lost_after_the_move_to_needs_attention_is_published_on_redelivery(
    service_settings, db, smtp_capture: SmtpCapture
):
    """The failure path committed needs_attention with its order.failed in the outbox, then the process
    died before publishing it: the next delivery of order.provisioned publishes it, once."""
    txn = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    failure = "email_failed: email_rejected_550"
    async with db.acquire() as conn, conn.transaction():
        await transition(conn, txn, OrderStatus.NEEDS_ATTENTION, failure_reason=failure)
        await outbox.add(conn, delivery_failed_event(txn, failure))
    async with running_notify(service_settings) as ctx:
        for _ in range(2):  # a redelivery, and one more
            await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: _at_least(lambda: settled(ctx, "ok"), 2))
        failed = await published(ctx, "reconcile.order-failed")

    assert [(event["step"], event["reason"]) for event in failed] == [("delivery", failure)]
    # The customer is not emailed again (only the operator, about the failure notify now announced).
    assert [m["To"] for m in smtp_capture.messages if m["To"] != service_settings.service_owner_email] == []
    assert await status_is(db, txn, OrderStatus.NEEDS_ATTENTION)
