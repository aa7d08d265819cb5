"""Failure emails: the customer is told once what happened and whether they were refunded; the operator
is emailed when the refund itself failed."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import asyncpg
import pytest
from aiosmtpd.controller import Controller
from prometheus_client import REGISTRY

from esim_common.events import FailedStep, OrderFailed
from esim_common.money import Money
from esim_common.order_repository import create_order
from esim_common.service import ServiceContext
from esim_sandbox.serve import free_port
from tests.fixtures.notify import running_notify
from tests.fixtures.polling import eventually
from tests.integration.test_notify_delivery import SelectiveSmtp

pytestmark = [pytest.mark.broker, pytest.mark.db]

WAIT_SECONDS = 20.0


async def failed_order(pool: asyncpg.Pool, status: str, *, refund_id: str | None = None) -> str:
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    async with pool.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id="ESIM-GLOBAL-30D-5GB",
            price=Money(1299, "USD"),
            zendit_cost=Money(900, "USD"),
            recipient_email="grace@example.com",
            recipient_name="Grace Hopper",
        )
        await conn.execute(
            """UPDATE esim_purchases SET status = $2, paid_at = now(), failed_at = now(), refund_id = $3,
                      refund_status = CASE WHEN $3::text IS NULL THEN NULL ELSE 'succeeded' END,
                      stripe_payment_intent_id = 'pi_' || $1, failure_reason = 'topup_declined'
                WHERE transaction_id = $1""",
            txn,
            status,
            refund_id,
        )
    return txn


async def handled(ctx: ServiceContext, before: float, count: int) -> None:
    """Wait until the notify.order-failed consumer has settled `count` more messages."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while ok_count(ctx) < before + count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{count} messages not handled within {WAIT_SECONDS} s")
        await asyncio.sleep(0.05)


def ok_count(ctx: ServiceContext) -> float:
    """Messages the notify.order-failed consumer acked after its handler returned."""
    queue = ctx.topology.queue("notify.order-failed").name
    labels = {"queue": queue, "outcome": "ok"}
    return REGISTRY.get_sample_value("esim_messages_processed_total", labels) or 0.0


async def publish_failure(ctx: ServiceContext, txn: str, step: FailedStep, times: int = 1) -> None:
    before = ok_count(ctx)
    event = OrderFailed(transaction_id=txn, step=step, reason="topup_declined")
    for _ in range(times):
        await ctx.publisher.publish(event)
    await handled(ctx, before, times)


async def test_a_refunded_order_gets_one_failure_email_that_says_it_was_refunded(
    service_settings, db, smtp_capture
):
    txn = await failed_order(db, "refunded", refund_id="re_123")
    async with running_notify(service_settings) as ctx:
        await publish_failure(ctx, txn, "funding", times=3)

    assert len(smtp_capture.messages) == 1
    message = smtp_capture.messages[0]
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    assert message["To"].addresses[0].addr_spec == "grace@example.com"
    assert "You have been refunded 12.99 USD" in text and "refunded 12.99 USD" in html
    assert "supplier could not take the order" in text  # the funding step, in plain words
    assert txn in text


async def test_a_released_authorisation_is_told_as_not_charged_not_as_a_refund(
    service_settings, db, smtp_capture
):
    """Manual capture: compensation cancelled the hold instead of refunding (refund_status canceled)."""
    txn = await failed_order(db, "refunded")
    await db.execute(
        "UPDATE esim_purchases SET capture_method = 'manual', refund_status = 'canceled' "
        "WHERE transaction_id = $1",
        txn,
    )
    async with running_notify(service_settings) as ctx:
        await publish_failure(ctx, txn, "funding")

    assert len(smtp_capture.messages) == 1
    text = smtp_capture.messages[0].get_body(preferencelist=("plain",)).get_content()
    assert "You have not been charged" in text and "hold of 12.99 USD" in text
    assert "refunded" not in text and "business days" not in text


