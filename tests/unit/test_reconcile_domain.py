"""Reconcile's rules: what counts as failed or in flight, status counts, the admin request."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from esim_common.metrics import legacy_gauge_values
from esim_common.order_states import TERMINAL_STATES, OrderStatus
from reconcile.domain import (
    ADMIN_ACTIONS,
    FAILED_STATES,
    IN_FLIGHT_STATES,
    average_issue_total_ms,
    status_counts,
)
from reconcile.schemas import AdminRequest


def test_failed_and_in_flight_orders_never_overlap_and_exclude_delivered_and_unpaid_ones():
    assert not FAILED_STATES & IN_FLIGHT_STATES
    for status in (OrderStatus.DELIVERED, OrderStatus.PAYMENT_FAILED, OrderStatus.PENDING_PAYMENT):
        assert status not in FAILED_STATES | IN_FLIGHT_STATES
    # every order that ends after payment ends either delivered or in a failed state
    assert TERMINAL_STATES - {OrderStatus.DELIVERED, OrderStatus.PAYMENT_FAILED} <= FAILED_STATES


def test_status_counts_list_every_state_and_keep_unknown_ones():
    counts = status_counts({"delivered": 3, "something_new": 1})
    assert counts["delivered"] == 3 and counts["refunded"] == 0 and counts["something_new"] == 1
    assert list(counts)[: len(OrderStatus)] == [s.value for s in OrderStatus]


def test_the_average_time_is_over_the_orders_that_have_both_timestamps():
    total = average_issue_total_ms(total_timed_ms=30_000.0, timed=2, delivered=3)
    gauges = legacy_gauge_values(
        delivered=3, failed=1, topup_failures=0, refunds_issued=0, total_issue_ms=total
    )
    assert gauges["average_time_to_issue_esim_ms"] == 15_000.0
    assert gauges["esim_success_rate"] == 75.0
    assert math.isnan(average_issue_total_ms(0.0, timed=0, delivered=2))


def test_an_admin_request_names_one_of_the_seeds_actions():
    assert ADMIN_ACTIONS == ("check_balance", "list_failed_topups", "list_failed_purchases", "reconcile")
    assert AdminRequest.model_validate({"action": "reconcile"}).stuck_after_minutes == 30
    with pytest.raises(ValidationError) as refused:
        AdminRequest.model_validate({"action": "delete_everything"})
    assert all(action in str(refused.value) for action in ADMIN_ACTIONS)
    with pytest.raises(ValidationError):
        AdminRequest.model_validate({"action": "reconcile", "limit": 10_000})
    with pytest.raises(ValidationError):
        AdminRequest.model_validate({"action": "reconcile", "extra": 1})
