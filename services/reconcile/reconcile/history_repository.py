"""Named SQL for the failure history (`dead_letter_events`, `order_failures`, migration 0009), typed rows.

Both inserts are idempotent (`ON CONFLICT DO NOTHING`) and say whether they inserted, so a consumer
counts a failure once however often its message is redelivered, whichever replica handles it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from reconcile.failure_history import DeadLetterRecord

INSERT_DEAD_LETTER_EVENT = """
    INSERT INTO dead_letter_events (queue, event_id, copy_key, routing_key, event_type, transaction_id,
                                    error, attempt, dead_lettered_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT ON CONSTRAINT dead_letter_events_once DO NOTHING
    RETURNING id
"""
# Counts since $1 and overall, and the latest row, per DLQ in $2.
DEAD_LETTER_STATS = """
    WITH counts AS (
        SELECT queue, count(*) AS total, count(*) FILTER (WHERE dead_lettered_at >= $1) AS recent
          FROM dead_letter_events WHERE queue = ANY($2::text[]) GROUP BY queue
    ), latest AS (
        SELECT DISTINCT ON (queue) queue, error, dead_lettered_at, event_id, transaction_id
          FROM dead_letter_events WHERE queue = ANY($2::text[])
         ORDER BY queue, dead_lettered_at DESC, id DESC
    )
    SELECT c.queue, c.total, c.recent, l.error, l.dead_lettered_at, l.event_id, l.transaction_id
      FROM counts c JOIN latest l USING (queue)
"""
INSERT_ORDER_FAILURE = """
    INSERT INTO order_failures (event_id, transaction_id, step, reason, occurred_at)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
"""
# Per step since $1: how many, and the latest one's reason.
FAILURES_SINCE = """
    WITH recent AS (
        SELECT event_id, transaction_id, step, reason, occurred_at FROM order_failures WHERE occurred_at >= $1
    ), counts AS (
        SELECT step, count(*) AS failures FROM recent GROUP BY step
    ), latest AS (
        SELECT DISTINCT ON (step) step, reason, occurred_at, transaction_id
          FROM recent ORDER BY step, occurred_at DESC, event_id
    )
    SELECT c.step, c.failures, l.reason, l.occurred_at, l.transaction_id
      FROM counts c JOIN latest l USING (step)
"""


@dataclass(frozen=True)
class DeadLetterStats:
    queue: str
    total: int
    recent: int
    last_error: str | None
    last_at: datetime
    last_message_id: str
    last_transaction_id: str | None


@dataclass(frozen=True)
class StepFailures:
    step: str
    failures: int
    last_reason: str
    last_at: datetime
    last_transaction_id: str


async def insert_dead_letter_event(pool: asyncpg.Pool, record: DeadLetterRecord) -> bool:
    """True when this copy was new (a redelivered copy inserts nothing)."""
    inserted = await pool.fetchval(
        INSERT_DEAD_LETTER_EVENT,
        record.queue,
        record.event_id,
        record.copy_key,
        record.routing_key,
        record.event_type,
        record.transaction_id,
        record.error,
        record.attempt,
        record.dead_lettered_at,
    )
    return inserted is not None


async def dead_letter_stats(
    pool: asyncpg.Pool, queues: Sequence[str], *, since: datetime
) -> dict[str, DeadLetterStats]:
    """By DLQ name; a DLQ with no history is absent."""
    rows = await pool.fetch(DEAD_LETTER_STATS, since, list(queues))
    return {
        row["queue"]: DeadLetterStats(
            queue=row["queue"],
            total=row["total"],
            recent=row["recent"],
            last_error=row["error"],
            last_at=row["dead_lettered_at"],
            last_message_id=row["event_id"],
            last_transaction_id=row["transaction_id"],
        )
        for row in rows
    }


async def insert_order_failure(
    pool: asyncpg.Pool, *, event_id: UUID, transaction_id: str, step: str, reason: str, occurred_at: datetime
) -> bool:
    """True when this event was new."""
    inserted = await pool.fetchval(INSERT_ORDER_FAILURE, event_id, transaction_id, step, reason, occurred_at)
    return inserted is not None


async def failures_since(pool: asyncpg.Pool, since: datetime) -> dict[str, StepFailures]:
    """By step; a step without failures since then is absent."""
    rows = await pool.fetch(FAILURES_SINCE, since)
    return {
        row["step"]: StepFailures(
            step=row["step"],
            failures=row["failures"],
            last_reason=row["reason"],
            last_at=row["occurred_at"],
            last_transaction_id=row["transaction_id"],
        )
        for row in rows
    }
