"""The failure policy on real Postgres, RabbitMQ and the Stripe emulator: refund once, announce, resume."""

from __future__ import annotations

import uuid

import aio_pika
import pytest

from esim_common.compensation import fail_and_refund
from esim_common.events import OrderFailed, OrderRefunded
from esim_common.money import Money
from esim_common.order_repository import create_order, get_order, record
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.providers.stripe import StripeGateway
from esim_common.publisher import EventPublisher, create_broker

pytestmark = [pytest.mark.broker, pytest.mark.db]

PRICE = Money(1299, "USD")


async def paid_order(
    db, gateway: StripeGateway, stripe_emulator, *, path: tuple[OrderStatus, ...], capture_method="automatic"
) -> str:
    """An order paid for real in the Stripe emulator (only authorised when `manual`), then walked
    through `path`."""
    txn = f"txn_{uuid.uuid4().hex[:16]}"
    session = await gateway.create_checkout_session(
        transaction_id=txn,
        amount=PRICE.amount,
        currency=PRICE.currency,
        product_name="eSIM",
        success_url="http://shop/ok",
        cancel_url="http://shop/cancel",
        capture_method=capture_method,
    )
    payment_intent = stripe_emulator.pay(session.id)["payment_intent"]["id"]
    async with db.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id="ESIM-US-7D-1GB",
            price=PRICE,
            zendit_cost=Money(500, "USD"),
            recipient_email="ada@example.com",
            recipient_name="Ada",
            capture_method=capture_method,
        )
        await record(conn, txn, stripe_payment_intent_id=payment_intent)
        for state in path:
            await transition(conn, txn, state)
    return txn


@pytest.fixture
async def gateway(stripe_emulator):
    async with StripeGateway(api_key=stripe_emulator.api_key, api_base=stripe_emulator.url) as client:
        yield client


@pytest.fixture
async def publisher(amqp_url, topology):
    broker = create_broker(amqp_url)
    await broker.start()
    yield EventPublisher(broker, topology)
    await broker.stop()


async def messages_in(amqp_url: str, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(message)
        return found


async def test_a_failed_topup_is_refunded_exactly_once_even_when_the_failure_path_runs_twice(
    db, gateway, stripe_emulator, publisher, topology, amqp_url
):
    txn = await paid_order(db, gateway, stripe_emulator, path=(OrderStatus.PAID, OrderStatus.FUNDING))
    for _ in range(2):  # a redelivery runs the failure path again
        final = await fail_and_refund(
            pool=db,
            stripe=gateway,
            publisher=publisher,
            transaction_id=txn,
            failed_state=OrderStatus.TOPUP_FAILED,
            step="funding",
            reason="CARD_DECLINED",
        )
        assert final == OrderStatus.REFUNDED

    order = await get_order(db, txn)
    refunds = stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id)
    assert len(refunds) == 1 and refunds[0]["amount"] == PRICE.amount
    assert order.refund_id == refunds[0]["id"] and order.failure_reason == "CARD_DECLINED"
    assert order.refunded_at is not None and order.failed_at is not None
    timeline = [
        r["to_status"]
        for r in await db.fetch("SELECT to_status FROM order_transitions WHERE transaction_id=$1", txn)
    ]
    assert timeline == ["paid", "funding", "topup_failed", "refund_pending", "refunded"]
    failed = await messages_in(amqp_url, topology.queue("notify.order-failed").name)
    assert {m.correlation_id for m in failed} == {txn} and len(failed) == 2  # announced on each run
    assert len(await messages_in(amqp_url, topology.queue("reconcile.order-refunded").name)) == 2


async def test_a_released_authorisation_is_recorded_as_released_not_as_a_refund(
    db, gateway, stripe_emulator, publisher, topology, amqp_url
):
    """Manual capture: the hold is cancelled. No refund exists, so no refund id is stored (a pi_ id is
    not one) and order.refunded says so with an empty refund_id."""
    txn = await paid_order(
        db, gateway, stripe_emulator, path=(OrderStatus.PAID, OrderStatus.FUNDING), capture_method="manual"
    )
    final = await fail_and_refund(
        pool=db,
        stripe=gateway,
        publisher=publisher,
        transaction_id=txn,
        failed_state=OrderStatus.TOPUP_FAILED,
        step="funding",
        reason="CARD_DECLINED",
    )

    order = await get_order(db, txn)
    assert final == OrderStatus.REFUNDED
    assert (order.refund_id, order.refund_status) == (None, "canceled")
    assert stripe_emulator.state.get("payment_intent", order.stripe_payment_intent_id)["status"] == "canceled"
    assert stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id) == []
    refunded = await messages_in(amqp_url, topology.queue("reconcile.order-refunded").name)
    assert [OrderRefunded.model_validate_json(m.body).refund_id for m in refunded] == [""]


async def test_a_delivered_order_is_never_refunded(db, gateway, stripe_emulator, publisher):
    path = (
        OrderStatus.PAID,
        OrderStatus.FUNDING,
        OrderStatus.FUNDED,
        OrderStatus.PURCHASING,
        OrderStatus.PROVISIONED,
        OrderStatus.DELIVERED,
    )
    txn = await paid_order(db, gateway, stripe_emulator, path=path)
    final = await fail_and_refund(
        pool=db,
        stripe=gateway,
        publisher=publisher,
        transaction_id=txn,
        failed_state=OrderStatus.PURCHASE_FAILED,
        step="purchase",
        reason="late duplicate",
    )
    order = await get_order(db, txn)
    assert final == OrderStatus.DELIVERED and order.refund_id is None
    assert stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id) == []


async def test_a_refund_stripe_refuses_leaves_the_order_for_an_operator(
    db, gateway, stripe_emulator, publisher, topology, amqp_url
):
    txn = await paid_order(db, gateway, stripe_emulator, path=(OrderStatus.PAID, OrderStatus.FUNDING))
    await record(db, txn, stripe_payment_intent_id="pi_does_not_exist")
    final = await fail_and_refund(
        pool=db,
        stripe=gateway,
        publisher=publisher,
        transaction_id=txn,
        failed_state=OrderStatus.TOPUP_FAILED,
        step="funding",
        reason="CARD_DECLINED",
    )
    order = await get_order(db, txn)
    assert final == OrderStatus.NEEDS_ATTENTION
    assert order.failure_reason.startswith("refund_failed: stripe_")
    failed = await messages_in(amqp_url, topology.queue("notify.order-failed").name)
    assert [OrderFailed.model_validate_json(m.body).step for m in failed] == ["refund"]
