"""Reconcile's rules, without I/O: which orders count as failed, stuck or finished, and the admin actions."""

from __future__ import annotations

from typing import Literal, get_args

from esim_common.order_states import OrderStatus

S = OrderStatus

# A paid order that ended without its eSIM reaching the customer. `payment_failed` is not among them:
# the seed's success rate is over paid orders, and those never were.
FAILED_STATES: frozenset[OrderStatus] = frozenset(
    {S.TOPUP_FAILED, S.PURCHASE_FAILED, S.REFUND_PENDING, S.REFUNDED, S.NEEDS_ATTENTION}
)

# Paid and still on its way to the customer: stuck when it stays here too long.
IN_FLIGHT_STATES: frozenset[OrderStatus] = frozenset(
    {S.PAID, S.FUNDING, S.AWAITING_FUNDS, S.FUNDED, S.PURCHASING, S.PROVISIONED}
)

# Every state an order does not stay in for good: what the unfinished-orders gauges cover (in flight, plus
# the failure states that still wait for a refund or a person).
UNFINISHED_STATES: frozenset[OrderStatus] = IN_FLIGHT_STATES | frozenset(
    {S.TOPUP_FAILED, S.PURCHASE_FAILED, S.REFUND_PENDING, S.NEEDS_ATTENTION}
)

# `wallet_topups.status` values of a top-up that failed for good.
FAILED_TOPUP_STATUSES: tuple[str, ...] = ("declined", "failed")

# Half an hour is far beyond a healthy order (seconds) but short enough to catch a stall the same day.
DEFAULT_STUCK_AFTER_MINUTES = 30
# Lists in admin answers are bounded: an operator pages with a narrower query, the API never streams
# the whole table.
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


# The seed's actions of `POST /api/admin/reconcile-zendit` (a Literal, so the request's JSON schema is
# self-contained and a wrong action's 422 lists the valid ones).
AdminAction = Literal["check_balance", "list_failed_topups", "list_failed_purchases", "reconcile"]
ADMIN_ACTIONS: tuple[str, ...] = get_args(AdminAction)


def status_counts(rows: dict[str, int]) -> dict[str, int]:
    """Every known status with its count (0 when absent), in the state machine's order; unknown
    values from the database are kept so a count never disappears."""
    counts = {status.value: rows.get(status.value, 0) for status in OrderStatus}
    counts.update({status: count for status, count in rows.items() if status not in counts})
    return counts


def average_issue_total_ms(total_timed_ms: float, timed: int, delivered: int) -> float:
    """The sum `legacy_gauge_values` divides by `delivered`, so that it yields the mean over the
    delivered orders that have both timestamps (an order delivered by an operator may lack one)."""
    if timed == 0:
        return float("nan")
    return total_timed_ms / timed * delivered
