"""The topology on the real RabbitMQ: retries after 1 s, 3 s and 10 s, then the DLQ; permanent failures
take the failure path at once; poison messages and bugs are dead-lettered; unroutable publishes raise."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import aio_pika
import pytest
from faststream.rabbit import RabbitExchange
from faststream.rabbit.schemas import ExchangeType

from esim_common.consumer import consume
from esim_common.errors import FailPermanently, RetryLater
from esim_common.events import ALL_EVENTS, OrderFunded, OrderPaid
from esim_common.money import Money
from esim_common.publisher import EventPublisher, PublishFailed, create_broker, publish_raw, topic_exchange
from esim_common.topology import (
    ATTEMPT_HEADER,
    LAST_ERROR_HEADER,
    ORIGIN_QUEUE_HEADER,
    ROUTING_KEY_HEADER,
    ConsumerQueue,
    Topology,
)

pytestmark = pytest.mark.broker

QUEUE = "funding.order-paid"
OBSERVER = "reconcile.dead-letters"


def paid_event() -> OrderPaid:
    return OrderPaid(
        transaction_id=f"txn_{uuid.uuid4().hex[:12]}",
        offer_id="ESIM-US-7D-1GB",
        price=Money(amount=1299, currency="USD"),
        payment_intent_id="pi_test",
    )


async def queue_depth(amqp_url: str, name: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def get_one(amqp_url: str, name: str) -> aio_pika.abc.AbstractIncomingMessage | None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return await queue.get(no_ack=True, fail=False)


async def wait_until(predicate, timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class Recorder:
    def __init__(self, raises: BaseException | None = None, hook_raises: BaseException | None = None) -> None:
        self.raises = raises
        self.hook_raises = hook_raises
        self.deliveries: list[float] = []
        self.failures: list[tuple[str, str]] = []

    async def handler(self, event: OrderPaid) -> None:
        self.deliveries.append(time.monotonic())
        if self.raises is not None:
            raise self.raises

    async def on_failure(self, event: OrderPaid, reason: str) -> None:
        self.failures.append((event.transaction_id, reason))
        if self.hook_raises is not None:
            raise self.hook_raises


async def run_consumer(amqp_url: str, topology: Topology, recorder: Recorder, *, with_hook: bool = True):
    broker = create_broker(amqp_url)
    consume(
        broker,
        topology,
        QUEUE,
        OrderPaid,
        recorder.handler,
        on_failure=recorder.on_failure if with_hook else None,
    )
    await broker.start()
    return broker


async def test_transient_failure_is_retried_after_1_3_and_10_seconds_then_dead_lettered(amqp_url, topology):
    recorder = Recorder(raises=RetryLater("zendit answered 503"))
    broker = await run_consumer(amqp_url, topology, recorder)
    try:
        event = paid_event()
        await EventPublisher(broker, topology).publish(event)
        dlq = topology.queue(QUEUE).dlq

        async def dead_lettered() -> bool:
            return await queue_depth(amqp_url, dlq) == 1

        await wait_until(dead_lettered, timeout=25)
    finally:
        await broker.stop()

    assert len(recorder.deliveries) == 4, "one delivery and three retries"
    gaps = [b - a for a, b in zip(recorder.deliveries, recorder.deliveries[1:], strict=False)]
    for gap, expected in zip(gaps, (1, 3, 10), strict=True):
        assert expected - 0.1 <= gap <= expected + 1.5, f"retry gaps were {gaps}"
    assert recorder.failures == [(event.transaction_id, "retries_exhausted")]

    dead = await get_one(amqp_url, dlq)
    assert dead is not None
    assert dead.message_id == str(event.event_id)
    assert dead.correlation_id == event.transaction_id
    assert dead.headers[ATTEMPT_HEADER] == 4
    assert "zendit answered 503" in dead.headers[LAST_ERROR_HEADER]
    assert dead.headers[ORIGIN_QUEUE_HEADER] == topology.queue(QUEUE).name
    assert OrderPaid.model_validate_json(dead.body) == event
    for delay in topology.retry_delays:
        assert await queue_depth(amqp_url, topology.queue(QUEUE).retry_tier(delay)) == 0
    assert await queue_depth(amqp_url, topology.queue(QUEUE).name) == 0


async def test_permanent_failure_takes_the_failure_path_at_once_without_retries(amqp_url, topology):
    recorder = Recorder(raises=FailPermanently("offer_disabled", "ESIM-XX is disabled"))
    broker = await run_consumer(amqp_url, topology, recorder)
    try:
        event = paid_event()
        started = time.monotonic()
        await EventPublisher(broker, topology).publish(event)

        async def failed() -> bool:
            return bool(recorder.failures)

        await wait_until(failed, timeout=5)
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.5)  # long enough for a 1 s retry to have come back, were there one
    finally:
        await broker.stop()

    assert elapsed < 1.0
    assert recorder.failures == [(event.transaction_id, "offer_disabled")]
    assert len(recorder.deliveries) == 1
    queue = topology.queue(QUEUE)
    assert await queue_depth(amqp_url, queue.dlq) == 0
    for delay in topology.retry_delays:
        assert await queue_depth(amqp_url, queue.retry_tier(delay)) == 0


async def test_permanent_failure_without_a_failure_path_is_dead_lettered(amqp_url, topology):
    recorder = Recorder(raises=FailPermanently("offer_disabled"))
    broker = await run_consumer(amqp_url, topology, recorder, with_hook=False)
    try:
        await EventPublisher(broker, topology).publish(paid_event())

        async def dead_lettered() -> bool:
            return await queue_depth(amqp_url, topology.queue(QUEUE).dlq) == 1

        await wait_until(dead_lettered, timeout=5)
    finally:
        await broker.stop()
    assert len(recorder.deliveries) == 1


async def test_unexpected_error_goes_straight_to_the_dlq_for_an_operator(amqp_url, topology):
    recorder = Recorder(raises=KeyError("bug"))
    broker = await run_consumer(amqp_url, topology, recorder)
    try:
        await EventPublisher(broker, topology).publish(paid_event())

        async def dead_lettered() -> bool:
            return await queue_depth(amqp_url, topology.queue(QUEUE).dlq) == 1

        await wait_until(dead_lettered, timeout=5)
    finally:
        await broker.stop()
    assert len(recorder.deliveries) == 1
    assert recorder.failures == []
    dead = await get_one(amqp_url, topology.queue(QUEUE).dlq)
    assert "KeyError" in dead.headers[LAST_ERROR_HEADER]


async def test_poison_message_is_dead_lettered_without_calling_the_handler(amqp_url, topology):
    recorder = Recorder()
    broker = await run_consumer(amqp_url, topology, recorder)
    try:
        await publish_raw(
            broker,
            b'{"not": "an order.paid event"}',
            exchange=topic_exchange(topology),
            routing_key="order.paid",
            message_id="poison-1",
            correlation_id=None,
            headers={},
        )

        async def dead_lettered() -> bool:
            return await queue_depth(amqp_url, topology.queue(QUEUE).dlq) == 1

        await wait_until(dead_lettered, timeout=5)
    finally:
        await broker.stop()
    assert recorder.deliveries == []
    dead = await get_one(amqp_url, topology.queue(QUEUE).dlq)
    assert dead.message_id == "poison-1"
    assert "invalid OrderPaid" in dead.headers[LAST_ERROR_HEADER]


async def test_successful_handling_acks_the_message_once(amqp_url, topology):
    recorder = Recorder()
    broker = await run_consumer(amqp_url, topology, recorder)
    try:
        await EventPublisher(broker, topology).publish(paid_event())

        async def handled() -> bool:
            return len(recorder.deliveries) == 1

        await wait_until(handled, timeout=5)
        await asyncio.sleep(0.3)
    finally:
        await broker.stop()
    assert len(recorder.deliveries) == 1
    assert await queue_depth(amqp_url, topology.queue(QUEUE).name) == 0
    assert await queue_depth(amqp_url, topology.queue(QUEUE).dlq) == 0


async def test_unroutable_publish_raises(amqp_url, topology):
    broker = create_broker(amqp_url)
    await broker.start()
    try:
        # order.funded is bound in the topology, but publish with a routing key nobody binds.
        event = OrderFunded(
            transaction_id="txn_unroutable",
            offer_id="ESIM-US-7D-1GB",
            zendit_cost=Money(amount=500, currency="USD"),
        )
        with pytest.raises(PublishFailed):
            await publish_raw(
                broker,
                event.model_dump_json().encode(),
                exchange=topic_exchange(topology),
                routing_key="order.nobody-listens",
                message_id=str(event.event_id),
                correlation_id=event.transaction_id,
                headers={},
            )
    finally:
        await broker.stop()


async def test_published_events_are_persistent_and_carry_their_ids(amqp_url, topology):
    broker = create_broker(amqp_url)
    await broker.start()
    try:
        event = paid_event()
        await EventPublisher(broker, topology).publish(event)
    finally:
        await broker.stop()
    message = await get_one(amqp_url, topology.queue(QUEUE).name)
    assert message is not None
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == str(event.event_id)
    assert message.correlation_id == event.transaction_id
    assert OrderPaid.model_validate_json(message.body) == event


async def test_a_failing_failure_path_is_retried_through_the_tiers_then_dead_lettered_once(
    amqp_url, topology
):
    recorder = Recorder(raises=FailPermanently("offer_disabled"), hook_raises=ConnectionError("db down"))
    broker = await run_consumer(amqp_url, topology, recorder)
    queue = topology.queue(QUEUE)
    try:
        await EventPublisher(broker, topology).publish(paid_event())

        async def dead_lettered() -> bool:
            return await queue_depth(amqp_url, queue.dlq) >= 1

        await wait_until(dead_lettered, timeout=25)
        await asyncio.sleep(1.5)  # a loop would have produced more deliveries and DLQ copies by now
    finally:
        await broker.stop()

    assert len(recorder.deliveries) == 4, "first delivery and three retries, not a hot loop"
    assert len(recorder.failures) == 4
    assert await queue_depth(amqp_url, queue.dlq) == 1
    dead = await get_one(amqp_url, queue.dlq)
    assert "the failure path failed" in dead.headers[LAST_ERROR_HEADER]
    assert "db down" in dead.headers[LAST_ERROR_HEADER]


async def test_when_the_failure_cannot_be_routed_the_broker_dead_letters_the_message_once(amqp_url, topology):
    recorder = Recorder(raises=RetryLater("zendit answered 503"))
    queue = topology.queue(QUEUE)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue.retry_tier(topology.retry_delays[0]))  # the copy becomes unroutable
    broker = await run_consumer(amqp_url, topology, recorder)
    try:
        await EventPublisher(broker, topology).publish(paid_event())

        async def dead_lettered() -> bool:
            return await queue_depth(amqp_url, queue.dlq) >= 1

        await wait_until(dead_lettered, timeout=10)
        await asyncio.sleep(1.0)
    finally:
        await broker.stop()
    assert len(recorder.deliveries) == 1, "rejected, not requeued: the handler ran once"
    assert await queue_depth(amqp_url, queue.dlq) == 1
    assert await queue_depth(amqp_url, queue.name) == 0
    # The broker's own dead-lettering bypasses the dead-letter exchange: only the DLQ depth shows it.
    assert await queue_depth(amqp_url, topology.queue(OBSERVER).name) == 0


async def test_every_event_type_is_routable_in_the_production_topology(amqp_url, topology):
    broker = create_broker(amqp_url)
    await broker.start()
    try:
        for event_type in ALL_EVENTS:
            await publish_raw(
                broker,
                b"{}",
                exchange=topic_exchange(topology),
                routing_key=event_type.routing_key,
                message_id=None,
                correlation_id=None,
                headers={},
            )
    finally:
        await broker.stop()


def test_a_consumer_wired_to_a_queue_that_never_receives_its_event_is_refused():
    topo = Topology(queues=(ConsumerQueue("funding.order-paid", ("order.paid",)),))
    with pytest.raises(ValueError, match=r"not order\.funded"):
        consume(create_broker("amqp://unused/"), topo, "funding.order-paid", OrderFunded, Recorder().handler)


async def test_a_delivery_logs_no_per_message_lines_at_info_but_a_failure_still_logs_an_error(
    amqp_url, topology, caplog
):
    """FastStream's "Received"/"Processed" pair is DEBUG (two lines per delivery for nothing); a handler
    that blows up is still an ERROR line."""
    caplog.set_level(logging.INFO)
    recorder = Recorder()
    broker = await run_consumer(amqp_url, topology, recorder)
    try:
        await EventPublisher(broker, topology).publish(paid_event())
        await wait_until(lambda_async(lambda: len(recorder.deliveries) == 1), timeout=5)
        await asyncio.sleep(0.2)
        per_message = [r for r in caplog.records if r.getMessage() in ("Received", "Processed")]
        assert per_message == []
        recorder.raises = RuntimeError("boom")
        await EventPublisher(broker, topology).publish(paid_event())
        await wait_until(lambda_async(lambda: len(recorder.deliveries) == 2), timeout=5)
        await asyncio.sleep(0.2)
    finally:
        await broker.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("boom" in r.getMessage() or "boom" in (r.exc_text or "") for r in errors)


def lambda_async(check):
    async def probe() -> bool:
        return check()

    return probe


async def test_a_dead_letter_reaches_its_dlq_and_an_observation_copy_for_reconcile(amqp_url, topology):
    """The consumer's DLQ copy goes through the dead-letter exchange: the DLQ gets it as before, and
    `reconcile.dead-letters` gets a copy with the same id and headers; nothing consumes the DLQ."""
    recorder = Recorder(raises=KeyError("bug"))
    broker = await run_consumer(amqp_url, topology, recorder)
    queue, observer = topology.queue(QUEUE), topology.queue(OBSERVER)
    try:
        event = paid_event()
        await EventPublisher(broker, topology).publish(event)

        async def both() -> bool:
            return (
                await queue_depth(amqp_url, queue.dlq) == 1
                and await queue_depth(amqp_url, observer.name) == 1
            )

        await wait_until(both, timeout=5)
    finally:
        await broker.stop()
    dead, seen = await get_one(amqp_url, queue.dlq), await get_one(amqp_url, observer.name)
    assert dead is not None and seen is not None
    for message in (dead, seen):
        assert message.message_id == str(event.event_id) and message.body == dead.body
        assert message.routing_key == queue.dlq
        assert message.headers[ORIGIN_QUEUE_HEADER] == queue.name
        assert message.headers[ROUTING_KEY_HEADER] == "order.paid"  # the event's, kept for the history
        assert "KeyError" in message.headers[LAST_ERROR_HEADER]
    for other in topology.queues:  # one copy each: no other DLQ or observer got one
        if other.name not in (queue.name, observer.name):
            assert await queue_depth(amqp_url, other.dlq) == 0
    assert await queue_depth(amqp_url, observer.dlq) == 0


async def test_the_retry_tiers_keep_the_events_routing_key_for_the_dlq(amqp_url, topology):
    """A retry tier hands the message back under the work queue's name; the header keeps order.paid."""
    recorder = Recorder(raises=RetryLater("zendit answered 503"))
    queue = topology.queue(QUEUE)
    broker = await run_consumer(amqp_url, topology, recorder, with_hook=False)
    try:
        await EventPublisher(broker, topology).publish(paid_event())

        async def retried_once() -> bool:
            return len(recorder.deliveries) == 2

        await wait_until(retried_once, timeout=5)
        recorder.raises = KeyError("bug")  # the next delivery (after the 3 s tier) dead-letters it

        async def dead_lettered() -> bool:
            return await queue_depth(amqp_url, queue.dlq) == 1

        await wait_until(dead_lettered, timeout=8)
    finally:
        await broker.stop()
    dead = await get_one(amqp_url, queue.dlq)
    assert dead is not None and dead.headers[ROUTING_KEY_HEADER] == "order.paid"


