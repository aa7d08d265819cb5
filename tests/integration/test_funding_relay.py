"""The announcement relay on the real broker and database: order.funded rows nobody published.

A batch funds orders whose own order.paid delivery may be gone (dead-lettered while the order was in
funding, say). When the batch's publish fails for such an order, the deciding order's retry announces
only its own; the relay publishes the rest once they have stayed unpublished RELAY_AFTER_SECONDS, once
each, and never a row a delivery holds while publishing it. A row it cannot publish is skipped and
counted, never blocking the rows behind it, and the age of the oldest unpublished row is exported.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import REGISTRY

from esim_common.events import Event, OrderFunded, OrderPaid
from esim_common.order_repository import get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.publisher import EventPublisher, PublishFailed
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


def relay_failures() -> float:
    return REGISTRY.get_sample_value("esim_funding_announcement_relay_failures_total") or 0.0


def oldest_unpublished_age() -> float | None:
    return REGISTRY.get_sample_value("esim_funding_oldest_unpublished_announcement_seconds")


class Refuses:
    """The service's publisher, but the broker refuses these orders' events (each time, or once)."""

    def __init__(self, publisher: EventPublisher, *refused: OrderPaid, once: bool = False) -> None:
        self._publisher = publisher
        self._refused = {e.transaction_id for e in refused}
        self._once = once

    async def publish(self, event: Event) -> None:
        if event.transaction_id in self._refused:
            if self._once:
                self._refused.discard(event.transaction_id)
            raise PublishFailed("broker gone")
        await self._publisher.publish(event)


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
    # 20 s: a long batch transaction's row can look that old as it commits; it is not the relay's yet.
    await age_announcements(funding, fresh, seconds=20)
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


async def test_a_refused_publish_is_skipped_for_the_round_and_published_by_the_next(funding, paid_order):
    first, second = await paid_order(), await paid_order()
    await funded_unannounced(funding, first)
    await funded_unannounced(funding, second)
    await age_announcements(funding, first, seconds=120)  # oldest first: first, then second
    await age_announcements(funding, second, seconds=60)
    relay = AnnouncementRelay(
        pool=lambda: funding.pool, publisher=Refuses(funding.ctx.publisher, first, once=True)
    )
    failures = relay_failures()

    assert await relay.run_once() == 1  # first refused and skipped; second, behind it, published
    assert await unpublished(funding, first) == 1 and await unpublished(funding, second) == 0
    assert relay_failures() == failures + 1
    assert await relay.run_once() == 1

    messages = await funding.messages("provisioning.order-funded")
    assert announced(messages) == sorted([first.transaction_id, second.transaction_id])


async def test_a_poisoned_row_does_not_block_a_good_one_and_the_gauge_shows_the_oldest_age(
    funding, paid_order, caplog
):
    refused, good = await paid_order(), await paid_order()
    poisoned = uuid.uuid4()
    await funding.pool.execute(  # a payload no OrderFunded validates, the oldest of all
        "INSERT INTO outbox (event_id, routing_key, transaction_id, payload, created_at)"
        " VALUES ($1, 'order.funded', 'txn-poisoned', $2::jsonb, now() - interval '300 seconds')",
        poisoned,
        '{"bogus": "leak-me"}',
    )
    await funded_unannounced(funding, refused)
    await funded_unannounced(funding, good)
    await age_announcements(funding, refused, seconds=120)
    await age_announcements(funding, good, seconds=60)
    relay = AnnouncementRelay(pool=lambda: funding.pool, publisher=Refuses(funding.ctx.publisher, refused))
    failures = relay_failures()
    caplog.set_level(logging.ERROR, logger="esim.funding.relay")

    assert await relay.run_once() == 1
    assert announced(await funding.messages("provisioning.order-funded")) == [good.transaction_id]
    assert await unpublished(funding, refused) == 1
    assert relay_failures() == failures + 2
    skipped = sorted(r.transaction_id for r in caplog.records if r.name == "esim.funding.relay")
    assert skipped == sorted(["txn-poisoned", refused.transaction_id])
    assert not any("leak-me" in r.error for r in caplog.records if r.name == "esim.funding.relay")
    assert 300 <= oldest_unpublished_age() < 360  # the poisoned row's age

    assert await relay.run_once() == 0  # still stuck: counted again, the gauge still shows them
    assert relay_failures() == failures + 4
    await funding.pool.execute("UPDATE outbox SET published_at = now()")  # an operator settled them
    assert await relay.run_once() == 0
    assert oldest_unpublished_age() == 0


async def test_a_refusing_broker_stops_the_round_and_the_rows_that_failed_go_last_next_time(
    funding, paid_order
):
    """Twice as many refused rows as a round tries: each round stops after its share, and the third
    puts every one that failed behind the good row."""
    refused = [await paid_order() for _ in range(2 * relay_module.MAX_PUBLISH_FAILURES_PER_ROUND)]
    good = await paid_order()
    for event in [*refused, good]:
        await funded_unannounced(funding, event)
    await age_announcements(funding, *refused, seconds=120)  # all ahead of good
    await age_announcements(funding, good, seconds=60)
    publisher = Refuses(funding.ctx.publisher, *refused)
    relay = AnnouncementRelay(pool=lambda: funding.pool, publisher=publisher)
    failures = relay_failures()

    assert await relay.run_once() == 0  # it stopped after its share of refusals, before reaching good
    assert relay_failures() == failures + relay_module.MAX_PUBLISH_FAILURES_PER_ROUND
    assert await relay.run_once() == 0  # the other refused ones, still ahead of good
    assert await unpublished(funding, good) == 1

    assert await relay.run_once() == 1  # every one that failed comes after good now
    assert announced(await funding.messages("provisioning.order-funded")) == [good.transaction_id]


@pytest.mark.parametrize("relay_interval", [0.5])  # the service's loop, at a pace a test can wait for
async def test_an_order_funded_by_a_batch_whose_publish_failed_and_whose_delivery_is_gone_is_relayed(
    funding, paid_order, zendit_emulator, monkeypatch
):
    # Until gone is aged below, the loop must not find it old, however long a's retry takes on a busy
    # machine: the relay publishing it early would not be this scenario.
    relay_after = relay_module.RELAY_AFTER_SECONDS
    monkeypatch.setattr(relay_module, "RELAY_AFTER_SECONDS", 3600.0)
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

    monkeypatch.setattr(relay_module, "RELAY_AFTER_SECONDS", relay_after)
    await age_announcements(funding, gone)  # as if RELAY_AFTER_SECONDS had passed

    # The service's own relay loop (every RELAY_INTERVAL_SECONDS) publishes it.
    async def relayed() -> bool:
        return await unpublished(funding, gone) == 0

    await eventually(relayed, within=10, what="the relay loop publishes gone's order.funded")
    assert announced(await funding.messages("provisioning.order-funded")) == [gone.transaction_id]
