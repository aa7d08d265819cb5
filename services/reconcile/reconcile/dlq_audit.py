"""The audit trail of dead-letter actions: one `operator_actions` row per message replayed or discarded.

The table comes from `deploy/migrations/0007_operator_actions.sql` (shared by every operator action).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import asyncpg

from reconcile.dead_letters import AuditEntry

INSERT_OPERATOR_ACTION = """
    INSERT INTO operator_actions (transaction_id, action, detail, note)
    VALUES ($1, $2, $3::jsonb, $4)
"""


async def record_operator_actions(pool: asyncpg.Pool, entries: Sequence[AuditEntry]) -> None:
    """All rows or none (one transaction), committed before the caller acks a message."""
    if not entries:
        return
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            INSERT_OPERATOR_ACTION,
            [(e.transaction_id, e.action, json.dumps(e.detail), e.note) for e in entries],
        )
