"""Consumers whose every outcome is explicit: a message is acked, retried, failed over or dead-lettered.

A service registers a handler with `consume(...)`. The handler takes the typed event and returns
nothing; what it raises decides the message's fate (see `esim_common.errors`):

| handler outcome                         | fate                                                      |
|-----------------------------------------|-----------------------------------------------------------|
| returns                                 | ack                                                       |
| raises TransientError (e.g. RetryLater) | copy to the next retry tier (1 s, 3 s, 10 s), ack          |
|   ... after the last tier               | copy to `<queue>.dlq`, run the failure hook, ack           |
| raises PermanentError                   | run the failure hook (compensation), ack; no hook → DLQ    |
| raises anything else (a bug)            | copy to `<queue>.dlq` for a person, ack                    |
| body is not a valid event (poison)      | copy to `<queue>.dlq`, ack                                 |

"Copy, then ack" means the broker has confirmed the copy before the original goes, so a crash in
between duplicates the message (handlers are idempotent) but never loses it. If routing the failure
itself fails (broker trouble), the message is requeued after a pause; the quorum queue's delivery
limit dead-letters it if that repeats. FastStream's own ack policy is switched off (`MANUAL`) because
its default rejects without requeue, which would drop a message from a queue with no dead-letter target.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from faststream.middlewares import AckPolicy
from faststream.rabbit import RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from faststream.rabbit.subscriber import RabbitSubscriber
from pydantic import ValidationError

from esim_common import metrics
from esim_common.errors import PermanentError, TransientError
from esim_common.events import Event
from esim_common.logging import bind_transaction_id, redact
from esim_common.publisher import publish_raw
from esim_common.topology import (
    ATTEMPT_HEADER,
    FAILED_AT_HEADER,
    LAST_ERROR_HEADER,
    ORIGIN_QUEUE_HEADER,
    ConsumerQueue,
    Topology,
)

E = TypeVar("E", bound=Event)
Handler = Callable[[E], Awaitable[None]]
FailureHook = Callable[[E, str], Awaitable[None]]

log = logging.getLogger("esim.consumer")

# Pause before requeueing a message whose failure could not be routed (the broker is probably
# restarting); without it a consumer would spin on the same message.
REQUEUE_PAUSE_SECONDS = 1.0
# Headers are visible in the management UI; keep the error short and never let secrets through.
MAX_ERROR_HEADER_LENGTH = 500


def error_summary(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")[:MAX_ERROR_HEADER_LENGTH]


def failure_reason(exc: BaseException) -> str:
    """The short code recorded on the order for a failure."""
    if isinstance(exc, PermanentError):
        return exc.reason
    return "retries_exhausted"


class MessageRouter:
    """Moves one delivered message to its next place (retry tier or DLQ) with our headers."""

    def __init__(self, broker: RabbitBroker, queue: ConsumerQueue, retry_delays: tuple[int, ...]) -> None:
        self._broker = broker
        self.queue = queue
        self.retry_delays = retry_delays

    async def _copy(self, message: RabbitMessage, routing_key: str, headers: dict[str, Any]) -> None:
        await publish_raw(
            self._broker,
            message.body,
            exchange=None,  # the default exchange delivers straight to the named queue
            routing_key=routing_key,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            headers={**message.headers, **headers},
        )

    async def to_retry_tier(self, message: RabbitMessage, attempt: int, exc: BaseException) -> None:
        delay = self.retry_delays[attempt - 1]
        await self._copy(
            message,
            self.queue.retry_tier(delay),
            {ATTEMPT_HEADER: attempt + 1, LAST_ERROR_HEADER: error_summary(exc)},
        )

    async def to_dlq(self, message: RabbitMessage, exc: BaseException | str) -> None:
        summary = exc if isinstance(exc, str) else error_summary(exc)
        await self._copy(
            message,
            self.queue.dlq,
            {
                LAST_ERROR_HEADER: summary[:MAX_ERROR_HEADER_LENGTH],
                ORIGIN_QUEUE_HEADER: self.queue.name,
                FAILED_AT_HEADER: datetime.now(UTC).isoformat(),
            },
        )


def attempt_of(message: RabbitMessage) -> int:
    """1 for the first delivery; our header counts the retries (x-death is rewritten per hop)."""
    try:
        return max(1, int(message.headers.get(ATTEMPT_HEADER, 1)))
    except (TypeError, ValueError):
        return 1


async def handle_delivery(
    message: RabbitMessage,
    *,
    event_type: type[E],
    handler: Handler[E],
    router: MessageRouter,
    on_failure: FailureHook[E] | None,
) -> str:
    """Run the handler for one delivery and settle the message. Returns the outcome label."""
    queue_name = router.queue.name
    try:
        event = event_type.model_validate_json(message.body)
    except ValidationError as exc:
        log.error("poison message sent to DLQ", extra={"queue": queue_name, "error": error_summary(exc)})
        await router.to_dlq(message, f"invalid {event_type.__name__}: {error_summary(exc)}")
        return "dead_lettered"

    attempt = attempt_of(message)
    with bind_transaction_id(event.transaction_id):
        try:
            await handler(event)
            return "ok"
        except TransientError as exc:
            if attempt <= len(router.retry_delays):
                log.warning(
                    "transient failure, retrying",
                    extra={"queue": queue_name, "attempt": attempt, "error": error_summary(exc)},
                )
                await router.to_retry_tier(message, attempt, exc)
                return "retried"
            log.error(
                "retries exhausted, dead-lettered",
                extra={"queue": queue_name, "attempt": attempt, "error": error_summary(exc)},
            )
            await router.to_dlq(message, exc)
            if on_failure is not None:
                await on_failure(event, failure_reason(exc))
            return "dead_lettered"
        except PermanentError as exc:
            log.error(
                "permanent failure",
                extra={"queue": queue_name, "reason": exc.reason, "error": error_summary(exc)},
            )
            if on_failure is None:
                await router.to_dlq(message, exc)
                return "dead_lettered"
            await on_failure(event, failure_reason(exc))
            return "failed_permanently"
        except Exception as exc:
            log.exception("unexpected error, dead-lettered for an operator", extra={"queue": queue_name})
            await router.to_dlq(message, exc)
            return "dead_lettered"


def consume(
    broker: RabbitBroker,
    topology: Topology,
    queue_name: str,
    event_type: type[E],
    handler: Handler[E],
    *,
    on_failure: FailureHook[E] | None = None,
) -> RabbitSubscriber:
    """Subscribe `handler` to a queue of the topology, with explicit fates for every outcome.

    The queue, its retry tiers and its DLQ must have been declared (`topology.declare`) — FastStream
    does not declare it again here, so there is exactly one place that defines its arguments.
    """
    queue = topology.queue(queue_name)
    router = MessageRouter(broker, queue, topology.retry_delays)
    subscriber = broker.subscriber(
        RabbitQueue(queue.name, declare=False),
        ack_policy=AckPolicy.MANUAL,
        no_reply=True,
        title=f"{queue.name}:{event_type.__name__}",
        description=(handler.__doc__ or "").strip() or None,
    )

    async def on_message(message: RabbitMessage) -> None:
        started = time.perf_counter()
        try:
            outcome = await handle_delivery(
                message, event_type=event_type, handler=handler, router=router, on_failure=on_failure
            )
        except Exception:
            # Settling failed (broker trouble, or the failure hook raised): keep the message.
            log.exception("could not settle message, requeueing", extra={"queue": queue.name})
            await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
            await message.nack(requeue=True)
            metrics.messages_processed_total.labels(queue=queue.name, outcome="requeued").inc()
            return
        await message.ack()
        metrics.messages_processed_total.labels(queue=queue.name, outcome=outcome).inc()
        metrics.message_handling_seconds.labels(queue=queue.name).observe(time.perf_counter() - started)

    subscriber(on_message)
    return subscriber
