"""Guarded order-state transitions in Postgres.

Every state change is one UPDATE whose WHERE clause only matches the states the target may be entered
from, so two workers racing on the same order cannot both move it, and an illegal move (e.g. refunding
a delivered order) changes nothing. Accepted moves are written to `order_transitions` in the same
transaction; refused ones are logged and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from esim_common import metrics
from esim_common.order_states import STEP_TIMESTAMP_COLUMN, OrderStatus, sources_of

log = logging.getLogger("esim.orders")


class IllegalTransition(Exception):
    """The order is in a state from which the requested state cannot be entered."""

    def __init__(self, transaction_id: str, current: OrderStatus | None, target: OrderStatus) -> None:
        where = "does not exist" if current is None else f"is {current.value}"
        super().__init__(f"order {transaction_id} {where}; cannot move it to {target.value}")
        self.transaction_id = transaction_id
        self.current = current
        self.target = target


@dataclass(frozen=True)
class TransitionResult:
    """`changed` is False when the order already was in the target state (a redelivery: no-op)."""

    changed: bool
    previous: OrderStatus


# One statement, so one round trip and atomic on its own: lock the order, move it if its status allows,
# and record the move in its timeline. The guard reads `previous` (the row as the lock returned it, the
# latest committed version), not `o`: the UPDATE's own scan sees the statement's snapshot, and a row whose
# snapshot version fails the guard is dropped without being re-checked against what the lock waited for.
# `{stamp_sql}` is filled from STEP_TIMESTAMP_COLUMN (our constants), never from input.
# `seconds_in_previous` (for esim_order_step_seconds): since the order's last recorded move, or its creation;
# the main SELECT does not see the row `recorded` inserts (one snapshot), so that is the previous move.
# It uses now() (the transaction's start), not clock_timestamp(), on purpose: the move itself is stamped
# with now() (`at`'s default, updated_at, the step columns), so the observed time is exactly the gap
# between two rows of the order's timeline, and the steps add up to the whole. clock_timestamp() here
# would count a caller's time inside its transaction twice: in this step, and in the next one, which is
# measured from this move's now()-stamped `at`. (A move stamped before the previous one, by a transaction
# that started first but locked the order second, gives a negative gap: observed as 0.)
_UPDATE_TEMPLATE = """
    WITH previous AS (
        SELECT status, created_at FROM esim_purchases WHERE transaction_id = $1 FOR UPDATE
    ), moved AS (
        UPDATE esim_purchases AS o
           SET status = $2, updated_at = now(),
               failure_reason = COALESCE($4, o.failure_reason){stamp_sql}
          FROM previous
         WHERE o.transaction_id = $1 AND previous.status = ANY($3::text[])
     RETURNING previous.status AS previous_status
    ), recorded AS (
        INSERT INTO order_transitions (transaction_id, from_status, to_status, reason)
        SELECT $1, previous_status, $2, $5 FROM moved
    )
    SELECT p.status AS current, m.previous_status,
           extract(epoch FROM now() - COALESCE(
               (SELECT max(at) FROM order_transitions WHERE transaction_id = $1), p.created_at
           ))::float8 AS seconds_in_previous
      FROM previous AS p LEFT JOIN moved AS m ON true
"""


def _update_sql(target: OrderStatus) -> str:
    stamp = STEP_TIMESTAMP_COLUMN.get(target)
    return _UPDATE_TEMPLATE.format(stamp_sql=f", {stamp} = COALESCE({stamp}, now())" if stamp else "")


async def transition(
    conn: asyncpg.Connection,
    transaction_id: str,
    target: OrderStatus,
    *,
    reason: str | None = None,
    failure_reason: str | None = None,
    expected_from: OrderStatus | None = None,
) -> TransitionResult:
    """Move an order to `target` if that is legal from its current state.

    Returns `changed=False` when the order is already in `target` (idempotent redelivery), raises
    `IllegalTransition` otherwise. Call inside the caller's transaction to make the move atomic with
    whatever else it writes.

    `expected_from`: move only from that one (legal) source, the status the caller acted on. Without it
    a decision made on a stale read could move an order that went on meanwhile by another legal edge
    (funding's `awaiting_funds → funding` must not also take an order that reached `purchasing`).
    """
    sources = sources_of(target)
    if expected_from is not None:
        if expected_from not in sources:
            raise ValueError(f"an order cannot enter {target.value} from {expected_from.value}")
        sources = frozenset({expected_from})
    allowed_from = [s.value for s in sources]
    row = await conn.fetchrow(
        _update_sql(target),
        transaction_id,
        target.value,
        allowed_from,
        failure_reason,
        reason or failure_reason,
    )
    if row is not None and row["previous_status"] is not None:
        metrics.orders_transitions_total.labels(to_state=target.value).inc()
        metrics.order_step_seconds.labels(step=row["previous_status"]).observe(
            max(0.0, row["seconds_in_previous"])
        )
        return TransitionResult(changed=True, previous=OrderStatus(row["previous_status"]))
    # Refused: `current` is the version the row lock returned, the one the guard was evaluated on (a
    # second read after the statement could see a later one and misreport the refusal).
    current = OrderStatus(row["current"]) if row is not None else None
    if current == target:
        return TransitionResult(changed=False, previous=current)
    metrics.illegal_transitions_total.labels(
        from_state=current.value if current else "missing", to_state=target.value
    ).inc()
    log.warning(
        "illegal order transition refused",
        extra={"from_state": current.value if current else None, "to_state": target.value},
    )
    raise IllegalTransition(transaction_id, current, target)
