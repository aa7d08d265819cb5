"""The SQL of the scheduled sweep: the run's lock and the stuck orders (stuck_rules' rule, in Postgres)."""

from __future__ import annotations

from datetime import datetime

import asyncpg
from pydantic import BaseModel, ConfigDict

from esim_common.order_states import OrderStatus
from reconcile.order_ops import REDRIVE_ACTIONS
from reconcile.stuck_rules import StuckRules

# One sweep at a time across replicas: a transaction-scoped lock (pooled connections keep no session
# state, esim_common.db.keep_session), held by the run's own transaction until the run ends. The class
# is reconcile's, beside funding's 7_230_001/7_230_002.
SWEEP_LOCK_CLASS = 7_230_101
TRY_SWEEP_LOCK = f"SELECT pg_try_advisory_xact_lock({SWEEP_LOCK_CLASS}, 0)"

# Orders unchanged for longer than their state's deadline, and not re-driven (by anyone) within it,
# oldest first. Database time throughout: the same clock wrote updated_at and the audit rows.
STUCK_ORDERS = """
    SELECT o.transaction_id, o.status, o.updated_at
      FROM unnest($1::text[], $2::float8[]) AS d(status, deadline_s)
      JOIN esim_purchases AS o
        ON o.status = d.status AND o.updated_at < now() - make_interval(secs => d.deadline_s)
     WHERE NOT EXISTS (
               SELECT 1 FROM operator_actions AS a
                WHERE a.transaction_id = o.transaction_id AND a.action = ANY($3::text[])
                  AND a.created_at > now() - make_interval(secs => d.deadline_s))
     ORDER BY o.updated_at, o.transaction_id
     LIMIT $4
"""


class StuckOrder(BaseModel):
    model_config = ConfigDict(frozen=True)

    transaction_id: str
    status: OrderStatus
    updated_at: datetime


async def try_sweep_lock(conn: asyncpg.Connection) -> bool:
    """Inside a transaction: True if this replica now sweeps (until the transaction ends)."""
    return bool(await conn.fetchval(TRY_SWEEP_LOCK))


async def stuck_orders(pool: asyncpg.Pool | asyncpg.Connection, rules: StuckRules) -> list[StuckOrder]:
    deadlines = [rules.deadlines[s].total_seconds() for s in rules.states]
    rows = await pool.fetch(
        STUCK_ORDERS, [s.value for s in rules.states], deadlines, list(REDRIVE_ACTIONS), rules.max_per_sweep
    )
    return [StuckOrder(**dict(row)) for row in rows]
