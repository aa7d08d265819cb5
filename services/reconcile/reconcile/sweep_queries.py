"""The SQL of the scheduled sweep: the re-drive phase's lock, the stuck orders (stuck_rules' rule, in
Postgres), the checks' claim across replicas, and the pruning of old run rows."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
from pydantic import BaseModel, ConfigDict

from esim_common.order_states import OrderStatus
from reconcile.order_ops import REDRIVE_ACTIONS
from reconcile.stuck_rules import StuckRules

# One re-drive phase at a time across replicas: a transaction-scoped lock (pooled connections keep no
# session state, esim_common.db.keep_session), held by the phase's own transaction until its re-drives
# are done; never while the checks page Stripe and Zendit. The class is reconcile's, beside funding's
# 7_230_001/7_230_002.
SWEEP_LOCK_CLASS = 7_230_101
TRY_SWEEP_LOCK = f"SELECT pg_try_advisory_xact_lock({SWEEP_LOCK_CLASS}, 0)"

# Orders unchanged for longer than their state's deadline, and not re-driven (by anyone) within it,
# oldest first. Database time throughout: the same clock wrote updated_at and the audit rows.
STUCK_ORDERS = """
    SELECT o.transaction_id, o.status, o.updated_at, d.deadline_s AS deadline
      FROM unnest($1::text[], $2::float8[]) AS d(status, deadline_s)
      JOIN esim_purchases AS o
        ON o.status = d.status AND o.updated_at < now() - make_interval(secs => d.deadline_s)
     WHERE NOT EXISTS (
               SELECT 1 FROM operator_actions AS a
                WHERE a.transaction_id = o.transaction_id AND a.action = ANY($3::text[])
                  AND a.created_at >= now() - make_interval(secs => d.deadline_s))
     ORDER BY o.updated_at, o.transaction_id
     LIMIT $4
"""
# The same exclusion for one order, asked again under its row lock: an operator's re-drive committed
# after the search found the order must not be followed by the sweep's.
REDRIVEN_WITHIN = """
    SELECT EXISTS (
        SELECT 1 FROM operator_actions
         WHERE transaction_id = $1 AND action = ANY($2::text[])
           AND created_at >= now() - make_interval(secs => $3))
"""

# One statement claims a job for this interval: it moves `claimed_at` only when the last claim is at
# least `every` old (a concurrent claim waits for the row and then finds it fresh), so one replica per
# interval runs the job, and no lock is held while it runs (migration 0010).
CLAIM_JOB = """
    INSERT INTO reconcile_schedule AS s (job, claimed_at) VALUES ($1, now())
    ON CONFLICT (job) DO UPDATE SET claimed_at = EXCLUDED.claimed_at
     WHERE s.claimed_at <= now() - make_interval(secs => $2)
    RETURNING true
"""
LEDGER_JOB = "ledger_checks"

# reconcile_runs keeps a row per ledger run (mismatch_store.store_run) for an operator to see when a
# source began failing; a month covers any investigation, and nothing reads older rows.
RUN_HISTORY_RETENTION = timedelta(days=30)
PRUNE_RUNS = "DELETE FROM reconcile_runs WHERE started_at < now() - make_interval(secs => $1)"


class StuckOrder(BaseModel):
    model_config = ConfigDict(frozen=True)

    transaction_id: str
    status: OrderStatus
    updated_at: datetime
    deadline: timedelta  # its state's, from the rules the sweep searched with


async def try_sweep_lock(conn: asyncpg.Connection) -> bool:
    """Inside a transaction: True if this replica now re-drives (until the transaction ends)."""
    return bool(await conn.fetchval(TRY_SWEEP_LOCK))


async def stuck_orders(pool: asyncpg.Pool | asyncpg.Connection, rules: StuckRules) -> list[StuckOrder]:
    deadlines = [rules.deadlines[s].total_seconds() for s in rules.states]
    rows = await pool.fetch(
        STUCK_ORDERS, [s.value for s in rules.states], deadlines, list(REDRIVE_ACTIONS), rules.max_per_sweep
    )
    return [StuckOrder(**dict(row)) for row in rows]


async def redriven_within(conn: asyncpg.Connection, transaction_id: str, deadline: timedelta) -> bool:
    """True if anyone re-drove the order (or the sweep was refused it) within `deadline`."""
    args = (transaction_id, list(REDRIVE_ACTIONS), deadline.total_seconds())
    return bool(await conn.fetchval(REDRIVEN_WITHIN, *args))


async def claim_job(pool: asyncpg.Pool, job: str, every: timedelta) -> bool:
    """True if this replica runs `job` now: no replica claimed it within `every`."""
    return bool(await pool.fetchval(CLAIM_JOB, job, every.total_seconds()))


async def prune_runs(pool: asyncpg.Pool, older_than: timedelta = RUN_HISTORY_RETENTION) -> int:
    """Delete the reconcile_runs rows started more than `older_than` ago; how many."""
    status = await pool.execute(PRUNE_RUNS, older_than.total_seconds())
    return int(status.split()[-1])
