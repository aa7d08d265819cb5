"""When the scheduled sweep counts an order as stuck: past every timer of its state's owner, at most once per
deadline, never for terminal or failure states."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from esim_common.order_states import TERMINAL_STATES, OrderStatus
from esim_common.settings import Settings
from reconcile.order_ops import MovedOn, NotAllowed, check_unchanged
from reconcile.stuck_rules import (
    LOST_MESSAGE_DEADLINE,
    MAX_REDRIVES_PER_SWEEP,
    OWNER_DEADLINE_MARGIN,
    StuckRules,
    stuck_rules,
)

S = OrderStatus
MINUTE = timedelta(minutes=1)


def rules(**settings: object) -> StuckRules:
    return stuck_rules(Settings(**settings))  # type: ignore[arg-type]


def test_only_in_flight_states_have_a_deadline():
    assert set(rules().states) == {S.PAID, S.FUNDING, S.AWAITING_FUNDS, S.FUNDED, S.PURCHASING, S.PROVISIONED}
    for status in TERMINAL_STATES | {S.PENDING_PAYMENT, S.NEEDS_ATTENTION, S.REFUND_PENDING, S.TOPUP_FAILED}:
        assert rules().deadline(status) is None
        assert not rules().is_stuck(status, timedelta(days=30), None)


@pytest.mark.parametrize(
    ("status", "setting", "seconds"),
    [
        (S.AWAITING_FUNDS, "awaiting_funds_max_age", 7200),
        (S.PURCHASING, "purchase_deadline_seconds", 3600),
        (S.PROVISIONED, "email_give_up_seconds", 900),
    ],
)
def test_a_state_with_its_own_timer_is_stuck_only_past_that_timer_and_a_margin(status, setting, seconds):
    deadline = timedelta(seconds=seconds) + OWNER_DEADLINE_MARGIN
    assert rules(**{setting: seconds}).deadline(status) == deadline
    assert not rules(**{setting: seconds}).is_stuck(status, deadline, None)
    assert rules(**{setting: seconds}).is_stuck(status, deadline + timedelta(seconds=1), None)


def test_the_default_deadlines_never_race_the_owners_timers():
    defaults = Settings()
    assert rules().deadline(S.AWAITING_FUNDS) > timedelta(seconds=defaults.awaiting_funds_max_age)
    assert rules().deadline(S.PURCHASING) > timedelta(seconds=defaults.purchase_deadline_seconds)
    assert rules().deadline(S.PROVISIONED) > timedelta(seconds=defaults.email_give_up_seconds)


@pytest.mark.parametrize("status", [S.PAID, S.FUNDING, S.FUNDED])
def test_a_lost_message_is_redriven_after_ten_minutes_before_the_stuck_order_page(status):
    # OrdersStuck pages after 15 minutes plus 5 of `for` (deploy/prometheus/alerts.yml).
    assert rules().deadline(status) == LOST_MESSAGE_DEADLINE == timedelta(minutes=10)
    assert not rules().is_stuck(status, 9 * MINUTE, None)
    assert rules().is_stuck(status, 11 * MINUTE, None)


def test_an_order_redriven_within_its_deadline_is_not_redriven_again():
    stuck_for = timedelta(hours=1)
    assert not rules().is_stuck(S.PAID, stuck_for, since_last_redrive=2 * MINUTE)
    assert not rules().is_stuck(S.PAID, stuck_for, since_last_redrive=LOST_MESSAGE_DEADLINE)
    assert rules().is_stuck(S.PAID, stuck_for, since_last_redrive=11 * MINUTE)


def test_a_sweep_is_capped_and_deadlines_must_be_positive():
    assert rules().max_per_sweep == MAX_REDRIVES_PER_SWEEP
    with pytest.raises(ValueError, match="positive"):
        StuckRules(deadlines={S.PAID: timedelta(0)})
    with pytest.raises(ValueError, match="at least one"):
        StuckRules(deadlines={S.PAID: MINUTE}, max_per_sweep=0)


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_reconcile_interval_must_be_a_positive_number_of_seconds(value, monkeypatch):
    assert Settings().reconcile_interval == 60
    monkeypatch.setenv("RECONCILE_INTERVAL", value)
    with pytest.raises(ValidationError, match="reconcile_interval"):
        Settings()
    monkeypatch.setenv("RECONCILE_INTERVAL", "5")
    assert Settings().reconcile_interval == 5


@pytest.mark.parametrize("value", ["0", "-600", "hourly"])
def test_the_ledger_checks_interval_must_be_a_positive_number_of_seconds(value, monkeypatch):
    assert Settings().reconcile_ledger_interval == 600
    monkeypatch.setenv("RECONCILE_LEDGER_INTERVAL", value)
    with pytest.raises(ValidationError, match="reconcile_ledger_interval"):
        Settings()
    monkeypatch.setenv("RECONCILE_LEDGER_INTERVAL", "3600")
    assert Settings().reconcile_ledger_interval == 3600


@dataclass(frozen=True)
class Found:
    status: OrderStatus
    updated_at: datetime
    transaction_id: str = "txn_1"


def test_an_order_that_changed_since_it_was_found_stuck_has_moved_on():
    at = datetime(2026, 1, 1, tzinfo=UTC)
    check_unchanged(Found(S.PAID, at), S.PAID, at)
    with pytest.raises(MovedOn):
        check_unchanged(Found(S.FUNDING, at), S.PAID, at)
    with pytest.raises(MovedOn) as moved:
        check_unchanged(Found(S.PAID, at + timedelta(microseconds=1)), S.PAID, at)
    assert isinstance(moved.value, NotAllowed)
