"""The funding rules: what a delivery does per order state, reservations, top-up sizing and ids."""

from __future__ import annotations

from dataclasses import replace

import pytest

from esim_common.money import Money
from esim_common.order_states import OrderStatus
from funding.domain import (
    MAX_TOPUPS_PER_ORDER,
    TOPUP_STALE_SECONDS,
    Fund,
    NewTopup,
    OrderCost,
    Short,
    Step,
    TopupAboveMaximum,
    TopupFailed,
    TopupsExhausted,
    TopupStatus,
    TopupView,
    UnsettledTopup,
    WaitForTopup,
    WaitingOrder,
    WalletBook,
    after_short,
    batch_to_fund,
    busy_with_topups,
    card_expiry,
    decide_funding,
    drives,
    fundable_in_payment_order,
    issuing_float_covers,
    may_drive,
    may_take_over,
    next_step,
    next_topup_id,
    order_failure_reason,
    reserved_amount,
    reserved_with_fresh_status,
    reserves_wallet,
    status_unsure,
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


def test_zendits_fresh_answers_replace_the_recorded_statuses_in_a_reserved_sum():
    settled = [OrderCost(S.FUNDED, None, usd(2415)), OrderCost(S.PURCHASING, "DONE", usd(700))]
    asked = [
        OrderCost(S.PURCHASING, "ACCEPTED", usd(1300), "z1"),
        OrderCost(S.PURCHASING, None, usd(900), "z2"),
        OrderCost(S.PURCHASING, None, usd(500), "z3"),
    ]
    answered = [
        replace(asked[0], zendit_status="AUTHORIZED"),
        asked[1],
        replace(asked[2], zendit_status="FAILED"),
    ]
    assert all(map(status_unsure, asked))
    summed = reserved_amount(settled + asked, "USD")  # what the SQL sum says

    fresh = reserved_with_fresh_status(summed, asked, answered)

    assert fresh == reserved_amount(settled + answered, "USD") == usd(2415 + 900)


def test_a_batch_funds_every_waiting_order_the_money_pays_for_in_payment_order():
    wallet = book(10_000, ("a", 2_415), ("b", 2_415), ("c", 2_415), ("d", 2_415), ("e", 2_415))
    assert batch_to_fund(wallet, "b", busy=set()) == ["a", "b", "c", "d"]  # e does not fit any more


def test_an_order_driving_its_own_top_up_is_left_out_of_a_batch_but_keeps_its_money():
    wallet = book(7_500, ("a", 2_415), ("busy", 2_415), ("c", 2_415), ("d", 2_415))
    # "d" would fit in the money "busy" leaves unused; it is not given it: "busy" funds itself next.
    assert batch_to_fund(wallet, "c", busy={"busy"}) == ["a", "c"]
    assert batch_to_fund(wallet, "busy", busy={"busy"}) == ["a", "busy", "c"]  # deciding: its own call


def test_the_orders_busy_with_a_top_up_drive_an_unsettled_one_or_joined_an_open_one():
    unsettled = [
        UnsettledTopup("tu_a", None, ("a", "j"), is_open=True),  # j joined it: waits, rescues if it stalls
        UnsettledTopup("tu_b-2", None, ("b", "k"), is_open=False),  # final, card active: b cancels it
        UnsettledTopup("tu_x", "c", ("x", "c"), is_open=False),
    ]
    assert busy_with_topups(["a", "b", "c", "d", "j", "k", "x2"], unsettled) == {"a", "b", "c", "j"}
    assert busy_with_topups(["a"], []) == set()
    assert drives("tu_a-3", "a", None) and drives("tu_x", "c", "c")
    assert not drives("tu_x", "a", "c") and not drives("tu_ab", "a", None)


def test_an_order_takes_over_only_a_stalled_top_up_someone_else_drives():
    stale, fresh = TOPUP_STALE_SECONDS, TOPUP_STALE_SECONDS - 1
    assert may_take_over("tu_other", "t", idle_seconds=stale, driven_by=None)
    assert not may_take_over("tu_other", "t", idle_seconds=fresh, driven_by=None)
    assert not may_take_over("tu_t", "t", idle_seconds=stale, driven_by=None)  # its own: it drives it
    assert not may_take_over("tu_other", "t", idle_seconds=stale, driven_by="t")  # taken over already


def book(available: int, *waiting: tuple[str, int], reserved: int = 0, incoming: int = 0) -> WalletBook:
    return WalletBook(
        available=usd(available),
        reserved=usd(reserved),
        incoming=usd(incoming),
        waiting=tuple(WaitingOrder(txn, usd(cost)) for txn, cost in waiting),
    )


def decide(
    wallet: WalletBook, txn: str, *, can_top_up: bool = True, min_topup: int = 5_000, max_topup=100_000
):
    cost = next(o.cost for o in wallet.waiting if o.transaction_id == txn)
    return decide_funding(wallet, txn, cost, can_top_up=can_top_up, min_topup=min_topup, max_topup=max_topup)


def test_an_order_is_funded_when_available_minus_reserved_covers_it():
    assert decide(book(10_000, ("a", 2_415), reserved=7_585), "a") == Fund()
    assert decide(book(10_000, ("a", 2_416), reserved=7_585), "a") != Fund()


def test_money_goes_in_payment_order_a_later_order_never_takes_what_an_earlier_one_waits_for():
    wallet = book(3_000, ("early", 2_500), ("late", 500))
    assert decide(wallet, "early") == Fund()
    assert decide(wallet, "late") == Fund()  # exactly what is left after the earlier order
    # 3,000 would pay for "late" alone, but 2,600 of it is the earlier order's.
    wallet = book(3_000, ("early", 2_600), ("late", 500))
    assert decide(wallet, "late", can_top_up=False) == Short(amount_to_add=usd(100))
    assert decide(wallet, "late") == NewTopup(usd(5_000))


def test_a_short_order_starts_one_topup_for_everyone_waiting_rounded_up_to_the_minimum():
    wallet = book(1_000, ("a", 2_415), ("b", 2_415), ("c", 2_415))
    # 7,245 wanted, 1,000 there: 6,245 missing → 10,000 (two minimum top-ups), not 5,000 per order.
    assert decide(wallet, "b") == NewTopup(usd(10_000))


def test_an_order_covered_by_a_topup_on_its_way_waits_instead_of_starting_another():
    wallet = book(1_000, ("a", 2_415), ("b", 2_415), incoming=5_000)
    assert decide(wallet, "a") == WaitForTopup()
    assert decide(wallet, "b") == WaitForTopup()  # 1,000 + 5,000 ≥ 4,830
    wallet = book(1_000, ("a", 2_415), ("b", 2_415), ("c", 2_415), incoming=5_000)
    # "c" is not covered (needs 7,245 - 6,000 more): one more top-up for what is still missing.
    assert decide(wallet, "c") == NewTopup(usd(5_000))


def test_a_topup_is_capped_at_the_maximum_and_the_rest_waits_for_the_next():
    wallet = book(0, *[(f"o{i}", 20_000) for i in range(8)])
    assert decide(wallet, "o0", max_topup=100_000) == NewTopup(usd(100_000))


def test_an_order_no_single_topup_could_pay_for_is_refused():
    with pytest.raises(TopupAboveMaximum):
        decide(book(0, ("big", 150_000)), "big", max_topup=100_000)
    # Free money counts: 60,000 there, 90,000 missing, one top-up can do it.
    assert decide(book(60_000, ("big", 150_000)), "big", max_topup=100_000) == NewTopup(usd(90_000))


def test_reservations_above_the_balance_make_the_whole_cost_and_more_missing():
    assert decide(book(1_000, ("a", 500), reserved=3_000), "a", can_top_up=False) == Short(usd(2_500))


def test_prefunded_mode_says_what_every_waiting_order_together_lacks():
    wallet = book(2_000, ("a", 2_415), ("b", 2_415))
    assert decide(wallet, "a", can_top_up=False) == Short(amount_to_add=usd(2_830))


def test_an_order_not_among_the_waiting_is_a_bug_not_a_decision():
    with pytest.raises(ValueError, match="not among the waiting orders"):
        decide_funding(book(0), "ghost", usd(1), can_top_up=True, min_topup=1, max_topup=10)


def test_a_recheck_funds_the_waiting_orders_in_payment_order_until_one_does_not_fit():
    wallet = book(6_000, ("a", 2_415), ("b", 2_415), ("c", 500), reserved=1_000)
    assert fundable_in_payment_order(wallet) == ["a", "b"]  # 5,000 free: 170 left after a and b
    wallet = book(4_000, ("a", 2_415), ("big", 5_000), ("c", 500))
    # "big" does not fit: "c" behind it is not served first, even though it would fit.
    assert fundable_in_payment_order(wallet) == ["a"]
    assert fundable_in_payment_order(book(100, ("a", 2_415))) == []


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


def test_an_order_starts_its_topups_under_ids_derived_from_its_own():
    assert next_topup_id("t", []) == "tu_t"
    # Top-ups it joined (started by others) do not use up its own ids.
    assert next_topup_id("t", ["tu_other"]) == "tu_t"
    assert next_topup_id("t", ["tu_other", "tu_t"]) == "tu_t-2"
    assert next_topup_id("t", topup_ids("t")) is None


def view(topup_id: str, status: TopupStatus, reason: str | None = None) -> TopupView:
    return TopupView(topup_id, status, reason)


def test_a_short_order_whose_last_topup_failed_fails_with_it_instead_of_trying_another_card():
    assert after_short([view("tu_x", TopupStatus.DECLINED, "CARD_DECLINED")]) == TopupFailed("topup_declined")
    assert after_short([view("tu_x", TopupStatus.FAILED, "issuing_float_low")]) == TopupFailed(
        "issuing_float_low"
    )
    # An earlier failure followed by a success does not fail it: the last word counts.
    assert after_short([view("tu_x", TopupStatus.FAILED), view("tu_y", TopupStatus.SUCCEEDED)]) is None
    assert after_short([]) is None


def test_an_order_still_short_after_the_maximum_of_successful_topups_stops():
    succeeded = [view(f"tu_{n}", TopupStatus.SUCCEEDED) for n in range(MAX_TOPUPS_PER_ORDER)]
    assert after_short(succeeded) == TopupsExhausted(MAX_TOPUPS_PER_ORDER)
    assert after_short(succeeded[:-1]) is None


def test_only_the_order_that_started_a_topup_drives_it_unless_it_has_stalled():
    assert may_drive("tu_t", "t", idle_seconds=0)
    assert may_drive("tu_t-2", "t", idle_seconds=0)
    assert not may_drive("tu_other", "t", idle_seconds=TOPUP_STALE_SECONDS - 1)
    assert may_drive("tu_other", "t", idle_seconds=TOPUP_STALE_SECONDS)
    assert may_drive("tu_other", "t", idle_seconds=0, driven_by="t")  # it took the top-up over
    assert not may_drive("tu_other", "t", idle_seconds=0, driven_by="u")


def test_the_order_failure_reason_names_a_decline_and_keeps_other_reasons():
    assert order_failure_reason(TopupStatus.DECLINED, "CARD_DECLINED") == "topup_declined"
    assert order_failure_reason(TopupStatus.FAILED, "gateway_answer_mismatch") == "gateway_answer_mismatch"
    assert order_failure_reason(TopupStatus.FAILED, None) == "topup_failed"


def test_card_expiry_is_stored_as_month_slash_four_digit_year():
    assert card_expiry(3, 2031) == "03/2031"
    assert card_expiry(12, 2030) == "12/2030"
    with pytest.raises(ValueError):
        card_expiry(13, 2030)
