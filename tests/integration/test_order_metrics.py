"""The order series behind the dashboard's per-step and refund panels, on real Postgres (and, for the
refund, RabbitMQ and the Stripe emulator): how long an order spent in each step, refunds by failed step."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from esim_common.compensation import fail_and_refund
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.providers.stripe import Refund, StripeGateway
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


class RefundsMeetFirst(StripeGateway):
    """Holds each refund call until `parties` calls wait, so that concurrent failure paths all refund
    before either moves the order to refunded: the interleaving in which each used to count the refund."""

    parties = 2

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._barrier = asyncio.Barrier(self.parties)

    async def create_refund(self, **kwargs) -> Refund:  # type: ignore[override]
        async with asyncio.timeout(10):  # a run that never refunds fails the test instead of hanging
            await self._barrier.wait()
        return await super().create_refund(**kwargs)


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


async def test_a_step_is_timed_as_the_gap_between_its_two_moves_in_the_order_timeline(db):
    # Both moves in one transaction that lasts a while: the timeline stamps both with its start, so the
    # time observed in `paid` is that gap (0), and the wait is not counted in both `paid` and `funding`.
    txn = await insert_order(db)
    before = sample("esim_order_step_seconds_sum", step="paid")
    async with db.acquire() as conn, conn.transaction():
        await transition(conn, txn, OrderStatus.PAID)
        await conn.execute("SELECT pg_sleep(0.3)")
        await transition(conn, txn, OrderStatus.FUNDING)
    gap = await db.fetchval(
        """SELECT extract(epoch FROM max(at) FILTER (WHERE to_status = 'funding')
                                   - max(at) FILTER (WHERE to_status = 'paid'))::float8
             FROM order_transitions WHERE transaction_id = $1""",
        txn,
    )
    assert sample("esim_order_step_seconds_sum", step="paid") - before == pytest.approx(gap, abs=1e-3)


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


async def test_two_concurrent_failure_paths_on_one_order_count_its_refund_once(
    db, stripe_emulator, publisher
):
    async with RefundsMeetFirst(api_key=stripe_emulator.api_key, api_base=stripe_emulator.url) as racing:
        txn = await paid_order(db, racing, stripe_emulator, path=(OrderStatus.PAID, OrderStatus.FUNDING))
        before = sample("esim_refunds_total", step="funding")
        finals = await asyncio.gather(
            *(
                fail_and_refund(
                    pool=db,
                    stripe=racing,
                    publisher=publisher,
                    transaction_id=txn,
                    failed_state=OrderStatus.TOPUP_FAILED,
                    step="funding",
                    reason="CARD_DECLINED",
                )
                for _ in range(RefundsMeetFirst.parties)
            )
        )
    assert finals == [OrderStatus.REFUNDED] * RefundsMeetFirst.parties
    assert sample("esim_refunds_total", step="funding") == before + 1
