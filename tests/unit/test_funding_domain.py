"""The funding rules: what a delivery does per order state, reservations, top-up sizing and ids."""

from __future__ import annotations

import pytest

from esim_common.money import Money
from esim_common.order_states import OrderStatus
from funding.domain import (
    MAX_TOPUPS_PER_ORDER,
    OrderCost,
    ResumeTopup,
    StartTopup,
    Step,
    TopupAboveMaximum,
    TopupFailed,
    TopupsExhausted,
    TopupStatus,
    WalletPosition,
    card_expiry,
    issuing_float_covers,
    next_step,
    order_failure_reason,
    plan_topup,
    reserved_amount,
    reserves_wallet,
    topup_amount,
    topup_ids,
)

S = OrderStatus


def usd(amount: int) -> Money:
    return Money(amount, "USD")


# ------------------------------------------------------------------------------------ the guard


@pytest.mark.parametrize("status", [S.PAID, S.FUNDING, S.AWAITING_FUNDS])
def test_paid_and_half_funded_orders_are_funded(status):
    assert next_step(status, ever_funded=False) == Step.FUND


def test_a_funded_order_is_announced_again_to_heal_a_lost_publish():
    assert next_step(S.FUNDED, ever_funded=True) == Step.ANNOUNCE


@pytest.mark.parametrize("status", [S.PURCHASING, S.PROVISIONED, S.DELIVERED, S.REFUNDED, S.NEEDS_ATTENTION])
def test_orders_past_funding_or_closed_are_left_alone(status):
    assert next_step(status, ever_funded=True) == Step.NOTHING


@pytest.mark.parametrize("status", [S.TOPUP_FAILED, S.REFUND_PENDING])
def test_a_funding_failure_whose_refund_did_not_finish_is_resumed(status):
    assert next_step(status, ever_funded=False) == Step.RESUME_FAILURE


def test_a_failed_top_up_of_an_order_funded_once_before_is_still_resumed():
    assert next_step(S.TOPUP_FAILED, ever_funded=True) == Step.RESUME_FAILURE


def test_a_refund_started_by_a_purchase_failure_is_not_ours_to_resume():
    assert next_step(S.REFUND_PENDING, ever_funded=True) == Step.NOTHING


def test_order_paid_for_an_unpaid_order_goes_to_a_person():
    assert next_step(S.PENDING_PAYMENT, ever_funded=False) == Step.UNEXPECTED


# ------------------------------------------------------------------------------------ reservations


def test_funded_orders_and_purchases_zendit_has_not_held_yet_reserve_their_cost():
    assert reserves_wallet(OrderCost(S.FUNDED, None, usd(100)))
    assert reserves_wallet(OrderCost(S.PURCHASING, None, usd(100)))
    assert reserves_wallet(OrderCost(S.PURCHASING, "ACCEPTED", usd(100)))
    assert reserves_wallet(OrderCost(S.PURCHASING, "PENDING", usd(100)))


@pytest.mark.parametrize("zendit_status", ["AUTHORIZED", "IN_PROGRESS", "DONE", "FAILED"])
def test_a_purchase_zendit_holds_debited_or_released_reserves_nothing(zendit_status):
    # Zendit's availableBalance already excludes a held or debited cost: reserving it counts it twice.
    assert not reserves_wallet(OrderCost(S.PURCHASING, zendit_status, usd(100)))


@pytest.mark.parametrize("status", [S.PAID, S.FUNDING, S.AWAITING_FUNDS, S.PROVISIONED, S.REFUNDED])
def test_orders_not_funded_or_already_bought_reserve_nothing(status):
    assert not reserves_wallet(OrderCost(status, None, usd(100)))


def test_reserved_amount_sums_the_reserving_costs_in_the_wallet_currency():
    orders = [
        OrderCost(S.FUNDED, None, usd(2415)),
        OrderCost(S.PURCHASING, "PENDING", usd(1300)),
        OrderCost(S.PURCHASING, "DONE", usd(9999)),  # debited: in the balance already
        OrderCost(S.FUNDED, None, Money(735, "GBP")),  # another currency: not from this wallet
        OrderCost(S.FUNDED, None, None),  # no cost recorded: nothing to count
        OrderCost(S.DELIVERED, "DONE", usd(5000)),
    ]
    assert reserved_amount(orders, "USD") == usd(3715)
    assert reserved_amount([], "USD") == usd(0)


