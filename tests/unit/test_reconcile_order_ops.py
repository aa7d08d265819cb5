"""The operator's order rules: what a re-drive publishes, when a refund may be retried, what is resolved."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from esim_common.events import OrderFunded, OrderPaid, OrderProvisioned
from esim_common.order_states import TERMINAL_STATES, OrderStatus
from reconcile.order_ops import (
    DEFAULT_LIST_STATUSES,
    Move,
    NotAllowed,
    manual_redrive,
    parse_statuses,
    redrive_event,
    refund_retry_plan,
    resolve_target,
    shareable_url,
    stored_note,
)
from reconcile.order_schemas import RedriveRequest, ResolveRequest

S = OrderStatus


@dataclass(frozen=True)
class FakeOrder:
    status: OrderStatus
    transaction_id: str = "txn_1"
    stripe_payment_intent_id: str | None = "pi_1"
    refund_id: str | None = None
    refund_status: str | None = None
    zendit_transaction_id: str | None = None
    zendit_status: str | None = None
    qr_code_url: str | None = None
    qr_stored_at: datetime | None = None


def history(*states: str, reasons: dict[str, str] | None = None) -> list[Move]:
    """Moves through `states`, starting from pending_payment."""
    reasons = reasons or {}
    path = ["pending_payment", *states]
    return [Move(a, b, reasons.get(b)) for a, b in itertools.pairwise(path)]


# ------------------------------------------------------------------------------------------- re-drive
@pytest.mark.parametrize(
    ("status", "event"),
    [
        (S.PAID, OrderPaid),
        (S.FUNDING, OrderPaid),
        (S.AWAITING_FUNDS, OrderPaid),
        (S.FUNDED, OrderFunded),
        (S.PURCHASING, OrderFunded),
        (S.PROVISIONED, OrderProvisioned),
    ],
)
def test_a_stuck_order_is_redriven_by_the_event_its_consumer_acts_on(status, event):
    assert redrive_event(FakeOrder(status)) is event


@pytest.mark.parametrize(
    ("status", "advice"),
    [
        (S.PENDING_PAYMENT, "not paid"),
        (S.DELIVERED, "nothing left"),
        (S.REFUNDED, "finished"),
        (S.PAYMENT_FAILED, "nothing was charged"),
        (S.TOPUP_FAILED, "retry-refund"),
        (S.PURCHASE_FAILED, "retry-refund"),
        (S.REFUND_PENDING, "retry-refund"),
        (S.NEEDS_ATTENTION, '"to": "funding"'),
    ],
)
def test_other_states_are_not_redriven_and_the_refusal_says_what_to_do_instead(status, advice):
    with pytest.raises(NotAllowed, match=status.value) as refusal:
        redrive_event(FakeOrder(status))
    assert advice in str(refusal.value)


def test_needs_attention_goes_back_to_funding_when_nothing_was_bought_or_given_back():
    order = FakeOrder(S.NEEDS_ATTENTION)
    assert manual_redrive(order, "funding") == (S.FUNDING, OrderPaid)
    # a refund Stripe failed gave nothing back: the customer still paid
    assert manual_redrive(replace(order, refund_status="failed"), "funding") == (S.FUNDING, OrderPaid)
    # a purchase that FAILED at Zendit delivered nothing
    failed_purchase = replace(order, zendit_transaction_id="txn_1", zendit_status="FAILED")
    assert manual_redrive(failed_purchase, "funding") == (S.FUNDING, OrderPaid)


@pytest.mark.parametrize(
    ("facts", "why"),
    [
        ({"zendit_transaction_id": "txn_1", "zendit_status": "PENDING"}, "may still deliver"),
        ({"zendit_transaction_id": "txn_1", "zendit_status": None}, "second eSIM"),
        ({"zendit_transaction_id": "txn_1", "zendit_status": "DONE"}, '"to": "provisioned"'),
        ({"refund_id": "re_1", "refund_status": "succeeded"}, "unpaid eSIM"),
        ({"refund_status": "canceled"}, "unpaid eSIM"),  # a released authorisation
        ({"stripe_payment_intent_id": None}, "no PaymentIntent"),
    ],
)
def test_funding_again_is_refused_when_it_could_deliver_twice_or_unpaid(facts, why):
    with pytest.raises(NotAllowed, match=why):
        manual_redrive(FakeOrder(S.NEEDS_ATTENTION, **facts), "funding")


def test_needs_attention_goes_to_provisioned_only_with_a_stored_qr_code():
    order = FakeOrder(S.NEEDS_ATTENTION, zendit_transaction_id="txn_1", zendit_status="DONE")
    with pytest.raises(NotAllowed, match="no stored QR code"):
        manual_redrive(order, "provisioned")
    stored = replace(order, qr_code_url="https://qr.test/txn_1.png")
    assert manual_redrive(stored, "provisioned") == (S.PROVISIONED, OrderProvisioned)


def test_a_target_state_is_only_for_needs_attention_orders():
    with pytest.raises(NotAllowed, match="only moves a needs_attention order"):
        manual_redrive(FakeOrder(S.FUNDED), "funding")


# ------------------------------------------------------------------------------------------- refunds
def test_a_pending_refund_is_retried_as_the_failed_step_with_its_original_reason():
    moves = history(
        "paid", "funding", "topup_failed", "refund_pending", reasons={"topup_failed": "CARD_DECLINED"}
    )
    plan = refund_retry_plan(FakeOrder(S.REFUND_PENDING), moves)
    assert (plan.failed_state, plan.step, plan.reason, plan.reopen) == (
        S.TOPUP_FAILED,
        "funding",
        "CARD_DECLINED",
        False,
    )


def test_a_refund_stripe_refused_is_retried_after_reopening_the_order():
    moves = history(
        "paid",
        "funding",
        "funded",
        "purchasing",
        "purchase_failed",
        "refund_pending",
        "needs_attention",
        reasons={"purchase_failed": "zendit_product_unavailable", "needs_attention": "refund_failed: x"},
    )
    plan = refund_retry_plan(FakeOrder(S.NEEDS_ATTENTION), moves)
    assert (plan.failed_state, plan.step, plan.reason, plan.reopen) == (
        S.PURCHASE_FAILED,
        "purchase",
        "zendit_product_unavailable",
        True,
    )


@pytest.mark.parametrize("status", [S.TOPUP_FAILED, S.PURCHASE_FAILED])
def test_an_order_stuck_in_its_failed_state_is_refunded_from_there(status):
    plan = refund_retry_plan(FakeOrder(status), history("paid", "funding", status.value))
    assert plan.failed_state == status and not plan.reopen and plan.reason == status.value


def test_an_order_held_while_its_zendit_purchase_was_unresolved_is_never_refunded_here():
    moves = history("paid", "funding", "funded", "purchasing", "needs_attention")
    with pytest.raises(NotAllowed, match="may still deliver"):
        refund_retry_plan(FakeOrder(S.NEEDS_ATTENTION, zendit_transaction_id="txn_1"), moves)


def test_a_payment_held_for_review_has_no_automatic_refund_to_retry():
    with pytest.raises(NotAllowed, match="no automatic refund was attempted"):
        refund_retry_plan(FakeOrder(S.NEEDS_ATTENTION), history("paid", "needs_attention"))


@pytest.mark.parametrize(
    "order",
    [
        FakeOrder(S.DELIVERED),
        FakeOrder(S.PROVISIONED),
        # however the order got here, a DONE purchase or a stored QR code means the customer has it
        FakeOrder(S.REFUND_PENDING, zendit_status="DONE"),
        FakeOrder(S.NEEDS_ATTENTION, qr_stored_at=datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
def test_an_order_zendit_delivered_is_never_refunded_automatically(order):
    moves = history("paid", "funding", "topup_failed", "refund_pending", "needs_attention")
    with pytest.raises(NotAllowed, match="never refunded"):
        refund_retry_plan(order, moves)


def test_an_order_refunded_by_hand_has_nothing_to_retry_or_announce():
    moves = history("paid", "funding", "topup_failed", "refund_pending", "needs_attention", "refunded")
    with pytest.raises(NotAllowed, match="marked so by hand"):
        refund_retry_plan(FakeOrder(S.REFUNDED, refund_id="re_1"), moves)


def test_an_order_the_system_refunded_is_announced_again_as_its_failed_step():
    """Its announcement may have been refused by the broker: the retry publishes it, refunds nothing."""
    moves = history(
        "paid", "funding", "topup_failed", "refund_pending", "refunded", reasons={"topup_failed": "DECLINED"}
    )
    plan = refund_retry_plan(FakeOrder(S.REFUNDED, refund_id="re_1"), moves)
    assert (plan.failed_state, plan.step, plan.reason, plan.reopen, plan.announce_only) == (
        S.TOPUP_FAILED,
        "funding",
        "DECLINED",
        False,
        True,
    )


@pytest.mark.parametrize("status", [S.PAID, S.FUNDING, S.FUNDED, S.PENDING_PAYMENT, S.PAYMENT_FAILED])
def test_an_order_no_step_failed_for_is_not_refunded(status):
    with pytest.raises(NotAllowed, match="nothing to refund"):
        refund_retry_plan(FakeOrder(status), history("paid"))


def test_a_refund_whose_failed_step_is_unknown_is_refused_rather_than_guessed():
    moves = history("paid", "needs_attention", "refund_pending")
    with pytest.raises(NotAllowed, match="no failed step"):
        refund_retry_plan(FakeOrder(S.REFUND_PENDING), moves)


# ------------------------------------------------------------------------------------------- resolve
def test_only_needs_attention_is_resolved_by_hand():
    assert resolve_target(FakeOrder(S.NEEDS_ATTENTION), "delivered") == S.DELIVERED
    assert resolve_target(FakeOrder(S.NEEDS_ATTENTION), "refunded") == S.REFUNDED
    with pytest.raises(NotAllowed, match="only a needs_attention order"):
        resolve_target(FakeOrder(S.PURCHASING), "delivered")


def test_a_manual_move_or_resolution_must_say_why():
    with pytest.raises(ValidationError, match="note"):
        RedriveRequest.model_validate({"to": "funding"})
    with pytest.raises(ValidationError):
        RedriveRequest.model_validate({"to": "funding", "note": "   "})
    with pytest.raises(ValidationError):
        ResolveRequest.model_validate({"outcome": "refunded", "note": "x" * 501})
    with pytest.raises(ValidationError):
        ResolveRequest.model_validate({"outcome": "refunded"})
    assert RedriveRequest.model_validate({}).to is None
    assert (
        ResolveRequest.model_validate({"outcome": "delivered", "note": " sent by hand "}).note
        == "sent by hand"
    )


# ------------------------------------------------------------------------------------------- listing
def test_the_default_list_is_every_state_that_is_not_final():
    assert set(DEFAULT_LIST_STATUSES) == set(OrderStatus) - TERMINAL_STATES
    assert parse_statuses(None) == parse_statuses([]) == DEFAULT_LIST_STATUSES


def test_asked_states_come_once_each_in_the_state_machines_order():
    assert parse_statuses(["purchasing", "paid", "paid"]) == (S.PAID, S.PURCHASING)


def test_an_unknown_state_is_refused_with_the_valid_ones_listed_and_not_echoed():
    with pytest.raises(ValueError, match="valid statuses") as refusal:
        parse_statuses(["paid", "stuckish"])
    assert "stuckish" not in str(refusal.value)
    assert all(s.value in str(refusal.value) for s in OrderStatus)


def test_a_signed_urls_token_never_leaves_the_database():
    url = "https://x.supabase.co/storage/v1/object/sign/esim-qrcodes/t.png?token=secret#frag"
    assert shareable_url(url) == "https://x.supabase.co/storage/v1/object/sign/esim-qrcodes/t.png"
    assert shareable_url(None) is None


def test_an_operators_note_is_stored_redacted_and_within_the_columns_limit():
    stored = stored_note("customer read me 4242 4242 4242 4242 on the phone " + "x" * 600)
    assert stored is not None and "4242 4242" not in stored and "[REDACTED" in stored
    assert len(stored) == 500
    assert stored_note(None) is None and stored_note("refunded in Stripe") == "refunded in Stripe"
