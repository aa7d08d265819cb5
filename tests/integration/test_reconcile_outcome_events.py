"""Reconcile's consumers log and count every outcome; redeliveries and unknown orders change nothing."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from prometheus_client import REGISTRY

from esim_common.events import OrderDelivered, OrderFailed, OrderRefunded
from esim_common.money import Money
from esim_common.topology import delete
from reconcile.main import create_app

pytestmark = [pytest.mark.broker, pytest.mark.db]

WAIT_SECONDS = 20.0


def settled(ctx, queue: str, outcome: str = "ok") -> float:
    labels = {"queue": ctx.topology.queue(queue).name, "outcome": outcome}
    return REGISTRY.get_sample_value("esim_messages_processed_total", labels) or 0.0


def unknown_failures() -> float:
    labels = {"event": "order.failed"}
    return REGISTRY.get_sample_value("esim_unknown_order_events_total", labels) or 0.0


async def wait_for(condition) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not settled in time"
        await asyncio.sleep(0.05)


async def test_outcomes_for_known_and_unknown_orders_are_acked_and_counted_never_dead_lettered(
    service_settings, db
):
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    await db.execute(
        """INSERT INTO esim_purchases (transaction_id, offer_id, price, currency, recipient_email,
                                       recipient_name, status)
           VALUES ($1, 'O', 1000, 'USD', 'c@example.com', 'C', 'refunded')""",
        txn,
    )
    unknown_before = (
        REGISTRY.get_sample_value("esim_unknown_order_events_total", {"event": "order.failed"}) or 0
    )
    app = create_app(service_settings)
    ctx = app.state.ctx
    await ctx.start()
    try:
        events = [
            OrderDelivered(transaction_id=txn),
            OrderRefunded(transaction_id=txn, refund_id="re_1", amount=Money(1000, "USD")),
            OrderFailed(transaction_id=txn, step="funding", reason="topup_declined"),
            OrderFailed(transaction_id="txn-unknown", step="refund", reason="refund_failed"),
        ]
        for event in (*events, events[1]):  # the refund twice: a redelivery
            await ctx.publisher.publish(event)
        await wait_for(
            lambda: (
                (
                    settled(ctx, "reconcile.order-delivered"),
                    settled(ctx, "reconcile.order-refunded"),
                    settled(ctx, "reconcile.order-failed"),
                )
                == (1, 2, 2)
            )
        )
        connection = await aio_pika.connect(service_settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            dead = [
                (
                    await channel.declare_queue(ctx.topology.queue(q).dlq, passive=True)
                ).declaration_result.message_count
                for q in ("reconcile.order-delivered", "reconcile.order-refunded", "reconcile.order-failed")
            ]
    finally:
        await ctx.stop()
        connection = await aio_pika.connect(service_settings.amqp_url)
        async with connection:
            await delete(await connection.channel(), ctx.topology)

    assert dead == [0, 0, 0]
    assert unknown_failures() == unknown_before + 1
    assert await db.fetchval("SELECT status FROM esim_purchases WHERE transaction_id = $1", txn) == "refunded"


async def test_a_capture_failure_is_logged_as_an_error_like_other_failures_an_operator_must_fix(
    service_settings, db, caplog
):
    """Manual capture: a delivered order's payment could not be captured, money the shop is owed."""
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    await db.execute(
        """INSERT INTO esim_purchases (transaction_id, offer_id, price, currency, recipient_email,
                                       recipient_name, status, capture_method)
           VALUES ($1, 'O', 1000, 'USD', 'c@example.com', 'C', 'delivered', 'manual')""",
        txn,
    )
    app = create_app(service_settings)
    ctx = app.state.ctx
    await ctx.start()
    try:
        for step, reason in (("capture", "capture_failed: retries_exhausted"), ("funding", "topup_declined")):
            await ctx.publisher.publish(OrderFailed(transaction_id=txn, step=step, reason=reason))
        await wait_for(lambda: settled(ctx, "reconcile.order-failed") == 2)
    finally:
        await ctx.stop()
        connection = await aio_pika.connect(service_settings.amqp_url)
        async with connection:
            await delete(await connection.channel(), ctx.topology)

    levels = {
        record.step: record.levelname
        for record in caplog.records
        if record.getMessage() == "order failed" and getattr(record, "step", None)
    }
    assert levels == {"capture": "ERROR", "funding": "WARNING"}