def test_the_wallet_covers_a_cost_only_when_available_minus_reserved_is_enough():
    position = WalletPosition(available=usd(10_000), reserved=usd(7_585))
    assert position.free == usd(2_415)
    assert position.covers(usd(2_415))
    assert not position.covers(usd(2_416))
    assert position.shortfall(usd(2_416)) == usd(1)
    assert position.shortfall(usd(2_000)) == usd(0)


def test_reservations_above_the_balance_make_the_whole_cost_and_more_missing():
    position = WalletPosition(available=usd(1_000), reserved=usd(3_000))
    assert position.shortfall(usd(500)) == usd(2_500)


# ------------------------------------------------------------------------------------ top-up sizing


def test_a_topup_is_the_shortfall_rounded_up_to_the_minimum_topup():
    assert topup_amount(usd(1), min_topup=5_000, max_topup=100_000) == usd(5_000)
    assert topup_amount(usd(1_415), min_topup=5_000, max_topup=100_000) == usd(5_000)
    assert topup_amount(usd(5_000), min_topup=5_000, max_topup=100_000) == usd(5_000)
    assert topup_amount(usd(5_001), min_topup=5_000, max_topup=100_000) == usd(10_000)


def test_a_topup_may_reach_the_maximum_but_not_exceed_it():
    assert topup_amount(usd(99_999), min_topup=5_000, max_topup=100_000) == usd(100_000)
    with pytest.raises(TopupAboveMaximum, match="above the maximum"):
        topup_amount(usd(100_001), min_topup=5_000, max_topup=100_000)


def test_a_minimum_of_zero_tops_up_exactly_the_shortfall():
    assert topup_amount(usd(1_415), min_topup=0, max_topup=100_000) == usd(1_415)


def test_there_is_no_topup_for_nothing():
    with pytest.raises(ValueError, match="nothing to top up"):
        topup_amount(usd(0), min_topup=5_000, max_topup=100_000)


def test_the_issuing_float_must_hold_the_whole_topup():
    assert issuing_float_covers(5_000, usd(5_000))
    assert not issuing_float_covers(4_999, usd(5_000))


# ------------------------------------------------------------------------------------ top-up ids


def test_topup_ids_are_derived_from_the_transaction_id_so_a_redelivery_finds_them():
    assert topup_ids("txn1") == ["tu_txn1", "tu_txn1-2", "tu_txn1-3"][:MAX_TOPUPS_PER_ORDER]
    assert topup_ids("txn1") == topup_ids("txn1")


def test_the_first_topup_of_an_order_uses_its_base_id():
    assert plan_topup("t", []) == StartTopup("tu_t")


@pytest.mark.parametrize("status", [TopupStatus.PENDING, TopupStatus.CARD_CREATED, TopupStatus.SUBMITTED])
def test_an_open_topup_is_joined_never_skipped_it_may_be_paying_right_now(status):
    assert plan_topup("t", [("tu_t", status, None)]) == ResumeTopup("tu_t")
    assert plan_topup("t", [("tu_t", TopupStatus.SUCCEEDED, None), ("tu_t-2", status, None)]) == ResumeTopup(
        "tu_t-2"
    )


def test_after_a_successful_topup_that_others_spent_the_next_id_follows():
    assert plan_topup("t", [("tu_t", TopupStatus.SUCCEEDED, None)]) == StartTopup("tu_t-2")


def test_a_declined_last_topup_fails_the_order_instead_of_trying_another_card():
    plan = plan_topup("t", [("tu_t", TopupStatus.DECLINED, "CARD_DECLINED")])
    assert plan == TopupFailed("topup_declined")
    assert plan_topup("t", [("tu_t", TopupStatus.FAILED, "issuing_float_low")]) == TopupFailed(
        "issuing_float_low"
    )


def test_an_order_never_gets_more_than_the_maximum_number_of_topups():
    existing = [(topup_id, TopupStatus.SUCCEEDED, None) for topup_id in topup_ids("t")]
    assert plan_topup("t", existing) == TopupsExhausted(MAX_TOPUPS_PER_ORDER)


def test_the_order_failure_reason_names_a_decline_and_keeps_other_reasons():
    assert order_failure_reason(TopupStatus.DECLINED, "CARD_DECLINED") == "topup_declined"
    assert order_failure_reason(TopupStatus.FAILED, "gateway_answer_mismatch") == "gateway_answer_mismatch"
    assert order_failure_reason(TopupStatus.FAILED, None) == "topup_failed"


def test_card_expiry_is_stored_as_month_slash_four_digit_year():
    assert card_expiry(3, 2031) == "03/2031"
    assert card_expiry(12, 2030) == "12/2030"
    with pytest.raises(ValueError):
        card_expiry(13, 2030)