async def test_a_failed_refund_tells_the_customer_we_are_on_it_and_emails_the_operator(
    service_settings, db, smtp_capture
):
    txn = await failed_order(db, "needs_attention")
    async with running_notify(service_settings) as ctx:
        await publish_failure(ctx, txn, "refund", times=2)

    by_recipient = {m["To"].addresses[0].addr_spec: m for m in smtp_capture.messages}
    assert len(smtp_capture.messages) == 2
    customer = by_recipient["grace@example.com"].get_body(preferencelist=("plain",)).get_content()
    assert "We are looking into it" in customer and "refunded" not in customer
    alert = by_recipient[service_settings.service_owner_email]
    assert txn in alert["Subject"]
    alert_text = alert.get_body(preferencelist=("plain",)).get_content()
    assert "Failed step: refund" in alert_text and "needs_attention" in alert_text


async def test_a_failure_email_for_an_unknown_order_is_dead_lettered_not_dropped(
    service_settings, smtp_capture
):
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(OrderFailed(transaction_id="txn-nobody", step="purchase", reason="x"))
        dlq = ctx.topology.queue("notify.order-failed").dlq
        connection = await aio_pika.connect(service_settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
            while (await channel.declare_queue(dlq, passive=True)).declaration_result.message_count != 1:
                assert asyncio.get_running_loop().time() < deadline, "not dead-lettered"
                await asyncio.sleep(0.05)

    assert smtp_capture.messages == []


async def test_the_operator_is_emailed_even_when_the_customers_address_refuses_the_failure_email(
    service_settings, db
):
    server = SelectiveSmtp(rejected={"grace@example.com"})
    controller = Controller(server, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        settings = service_settings.model_copy(update={"smtp_port": controller.port})
        txn = await failed_order(db, "needs_attention")
        async with running_notify(settings) as ctx:
            await ctx.publisher.publish(
                OrderFailed(transaction_id=txn, step="refund", reason="refund_failed")
            )
            await eventually(lambda: len(server.accepted) >= 1, within=WAIT_SECONDS, what="operator email")
            queue = ctx.topology.queue("notify.order-failed").name
            # The failure path ran and the message stays visible in the DLQ (an unsent failure email).
            labels = {"queue": queue, "outcome": "dead_lettered"}
            await eventually(
                lambda: (REGISTRY.get_sample_value("esim_messages_processed_total", labels) or 0) >= 1,
                within=WAIT_SECONDS,
                what="the customer's refusal took the failure path and was dead-lettered",
            )
    finally:
        controller.stop()

    assert [message["To"] for message in server.accepted] == [settings.service_owner_email]
    statuses = dict(await db.fetch("SELECT template, status FROM sent_emails WHERE transaction_id = $1", txn))
    assert statuses == {"order_failed": "failed", "operator_alert": "sent"}


class RefusingThenDeferringSmtp(SelectiveSmtp):
    """550 for the customer; 451 for the operator the first `defer` times, then accepted."""

    def __init__(self, rejected: set[str], deferred: str, defer: int) -> None:
        super().__init__(rejected)
        self.deferred, self.defer = deferred, defer

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == self.deferred and self.defer > 0:
            self.defer -= 1
            return "451 4.3.0 try again later"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


async def test_a_refused_customer_address_does_not_stop_a_deferred_operator_email_being_retried(
    service_settings, db
):
    """The customer's 550 is permanent, the operator's 451 transient: the message must be retried for the
    operator's sake (the customer is not emailed twice), not ended by the customer's refusal."""
    server = RefusingThenDeferringSmtp(
        rejected={"grace@example.com"}, deferred=service_settings.service_owner_email, defer=1
    )
    controller = Controller(server, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        settings = service_settings.model_copy(update={"smtp_port": controller.port})
        txn = await failed_order(db, "needs_attention")
        async with running_notify(settings) as ctx:
            await ctx.publisher.publish(
                OrderFailed(transaction_id=txn, step="refund", reason="refund_failed")
            )
            await eventually(lambda: len(server.accepted) >= 1, within=WAIT_SECONDS, what="operator email")
    finally:
        controller.stop()

    assert server.defer == 0
    assert [message["To"] for message in server.accepted] == [settings.service_owner_email]
    statuses = dict(await db.fetch("SELECT template, status FROM sent_emails WHERE transaction_id = $1", txn))
    assert statuses["operator_alert"] == "sent"
