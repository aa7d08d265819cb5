"""A top-up card is never made twice and never left active, whatever Stripe answered (or did not) when it
was asked for it: a timeout while Stripe is still making it, a crash after it was made, a 429 or a 500
on the way back, a failing cardholder lookup, settings changed in between, giving up.

"Crashed inside the card creation" is set up as the service leaves it: the card made at Stripe under the
top-up's key (`platform_card`) and the top-up `pending` with `card_requested_at` set but no card
recorded (`leave_requested_topup`).
"""

from __future__ import annotations

import pytest

from esim_common.order_repository import get_order
from esim_common.order_states import OrderStatus
from tests.fixtures.funding import (
    COST,
    MIN_TOPUP,
    approved_charges,
    cards_for,
    leave_requested_topup,
    leave_stalled_topup,
    pay_for_order,
    rows,
    running,
    set_wallet,
)

pytestmark = [pytest.mark.broker, pytest.mark.db]

S = OrderStatus


def alerts(caplog, reason: str) -> list[object]:
    return [r for r in caplog.records if getattr(r, "alert", None) == reason]


def faults_left(stripe_emulator) -> list[object]:
    """Injected faults not used up yet: a test whose fault never fired proves nothing about it."""
    return [fault for fault in stripe_emulator.state.faults if fault.remaining > 0]


async def test_a_card_request_that_outlasts_the_timeout_makes_one_card_not_two(
    service_settings, amqp_url, stripe_gateway, stripe_emulator, zendit_emulator
):
    # Stripe takes 12 s to answer; we give up waiting after 3 s, and the SDK's own retries under the same
    # key are told "still in progress" (409). Neither says "no card": the same key again later. (The
    # emulator makes the card before it sleeps, so the lookup would find it too; the 409 rule is proven
    # by the 429 test below, which fails when an unsaved answer moves the key.)
    settings = service_settings.model_copy(update={"stripe_timeout_seconds": 3.0})
    async with running(settings, amqp_url) as funding:
        set_wallet(zendit_emulator, 1_000)
        stripe_emulator.inject_fault("/v1/issuing/cards", method="POST", delay_seconds=12, count=1)
        event = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)

        await funding.deliver(event)
        await funding.wait_status(event.transaction_id, S.FUNDED, within=60)
        [topup] = await rows(funding.pool, "SELECT id, card_id, card_attempts FROM wallet_topups")

    [card] = cards_for(stripe_emulator, topup["id"])
    assert card["id"] == topup["card_id"] and topup["card_attempts"] == 1
    assert card["status"] == "canceled" and len(approved_charges(stripe_emulator, card["id"])) == 1


async def test_a_rate_limited_card_request_keeps_its_key_it_says_nothing_about_an_earlier_one(
    funding, paid_order, zendit_emulator, stripe_emulator
):
    # Stripe rate-limits before its idempotency layer and saves nothing: an earlier request under the
    # key may still be making the card, so a new key could make a second one.
    set_wallet(zendit_emulator, 1_000)
    stripe_emulator.inject_fault("/v1/issuing/cards", method="POST", status=429, count=3)
    event = await paid_order()

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED, within=40)

    assert faults_left(stripe_emulator) == []
    [topup] = await rows(funding.pool, "SELECT id, card_attempts FROM wallet_topups")
    assert topup["card_attempts"] == 1
    [card] = cards_for(stripe_emulator, topup["id"])
    assert card["status"] == "canceled" and len(approved_charges(stripe_emulator, card["id"])) == 1


