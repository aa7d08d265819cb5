"""Consumers whose every outcome is explicit: a message is acked, retried, failed over or dead-lettered.

A service registers a handler with `consume(...)`. The handler takes the typed event and returns
nothing; what it raises decides the message's fate (see `esim_common.errors`):

| handler outcome                         | fate                                                      |
|-----------------------------------------|-----------------------------------------------------------|
| returns                                 | ack                                                       |
| raises TransientError (e.g. RetryLater) | copy to the next retry tier (1 s, 3 s, 10 s), ack          |
|   ... after the last tier               | run the failure hook, copy to `<queue>.dlq`, ack           |
| raises PermanentError                   | run the failure hook (compensation), ack; no hook → DLQ    |
|   ... with dead_letter_after_failure    | run the failure hook, copy to `<queue>.dlq`, ack           |
| the failure hook raises                 | retry tier while attempts remain, then DLQ                 |
| raises CheckAgainLater (not done yet)   | copy to a delay tier, attempts unchanged, ack              |
| raises anything else (a bug)            | copy to `<queue>.dlq` for a person, ack                    |
| body is not a valid event (poison)      | copy to `<queue>.dlq`, ack                                 |
| the copy itself is not confirmed        | reject without requeue: the broker dead-letters to the DLQ |

A DLQ copy goes through the dead-letter exchange (`esim.dead-letters`, routing key = the DLQ's name),
which hands it to the DLQ and a second copy to reconcile's history (`reconcile.dead-letters`); the DLQ
itself is never consumed. The copy carries the dead-letter stamp (`x-esim-dead-letter-*`: which DLQ,
why, when, at which attempt), which the observer's own retries, its own DLQ copy and a replay leave
alone. `consume_raw` subscribes a handler that takes the message itself (that history, whose messages
are any event or none) with the same fates minus the failure hook; it counts its retries in its own
header, and may be given more patience with a database outage than with other transient errors.

"Copy, then ack" means the broker has confirmed the copy before the original goes, so a crash in
between duplicates the message (handlers are idempotent) but never loses it. Nothing is ever requeued
with a nack: that would re-run the handler in a tight loop, and RabbitMQ 4.3 no longer counts such
nacks towards a quorum queue's delivery limit. FastStream's own ack policy is switched off (`MANUAL`)
because its default rejects without requeue, which would drop a message from a queue with no
dead-letter target.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from faststream.middlewares import AckPolicy
from faststream.rabbit import RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from faststream.rabbit.schemas import ExchangeType
from faststream.rabbit.subscriber import RabbitSubscriber
from pydantic import ValidationError

from esim_common import metrics
from esim_common.errors import CheckAgainLater, PermanentError, TransientError
from esim_common.events import Event
from esim_common.logging import bind_transaction_id, redact
from esim_common.publisher import publish_raw
from esim_common.topology import (
    ATTEMPT_HEADER,
    DEAD_LETTER_ATTEMPT_HEADER,
    DEAD_LETTER_ERROR_HEADER,
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTERED_AT_HEADER,
    FAILED_AT_HEADER,
    LAST_ERROR_HEADER,
    ORIGIN_QUEUE_HEADER,
    ROUTING_KEY_HEADER,
    ConsumerQueue,
    Topology,
)

E = TypeVar("E", bound=Event)
Handler = Callable[[E], Awaitable[None]]
RawHandler = Callable[[RabbitMessage], Awaitable[None]]
FailureHook = Callable[[E, str], Awaitable[None]]

log = logging.getLogger("esim.consumer")

# Headers are visible in the management UI; keep the error short and never let secrets through.
MAX_ERROR_HEADER_LENGTH = 500


# A database that is restarting, failing over or momentarily overloaded is a transient condition for
# every handler, not a bug: retry through the tiers instead of dead-lettering the order.
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.QueryCanceledError,  # statement or lock timeout
    TimeoutError,
    ConnectionError,
)


RETRYABLE: tuple[type[BaseException], ...] = (TransientError, *DATABASE_UNAVAILABLE)


def error_summary(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")[:MAX_ERROR_HEADER_LENGTH]


def failure_reason(exc: BaseException) -> str:
    """The short code recorded on the order for a failure."""
    if isinstance(exc, PermanentError):
        return exc.reason
    return "retries_exhausted"


class MessageRouter:
    """Moves one delivered message to its next place (retry tier or DLQ) with our headers."""

    def __init__(
        self,
        broker: RabbitBroker,
        queue: ConsumerQueue,
        retry_delays: tuple[int, ...],
        *,
        dead_letter_exchange: str | None = None,
    ) -> None:
        self._broker = broker
        self.queue = queue
        self.retry_delays = retry_delays
        # None: DLQ copies go through the default exchange (unobserved), as before the exchange existed.
        self._dead_letters = (
            None
            if dead_letter_exchange is None
            else RabbitExchange(dead_letter_exchange, type=ExchangeType.DIRECT, durable=True)
        )

    async def _copy(
        self,
        message: RabbitMessage,
        routing_key: str,
        headers: dict[str, Any],
        exchange: RabbitExchange | None = None,
    ) -> None:
        original = message.headers.get(ROUTING_KEY_HEADER) or _routing_key(message)
        stamp = {ROUTING_KEY_HEADER: original} if original else {}
        await publish_raw(
            self._broker,
            message.body,
            exchange=exchange,  # None: the default exchange delivers straight to the named queue
            routing_key=routing_key,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            headers={**message.headers, **stamp, **headers},
        )

    async def to_retry_tier(self, message: RabbitMessage, attempt: int, exc: BaseException) -> None:
        # Past the last tier (a consumer given more attempts than tiers) every retry waits the longest.
        delay = self.retry_delays[min(attempt, len(self.retry_delays)) - 1]
        await self._copy(
            message,
            self.queue.retry_tier(delay),
            {self.queue.attempt_header: attempt + 1, LAST_ERROR_HEADER: error_summary(exc)},
        )

    async def check_again_later(self, message: RabbitMessage, delay_seconds: float) -> int:
        """Park the message in the longest delay tier not beyond `delay_seconds`; attempts unchanged."""
        fitting = [d for d in self.retry_delays if d <= delay_seconds] or [min(self.retry_delays)]
        delay = max(fitting)
        await self._copy(message, self.queue.retry_tier(delay), {})
        return delay

    async def to_dlq(self, message: RabbitMessage, exc: BaseException | str) -> None:
        summary = (exc if isinstance(exc, str) else error_summary(exc))[:MAX_ERROR_HEADER_LENGTH]
        failed_at = datetime.now(UTC).isoformat()
        headers: dict[str, Any] = {
            LAST_ERROR_HEADER: summary,
            ORIGIN_QUEUE_HEADER: self.queue.name,
            FAILED_AT_HEADER: failed_at,
        }
        if not self.queue.observes_dead_letters:
            # An observer leaves the stamp alone: it names the dead letter the observer could not record
            # (its own DLQ is not observed), so a replay to the observer records that one as it was.
            attempt = attempt_of(message, self.queue.attempt_header)
            headers |= dead_letter_stamp(self.queue, summary, failed_at, attempt)
        await self._copy(message, self.queue.dlq, headers, self._dead_letters)


def dead_letter_stamp(queue: ConsumerQueue, error: str, failed_at: str, attempt: int) -> dict[str, Any]:
    """The headers the dead-letter history records (see `esim_common.topology`)."""
    return {
        DEAD_LETTER_QUEUE_HEADER: queue.dlq,
        DEAD_LETTER_ERROR_HEADER: error,
        DEAD_LETTERED_AT_HEADER: failed_at,
        DEAD_LETTER_ATTEMPT_HEADER: attempt,
    }


def _routing_key(message: RabbitMessage) -> str | None:
    """The routing key this delivery came with (a test double may have no AMQP message underneath)."""
    key = getattr(getattr(message, "raw_message", None), "routing_key", None)
    return key if isinstance(key, str) and key else None


def attempt_of(message: RabbitMessage, header: str = ATTEMPT_HEADER) -> int:
    """1 for the first delivery; our header counts the retries (x-death is rewritten per hop)."""
    try:
        return max(1, int(message.headers.get(header, 1)))
    except (TypeError, ValueError):
        return 1


async def handle_delivery(
    message: RabbitMessage,
    *,
    event_type: type[E],
    handler: Handler[E],
    router: MessageRouter,
    on_failure: FailureHook[E] | None,
    dead_letter_after_failure: bool = False,
) -> str:
    """Run the handler for one delivery and settle the message. Returns the outcome label."""
    queue_name = router.queue.name
    try:
        event = event_type.model_validate_json(message.body)
    except ValidationError as exc:
        log.error("poison message sent to DLQ", extra={"queue": queue_name, "error": error_summary(exc)})
        await router.to_dlq(message, f"invalid {event_type.__name__}: {error_summary(exc)}")
        return "dead_lettered"

    attempt = attempt_of(message, router.queue.attempt_header)
    with bind_transaction_id(event.transaction_id):
        try:
            await handler(event)
            return "ok"
        except CheckAgainLater as later:
            delay = await router.check_again_later(message, later.delay_seconds)
            log.info("not finished yet, checking again later", extra={"queue": queue_name, "delay_s": delay})
            return "deferred"
        except RETRYABLE as exc:
            if await _retried(message, exc, attempt, router, attempts=len(router.retry_delays)):
                return "retried"
            return await _take_failure_path(message, event, exc, attempt, router, on_failure)
        except PermanentError as exc:
            log.error(
                "permanent failure",
                extra={"queue": queue_name, "reason": exc.reason, "error": error_summary(exc)},
            )
            return await _take_failure_path(
                message, event, exc, attempt, router, on_failure, dead_letter=dead_letter_after_failure
            )
        except Exception as exc:
            log.exception("unexpected error, dead-lettered for an operator", extra={"queue": queue_name})
            await router.to_dlq(message, exc)
            return "dead_lettered"


async def handle_raw_delivery(
    message: RabbitMessage,
    *,
    handler: RawHandler,
    router: MessageRouter,
    database_outage_attempts: int | None = None,
) -> str:
    """The fates for a handler that takes the message itself: returns → ack; a retryable error → the
    retry tiers, then the DLQ; anything else → the DLQ. There is no failure hook: no order to fail.

    `database_outage_attempts`: how often a database outage is retried (the tiers, then the longest
    one again) before the DLQ, for a handler that can wait out a failover, default as other errors."""
    attempt = attempt_of(message, router.queue.attempt_header)
    try:
        await handler(message)
        return "ok"
    except RETRYABLE as exc:
        attempts = len(router.retry_delays)
        if database_outage_attempts is not None and isinstance(exc, DATABASE_UNAVAILABLE):
            attempts = database_outage_attempts
        if await _retried(message, exc, attempt, router, attempts=attempts):
            return "retried"
        await router.to_dlq(message, exc)
        return "dead_lettered"
    except Exception as exc:
        log.exception("unexpected error, dead-lettered for an operator", extra={"queue": router.queue.name})
        await router.to_dlq(message, exc)
        return "dead_lettered"


async def _retried(
    message: RabbitMessage, exc: BaseException, attempt: int, router: MessageRouter, *, attempts: int
) -> bool:
    """Copy the message to its next retry tier while `attempt` is within `attempts` (True); False once
    they are used up, and the caller decides what comes next."""
    facts = {"queue": router.queue.name, "attempt": attempt, "error": error_summary(exc)}
    if attempt <= attempts:
        log.warning("transient failure, retrying", extra=facts)
        await router.to_retry_tier(message, attempt, exc)
        return True
    log.error("retries exhausted", extra=facts)
    return False


async def _take_failure_path(
    message: RabbitMessage,
    event: E,
    exc: BaseException,
    attempt: int,
    router: MessageRouter,
    on_failure: FailureHook[E] | None,
    *,
    dead_letter: bool = False,
) -> str:
    """Run the service's compensation; a message whose retries ran out (or, with `dead_letter`, any
    message that took the failure path) also goes to the DLQ.

    A compensation that fails (database down, refund refused) is itself retried through the tiers —
    bounded by the same attempt counter — and dead-lettered when they are used up, so a failing
    failure path never loops and never goes quiet.
    """
    exhausted = not isinstance(exc, PermanentError)
    if on_failure is None:
        await router.to_dlq(message, exc)
        return "dead_lettered"
    try:
        await on_failure(event, failure_reason(exc))
    except Exception as hook_exc:
        log.exception("failure path failed", extra={"queue": router.queue.name, "attempt": attempt})
        if not exhausted and attempt <= len(router.retry_delays):
            await router.to_retry_tier(message, attempt, hook_exc)
            return "retried"
        await router.to_dlq(
            message, f"{error_summary(exc)}; then the failure path failed: {error_summary(hook_exc)}"
        )
        return "dead_lettered"
    if exhausted or dead_letter:
        await router.to_dlq(message, exc)
        return "dead_lettered"
    return "failed_permanently"


def consume(
    broker: RabbitBroker,
    topology: Topology,
    queue_name: str,
    event_type: type[E],
    handler: Handler[E],
    *,
    on_failure: FailureHook[E] | None = None,
    dead_letter_after_failure: bool = False,
) -> RabbitSubscriber:
    """Subscribe `handler` to a queue of the topology, with explicit fates for every outcome.

    `dead_letter_after_failure`: a permanent failure is also copied to `<queue>.dlq` once the failure
    hook ran, for a hook that can only log (the message stays visible and can be replayed).

    The queue, its retry tiers and its DLQ must have been declared (`topology.declare`) — FastStream
    does not declare it again here, so there is exactly one place that defines its arguments.
    """
    queue = topology.queue(queue_name)
    if event_type.routing_key not in queue.routing_keys:
        raise ValueError(
            f"{queue.name} receives {', '.join(queue.routing_keys)}, not {event_type.routing_key} "
            f"({event_type.__name__}); every message would be dead-lettered as poison"
        )
    router = MessageRouter(
        broker, queue, topology.retry_delays, dead_letter_exchange=topology.dead_letter_exchange
    )

    async def settle(message: RabbitMessage) -> str:
        return await handle_delivery(
            message,
            event_type=event_type,
            handler=handler,
            router=router,
            on_failure=on_failure,
            dead_letter_after_failure=dead_letter_after_failure,
        )

    return _subscribe(broker, queue, f"{queue.name}:{event_type.__name__}", handler.__doc__, settle)


def consume_raw(
    broker: RabbitBroker,
    topology: Topology,
    queue_name: str,
    handler: RawHandler,
    *,
    database_outage_attempts: int | None = None,
) -> RabbitSubscriber:
    """Subscribe `handler` to a queue whose messages are not one event type (see `handle_raw_delivery`)."""
    queue = topology.queue(queue_name)
    router = MessageRouter(
        broker, queue, topology.retry_delays, dead_letter_exchange=topology.dead_letter_exchange
    )

    async def settle(message: RabbitMessage) -> str:
        return await handle_raw_delivery(
            message, handler=handler, router=router, database_outage_attempts=database_outage_attempts
        )

    return _subscribe(broker, queue, queue.name, handler.__doc__, settle)


def _subscribe(
    broker: RabbitBroker,
    queue: ConsumerQueue,
    title: str,
    doc: str | None,
    settle: Callable[[RabbitMessage], Awaitable[str]],
) -> RabbitSubscriber:
    """The subscription itself: settle each delivery, then ack it; a failure to route it rejects it."""
    subscriber = broker.subscriber(
        RabbitQueue(queue.name, declare=False),
        ack_policy=AckPolicy.MANUAL,
        no_reply=True,
        title=title,
        description=(doc or "").strip() or None,
    )

    async def on_message(message: RabbitMessage) -> None:
        started = time.perf_counter()
        try:
            outcome = await settle(message)
        except Exception:
            # The copy to a retry tier or the DLQ was not confirmed. Reject without requeue: the work
            # queue dead-letters to its DLQ inside the broker (at-least-once), so the message is kept
            # and the handler does not run again in a loop. If the channel itself is gone, the reject
            # fails too and the broker redelivers the unacked message after the reconnect.
            log.exception("could not route the failure, rejecting to the DLQ", extra={"queue": queue.name})
            await message.reject(requeue=False)
            metrics.messages_processed_total.labels(queue=queue.name, outcome="rejected_to_dlq").inc()
            return
        await message.ack()
        metrics.messages_processed_total.labels(queue=queue.name, outcome=outcome).inc()
        metrics.message_handling_seconds.labels(queue=queue.name).observe(time.perf_counter() - started)

    subscriber(on_message)
    return subscriber
