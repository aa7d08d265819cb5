"""The RabbitMQ topology, declared in one place.

    esim.events (topic exchange, durable)
      ├─ order.paid ──────► funding.order-paid            (quorum)  ─┐ reject / delivery limit
      ├─ order.funded ────► provisioning.order-funded     (quorum)   │ dead-letters to
      └─ ...                                                          ▼
                                                          <queue>.dlq (quorum)
    <queue>.retry.1s / .retry.3s / .retry.10s (quorum, message TTL) ── expire ──► <queue>
                         (dead-lettered through the default exchange straight back to the work
                          queue, so a retry never reaches the other consumers of the same event)

A consumer that hits a transient error publishes a copy of the message to the next retry tier with our
own attempt counter in a header (`x-esim-attempt`) and acks the original; after the last tier it goes to
`<queue>.dlq`. We count attempts ourselves because RabbitMQ 4.3 stopped counting `basic.nack` towards a
quorum queue's `x-delivery-limit`, and `x-death` is rewritten by every hop.

Everything here is data plus one `declare()` function, so a test can build a private copy of the
topology under a prefix and never see another test's messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, ExchangeType
from aiormq.abc import FieldTable

# The seed asks for retries after 1 s, 3 s and 10 s; Zendit and Stripe outages shorter than that are
# the common case, longer ones are for the DLQ and an operator.
RETRY_DELAYS_SECONDS: tuple[int, ...] = (1, 3, 10)

# A message that kills its consumer (crash, OOM) is redelivered by the broker without reaching our
# retry logic; after this many deliveries the quorum queue dead-letters it instead of looping forever.
DELIVERY_LIMIT = 20

ATTEMPT_HEADER = "x-esim-attempt"
LAST_ERROR_HEADER = "x-esim-last-error"
ORIGIN_QUEUE_HEADER = "x-esim-origin-queue"
FAILED_AT_HEADER = "x-esim-failed-at"

DEFAULT_EXCHANGE = ""  # AMQP's default exchange routes a message to the queue named by its routing key


@dataclass(frozen=True)
class ConsumerQueue:
    """One work queue: who consumes it, and which events it receives."""

    name: str
    routing_keys: tuple[str, ...]

    @property
    def dlq(self) -> str:
        return f"{self.name}.dlq"

    def retry_tier(self, delay_seconds: int) -> str:
        return f"{self.name}.retry.{delay_seconds}s"


@dataclass(frozen=True)
class Topology:
    """The exchange and every consumer queue, optionally under a name prefix (tests)."""

    exchange: str = "esim.events"
    queues: tuple[ConsumerQueue, ...] = ()
    retry_delays: tuple[int, ...] = RETRY_DELAYS_SECONDS
    prefix: str = ""
    _by_name: dict[str, ConsumerQueue] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prefix:
            object.__setattr__(self, "exchange", f"{self.prefix}{self.exchange}")
            object.__setattr__(
                self,
                "queues",
                tuple(ConsumerQueue(f"{self.prefix}{q.name}", q.routing_keys) for q in self.queues),
            )
        self._by_name.update({q.name: q for q in self.queues})

    def queue(self, name: str) -> ConsumerQueue:
        """Look a queue up by its unprefixed or prefixed name."""
        found = self._by_name.get(name) or self._by_name.get(f"{self.prefix}{name}")
        if found is None:
            raise KeyError(f"no consumer queue named {name!r} in the topology")
        return found


# The production topology: one queue per consumer and purpose, named `<service>.<event>`.
ESIM_QUEUES: tuple[ConsumerQueue, ...] = (
    ConsumerQueue("funding.order-paid", ("order.paid",)),
    # Manual capture mode: the authorised payment is captured once the eSIM has been emailed.
    ConsumerQueue("funding.order-delivered", ("order.delivered",)),
    ConsumerQueue("provisioning.order-funded", ("order.funded",)),
    # Zendit webhook hints: re-check a purchase now instead of at its next scheduled poll.
    ConsumerQueue("provisioning.purchase-hint", ("zendit.purchase-updated",)),
    ConsumerQueue("notify.order-provisioned", ("order.provisioned",)),
    ConsumerQueue("notify.order-failed", ("order.failed",)),
    # Operator alerts (needs_attention, wallet_short): one email each to SERVICE_OWNER_EMAIL.
    ConsumerQueue("notify.operator-alert", ("operator.alert",)),
    ConsumerQueue("reconcile.order-failed", ("order.failed",)),
    # Outcomes the reconciler counts; they also make every event routable (publishes are mandatory).
    ConsumerQueue("reconcile.order-delivered", ("order.delivered",)),
    ConsumerQueue("reconcile.order-refunded", ("order.refunded",)),
)


def esim_topology(*, exchange: str = "esim.events", prefix: str = "") -> Topology:
    return Topology(exchange=exchange, queues=ESIM_QUEUES, prefix=prefix)


def work_queue_arguments(queue: ConsumerQueue) -> FieldTable:
    """Quorum work queue; anything rejected (or redelivered too often) dead-letters to its DLQ."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEFAULT_EXCHANGE,
        "x-dead-letter-routing-key": queue.dlq,
        # at-least-once dead-lettering: the broker keeps the message until the DLQ has confirmed it.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }


def retry_tier_arguments(queue: ConsumerQueue, delay_seconds: int) -> FieldTable:
    """Quorum delay queue with no consumer: messages wait `delay_seconds`, then go back to work."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": delay_seconds * 1000,
        "x-dead-letter-exchange": DEFAULT_EXCHANGE,
        "x-dead-letter-routing-key": queue.name,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


DLQ_ARGUMENTS: FieldTable = {"x-queue-type": "quorum"}


async def declare(channel: AbstractChannel, topology: Topology) -> None:
    """Declare the exchange, every work queue with its bindings, retry tiers and DLQ. Idempotent."""
    exchange = await channel.declare_exchange(topology.exchange, ExchangeType.TOPIC, durable=True)
    for queue in topology.queues:
        await channel.declare_queue(queue.dlq, durable=True, arguments=DLQ_ARGUMENTS)
        for delay in topology.retry_delays:
            await channel.declare_queue(
                queue.retry_tier(delay), durable=True, arguments=retry_tier_arguments(queue, delay)
            )
        work = await channel.declare_queue(queue.name, durable=True, arguments=work_queue_arguments(queue))
        for routing_key in queue.routing_keys:
            await work.bind(exchange, routing_key=routing_key)


async def declare_from_url(amqp_url: str, topology: Topology) -> None:
    """Declare over a short-lived connection (service start-up, `make run`, tests)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare(channel, topology)


async def delete(channel: AbstractChannel, topology: Topology) -> None:
    """Remove a (test) topology again: retry tiers first, so none dead-letters into a deleted queue."""
    for queue in topology.queues:
        for name in (*(queue.retry_tier(d) for d in topology.retry_delays), queue.name, queue.dlq):
            await channel.queue_delete(name)
    await channel.exchange_delete(topology.exchange)


async def delete_from_url(amqp_url: str, topology: Topology) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await delete(await connection.channel(), topology)
