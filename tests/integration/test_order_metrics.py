"""The order series behind the dashboard's per-step and refund panels, on real Postgres (and, for the
refund, RabbitMQ and the Stripe emulator): how long an order spent in each step, refunds by failed step."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from esim_common.compensation import fail_and_refund
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.providers.stripe import StripeGateway
from esim_common.publisher import EventPublisher, create_broker
from tests.integration.test_compensation import paid_order
from tests.integration.test_migrations_and_transitions import insert_order

pytestmark = [pytest.mark.broker, pytest.mark.db]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


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


async def test_moving_an_order_on_observes_the_time_it_spent_in_the_state_it_left(db):
    txn = await insert_order(db)
    # Ninety seconds at checkout before paying; the first move is timed from the order's creation.
    await db.execute(
        "UPDATE esim_purchases SET created_at = now() - interval '90 seconds' WHERE transaction_id = $1", txn
    )
    before = sample("esim_order_step_seconds_sum", step="pending_payment")
    count = sample("esim_order_step_seconds_count", step="pending_payment")
    async with db.acquire() as conn:
        await transition(conn, txn, OrderStatus.PAID)
    assert sample("esim_order_step_seconds_count", step="pending_payment") == count + 1
    assert 89 <= sample("esim_order_step_seconds_sum", step="pending_payment") - before < 100

    # Thirty seconds paid: timed from the move into `paid`, not from the order's creation.
    await db.execute(
        "UPDATE order_transitions SET at = now() - interval '30 seconds' WHERE transaction_id = $1", txn
    )
    before = sample("esim_order_step_seconds_sum", step="paid")
    count = sample("esim_order_step_seconds_count", step="paid")
    async with db.acquire() as conn:
        await transition(conn, txn, OrderStatus.FUNDING)
        await transition(conn, txn, OrderStatus.FUNDING)  # a redelivery: no move, nothing observed
    assert sample("esim_order_step_seconds_count", step="paid") == count + 1
    assert 29 <= sample("esim_order_step_seconds_sum", step="paid") - before < 40


async def test_a_refund_is_counted_once_under_the_step_that_failed_however_often_the_failure_path_runs(
    db, gateway, stripe_emulator, publisher
):
    txn = await paid_order(db, gateway, stripe_emulator, path=(OrderStatus.PAID, OrderStatus.FUNDING))
    before = sample("esim_refunds_total", step="funding")
    for _ in range(2):  # a redelivery runs the failure path again: same refund, announced again
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
    assert sample("esim_refunds_total", step="funding") == before + 1