@pytest.mark.parametrize(
    "fault",
    [None, {"path": "/v1/issuing/cardholders", "method": "GET", "status": 500, "count": 3}],
    ids=["restarted", "cardholder-lookup-fails-first"],
)
async def test_after_a_crash_inside_the_card_creation_the_card_stripe_made_is_the_one_used(
    fault, funding, paid_order, platform_card, zendit_emulator, stripe_emulator
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    txn, topup_id = event.transaction_id, f"tu_{event.transaction_id}"
    card = await platform_card(topup_id, MIN_TOPUP)
    await leave_requested_topup(funding.pool, txn=txn, topup_id=topup_id)
    funding.app.state.fund_order._topups._cardholder._id = None  # a restarted process looks it up again
    if fault is not None:
        stripe_emulator.inject_fault(**fault)

    await funding.deliver(event)
    await funding.wait_status(txn, S.FUNDED, within=40)

    assert faults_left(stripe_emulator) == []
    [found] = cards_for(stripe_emulator, topup_id)
    assert found["id"] == card.id and found["status"] == "canceled"
    assert len(approved_charges(stripe_emulator, card.id)) == 1


async def test_after_a_crash_the_card_made_before_a_settings_change_is_found_not_refused(
    service_settings, amqp_url, stripe_gateway, stripe_emulator, zendit_emulator, platform_card_with
):
    # The card was made without allow-lists; the restarted service has them, so asking again under the
    # same key would be a 400 idempotency_error. The service looks the card up first and uses it.
    settings = service_settings.model_copy(
        update={"stripe_issuing_allowed_categories": ["telecommunication_services"]}
    )
    async with running(settings, amqp_url) as funding:
        set_wallet(zendit_emulator, 1_000)
        event = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)
        txn, topup_id = event.transaction_id, f"tu_{event.transaction_id}"
        card = await platform_card_with(funding.settings, topup_id, MIN_TOPUP)
        await leave_requested_topup(funding.pool, txn=txn, topup_id=topup_id)

        await funding.deliver(event)
        await funding.wait_status(txn, S.FUNDED, within=40)

    [found] = cards_for(stripe_emulator, topup_id)
    assert found["id"] == card.id and found["status"] == "canceled"


async def test_giving_up_after_a_crash_inside_the_card_creation_cancels_the_card_stripe_made(
    funding, paid_order, platform_card, zendit_emulator, stripe_emulator, caplog
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    txn, topup_id = event.transaction_id, f"tu_{event.transaction_id}"
    card = await platform_card(topup_id, MIN_TOPUP)
    await leave_requested_topup(funding.pool, txn=txn, topup_id=topup_id)

    await funding.app.state.fund_order.give_up(txn, "retries_exhausted")

    [found] = cards_for(stripe_emulator, topup_id)
    assert found["id"] == card.id and found["status"] == "canceled"
    [topup] = await rows(funding.pool, "SELECT status, card_id FROM wallet_topups")
    assert topup == {"status": "failed", "card_id": card.id}


async def test_giving_up_when_stripe_cannot_be_asked_about_the_card_alerts_the_operator(
    funding, paid_order, platform_card, zendit_emulator, stripe_emulator, caplog
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    txn, topup_id = event.transaction_id, f"tu_{event.transaction_id}"
    await platform_card(topup_id, MIN_TOPUP)
    await leave_requested_topup(funding.pool, txn=txn, topup_id=topup_id)
    stripe_emulator.inject_fault("/v1/issuing/cards", method="GET", status=500, count=10)

    await funding.app.state.fund_order.give_up(txn, "retries_exhausted")

    assert len(faults_left(stripe_emulator)) == 1  # it did ask (and the SDK retried)
    stripe_emulator.clear_faults()
    [alert] = alerts(caplog, "card_may_be_active")
    assert alert.topup_id == topup_id
    [topup] = await rows(funding.pool, "SELECT status FROM wallet_topups")
    assert topup == {"status": "failed"}


async def test_an_order_that_took_over_a_stalled_top_up_closes_it_when_it_gives_up(
    funding, paid_order, stripe_emulator, zendit_emulator, caplog
):
    set_wallet(zendit_emulator, 0)
    stranded = await paid_order()
    topup_id = await leave_stalled_topup(funding.pool, txn=stranded.transaction_id, amount=3 * COST.amount)
    zendit_emulator.control("POST", "faults", {"endpoint": "wallet_topup", "status": 503, "count": 200})
    event = await paid_order()

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.REFUNDED, within=60)  # tiers: 1 s + 3 s + 10 s

    zendit_emulator.control("DELETE", "faults")
    [topup] = await rows(funding.pool, "SELECT status, driven_by FROM wallet_topups")
    assert topup == {"status": "failed", "driven_by": event.transaction_id}
    [card] = cards_for(stripe_emulator, topup_id)
    assert card["status"] == "canceled" and approved_charges(stripe_emulator, card["id"]) == []
    assert alerts(caplog, "topup_outcome_unknown")
    order = await get_order(funding.pool, event.transaction_id)
    assert order.failure_reason == "retries_exhausted"
