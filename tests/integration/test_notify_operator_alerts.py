"""Operator alerts (`operator.alert`): one email to SERVICE_OWNER_EMAIL per alert key, however often the
alert is delivered; when the operator cannot be emailed, the log line and counter are the last resort.

The notify service runs in-process on the real broker (a private topology prefix), this test's own
database and an SMTP server on loopback.
"""

from __future__ import annotations

import json
import logging
import uuid

import aio_pika
import asyncpg
import pytest
from aiosmtpd.controller import Controller
from prometheus_client import REGISTRY

from esim_common.events import OperatorAlert
from esim_common.money import Money
from esim_common.order_repository import create_order
from esim_common.service import ServiceContext
from esim_sandbox.serve import free_port
from tests.fixtures.notify import running_notify
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db]

ACTIVATION_CODE = "K2-1YT3J6-P4Z2KH"
QUEUE = "notify.operator-alert"


def settled(ctx: ServiceContext, outcome: str) -> float:
    labels = {"queue": ctx.topology.queue(QUEUE).name, "outcome": outcome}
    return REGISTRY.get_sample_value("esim_messages_processed_total", labels) or 0.0


async def publish(ctx: ServiceContext, alert: OperatorAlert, *, times: int = 1, outcome: str = "ok") -> None:
    """Publish `alert` `times` times and wait until the consumer has settled every copy."""
    before = settled(ctx, outcome)
    for _ in range(times):
        await ctx.publisher.publish(alert)
    await eventually(lambda: settled(ctx, outcome) >= before + times, within=20, what=f"{times} settled")


async def stuck_order(pool: asyncpg.Pool) -> str:
    """An order provisioning gave up on: needs_attention, with its Zendit id and activation data."""
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    async with pool.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id="ESIM-GLOBAL-30D-5GB",
            price=Money(3900, "USD"),
            zendit_cost=Money(2415, "USD"),
            recipient_email="ada@example.com",
            recipient_name="Ada Lovelace",
        )
        await conn.execute(
            """UPDATE esim_purchases SET status = 'needs_attention', paid_at = now(),
                      zendit_transaction_id = $1 || '-1', zendit_status = 'IN_PROGRESS',
                      smdp_address = 'smdp.example.com', activation_code = $2,
                      failure_reason = 'purchase_deadline_exceeded'
                WHERE transaction_id = $1""",
            txn,
            ACTIVATION_CODE,
        )
    return txn


def needs_attention(txn: str) -> OperatorAlert:
    return OperatorAlert(
        transaction_id=txn,
        alert="needs_attention",
        alert_key=f"needs_attention:{txn}",
        reason="purchase_deadline_exceeded",
        facts={"zendit_status": "IN_PROGRESS"},
    )


def wallet_short(txn: str) -> OperatorAlert:
    return OperatorAlert(
        transaction_id=txn,
        alert="wallet_short",
        alert_key=f"wallet_short:{txn}",
        reason="wallet_short",
        amount_to_add=Money(1_415, "USD"),
        facts={"orders_waiting": "2", "wallet_available": "10.00 USD"},
    )