async def test_the_observers_own_dead_letters_are_not_observed_so_they_cannot_loop(amqp_url, topology):
    broker = create_broker(amqp_url)
    await broker.start()
    observer = topology.queue(OBSERVER)
    try:
        await publish_raw(
            broker,
            b"{}",
            exchange=RabbitExchange(topology.dead_letter_exchange, type=ExchangeType.DIRECT, durable=True),
            routing_key=observer.dlq,
            message_id="observer-dead-letter",
            correlation_id=None,
            headers={ORIGIN_QUEUE_HEADER: observer.name},
        )
    finally:
        await broker.stop()
    assert await queue_depth(amqp_url, observer.dlq) == 1
    assert await queue_depth(amqp_url, observer.name) == 0


async def test_an_older_publisher_dead_lettering_through_the_default_exchange_still_reaches_the_dlq(
    amqp_url, topology
):
    """Rolling deploys: a consumer still on the previous release copies straight to `<queue>.dlq`."""
    broker = create_broker(amqp_url)
    await broker.start()
    queue = topology.queue(QUEUE)
    try:
        await publish_raw(
            broker,
            paid_event().model_dump_json().encode(),
            exchange=None,
            routing_key=queue.dlq,
            message_id="from-the-old-release",
            correlation_id=None,
            headers={ORIGIN_QUEUE_HEADER: queue.name},
        )
    finally:
        await broker.stop()
    assert await queue_depth(amqp_url, queue.dlq) == 1
    assert await queue_depth(amqp_url, topology.queue(OBSERVER).name) == 0  # documented: not observed
