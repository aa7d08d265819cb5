"""Provisioning's pure rules: Zendit ids per attempt, what a redelivery means, when to look again."""

from __future__ import annotations

import pytest

from esim_common.order_states import OrderStatus as S
from provisioning.domain import (
    FAST_POLL_WINDOW_SECONDS,
    HINTED_FIRST_POLL_SECONDS,
    HINTS_RECENT_SECONDS,
    MAX_PURCHASE_ATTEMPTS,
    CheckAgain,
    DeadlinePassed,
    Outcome,
    Step,
    hints_arrive,
    next_check,
    next_step,
    outcome_of,
    poll_delay,
    purchase_failure_reason,
    refund_is_safe,
    zendit_transaction_id,
)


def test_the_first_attempt_uses_the_order_id_and_later_attempts_a_numbered_suffix():
    assert zendit_transaction_id("txn_abc", 1) == "txn_abc"
    assert zendit_transaction_id("txn_abc", 2) == "txn_abc-r2"
    assert zendit_transaction_id("txn_abc", 3) == "txn_abc-r3"


def test_every_attempt_gets_a_different_zendit_id_that_starts_with_the_order_id():
    ids = [zendit_transaction_id("txn_abc", n) for n in range(1, 6)]
    assert len(set(ids)) == 5 and all(i.startswith("txn_abc") for i in ids)


def test_there_is_no_attempt_zero():
    with pytest.raises(ValueError):
        zendit_transaction_id("txn_abc", 0)


@pytest.mark.parametrize(
    ("status", "attempts", "step"),
    [
        (S.FUNDED, 0, Step.START),
        (S.FUNDED, 1, Step.START),  # funded again after INSUFFICIENT_FUNDS: a new attempt
        (S.PURCHASING, 1, Step.CONTINUE),
        (S.PROVISIONED, 1, Step.ANNOUNCE),
        (S.DELIVERED, 1, Step.ANNOUNCE),
        (S.FUNDING, 1, Step.FUND_AGAIN),
        (S.FUNDING, 0, Step.IGNORE),  # still in its first funding round: funding's business
        (S.AWAITING_FUNDS, 1, Step.IGNORE),  # funding already has it
        (S.PURCHASE_FAILED, 1, Step.FINISH_REFUND),
        (S.REFUND_PENDING, 1, Step.FINISH_REFUND),
        (S.REFUND_PENDING, 0, Step.IGNORE),  # a top-up failure's refund, not ours
        (S.REFUNDED, 1, Step.IGNORE),
        (S.NEEDS_ATTENTION, 1, Step.ALERT),  # publish its operator alert if that was lost
        (S.NEEDS_ATTENTION, 0, Step.IGNORE),  # held before any purchase: not ours to announce
        (S.TOPUP_FAILED, 0, Step.IGNORE),
        (S.PAID, 0, Step.IGNORE),
    ],
)
def test_a_redelivered_order_funded_does_what_the_orders_state_calls_for(status, attempts, step):
    assert next_step(status, attempts) == step


def test_only_done_and_failed_are_final():
    for status in ("ACCEPTED", "PENDING", "AUTHORIZED", "IN_PROGRESS"):
        assert outcome_of(status, None, 1) == Outcome.PENDING
    assert outcome_of("DONE", None, 1) == Outcome.DONE
    assert outcome_of("FAILED", "PRODUCT_UNAVAILABLE", 1) == Outcome.FAILED


def test_insufficient_funds_sends_the_order_back_to_funding_until_the_attempts_run_out():
    assert outcome_of("FAILED", "INSUFFICIENT_FUNDS", 1) == Outcome.FUND_AGAIN
    assert outcome_of("FAILED", "INSUFFICIENT_FUNDS", MAX_PURCHASE_ATTEMPTS - 1) == Outcome.FUND_AGAIN
    assert outcome_of("FAILED", "INSUFFICIENT_FUNDS", MAX_PURCHASE_ATTEMPTS) == Outcome.FAILED


def test_a_failed_purchase_reason_is_a_short_lower_case_code():
    assert purchase_failure_reason("PRODUCT_UNAVAILABLE") == "zendit_product_unavailable"
    assert purchase_failure_reason(None) == "zendit_failed"


@pytest.mark.parametrize("status", list(S))
def test_a_refund_is_safe_only_once_the_order_was_moved_to_purchase_failed(status):
    # purchase_failed is entered under the row lock when Zendit said FAILED (or refused the POST and
    # nothing exists); refund_pending means the refund began. Anything else — purchasing with a DONE
    # purchase whose QR code could not be stored, say — may still give the customer their eSIM, and no
    # failure reason (`zendit_*` or not) is even asked.
    assert refund_is_safe(status) is (status in (S.PURCHASE_FAILED, S.REFUND_PENDING))


def test_polling_is_about_once_a_second_for_fifteen_seconds_then_backs_off():
    assert poll_delay(0) == 1.0
    assert poll_delay(FAST_POLL_WINDOW_SECONDS - 0.1) == 1.0
    assert poll_delay(FAST_POLL_WINDOW_SECONDS) == 3.0
    assert poll_delay(3600) == 10.0
    delays = [poll_delay(t) for t in range(0, 7200, 5)]
    assert delays == sorted(delays)  # never speeds up again


def test_with_webhook_hints_arriving_the_first_look_waits_for_the_3_s_tier_and_then_polling_is_as_usual():
    assert HINTED_FIRST_POLL_SECONDS == 3.0  # a delay tier (1, 3, 10 s): a shorter delay rounds down to 1
    assert poll_delay(0, hints_arrive=True) == HINTED_FIRST_POLL_SECONDS
    assert poll_delay(2.9, hints_arrive=True) == HINTED_FIRST_POLL_SECONDS
    assert [poll_delay(t, hints_arrive=True) for t in (3, 10, 15, 3600)] == [1.0, 1.0, 3.0, 10.0]
    # Without hints, the contract: about every second for the first ~15 s.
    assert [poll_delay(t, hints_arrive=False) for t in (0, 2.9, 3, 14.9)] == [1.0] * 4
    assert next_check(0.2, 86400, hints_arrive=True) == CheckAgain(delay_seconds=3.0)
    assert next_check(0.2, 86400) == CheckAgain(delay_seconds=1.0)
    assert next_check(86400, 86400, hints_arrive=True) == DeadlinePassed(waited_seconds=86400)


def test_hints_count_as_arriving_only_while_the_last_one_is_recent():
    assert hints_arrive(None) is False  # none since the process started
    assert hints_arrive(0.0) is True
    assert hints_arrive(HINTS_RECENT_SECONDS - 1) is True
    assert hints_arrive(HINTS_RECENT_SECONDS) is False


def test_a_purchase_open_past_the_deadline_is_handed_over_instead_of_checked_again():
    assert next_check(5, 86400) == CheckAgain(delay_seconds=1.0)
    assert next_check(86399, 86400) == CheckAgain(delay_seconds=10.0)
    assert next_check(86400, 86400) == DeadlinePassed(waited_seconds=86400)


def test_order_provisioned_never_carries_a_signed_urls_token():
    from provisioning.phases import Provisioner
    from tests.unit.test_notify_templates import order

    signed = "https://ref.supabase.co/storage/v1/object/sign/esim-qrcodes/txn-1.png?token=eyJ.secret.sig"
    event = Provisioner._provisioned_event(order(qr_code_url=signed))
    assert event.qr_code_url == "https://ref.supabase.co/storage/v1/object/sign/esim-qrcodes/txn-1.png"
    assert "token" not in event.model_dump_json()