async def dead_letters(ctx: ServiceContext) -> list[tuple[dict, dict]]:
    """Take every message in the operator-alert DLQ: (body, headers)."""
    taken = []
    connection = await aio_pika.connect(ctx.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(ctx.topology.queue(QUEUE).dlq)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append((json.loads(message.body), dict(message.headers)))
    return taken


def plain(message) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


async def test_a_needs_attention_alert_delivered_twice_sends_the_operator_one_email(
    service_settings, db, smtp_capture
):
    txn = await stuck_order(db)
    async with running_notify(service_settings) as ctx:
        await publish(ctx, needs_attention(txn), times=2)

    assert len(smtp_capture.messages) == 1
    message = smtp_capture.messages[0]
    text = plain(message)
    assert message["To"] == service_settings.service_owner_email
    assert txn in message["Subject"] and "purchase_deadline_exceeded" in message["Subject"]
    assert f"Zendit transaction id: {txn}-1" in text and "NOT refunded automatically" in text
    assert message.get_body(preferencelist=("html",)) is not None
    decoded = [part.get_content() for part in message.walk() if part.get_content_maintype() == "text"]
    assert decoded and not [part for part in decoded if ACTIVATION_CODE in part]
    row = await db.fetchrow("SELECT * FROM sent_emails WHERE transaction_id = $1", f"needs_attention:{txn}")
    assert (row["template"], row["status"], row["recipient"]) == (
        "operator_needs_attention",
        "sent",
        service_settings.service_owner_email,
    )


async def test_two_alerts_with_different_keys_for_one_order_are_two_emails(
    service_settings, db, smtp_capture
):
    txn = await stuck_order(db)
    later = needs_attention(txn).model_copy(update={"alert_key": f"needs_attention:{txn}:2"})
    async with running_notify(service_settings) as ctx:
        await publish(ctx, needs_attention(txn))
        await publish(ctx, later)

    assert len(smtp_capture.messages) == 2
    assert {m["Message-ID"] for m in smtp_capture.messages} != {smtp_capture.messages[0]["Message-ID"]}
    keys = await db.fetch(
        "SELECT transaction_id FROM sent_emails WHERE transaction_id LIKE $1 ORDER BY transaction_id",
        f"needs_attention:{txn}%",
    )
    assert [row["transaction_id"] for row in keys] == [f"needs_attention:{txn}", f"needs_attention:{txn}:2"]


async def test_a_wallet_short_alert_tells_how_much_to_add_once_per_shortage(service_settings, smtp_capture):
    first, second = (f"txn-{uuid.uuid4().hex[:16]}" for _ in range(2))
    async with running_notify(service_settings) as ctx:
        await publish(ctx, wallet_short(first), times=3)
        await publish(ctx, wallet_short(second))  # a later shortage is a new alert

    assert [m["Subject"] for m in smtp_capture.messages] == [
        "[eSIM operator alert] Zendit wallet short: add at least 14.15 USD"
    ] * 2
    assert "Orders waiting: 2" in plain(smtp_capture.messages[0])
    assert [first in plain(m) for m in smtp_capture.messages] == [True, False]


class RefusingSmtp:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        return "550 5.1.1 mailbox unavailable"


async def test_when_the_operator_cannot_be_emailed_the_alert_is_logged_counted_and_dead_lettered(
    service_settings, db, caplog
):
    controller = Controller(RefusingSmtp(), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        settings = service_settings.model_copy(update={"smtp_port": controller.port})
        labels = {"alert": "wallet_short"}
        before = REGISTRY.get_sample_value("esim_operator_alert_emails_failed_total", labels) or 0.0
        txn = f"txn-{uuid.uuid4().hex[:16]}"
        with caplog.at_level(logging.ERROR, logger="esim.notify"):
            async with running_notify(settings) as ctx:
                await publish(ctx, wallet_short(txn), outcome="dead_lettered")
                dead = await dead_letters(ctx)
    finally:
        controller.stop()

    # In the DLQ, the message shows in the DLQ depth and can be replayed once the address works.
    assert [(body["alert_key"], headers["x-esim-origin-queue"]) for body, headers in dead] == [
        (f"wallet_short:{txn}", ctx.topology.queue(QUEUE).name)
    ]
    lines = [r for r in caplog.records if r.getMessage().startswith("OPERATOR ALERT: could not email")]
    assert [(r.alert, r.alert_key, r.amount_to_add) for r in lines] == [
        ("wallet_short", f"wallet_short:{txn}", "14.15 USD")
    ]
    assert REGISTRY.get_sample_value("esim_operator_alert_emails_failed_total", labels) == before + 1
    status = await db.fetchval(
        "SELECT status FROM sent_emails WHERE transaction_id = $1", f"wallet_short:{txn}"
    )
    assert status == "failed"


async def delivered_order(pool: asyncpg.Pool) -> str:
    """An order emailed to its customer, with its Zendit id and activation data."""
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    async with pool.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id="ESIM-GLOBAL-30D-5GB",
            price=Money(3900, "USD"),
            zendit_cost=Money(2415, "USD"),
            recipient_email="ada@example.com",
            recipient_name="Ada Lovelace",
        )
        await conn.execute(
            """UPDATE esim_purchases SET status = 'delivered', paid_at = now(), emailed_at = now(),
                      zendit_transaction_id = $1, zendit_status = 'DONE',
                      smdp_address = 'smdp.example.com', activation_code = $2
                WHERE transaction_id = $1""",
            txn,
            ACTIVATION_CODE,
        )
    return txn


def qr_mismatch(txn: str) -> OperatorAlert:
    return OperatorAlert(
        transaction_id=txn,
        alert="qr_mismatch",
        alert_key=f"qr_mismatch:{txn}",
        reason="qr_mismatch_zendit",
        facts={"zendit_transaction_id": txn, "zendit_status": "DONE"},
    )


async def test_a_qr_mismatch_alert_says_the_order_was_delivered_and_is_sent_once(
    service_settings, db, smtp_capture
):
    txn = await delivered_order(db)
    async with running_notify(service_settings) as ctx:
        await publish(ctx, qr_mismatch(txn), times=2)

    [message] = smtp_capture.messages
    text = plain(message)
    assert message["To"] == service_settings.service_owner_email
    assert txn in message["Subject"] and "delivered" in message["Subject"]
    assert "Status now: delivered" in text and "built from the activation data" in text
    assert "Zendit console" in text and "No action is needed for the customer" in text
    # Not the needs_attention email: that one would say things that are false for a delivered order.
    assert "no automation will finish it" not in text and "may still deliver" not in text
    assert message.get_body(preferencelist=("html",)) is not None
    decoded = [part.get_content() for part in message.walk() if part.get_content_maintype() == "text"]
    assert decoded and not [part for part in decoded if ACTIVATION_CODE in part]
    row = await db.fetchrow("SELECT * FROM sent_emails WHERE transaction_id = $1", f"qr_mismatch:{txn}")
    assert (row["template"], row["status"]) == ("operator_qr_mismatch", "sent")
