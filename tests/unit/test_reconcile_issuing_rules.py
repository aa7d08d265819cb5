"""The Issuing-card reconciliation rules (reconcile/issuing_rules.py), including the near-misses that
must not be reported."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from reconcile.issuing_rules import (
    ENDED_GRACE,
    OPEN_GRACE,
    Authorization,
    Card,
    CardTransaction,
    Topup,
    WalletCredit,
    charged,
    issuing_mismatches,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
LONG_AGO = NOW - timedelta(hours=3)
CHARGED_AT = LONG_AGO + timedelta(minutes=1)
TOPUP = Topup(
    id="tu_txn-1",
    amount=5000,
    currency="USD",
    status="succeeded",
    card_id="ic_1",
    gateway_topup_id="topup_abc",
    order_ids=("txn-1", "txn-2"),
    created_at=LONG_AGO,
    updated_at=LONG_AGO,
)
CARD = Card(
    id="ic_1", topup_id="tu_txn-1", status="canceled", last4="4242", currency="USD", recorded_active=False
)
CAPTURED = CardTransaction(card_id="ic_1", amount=-5000, created=CHARGED_AT)
CREDIT = WalletCredit(transaction_id="topup_abc", status="DONE", amount=5000, currency="USD")


def check(
    topup: Topup = TOPUP,
    cards: tuple[Card, ...] = (CARD,),
    authorizations: tuple[Authorization, ...] = (),
    transactions: tuple[CardTransaction, ...] = (CAPTURED,),
    credits: tuple[WalletCredit, ...] = (CREDIT,),
    now: datetime = NOW,
):
    return issuing_mismatches(
        topups=[topup],
        cards=list(cards),
        authorizations=list(authorizations),
        transactions=list(transactions),
        credits=list(credits),
        now=now,
    )


def kinds(found) -> list[tuple[str, str]]:
    return [(m.kind, m.subject) for m in found]


# ------------------------------------------------------------------------------------ card_still_active


def test_a_funded_topup_whose_card_paid_once_and_was_cancelled_is_clean() -> None:
    assert check() == []


def test_a_card_still_active_after_its_topup_ended_is_reported_with_facts_for_a_person() -> None:
    [found] = check(
        cards=(replace(CARD, status="active", recorded_active=True),), transactions=(), credits=()
    )

    assert (found.kind, found.subject, found.transaction_id) == ("card_still_active", "ic_1", "txn-1")
    assert found.detail == {
        "topup_id": "tu_txn-1",
        "topup_status": "succeeded",
        "card_last4": "4242",
        "amount": 5000,
        "currency": "USD",
        "stripe_status": "active",
        "recorded_active": "true",
        "age_seconds": 3 * 3600,
        "evidence_at": None,  # our books call it active: every run reads it again, whatever its age
    }


def test_an_inactive_card_counts_as_still_active_because_only_canceled_is_final() -> None:
    assert kinds(check(cards=(replace(CARD, status="inactive"),), transactions=())) == [
        ("card_still_active", "ic_1")
    ]


def test_a_cancelled_card_is_not_reported_even_when_our_books_still_call_it_active() -> None:
    assert check(cards=(replace(CARD, status="canceled", recorded_active=True),)) == []


def test_a_card_is_left_alone_within_the_grace_after_its_topup_ended() -> None:
    ended = replace(TOPUP, status="declined", gateway_topup_id=None, updated_at=NOW - ENDED_GRACE)
    active = replace(CARD, status="active")
    assert check(topup=ended, cards=(active,), transactions=(), credits=()) == []
    later = NOW + timedelta(seconds=1)
    assert kinds(check(topup=ended, cards=(active,), transactions=(), credits=(), now=later)) == [
        ("card_still_active", "ic_1")
    ]


def test_a_topup_still_in_progress_within_its_grace_is_not_reported() -> None:
    submitted = replace(
        TOPUP, status="submitted", gateway_topup_id=None, created_at=NOW - OPEN_GRACE, updated_at=NOW
    )
    held = Authorization(card_id="ic_1", approved=True, status="pending", amount=5000, created=CHARGED_AT)
    # The gateway has charged the card and not credited the wallet yet: a top-up in flight.
    assert (
        check(
            topup=submitted,
            cards=(replace(CARD, status="active"),),
            authorizations=(held,),
            transactions=(),
            credits=(),
        )
        == []
    )


def test_a_topup_open_past_its_grace_is_stuck_and_its_card_reported() -> None:
    # Counted from its creation: a row touched a moment ago (a retry) is still stuck after an hour.
    stuck = replace(
        TOPUP,
        status="submitted",
        gateway_topup_id=None,
        created_at=NOW - OPEN_GRACE - timedelta(seconds=1),
        updated_at=NOW,
    )
    assert kinds(
        check(topup=stuck, cards=(replace(CARD, status="active"),), transactions=(), credits=())
    ) == [("card_still_active", "ic_1")]


def test_an_open_topup_gets_the_longer_grace() -> None:
    retrying = replace(TOPUP, status="submitted", gateway_topup_id=None, created_at=NOW - 3 * ENDED_GRACE)
    retrying = replace(retrying, updated_at=retrying.created_at)
    assert check(topup=retrying, cards=(replace(CARD, status="active"),), transactions=(), credits=()) == []


def test_cards_of_topups_we_do_not_know_are_left_alone() -> None:
    foreign = Card(id="ic_9", topup_id="tu_other-deployment", status="active", last4="0000", currency="USD")
    assert check(cards=(CARD, foreign)) == []


# -------------------------------------------------------------------------- card_charged_without_credit


def test_a_charge_matched_by_the_credit_of_the_same_amount_is_clean() -> None:
    assert check(transactions=(CAPTURED,), credits=(CREDIT,)) == []


def test_a_charge_without_a_credit_is_reported() -> None:
    [found] = check(credits=())

    assert (found.kind, found.subject, found.transaction_id) == (
        "card_charged_without_credit",
        "ic_1",
        "txn-1",
    )
    assert found.detail["reason"] == "no_credit"
    assert (found.detail["charged"], found.detail["topup_amount"], found.detail["currency"]) == (
        5000,
        5000,
        "USD",
    )
    assert found.detail["gateway_topup_id"] == "topup_abc"


def test_a_credit_under_another_id_does_not_match() -> None:
    other = replace(CREDIT, transaction_id="topup_someone_else")
    assert kinds(check(credits=(other,))) == [("card_charged_without_credit", "ic_1")]


def test_a_charged_card_of_a_topup_that_never_learnt_its_gateway_id_is_reported() -> None:
    declined = replace(TOPUP, status="declined", gateway_topup_id=None)
    [found] = check(topup=declined)
    assert found.detail["reason"] == "no_credit" and found.detail["gateway_topup_id"] is None


def test_a_credit_that_is_not_done_does_not_match() -> None:
    [found] = check(credits=(replace(CREDIT, status="FAILED"),))
    assert found.detail["reason"] == "no_credit"


def test_a_credit_of_another_amount_is_reported() -> None:
    [found] = check(credits=(replace(CREDIT, amount=4000),))
    assert (found.detail["reason"], found.detail["credit_amount"]) == ("credit_differs", 4000)


def test_a_credit_the_wallet_divisor_cannot_express_exactly_is_reported() -> None:
    [found] = check(credits=(replace(CREDIT, amount=None),))
    assert found.detail["reason"] == "credit_differs"


def test_a_charge_larger_than_the_topup_is_reported_even_with_a_matching_credit() -> None:
    over = (CAPTURED, CardTransaction(card_id="ic_1", amount=-1, created=CHARGED_AT))
    [found] = check(transactions=over, credits=(replace(CREDIT, amount=5001),))
    assert (found.detail["reason"], found.detail["charged"]) == ("charged_more_than_topup", 5001)


def test_one_credit_pays_for_one_card_only() -> None:
    extra = replace(CARD, id="ic_0extra", last4="1111")  # sorts first, but our books' card claims first
    both = (CAPTURED, CardTransaction(card_id="ic_0extra", amount=-5000, created=CHARGED_AT))
    assert kinds(check(cards=(extra, CARD), transactions=both)) == [
        ("card_charged_without_credit", "ic_0extra")
    ]


def test_a_refunded_charge_is_not_a_charge() -> None:
    refunded = (CAPTURED, CardTransaction(card_id="ic_1", amount=5000, created=CHARGED_AT))
    assert check(transactions=refunded, credits=()) == []


def test_charged_counts_captures_and_approved_holds_but_not_declines_or_closed_holds() -> None:
    authorizations = [
        Authorization(card_id="ic_1", approved=True, status="pending", amount=700, created=CHARGED_AT),
        Authorization(card_id="ic_1", approved=False, status="closed", amount=0, created=CHARGED_AT),
        Authorization(
            card_id="ic_1", approved=False, status="pending", amount=800, created=CHARGED_AT
        ),  # awaiting a decision
        # Captured: a closed hold never counts, whatever Stripe leaves in its amount (not documented).
        Authorization(card_id="ic_1", approved=True, status="closed", amount=700, created=CHARGED_AT),
        Authorization(card_id="ic_1", approved=True, status="reversed", amount=900, created=CHARGED_AT),
        Authorization(card_id="ic_2", approved=True, status="pending", amount=50, created=CHARGED_AT),
    ]
    transactions = [
        CardTransaction("ic_1", -300, CHARGED_AT),
        CardTransaction("ic_1", 100, CHARGED_AT),
        CardTransaction("ic_2", -9, CHARGED_AT),
    ]
    assert charged("ic_1", authorizations, transactions) == 300 - 100 + 700


# ----------------------------------------------------------------------------------------- evidence_at
# What a later run must read again to find the mismatch; older than its window, the store keeps the row.


def test_a_card_our_books_do_not_call_active_is_in_view_only_while_its_topup_is() -> None:
    for recorded in (False, None):  # None: a card Stripe made for the top-up that our books lack
        [found] = check(cards=(replace(CARD, status="active", recorded_active=recorded),), transactions=())
        assert found.detail["evidence_at"] == LONG_AGO.isoformat()


def test_a_charge_is_evidenced_by_the_oldest_charge_counted_or_the_topup_it_needs_to_be_seen() -> None:
    older_decline = Authorization(
        card_id="ic_1", approved=False, status="closed", amount=5000, created=CHARGED_AT - timedelta(days=9)
    )
    hold = Authorization(
        card_id="ic_1", approved=True, status="pending", amount=1, created=CHARGED_AT + timedelta(hours=1)
    )
    active = replace(CARD, recorded_active=True)  # its top-up is read at any age: only the charges age
    [found] = check(cards=(active,), authorizations=(older_decline, hold), credits=())
    assert found.detail["evidence_at"] == CHARGED_AT.isoformat()

    [found] = check(cards=(replace(CARD, recorded_active=False),), credits=())
    assert found.detail["evidence_at"] == LONG_AGO.isoformat()  # the top-up, older than the capture
