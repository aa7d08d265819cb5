"""The RabbitMQ topology, declared in one place.

    esim.events (topic exchange, durable)
      ├─ order.paid ──────► funding.order-paid            (quorum)  ─┐ reject / delivery limit
      ├─ order.funded ────► provisioning.order-funded     (quorum)   │ dead-letters to
      └─ ...                                                          ▼
                                                          <queue>.dlq (quorum)
    <queue>.retry.1s / .retry.3s / .retry.10s (quorum, message TTL) ── expire ──► <queue>
                         (dead-lettered through the default exchange straight back to the work
                          queue, so a retry never reaches the other consumers of the same event)

    esim.dead-letters (direct exchange, durable): where a consumer puts its DLQ copy
      ├─ <queue>.dlq ───► <queue>.dlq                     (the DLQ itself; an operator replays it)
      └─ <queue>.dlq ───► reconcile.dead-letters          (quorum) an observation copy for the history;
                           bound to every DLQ name but its own, so it can never observe itself in a loop

A consumer that hits a transient error publishes a copy of the message to the next retry tier with our
own attempt counter in a header (`x-esim-attempt`) and acks the original; after the last tier it goes to
`<queue>.dlq` (through `esim.dead-letters`, so reconcile sees a copy without consuming the DLQ). A
message the broker dead-letters by itself (reject, delivery limit) goes to the DLQ through the default
exchange and is not observed: only the DLQ depth shows it. We count attempts ourselves because
RabbitMQ 4.3 stopped counting `basic.nack` towards a quorum queue's `x-delivery-limit`, and `x-death` is
rewritten by every hop.

Everything here is data plus one `declare()` function, so a test can build a private copy of the
topology under a prefix and never see another test's messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, ExchangeType
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
# The routing key the event was first published with: a retry tier hands the message back under the
# work queue's name, so the consumer keeps the original here for the DLQ's observers.
ROUTING_KEY_HEADER = "x-esim-routing-key"
# The dead-letter stamp, set by a work queue's consumer when it dead-letters a message: which DLQ, why,
# when, at which attempt. The failure headers above say where the message is in *its current* trip and
# are rewritten by the observer's own retries and DLQ copy, and stripped by a replay; the stamp is not,
# so a copy the observer records late (after a database blip, or replayed from the observer's DLQ) is
# recorded as it was. The next dead-lettering (after a replay) stamps it anew: a new dead letter.
DEAD_LETTER_QUEUE_HEADER = "x-esim-dead-letter-queue"
DEAD_LETTER_ERROR_HEADER = "x-esim-dead-letter-error"
DEAD_LETTERED_AT_HEADER = "x-esim-dead-lettered-at"
DEAD_LETTER_ATTEMPT_HEADER = "x-esim-dead-letter-attempt"
# An observer handles copies of other consumers' messages, which carry their consumer's attempt count
# (4 once its retries ran out): it counts its own retries here instead.
OBSERVER_ATTEMPT_HEADER = "x-esim-observer-attempt"

DEFAULT_EXCHANGE = ""  # AMQP's default exchange routes a message to the queue named by its routing key


@dataclass(frozen=True)
class ConsumerQueue:
    """One work queue: who consumes it, and which events it receives."""

    name: str
    routing_keys: tuple[str, ...]
    # Bound to every other queue's DLQ name on the dead-letter exchange instead of to events.
    observes_dead_letters: bool = False

    @property
    def dlq(self) -> str:
        return f"{self.name}.dlq"

    def retry_tier(self, delay_seconds: int) -> str:
        return f"{self.name}.retry.{delay_seconds}s"

    @property
    def attempt_header(self) -> str:
        """The header its consumer counts attempts in."""
        return OBSERVER_ATTEMPT_HEADER if self.observes_dead_letters else ATTEMPT_HEADER


@dataclass(frozen=True)
class Topology:
    """The exchange and every consumer queue, optionally under a name prefix (tests)."""

    exchange: str = "esim.events"
    queues: tuple[ConsumerQueue, ...] = ()
    dead_letter_exchange: str = "esim.dead-letters"
    retry_delays: tuple[int, ...] = RETRY_DELAYS_SECONDS
    prefix: str = ""
    _by_name: dict[str, ConsumerQueue] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prefix:
            object.__setattr__(self, "exchange", f"{self.prefix}{self.exchange}")
            object.__setattr__(self, "dead_letter_exchange", f"{self.prefix}{self.dead_letter_exchange}")
            object.__setattr__(
                self, "queues", tuple(replace(q, name=f"{self.prefix}{q.name}") for q in self.queues)
            )
        self._by_name.update({q.name: q for q in self.queues})

    def queue(self, name: str) -> ConsumerQueue:
        """Look a queue up by its unprefixed or prefixed name."""
        found = self._by_name.get(name) or self._by_name.get(f"{self.prefix}{name}")
        if found is None:
            raise KeyError(f"no consumer queue named {name!r} in the topology")
        return found

    def dead_letter_bindings(self) -> list[tuple[str, str]]:
        """(queue, routing key) bindings on the dead-letter exchange: each DLQ under its own name, and
        each observer under every DLQ name except observers' own (their dead letters are not observed,
        or one that fails to be recorded would come back to its observer forever)."""
        bindings = [(q.dlq, q.dlq) for q in self.queues]
        observed = [q.dlq for q in self.queues if not q.observes_dead_letters]
        for observer in (q for q in self.queues if q.observes_dead_letters):
            bindings.extend((observer.name, dlq) for dlq in observed)
        return bindings


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
    # A copy of every dead letter, for the history in reconcile's admin API (the DLQs stay untouched).
    ConsumerQueue("reconcile.dead-letters", (), observes_dead_letters=True),
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
    """Declare the exchanges, every work queue with its bindings, retry tiers and DLQ. Idempotent."""
    exchange = await channel.declare_exchange(topology.exchange, ExchangeType.TOPIC, durable=True)
    dead_letters = await channel.declare_exchange(
        topology.dead_letter_exchange, ExchangeType.DIRECT, durable=True
    )
    declared: dict[str, AbstractQueue] = {}
    for queue in topology.queues:
        declared[queue.dlq] = await channel.declare_queue(queue.dlq, durable=True, arguments=DLQ_ARGUMENTS)
        for delay in topology.retry_delays:
            await channel.declare_queue(
                queue.retry_tier(delay), durable=True, arguments=retry_tier_arguments(queue, delay)
            )
        work = await channel.declare_queue(queue.name, durable=True, arguments=work_queue_arguments(queue))
        declared[queue.name] = work
        for routing_key in queue.routing_keys:
            await work.bind(exchange, routing_key=routing_key)
    for name, routing_key in topology.dead_letter_bindings():
        await declared[name].bind(dead_letters, routing_key=routing_key)


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
    await channel.exchange_delete(topology.dead_letter_exchange)


async def delete_from_url(amqp_url: str, topology: Topology) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await delete(await connection.channel(), topology)
