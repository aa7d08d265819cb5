"""The ledger rules of scheduled reconciliation: each mismatch kind, and the near misses that are not."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from esim_common.money import Money
from reconcile import ledger_rules as rules
from reconcile.ledger_rules import (
    LedgerRow,
    OrderFacts,
    PaymentConflict,
    StripePayment,
    StripeRefund,
    Wallet,
    WalletAnchor,
    ZenditPurchase,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
GRACE = timedelta(minutes=30)
LOOKBACK = timedelta(hours=72)
USD = Wallet(available=10_000, currency="USD", divisor=100)


def order(txn: str = "txn-1", **changes: object) -> OrderFacts:
    base = OrderFacts(
        transaction_id=txn,
        status="delivered",
        paid_at=NOW - timedelta(hours=1),
        stripe_payment_intent_id=f"pi_{txn}",
        refund_status=None,
        zendit_transaction_id=txn,
        zendit_status="DONE",
        zendit_cost=Money(500, "USD"),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def purchase(txn: str = "txn-1", status: str = "DONE") -> ZenditPurchase:
    return ZenditPurchase(txn, status, NOW - timedelta(minutes=50))


def refund(txn: str = "txn-1", status: str = "succeeded", amount: int = 1000) -> StripeRefund:
    return StripeRefund(f"re_{txn}", status, amount, "USD", f"pi_{txn}")


def row(
    txn: str, type_: str = "DEBIT", status: str = "DONE", amount: int = 500, minutes_ago: int = 50
) -> LedgerRow:
    kind = "ESIM" if type_ == "DEBIT" else "WALLET_RECHARGE"
    return LedgerRow(txn, type_, kind, status, amount, "USD", NOW - timedelta(minutes=minutes_ago))


def kinds(found: list) -> list[tuple[str, str]]:
    return [(m.kind, m.subject) for m in found]


def paid_not_purchased(orders, purchases=(), refunds=()):
    return rules.paid_not_purchased(list(orders), list(purchases), list(refunds), now=NOW, grace=GRACE)


# ------------------------------------------------------------------------------ paid_not_purchased
def test_a_paid_order_without_any_zendit_purchase_is_paid_not_purchased():
    found = paid_not_purchased([order(status="funded")])
    assert kinds(found) == [("paid_not_purchased", "txn-1")]
    assert found[0].transaction_id == "txn-1"
    assert found[0].detail["status"] == "funded"
    assert found[0].detail["reason"] == "no_purchase"


def test_a_retry_purchase_under_txn_r2_counts_as_the_orders_purchase():
    assert paid_not_purchased([order()], [purchase("txn-1", "FAILED"), purchase("txn-1-r2", "DONE")]) == []


def test_a_purchase_still_in_progress_at_zendit_is_not_a_mismatch():
    assert paid_not_purchased([order(status="purchasing")], [purchase(status="IN_PROGRESS")]) == []


def test_only_failed_purchases_leave_the_order_paid_not_purchased():
    found = paid_not_purchased([order(status="needs_attention")], [purchase(status="FAILED")])
    assert kinds(found) == [("paid_not_purchased", "txn-1")]
    assert found[0].detail["zendit_statuses"] == "FAILED"


@pytest.mark.parametrize(
    "waiting",
    [
        order(paid_at=NOW - timedelta(minutes=29)),  # within the grace period
        order(status="awaiting_funds"),  # waits for the operator on purpose
        order(status="pending_payment", paid_at=None),  # never paid
        order(status="refunded", refund_status="succeeded"),
        order(status="refund_pending", refund_status="pending"),  # our refund is on its way
        order(status="needs_attention", refund_status="canceled"),  # a manual-capture hold released
    ],
    ids=["in-grace", "awaiting-funds", "never-paid", "refunded", "refund-pending", "hold-released"],
)
def test_orders_legitimately_without_a_purchase_are_not_mismatches(waiting):
    assert paid_not_purchased([waiting]) == []


def test_a_refund_made_at_stripe_but_not_recorded_by_us_means_not_paid_not_purchased():
    assert paid_not_purchased([order(status="purchase_failed")], refunds=[refund(status="pending")]) == []
    found = paid_not_purchased([order(status="purchase_failed")], refunds=[refund(status="failed")])
    assert kinds(found) == [("paid_not_purchased", "txn-1")]


# ------------------------------------------------------------------------------ payment_not_recorded
def intent(
    txn: str | None = "txn-1", status: str = "succeeded", minutes_ago: int = 45, amount: int = 1000
) -> StripePayment:
    held = status == "requires_capture"
    return StripePayment(
        id=f"pi_{txn}",
        status=status,
        amount_received=0 if held else amount,
        amount_capturable=amount if held else 0,
        currency="USD",
        created=NOW - timedelta(minutes=minutes_ago),
        transaction_id=txn,
    )


def not_recorded(intents, orders=(), refunds=()):
    by_id = {o.transaction_id: o for o in orders}
    return rules.payment_not_recorded(list(intents), by_id, list(refunds), now=NOW, grace=GRACE)


UNPAID = order(status="pending_payment", paid_at=None, stripe_payment_intent_id=None, zendit_status=None)


def test_money_taken_for_an_order_we_still_have_unpaid_is_paid_not_purchased():
    [found] = not_recorded([intent()], [UNPAID])
    assert (found.kind, found.subject, found.transaction_id) == ("paid_not_purchased", "txn-1", "txn-1")
    assert dict(found.detail) == {
        "evidence_at": (NOW - timedelta(minutes=45)).isoformat(),
        "reason": "payment_not_recorded",
        "status": "pending_payment",
        "payment_intent": "pi_txn-1",
        "payment_intent_status": "succeeded",
        "metadata_transaction_id": "txn-1",
        "amount": 1000,
        "currency": "USD",
    }


def test_a_payment_we_gave_up_on_is_payment_not_recorded_too():
    found = not_recorded([intent()], [order(status="payment_failed", paid_at=None)])
    assert kinds(found) == [("paid_not_purchased", "txn-1")]


def test_money_for_a_transaction_id_no_order_has_is_reported_under_the_payment_intent():
    [found] = not_recorded([intent("txn-lost")], [UNPAID])
    assert (found.subject, found.transaction_id) == ("pi_txn-lost", None)
    assert found.detail["metadata_transaction_id"] == "txn-lost"
    assert found.detail["status"] is None


def test_an_authorised_manual_capture_hold_counts_as_money_taken_with_its_held_amount():
    [found] = not_recorded([intent(status="requires_capture", amount=3900)], [UNPAID])
    assert (found.detail["payment_intent_status"], found.detail["amount"]) == ("requires_capture", 3900)


@pytest.mark.parametrize(
    ("the_intent", "orders", "refunds"),
    [
        (intent(None), [], []),  # another integration on the same Stripe account
        (intent(), [UNPAID], [refund(status="succeeded")]),  # refunded at Stripe
        (intent(), [UNPAID], [refund(status="pending")]),  # refund on its way
        (intent(minutes_ago=29), [UNPAID], []),  # within the grace: the webhook may still come
        (intent(), [order(status="delivered")], []),  # paid in our records: not this reason
        (intent(status="requires_capture"), [order(status="paid")], []),  # a manual order awaiting capture
        (intent(status="canceled"), [UNPAID], []),  # took nothing
        (intent(status="processing"), [UNPAID], []),  # not taken yet
        (intent(status="requires_payment_method"), [UNPAID], []),  # the customer has not paid
        (intent(), [replace(UNPAID, status="payment_failed", refund_status="succeeded")], []),  # we refunded
    ],
    ids=[
        "not-ours",
        "refunded",
        "refund-pending",
        "in-grace",
        "recorded",
        "manual-paid",
        "canceled",
        "processing",
        "unpaid",
        "our-refund",
    ],
)
def test_payments_that_are_not_payment_not_recorded(the_intent, orders, refunds):
    assert not_recorded([the_intent], orders, refunds) == []


def test_a_failed_refund_gives_nothing_back_so_the_payment_is_still_reported():
    assert kinds(not_recorded([intent()], [UNPAID], [refund(status="failed")])) == [
        ("paid_not_purchased", "txn-1")
    ]


def test_two_intents_of_one_order_are_one_mismatch():
    second = replace(intent(), id="pi_second")
    assert kinds(not_recorded([intent(), second], [UNPAID])) == [("paid_not_purchased", "txn-1")]


def test_a_paid_order_whose_intent_took_nothing_is_a_conflict_unless_we_released_it():
    orders = {
        "txn-1": order(status="delivered"),
        "txn-2": order("txn-2", status="needs_attention", refund_status="canceled"),  # our released hold
        "txn-3": order("txn-3", status="provisioned"),
        "txn-4": order("txn-4", status="pending_payment", paid_at=None),
    }
    intents = [
        intent("txn-1", status="canceled"),
        intent("txn-2", status="canceled"),
        intent("txn-3", status="succeeded"),
        intent("txn-4", status="requires_payment_method"),
        intent("txn-9", status="canceled"),  # no order of ours
    ]
    assert rules.payment_state_conflicts(intents, orders) == [
        PaymentConflict("txn-1", "pi_txn-1", "canceled", "delivered")
    ]
    lapsed = [intent("txn-3", status="requires_payment_method")]
    assert [c.intent_status for c in rules.payment_state_conflicts(lapsed, orders)] == [
        "requires_payment_method"
    ]


# ------------------------------------------------------------------------------ purchased_unknown
def test_a_zendit_purchase_of_no_order_is_purchased_unknown():
    orders = {"txn-1": order()}
    found = rules.purchased_unknown([purchase("txn-1"), purchase("foreign-9")], orders)
    assert kinds(found) == [("purchased_unknown", "foreign-9")]
    assert found[0].transaction_id is None
    assert found[0].detail["evidence_at"] == (NOW - timedelta(minutes=50)).isoformat()


def test_retry_ids_and_recorded_zendit_ids_map_to_their_orders():
    orders = {"txn-1": order(), "txn-2": order("txn-2", zendit_transaction_id="zx-77")}
    assert rules.purchased_unknown([purchase("txn-1-r3"), purchase("zx-77")], orders) == []


def test_a_retry_suffix_on_an_unknown_base_is_still_unknown():
    assert kinds(rules.purchased_unknown([purchase("other-r2")], {"txn-1": order()})) == [
        ("purchased_unknown", "other-r2")
    ]


def test_a_failed_foreign_purchase_moved_no_money_and_is_not_reported():
    assert rules.purchased_unknown([purchase("foreign-9", "FAILED")], {}) == []


def test_order_candidates_strip_only_a_retry_suffix():
    assert rules.order_candidates("txn-1-r2") == ("txn-1-r2", "txn-1")
    assert rules.order_candidates("txn-1-r12") == ("txn-1-r12", "txn-1")
    assert rules.order_candidates("txn-1-r1") == ("txn-1-r1",)  # attempt 1 has no suffix
    assert rules.order_candidates("txn-1-rx") == ("txn-1-rx",)


# ------------------------------------------------------------------------------ refunded_and_delivered
def test_a_succeeded_refund_of_an_order_with_a_done_purchase_is_refunded_and_delivered():
    found = rules.refunded_and_delivered(
        [refund()], [order(status="funded", zendit_status=None)], [purchase()]
    )
    assert kinds(found) == [("refunded_and_delivered", "txn-1")]
    assert found[0].detail["refund_id"] == "re_txn-1"
    assert found[0].detail["refund_amount"] == 1000


def test_our_own_record_of_delivery_is_enough():
    found = rules.refunded_and_delivered([refund()], [order(status="delivered")], [])
    assert kinds(found) == [("refunded_and_delivered", "txn-1")]


@pytest.mark.parametrize(
    ("the_refund", "the_order", "purchases"),
    [
        (refund(status="pending"), order(), [purchase()]),  # not (yet) given back
        (refund(status="failed"), order(), [purchase()]),
        (refund(), order(status="refunded", zendit_status="FAILED"), [purchase(status="FAILED")]),
        (refund("other"), order(), [purchase()]),  # a refund of someone else's payment
    ],
    ids=["pending", "failed", "not-delivered", "other-payment"],
)
def test_refunds_that_are_not_refunded_and_delivered(the_refund, the_order, purchases):
    assert rules.refunded_and_delivered([the_refund], [the_order], purchases) == []


# ------------------------------------------------------------------------------ wallet: debits
def test_a_debit_equal_to_the_recorded_cost_is_fine_and_a_different_one_is_a_drift():
    orders = {"txn-1": order(), "txn-2": order("txn-2")}
    found = rules.debit_mismatches([row("txn-1"), row("txn-2", amount=650)], orders, USD)
    assert kinds(found) == [("wallet_balance_drift", "txn-2")]
    assert found[0].transaction_id == "txn-2"
    assert found[0].detail == {
        "evidence_at": (NOW - timedelta(minutes=50)).isoformat(),
        "check": "debit",
        "ledger_amount": 650,
        "ledger_currency": "USD",
        "ledger_divisor": 100,
        "recorded_cost": 500,
        "recorded_currency": "USD",
    }


def test_debits_are_compared_exactly_across_divisors():
    orders = {"txn-1": order()}
    thousandths = Wallet(available=0, currency="USD", divisor=1000)
    assert rules.debit_mismatches([row("txn-1", amount=5000)], orders, thousandths) == []
    assert len(rules.debit_mismatches([row("txn-1", amount=5001)], orders, thousandths)) == 1


def test_only_done_debits_of_our_orders_are_compared():
    orders = {"txn-1": order()}
    rows = [
        row("txn-1", status="IN_PROGRESS", amount=999),
        row("foreign", amount=999),
        row("t", "CREDIT", amount=1),
    ]
    assert rules.debit_mismatches(rows, orders, USD) == []


def test_a_debit_in_another_currency_than_recorded_is_a_drift():
    orders = {"txn-1": order(zendit_cost=Money(500, "GBP"))}
    assert kinds(rules.debit_mismatches([row("txn-1")], orders, USD)) == [("wallet_balance_drift", "txn-1")]


# ------------------------------------------------------------------------------ wallet: balance
def test_effects_of_ledger_rows_on_the_available_balance():
    assert rules.effect(row("c", "CREDIT", amount=2000)) == 2000
    assert rules.effect(row("c", "CREDIT", status="FAILED", amount=2000)) == 0
    assert rules.effect(row("d", status="AUTHORIZED")) == -500  # held
    assert rules.effect(row("d", status="DONE", amount=-500)) == -500  # the sign Zendit writes is ignored
    assert rules.effect(row("d", status="PENDING")) == 0
    assert rules.effect(row("d", status="FAILED")) == 0  # the hold was released


def test_the_first_check_only_sets_the_anchor():
    check = rules.check_balance(None, USD, [row("d1")], now=NOW, lookback=LOOKBACK)
    assert check.drift is None
    assert check.anchor == WalletAnchor("USD", 100, NOW - LOOKBACK, 10_000 + 500)
    assert rules.balance_mismatch(check, USD) == []


def test_a_balance_explained_by_new_ledger_rows_is_not_a_drift():
    anchor = WalletAnchor("USD", 100, NOW - LOOKBACK, 10_000)
    rows = [row("d1", amount=500), row("c1", "CREDIT", amount=2000), row("d2", status="FAILED", amount=700)]
    check = rules.check_balance(anchor, replace(USD, available=11_500), rows, now=NOW, lookback=LOOKBACK)
    assert check.drift == 0
    assert rules.balance_mismatch(check, USD) == []


def test_a_balance_changed_without_a_ledger_row_is_a_drift_until_corrected():
    anchor = WalletAnchor("USD", 100, NOW - LOOKBACK, 10_000)
    raised = replace(USD, available=12_345)
    check = rules.check_balance(anchor, raised, [], now=NOW, lookback=LOOKBACK)
    found = rules.balance_mismatch(check, raised)
    assert kinds(found) == [("wallet_balance_drift", "USD")]
    assert found[0].detail["drift"] == 2_345
    assert found[0].detail["expected"] == 10_000
    # The next run still expects the old balance (the anchor kept it): reported again, then cleared
    # once the balance is back.
    again = rules.check_balance(check.anchor, raised, [], now=NOW + timedelta(minutes=1), lookback=LOOKBACK)
    assert again.drift == 2_345
    fixed = rules.check_balance(again.anchor, USD, [], now=NOW + timedelta(minutes=2), lookback=LOOKBACK)
    assert fixed.drift == 0


def test_the_anchor_moves_with_the_window_and_folds_the_rows_it_passes():
    anchor = WalletAnchor("USD", 100, NOW - LOOKBACK - timedelta(hours=2), 10_500)
    old = row("d-old", amount=500, minutes_ago=int((LOOKBACK + timedelta(hours=1)).total_seconds() // 60))
    check = rules.check_balance(anchor, USD, [old], now=NOW, lookback=LOOKBACK)
    assert check.drift == 0
    assert check.anchor.since == NOW - LOOKBACK
    assert check.anchor.base == 10_000  # the passed debit is in the base now
    # Read from the new anchor, without the old row, the same balance is still no drift.
    assert rules.check_balance(check.anchor, USD, [], now=NOW, lookback=LOOKBACK).drift == 0


def test_the_anchor_never_passes_a_row_that_can_still_change():
    anchor = WalletAnchor("USD", 100, NOW - LOOKBACK - timedelta(hours=2), 10_500)
    minutes = int((LOOKBACK + timedelta(hours=1)).total_seconds() // 60)
    stuck = row("d-stuck", status="IN_PROGRESS", amount=500, minutes_ago=minutes)
    check = rules.check_balance(anchor, USD, [stuck], now=NOW, lookback=LOOKBACK)
    assert check.anchor.since == stuck.created_at
    assert check.anchor.base == 10_500


def test_a_new_wallet_currency_starts_a_new_anchor():
    anchor = WalletAnchor("GBP", 100, NOW - LOOKBACK, 99)
    check = rules.check_balance(anchor, USD, [], now=NOW, lookback=LOOKBACK)
    assert check.drift is None
    assert check.anchor.currency == "USD"


def test_the_ledger_is_read_from_the_anchor_or_the_window_whichever_is_earlier():
    assert rules.window_start(None, NOW, LOOKBACK) == NOW - LOOKBACK
    early = WalletAnchor("USD", 100, NOW - LOOKBACK - timedelta(hours=5), 0)
    assert rules.window_start(early, NOW, LOOKBACK) == early.since
