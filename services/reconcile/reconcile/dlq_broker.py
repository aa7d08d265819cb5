"""The broker side of dead letters: queue depths by passive declare, and holding messages unacked.

Each operation opens its own short-lived connection: admin requests and the 15 s depth refresh are
rare, and a private connection is what makes "hold" safe — closing it hands every message that was
not acked back to the DLQ, whatever happened in between (an exception, a cancelled request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPError, ChannelNotFoundEntity

from reconcile.dead_letters import DeadLetter

# A passive declare or a basic.get answers in milliseconds; longer means the broker is in trouble and
# the operator is better served by a 503 than by a hanging request.
BROKER_TIMEOUT_SECONDS = 5.0


# What a broken, refusing or silent broker raises from aio-pika/aiormq; mapped to `BrokerUnavailable`.
BROKER_ERRORS: tuple[type[BaseException], ...] = (AMQPError, ConnectionError, TimeoutError, OSError)


class BrokerUnavailable(Exception):
    """The broker could not be reached, refused or did not answer in time."""


class QueueMissing(Exception):
    """The queue is not declared on the broker (the service declares its topology at start)."""


@dataclass(frozen=True)
class QueueCounts:
    ready: int  # messages not in flight: a held (peeked) message is not counted until it is returned
    consumers: int  # a DLQ should have none: a consumer there is taking dead letters away


class HeldMessages:
    """Messages taken from a DLQ with `basic.get` and no ack; the connection's close returns the rest."""

    def __init__(self, depth: int, messages: list[AbstractIncomingMessage]) -> None:
        self.depth = depth
        self._messages = messages
        self.letters = [_letter(message) for message in messages]

    async def ack(self, indexes: Sequence[int]) -> None:
        try:
            for index in indexes:
                await self._messages[index].ack()
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"ack failed: {type(exc).__name__}") from exc


def _letter(message: AbstractIncomingMessage) -> DeadLetter:
    return DeadLetter(
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        routing_key=message.routing_key,
        redelivered=bool(message.redelivered),
        headers=dict(message.headers or {}),
        body=message.body,
    )


class DeadLetterBroker:
    def __init__(self, amqp_url: str, *, timeout_seconds: float = BROKER_TIMEOUT_SECONDS) -> None:
        self._amqp_url = amqp_url
        self._timeout = timeout_seconds

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
        try:
            connection = await aio_pika.connect(self._amqp_url, timeout=self._timeout)
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"cannot connect to the broker: {type(exc).__name__}") from exc
        try:
            yield connection
        finally:
            # A connection that cannot be closed is broken, and a broken connection returns its
            # unacked messages just the same: an error here must not hide the caller's own.
            with contextlib.suppress(*BROKER_ERRORS):
                await asyncio.wait_for(connection.close(), self._timeout)

    async def counts(self, names: Sequence[str]) -> dict[str, QueueCounts | None]:
        """Ready messages and consumers per queue (None: not declared), without touching a message."""
        found: dict[str, QueueCounts | None] = {}
        async with self._connection() as connection:
            try:
                channel = await connection.channel(publisher_confirms=False)
                for name in names:
                    try:
                        queue = await channel.declare_queue(name, passive=True, timeout=self._timeout)
                    except ChannelNotFoundEntity:
                        found[name] = None
                        # A failed passive declare closes the channel; the next queue needs a new one.
                        channel = await connection.channel(publisher_confirms=False)
                        continue
                    result = queue.declaration_result
                    found[name] = QueueCounts(int(result.message_count or 0), int(result.consumer_count or 0))
            except BROKER_ERRORS as exc:
                raise BrokerUnavailable(f"passive declare failed: {type(exc).__name__}") from exc
        return found

    @asynccontextmanager
    async def hold(self, name: str, at_most: int) -> AsyncIterator[HeldMessages]:
        """Take, unacked and oldest first, up to `at_most` messages and never more than were ready
        when the hold started: the loop ends before anything is replayed, so a replayed message that
        fails again at once comes back after it and is not taken twice."""
        async with self._connection() as connection:
            try:
                channel = await connection.channel(publisher_confirms=False)
                queue = await channel.declare_queue(name, passive=True, timeout=self._timeout)
                depth = int(queue.declaration_result.message_count or 0)
                messages: list[AbstractIncomingMessage] = []
                while len(messages) < min(depth, at_most):
                    message = await queue.get(no_ack=False, fail=False, timeout=self._timeout)
                    if message is None:  # taken meanwhile (by another hold)
                        break
                    messages.append(message)
            except ChannelNotFoundEntity as exc:
                raise QueueMissing(name) from exc
            except BROKER_ERRORS as exc:
                raise BrokerUnavailable(f"reading {name} failed: {type(exc).__name__}") from exc
            yield HeldMessages(depth, messages)
            # Leaving the block closes the connection: every message not acked goes back to the DLQ.
