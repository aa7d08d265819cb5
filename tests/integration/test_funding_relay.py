"""The announcement relay on the real broker and database: order.funded rows nobody published.

A batch funds orders whose own order.paid delivery may be gone (dead-lettered while the order was in
funding, say). When the batch's publish fails for such an order, the deciding order's retry announces
only its own; the relay publishes the rest once they have stayed unpublished RELAY_AFTER_SECONDS, once
each, and never a row a delivery holds while publishing it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import REGISTRY

from esim_common.events import Event, OrderFunded, OrderPaid
from esim_common.order_repository import get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.publisher import PublishFailed
from funding import relay as relay_module
from funding import repository as repo
from funding.relay import AnnouncementRelay
from tests.fixtures.funding import COST, Funding, running, set_wallet
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db]

S = OrderStatus


@pytest.fixture
def relay_interval() -> float:
    """The service's relay loop runs a round at start-up, then every this many seconds; the tests that
    run rounds themselves keep it out of their way."""
    return 3600.0


@pytest.fixture
async def funding(service_settings, amqp_url, monkeypatch, relay_interval) -> AsyncIterator[Funding]:
    monkeypatch.setattr(relay_module, "RELAY_INTERVAL_SECONDS", relay_interval)
    async with running(service_settings, amqp_url) as service:
        yield service


def relayed_total() -> float:
    return REGISTRY.get_sample_value("esim_funding_announcements_relayed_total") or 0.0


async def funded_unannounced(funding: Funding, event: OrderPaid) -> None:
    """What a batch leaves when its publish of this order's order.funded is lost: funded, the event
    in the outbox, unpublished; and no delivery of the order's order.paid left to publish it."""
    async with funding.pool.acquire() as conn, conn.transaction():
        await transition(conn, event.transaction_id, S.FUNDING)
        await transition(conn, event.transaction_id, S.FUNDED)
        await repo.add_announcement(
            conn, OrderFunded(transaction_id=event.transaction_id, offer_id=event.offer_id, zendit_cost=COST)
        )


async def age_announcements(funding: Funding, *events: OrderPaid, seconds: int = 60) -> None:
    await funding.pool.execute(
        "UPDATE outbox SET created_at = created_at - make_interval(secs => $2)"
        " WHERE transaction_id = ANY($1::text[]) AND routing_key = 'order.funded'",
        [e.transaction_id for e in events],
        float(seconds),
    )


async def unpublished(funding: Funding, event: OrderPaid) -> int:
    """The order's order.funded rows nobody has published."""
    return int(
        await funding.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE transaction_id = $1 AND routing_key = 'order.funded'"
            " AND published_at IS NULL",
            event.transaction_id,
        )
    )


def announced(messages: list[dict[str, object]]) -> list[str]:
    return sorted(str(m["transaction_id"]) for m in messages)


async def test_a_stranded_order_funded_is_published_once_by_the_relay_and_only_once_old(
    funding, paid_order, caplog
):
    stranded, fresh = await paid_order(), await paid_order()
    await funded_unannounced(funding, stranded)
    await funded_unannounced(funding, fresh)
    await age_announcements(funding, stranded)
    relay = AnnouncementRelay(pool=lambda: funding.pool, publisher=funding.ctx.publisher)
    before = relayed_total()
    caplog.set_level(logging.WARNING, logger="esim.funding.relay")

    assert await relay.run_once() == 1
    assert await relay.run_once() == 0  # stamped: not again

    assert announced(await funding.messages("provisioning.order-funded")) == [stranded.transaction_id]
    assert await unpublished(funding, stranded) == 0 and await unpublished(funding, fresh) == 1
    assert relayed_total() == before + 1
    [said] = [r for r in caplog.records if r.name == "esim.funding.relay"]
    assert said.levelname == "WARNING" and said.transaction_id == stranded.transaction_id
    # A late delivery of the stranded order finds it published.
    await funding.app.state.fund_order.announce(stranded.transaction_id)
    assert await funding.messages("provisioning.order-funded") == []


