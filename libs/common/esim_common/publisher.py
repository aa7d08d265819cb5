"""Publishing events: persistent, confirmed by the broker, and never silently unroutable.

`publish()` returns only once RabbitMQ has confirmed the message (publisher confirms on the channel)
and raises `PublishFailed` when the broker refused it, could not route it (mandatory flag, returned
message) or did not answer in time. A caller that gets no exception knows the event is durable in a
queue; a caller that gets one must not acknowledge the work that produced it (the webhook answers 5xx,
a consumer lets the message be retried).
"""

from __future__ import annotations

import logging
from typing import Any

from aiormq.abc import ConfirmationFrameType
from faststream.rabbit import RabbitBroker, RabbitExchange
from faststream.rabbit.schemas import Channel, ExchangeType
from pamqp.commands import Basic

from esim_common.errors import TransientError
from esim_common.events import Event
from esim_common.topology import Topology

# A confirm normally arrives in milliseconds; longer means the broker is in trouble, and the caller
# is better off failing (and being retried) than hanging an HTTP request or a consumer.
PUBLISH_CONFIRM_TIMEOUT_SECONDS = 5.0
CONTENT_TYPE = "application/json"
SCHEMA_VERSION_HEADER = "x-esim-schema-version"
EVENT_TYPE_HEADER = "x-esim-event-type"


class PublishFailed(TransientError):
    """The broker did not take responsibility for the message."""


def create_broker(amqp_url: str, *, prefetch: int = 16, **kwargs: Any) -> RabbitBroker:
    """A FastStream broker whose channel confirms every publish and raises on unroutable messages.

    FastStream's own loggers print plain text to stdout; ours go through the JSON formatter and the
    redaction filter like every other line. Its "Received"/"Processed" line per message is logged at
    DEBUG: two lines per delivery that say nothing the handler's own lines do not (and cost ~10 % of a
    busy service's CPU); failures still come at ERROR from FastStream and with their fate from
    `consumer`.
    """
    channel = Channel(prefetch_count=prefetch, publisher_confirms=True, on_return_raises=True)
    kwargs.setdefault("logger", logging.getLogger("esim.broker"))
    kwargs.setdefault("log_level", logging.DEBUG)
    return RabbitBroker(amqp_url, default_channel=channel, **kwargs)


def topic_exchange(topology: Topology) -> RabbitExchange:
    return RabbitExchange(topology.exchange, type=ExchangeType.TOPIC, durable=True)


async def publish_raw(
    broker: RabbitBroker,
    body: bytes,
    *,
    exchange: RabbitExchange | None,
    routing_key: str,
    message_id: str | None,
    correlation_id: str | None,
    headers: dict[str, Any],
) -> None:
    """Persistent, mandatory, confirmed publish; every failure becomes `PublishFailed`."""
    try:
        confirmation: ConfirmationFrameType | None = await broker.publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            persist=True,
            mandatory=True,
            message_id=message_id,
            correlation_id=correlation_id,
            headers=headers,
            content_type=CONTENT_TYPE,
            timeout=PUBLISH_CONFIRM_TIMEOUT_SECONDS,
        )
    except TimeoutError as exc:
        raise PublishFailed(
            f"no confirm for {routing_key!r} within {PUBLISH_CONFIRM_TIMEOUT_SECONDS}s"
        ) from exc
    except Exception as exc:  # aio-pika DeliveryError, connection errors, ...: all mean "not durable"
        raise PublishFailed(f"publish to {routing_key!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(confirmation, Basic.Ack):
        raise PublishFailed(f"broker did not confirm {routing_key!r}: {type(confirmation).__name__}")


class EventPublisher:
    """Publishes our events to the topic exchange with ids in the AMQP properties."""

    def __init__(self, broker: RabbitBroker, topology: Topology) -> None:
        self._broker = broker
        self._exchange = topic_exchange(topology)

    async def publish(self, event: Event) -> None:
        await publish_raw(
            self._broker,
            event.model_dump_json().encode(),
            exchange=self._exchange,
            routing_key=event.routing_key,
            message_id=str(event.event_id),
            correlation_id=event.transaction_id,
            headers={SCHEMA_VERSION_HEADER: event.schema_version, EVENT_TYPE_HEADER: type(event).__name__},
        )
