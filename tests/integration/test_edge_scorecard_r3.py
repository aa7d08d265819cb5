"""Scorecard R3, publishes cannot lie: the webhook answers 2xx only once order.paid is confirmed by the
broker, whatever the broker does: route it nowhere, refuse it, or go away and come back.

The webhook app is served by uvicorn on a real port and driven over HTTP with the real paid events of
the Stripe emulator. Unroutable and refused publishes happen on the shared RabbitMQ (in this test's own
prefixed exchange and queues); the restart runs on a private node (`tests/fixtures/private_rabbitmq.py`)
that the test stops, crashes and starts again. In every case: no 2xx while the publish fails, and
Stripe's redelivery after the fix answers 2xx and leaves exactly one order.paid in the funding queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.exceptions import DeliveryError

from esim_common.settings import Settings
from esim_common.topology import Topology, declare_from_url, work_queue_arguments
from esim_sandbox.serve import serve_in_thread
from tests.fixtures.private_rabbitmq import PrivateRabbit
from tests.integration.test_edge_scorecard_r1 import (
    HTTP_TIMEOUT_SECONDS,
    PaidOrder,
    ServedEdge,
    footprint,
    paid_order,
    send,
    signed,
)
from webhook.main import create_app

pytestmark = [pytest.mark.broker, pytest.mark.db]

ORDER_PAID = "order.paid"
# The service's robust connection retries every few seconds; a node restart takes ~5 s (more under load).
RECONNECT_TIMEOUT_SECONDS = 90.0


# ------------------------------------------------------------------------------------------ harness


@asynccontextmanager
async def served_edge(settings: Settings, db: asyncpg.Pool) -> AsyncIterator[tuple[ServedEdge, Topology]]:
    app = create_app(settings)
    handle = serve_in_thread(app)
    topology: Topology = app.state.ctx.topology
    try:
        yield (
            ServedEdge(handle.url, settings, topology.queue("funding.order-paid").name, db, handle),
            topology,
        )
    finally:
        handle.stop()


@asynccontextmanager
async def channel_on(amqp_url: str, **kwargs: Any) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield await connection.channel(**kwargs)


async def outbox_published_at(edge: ServedEdge, txn: str) -> list[Any]:
    rows = await edge.db.fetch("SELECT published_at FROM outbox WHERE transaction_id = $1", txn)
    return [row["published_at"] for row in rows]


async def order_status(edge: ServedEdge, txn: str) -> str:
    return await edge.db.fetchval("SELECT status FROM esim_purchases WHERE transaction_id = $1", txn)


async def redeliver_until_accepted(client: httpx.AsyncClient, order: PaidOrder) -> list[int]:
    """Stripe retrying the event (re-signed each time) until it gets a 2xx; every answer, in order."""
    answers: list[int] = []
    deadline = time.monotonic() + RECONNECT_TIMEOUT_SECONDS
    while not answers or answers[-1] != 200:
        assert time.monotonic() < deadline, f"no 2xx within {RECONNECT_TIMEOUT_SECONDS}s: {answers}"
        if answers:
            await asyncio.sleep(0.5)
        answers.append((await send(client, signed(order.body))).status_code)
    return answers


def refused_then_accepted(answers: list[int]) -> bool:
    """Any number of 503s (a dependency unavailable), then one 200: never a 2xx before the broker
    confirmed, and never an unexpected error (500)."""
    *before, last = answers
    return last == 200 and all(status == 503 for status in before)


# ------------------------------------------------------------------------------------- (a) unroutable


async def break_routing(amqp_url: str, topology: Topology, queue_name: str, how: str) -> None:
    async with channel_on(amqp_url) as channel:
        if how == "funding queue unbound":
            queue = await channel.get_queue(queue_name, ensure=False)
            await queue.unbind(topology.exchange, routing_key=ORDER_PAID)
        else:  # the exchange gone: publishing to it is a channel error, not a returned message
            await channel.exchange_delete(topology.exchange)


@pytest.mark.parametrize("how", ["funding queue unbound", "exchange deleted"])
async def test_an_unroutable_order_paid_is_a_503_until_the_binding_exists(
    service_settings: Settings, stripe_emulator, db: asyncpg.Pool, how: str
):
    stripe_emulator.set_webhook(None)
    async with (
        served_edge(service_settings, db) as (edge, topology),
        httpx.AsyncClient(base_url=edge.url, timeout=HTTP_TIMEOUT_SECONDS) as client,
    ):
        order = await paid_order(edge, client, stripe_emulator)
        await break_routing(edge.settings.amqp_url, topology, edge.queue_name, how)

        while_broken = [await send(client, signed(order.body)) for _ in range(2)]

        assert [r.status_code for r in while_broken] == [503, 503], [r.text for r in while_broken]
        assert "retry" in while_broken[0].json()["error"]
        assert await order_status(edge, order.transaction_id) == "paid"  # committed: the retry only publishes
        assert await outbox_published_at(edge, order.transaction_id) == [None]
        assert (await footprint(edge, order.transaction_id)).order_paid_messages == []

        await declare_from_url(edge.settings.amqp_url, topology)  # the operator restores the topology
        answers = await redeliver_until_accepted(client, order)
        duplicate = await send(client, signed(order.body))

    assert refused_then_accepted(answers), answers
    assert duplicate.status_code == 200
    [published_at] = await outbox_published_at(edge, order.transaction_id)
    assert published_at is not None
    messages = (await footprint(edge, order.transaction_id)).order_paid_messages
    assert [m["transaction_id"] for m in messages] == [order.transaction_id]


# -------------------------------------------------------------------------------- (b) broker refusing


async def fill_until_refused(channel: aio_pika.abc.AbstractChannel, exchange: str) -> int:
    """Publish filler order.paid messages until the broker nacks one; how many it took."""
    target = await channel.get_exchange(exchange, ensure=False)
    for taken in range(10):
        try:
            await target.publish(
                aio_pika.Message(b"{}", message_id=f"filler-{taken}"), routing_key=ORDER_PAID
            )
        except DeliveryError:
            return taken
    raise AssertionError("the bounded queue never refused a message")


async def test_a_full_funding_queue_nacking_order_paid_is_a_503_until_it_has_room(
    service_settings: Settings, stripe_emulator, db: asyncpg.Pool
):
    stripe_emulator.set_webhook(None)
    async with (
        served_edge(service_settings, db) as (edge, topology),
        httpx.AsyncClient(base_url=edge.url, timeout=HTTP_TIMEOUT_SECONDS) as client,
    ):
        order = await paid_order(edge, client, stripe_emulator)
        # The funding queue as production declares it, plus a length limit: reject-publish (already its
        # overflow mode) makes the broker nack what does not fit.
        async with channel_on(edge.settings.amqp_url, publisher_confirms=True) as channel:
            await channel.queue_delete(edge.queue_name)
            arguments = {**work_queue_arguments(topology.queue(edge.queue_name)), "x-max-length": 1}
            queue = await channel.declare_queue(edge.queue_name, durable=True, arguments=arguments)
            await queue.bind(topology.exchange, routing_key=ORDER_PAID)
            fillers = await fill_until_refused(channel, topology.exchange)

            while_full = [await send(client, signed(order.body)) for _ in range(2)]

            assert fillers >= 1
            assert [r.status_code for r in while_full] == [503, 503], [r.text for r in while_full]
            assert await outbox_published_at(edge, order.transaction_id) == [None]
            # The consumer catches up: the fillers leave the queue.
            drained = 0
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                assert message.message_id.startswith("filler-"), "the refused order.paid must not be queued"
                drained += 1
            assert drained == fillers

        answers = await redeliver_until_accepted(client, order)

    assert refused_then_accepted(answers), answers
    assert (await outbox_published_at(edge, order.transaction_id))[0] is not None
    messages = (await footprint(edge, order.transaction_id)).order_paid_messages
    assert [m["transaction_id"] for m in messages] == [order.transaction_id]


# --------------------------------------------------------------------------------- (c) broker restart


# The private node boots (up to 90 s on a loaded machine) and, in the crash case, boots twice more.
@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", ["clean stop", "crash"])
async def test_confirmed_order_paid_survive_a_broker_restart_and_nothing_is_a_2xx_while_it_is_down(
    private_rabbitmq: PrivateRabbit, service_settings: Settings, stripe_emulator, db: asyncpg.Pool, how: str
):
    if not private_rabbitmq.running:  # an earlier test failed while the node was down
        private_rabbitmq.start()
    settings = service_settings.model_copy(update={"amqp_url": private_rabbitmq.url})
    stripe_emulator.set_webhook(None)
    async with (
        served_edge(settings, db) as (edge, _topology),
        httpx.AsyncClient(base_url=edge.url, timeout=HTTP_TIMEOUT_SECONDS) as client,
    ):
        confirmed, pending = [await paid_order(edge, client, stripe_emulator) for _ in range(2)]
        if how == "crash":
            # The service declared its queues a moment ago: see the fixture's docstring for why a crash
            # test first restarts the node cleanly (the service reconnects by itself meanwhile).
            await asyncio.to_thread(private_rabbitmq.settle_new_queues)
        before = await redeliver_until_accepted(client, confirmed)

        await asyncio.to_thread(private_rabbitmq.stop if how == "clean stop" else private_rabbitmq.kill)
        while_down = [await send(client, signed(pending.body)) for _ in range(2)]
        await asyncio.to_thread(private_rabbitmq.start)
        after = await redeliver_until_accepted(client, pending)  # the service reconnects by itself
        duplicates = [await send(client, signed(order.body)) for order in (confirmed, pending)]

    assert refused_then_accepted(before), before
    assert [r.status_code for r in while_down] == [503, 503], [r.text for r in while_down]
    assert refused_then_accepted(after), after
    assert [r.status_code for r in duplicates] == [200, 200]
    for order in (confirmed, pending):
        assert await order_status(edge, order.transaction_id) == "paid"
        [published_at] = await outbox_published_at(edge, order.transaction_id)
        assert published_at is not None
    # The confirmed message outlived the broker; the refused one was published once, on redelivery.
    messages = (await footprint(edge, confirmed.transaction_id)).order_paid_messages
    assert [m["transaction_id"] for m in messages] == [confirmed.transaction_id, pending.transaction_id]
