"""The transactional outbox for any event: queue it with the change it announces, publish it once.

    async with pool.acquire() as conn, conn.transaction():
        ...the state change...
        await outbox.add(conn, event)          # commits with the change, or not at all
    await outbox.publish_pending(pool, publisher, event)   # after the commit; again on a redelivery

`publish_pending` locks the row until the broker has confirmed the publish and then stamps it, so two
workers cannot both publish it, a publish lost to a crash or a broker error is made by the next caller,
and a caller who comes after the stamp publishes nothing. Event ids that must be stable across
redeliveries (one alert per purchase attempt, say) come from `stable_event_id`.
"""

from __future__ import annotations

import uuid
from typing import Protocol, TypeVar

import asyncpg

from esim_common.events import Event

E = TypeVar("E", bound=Event)

_NAMESPACE = uuid.UUID("5d0f3c1e-2b7a-4e55-9a61-3f8c2d7e9b10")

INSERT = """
    INSERT INTO outbox (event_id, routing_key, transaction_id, payload) VALUES ($1, $2, $3, $4::jsonb)
    ON CONFLICT (event_id) DO NOTHING
"""
SELECT_UNPUBLISHED = """
    SELECT payload::text FROM outbox WHERE event_id = $1 AND published_at IS NULL FOR UPDATE
"""
MARK_PUBLISHED = "UPDATE outbox SET published_at = now() WHERE event_id = $1"


class Publisher(Protocol):
    async def publish(self, event: Event) -> None: ...


def stable_event_id(key: str) -> uuid.UUID:
    """The same event id for the same `key` (e.g. an alert's key, `needs_attention:<zendit transaction
    id>` or `wallet_short:<txn>`)."""
    return uuid.uuid5(_NAMESPACE, key)


async def add(conn: asyncpg.Connection, event: Event) -> bool:
    """Queue `event` in the caller's transaction; False when an event with its id is queued already
    (the first version written is the one published)."""
    status: str = await conn.execute(
        INSERT, event.event_id, event.routing_key, event.transaction_id, event.model_dump_json()
    )
    return status.endswith(" 1")


async def publish_pending(pool: asyncpg.Pool, publisher: Publisher, event: E) -> bool:
    """Publish the queued version of `event` unless it was published already; True when this call did."""
    async with pool.acquire() as conn, conn.transaction():
        payload = await conn.fetchval(SELECT_UNPUBLISHED, event.event_id)
        if payload is None:
            return False
        await publisher.publish(type(event).model_validate_json(payload))
        await conn.execute(MARK_PUBLISHED, event.event_id)
        return True