async def test_the_relay_skips_a_row_a_delivery_holds_while_publishing_it(funding, paid_order):
    held, other = await paid_order(), await paid_order()
    await funded_unannounced(funding, held)
    await funded_unannounced(funding, other)
    await age_announcements(funding, held, other)
    relay = AnnouncementRelay(pool=lambda: funding.pool, publisher=funding.ctx.publisher)
    delivery: asyncpg.Connection = await asyncpg.connect(funding.settings.database_url)
    try:
        async with delivery.transaction():  # held's own delivery, publishing it right now
            await delivery.fetch(repo.SELECT_UNPUBLISHED_FUNDED, held.transaction_id)
            assert await asyncio.wait_for(relay.run_once(), 5) == 1  # does not wait for the row
            assert announced(await funding.messages("provisioning.order-funded")) == [other.transaction_id]
    finally:
        await delivery.close()

    await funding.app.state.fund_order.announce(held.transaction_id)  # what the delivery goes on to do
    assert await relay.run_once() == 0
    assert announced(await funding.messages("provisioning.order-funded")) == [held.transaction_id]


async def test_the_relay_keeps_going_after_a_failed_round_and_stamps_what_the_broker_confirmed(
    funding, paid_order
):
    first, second = await paid_order(), await paid_order()
    await funded_unannounced(funding, first)
    await funded_unannounced(funding, second)
    await age_announcements(funding, first, seconds=120)  # oldest first: first, then second
    await age_announcements(funding, second, seconds=60)
    publisher = funding.ctx.publisher

    class RefusesSecondOnce:
        refused = False

        async def publish(self, event: Event) -> None:
            if event.transaction_id == second.transaction_id and not self.refused:
                self.refused = True
                raise PublishFailed("broker gone")
            await publisher.publish(event)

    relay = AnnouncementRelay(pool=lambda: funding.pool, publisher=RefusesSecondOnce())

    with pytest.raises(PublishFailed):
        await relay.run_once()
    assert await unpublished(funding, first) == 0 and await unpublished(funding, second) == 1
    assert await relay.run_once() == 1

    messages = await funding.messages("provisioning.order-funded")
    assert announced(messages) == sorted([first.transaction_id, second.transaction_id])


@pytest.mark.parametrize("relay_interval", [0.5])  # the service's loop, at a pace a test can wait for
async def test_an_order_funded_by_a_batch_whose_publish_failed_and_whose_delivery_is_gone_is_relayed(
    funding, paid_order, zendit_emulator
):
    set_wallet(zendit_emulator, 10 * COST.amount)
    a, gone = await paid_order(), await paid_order()
    async with funding.pool.acquire() as conn:  # gone's delivery moved it to funding, then dead-lettered
        await transition(conn, gone.transaction_id, S.FUNDING)
    fund_order = funding.app.state.fund_order
    publisher = fund_order._publisher

    class LosesGone:
        """The broker refuses gone's order.funded (every time: a's retry never publishes it anyway)."""

        async def publish(self, event: Event) -> None:
            if isinstance(event, OrderFunded) and event.transaction_id == gone.transaction_id:
                raise PublishFailed("broker gone")
            await publisher.publish(event)

    fund_order._publisher = LosesGone()

    await funding.deliver(a)  # funds a and gone; publishes a, loses gone; a's retry announces a only
    await eventually(lambda: funding.handled("ok") >= 1, within=15, what="a's retry")
    assert (await get_order(funding.pool, gone.transaction_id)).status == S.FUNDED
    assert announced(await funding.messages("provisioning.order-funded")) == [a.transaction_id]
    assert await unpublished(funding, gone) == 1

    await age_announcements(funding, gone)  # as if RELAY_AFTER_SECONDS had passed

    # The service's own relay loop (every RELAY_INTERVAL_SECONDS) publishes it.
    async def relayed() -> bool:
        return await unpublished(funding, gone) == 0

    await eventually(relayed, within=10, what="the relay loop publishes gone's order.funded")
    assert announced(await funding.messages("provisioning.order-funded")) == [gone.transaction_id]
