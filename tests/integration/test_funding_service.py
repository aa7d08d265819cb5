"""The funding service in-process on the real broker and database, against the Stripe and Zendit emulators.

Each test pays a real Checkout Session in the Stripe emulator (so a refund has a PaymentIntent to go
to), inserts the order as `paid`, publishes `order.paid` and watches what the running service does:
order states, rows, the emulators' books, and the events it publishes.
"""

from __future__ import annotations

import json

import pytest

from esim_common.events import OrderPaid
from esim_common.money import Money
from esim_common.order_repository import get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.settings import FundingMode
from tests.fixtures.funding import (
    COST,
    MIN_TOPUP,
    PRICE,
    approved_charges,
    cards_for,
    credits,
    leave_requested_topup,
    pay_for_order,
    rows,
    running,
    set_wallet,
    wallet,
)
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db]

S = OrderStatus

# ------------------------------------------------------------------------------------ happy paths


async def test_an_order_the_wallet_covers_is_funded_without_a_card(
    funding, paid_order, zendit_emulator, stripe_emulator
):
    set_wallet(zendit_emulator, 10_000)
    event = await paid_order()

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED)
    await funding.wait_handled(1)

    funded = await funding.messages("provisioning.order-funded")
    assert [(m["transaction_id"], m["zendit_cost"], m["topup_id"]) for m in funded] == [
        (event.transaction_id, {"amount": 2415, "currency": "USD"}, None)
    ]
    assert cards_for(stripe_emulator, f"tu_{event.transaction_id}") == []
    assert await rows(funding.pool, "SELECT id FROM wallet_topups") == []
    assert wallet(zendit_emulator)["wallet"]["balance"] == 10_000
    order = await get_order(funding.pool, event.transaction_id)
    assert order.funded_at is not None and order.stripe_issuing_card_id is None


async def test_a_short_wallet_is_topped_up_with_one_cancelled_single_use_card(
    funding, paid_order, zendit_emulator, zendit_client, stripe_emulator
):
    set_wallet(zendit_emulator, 1_000)  # 24.15 needed, 10.00 there: 14.15 short → one 50.00 top-up
    event = await paid_order()
    txn, topup_id = event.transaction_id, f"tu_{event.transaction_id}"

    await funding.deliver(event)
    await funding.wait_status(txn, S.FUNDED)

    [card] = cards_for(stripe_emulator, topup_id)
    assert card["status"] == "canceled"
    assert [limit["interval"] for limit in card["spending_controls"]["spending_limits"]] == [
        "per_authorization",
        "all_time",
    ]
    assert {limit["amount"] for limit in card["spending_controls"]["spending_limits"]} == {MIN_TOPUP}
    assert card["lifecycle_controls"]["cancel_after"]["payment_count"] == 1
    assert len(approved_charges(stripe_emulator, card["id"])) == 1

    [stored] = await rows(funding.pool, "SELECT * FROM issuing_cards")
    assert stored["card_id"] == card["id"] and stored["topup_id"] == topup_id
    assert stored["card_last4"] == card["last4"]
    assert stored["card_exp"] == f"{card['exp_month']:02d}/{card['exp_year']}"
    assert stored["active"] is False and stored["cancelled_at"] is not None
    assert (stored["amount"], stored["currency"].strip()) == (MIN_TOPUP, "USD")

    [topup] = await rows(funding.pool, "SELECT * FROM wallet_topups")
    assert (topup["id"], topup["status"], topup["amount"], topup["card_id"]) == (
        topup_id,
        "succeeded",
        MIN_TOPUP,
        card["id"],
    )
    assert topup["gateway_reference"] == topup_id and topup["gateway_topup_id"]
    assert topup["order_ids"] == [txn]

    state = wallet(zendit_emulator)
    assert state["wallet"]["balance"] == 1_000 + MIN_TOPUP
    assert state["topups"][topup_id]["status"] == "SUCCEEDED"
    assert [(c.amount, c.product_type) for c in await credits(zendit_client)] == [
        (MIN_TOPUP, "WALLET_RECHARGE")
    ]

    order = await get_order(funding.pool, txn)
    assert order.stripe_issuing_card_id == card["id"]
    await funding.wait_handled(1)
    funded = await funding.messages("provisioning.order-funded")
    assert [(m["transaction_id"], m["topup_id"]) for m in funded] == [(txn, topup_id)]

    # The full card number and CVC reached no row of ours.
    secret = stripe_emulator.state.card_secrets[card["id"]]
    dump = json.dumps(
        [
            await rows(funding.pool, "SELECT * FROM issuing_cards"),
            await rows(funding.pool, "SELECT * FROM wallet_topups"),
            await rows(funding.pool, "SELECT * FROM esim_purchases"),
            await rows(funding.pool, "SELECT * FROM order_transitions"),
        ],
        default=str,
    )
    assert secret.number not in dump and f'"{secret.cvc}"' not in dump


async def test_redelivered_order_paid_tops_up_once_and_charges_the_card_once(
    funding, paid_order, zendit_emulator, zendit_client, stripe_emulator
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    txn, topup_id = event.transaction_id, f"tu_{event.transaction_id}"

    for _ in range(3):  # the same message, three times, as a broker redelivery would hand it over
        await funding.deliver(event)
    await funding.wait_handled(3)

    order = await get_order(funding.pool, txn)
    assert order.status == S.FUNDED
    [card] = cards_for(stripe_emulator, topup_id)
    assert len(approved_charges(stripe_emulator, card["id"])) == 1
    assert len(await rows(funding.pool, "SELECT * FROM wallet_topups")) == 1
    assert len(await rows(funding.pool, "SELECT * FROM issuing_cards")) == 1
    assert list(wallet(zendit_emulator)["topups"]) == [topup_id]
    assert wallet(zendit_emulator)["wallet"]["balance"] == 1_000 + MIN_TOPUP
    assert len(await credits(zendit_client)) == 1
    funded = await funding.messages("provisioning.order-funded")
    assert 1 <= len(funded) <= 3 and {m["transaction_id"] for m in funded} == {txn}


async def test_a_funded_order_whose_event_was_lost_is_announced_again(funding, paid_order, zendit_emulator):
    event = await paid_order()
    async with funding.pool.acquire() as conn:  # a crash between the commit and the publish
        await transition(conn, event.transaction_id, S.FUNDING)
        await transition(conn, event.transaction_id, S.FUNDED)

    await funding.deliver(event)
    await funding.wait_handled(1)

    funded = await funding.messages("provisioning.order-funded")
    assert [m["transaction_id"] for m in funded] == [event.transaction_id]
    assert funding.handled("ok") == 1


async def test_an_order_without_a_recorded_cost_gets_zendits_cost_before_funding(
    funding, paid_order, zendit_emulator
):
    set_wallet(zendit_emulator, 10_000)
    event = await paid_order()
    await funding.pool.execute(
        "UPDATE esim_purchases SET zendit_cost = NULL, zendit_cost_currency = NULL WHERE transaction_id = $1",
        event.transaction_id,
    )

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED)

    order = await get_order(funding.pool, event.transaction_id)
    assert order.zendit_cost_money == COST


async def test_money_reserved_for_funded_orders_is_not_spent_twice(
    funding, paid_order, zendit_emulator, stripe_emulator
):
    set_wallet(zendit_emulator, 10_000)
    earlier = await paid_order(cost=Money(8_000, "USD"), price=Money(9_900, "USD"))
    async with funding.pool.acquire() as conn:  # funded, its purchase not yet at Zendit: 80.00 reserved
        await transition(conn, earlier.transaction_id, S.FUNDING)
        await transition(conn, earlier.transaction_id, S.FUNDED)
    event = await paid_order()

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED)

    # 100.00 available, 80.00 reserved: 20.00 free < 24.15, so this order needed a top-up of its own.
    assert len(cards_for(stripe_emulator, f"tu_{event.transaction_id}")) == 1
    assert wallet(zendit_emulator)["wallet"]["balance"] == 10_000 + MIN_TOPUP


# ------------------------------------------------------------------------------------ transient gateway


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_gateway_503_is_retried_with_the_same_reference_and_charges_once(
    when, funding, paid_order, zendit_emulator, zendit_client, stripe_emulator
):
    # "after": the gateway charged the card and credited the wallet, then the answer was lost.
    set_wallet(zendit_emulator, 1_000)
    zendit_emulator.control("POST", "faults", {"endpoint": "wallet_topup", "status": 503, "when": when})
    event = await paid_order()
    topup_id = f"tu_{event.transaction_id}"

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED)

    assert funding.handled("retried") == 1
    [card] = cards_for(stripe_emulator, topup_id)
    assert len(approved_charges(stripe_emulator, card["id"])) == 1
    assert card["status"] == "canceled"
    assert len(await credits(zendit_client)) == 1
    assert wallet(zendit_emulator)["wallet"]["balance"] == 1_000 + MIN_TOPUP
    [topup] = await rows(funding.pool, "SELECT status, attempts FROM wallet_topups")
    assert topup == {"status": "succeeded", "attempts": 2}


# ------------------------------------------------------------------------------------ resume points


async def _leave_topup(pool, *, txn: str, topup_id: str, card, status: str) -> None:
    """What a worker that crashed in this phase leaves behind."""
    async with pool.acquire() as conn:
        await transition(conn, txn, S.FUNDING)
        await conn.execute(
            "INSERT INTO wallet_topups (id, amount, currency, status, card_id, gateway_reference, order_ids)"
            " VALUES ($1, $2, 'USD', $3, $4, $1, $5)",
            topup_id,
            MIN_TOPUP,
            status,
            card.id,
            [txn],
        )
        await conn.execute(
            "INSERT INTO issuing_cards (card_id, card_last4, card_exp, amount, currency, topup_id)"
            " VALUES ($1, $2, $3, $4, 'USD', $5)",
            card.id,
            card.last4,
            f"{card.exp_month:02d}/{card.exp_year}",
            MIN_TOPUP,
            topup_id,
        )


async def test_continues_from_card_created_with_the_same_card(
    funding, paid_order, platform_card, zendit_emulator, stripe_emulator
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    topup_id = f"tu_{event.transaction_id}"
    card = await platform_card(topup_id, MIN_TOPUP)
    await _leave_topup(
        funding.pool, txn=event.transaction_id, topup_id=topup_id, card=card, status="card_created"
    )

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED)

    assert [c["id"] for c in cards_for(stripe_emulator, topup_id)] == [card.id]
    assert len(approved_charges(stripe_emulator, card.id)) == 1
    assert wallet(zendit_emulator)["wallet"]["balance"] == 1_000 + MIN_TOPUP


async def test_a_crash_inside_the_card_creation_resumes_with_the_card_stripe_made_and_cancels_it(
    funding, paid_order, platform_card, zendit_emulator, stripe_emulator
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    txn = event.transaction_id
    topup_id = f"tu_{txn}"
    # The crashed worker had passed the float check and asked Stripe for the card; Stripe made it, the
    # worker died before writing it down. Since then the Issuing float has run dry: a fresh check would
    # fail the top-up and leave that card active and unknown to us.
    card = await platform_card(topup_id, MIN_TOPUP)
    await leave_requested_topup(funding.pool, txn=txn, topup_id=topup_id)
    saved = dict(stripe_emulator.state.issuing_available)
    stripe_emulator.state.issuing_available["usd"] = 0
    try:
        await funding.deliver(event)
        await funding.wait_status(txn, S.REFUNDED)  # the card's charge is declined: no float
    finally:
        stripe_emulator.state.issuing_available.update(saved)

    assert [c["id"] for c in cards_for(stripe_emulator, topup_id)] == [card.id]  # no second card
    assert cards_for(stripe_emulator, topup_id)[0]["status"] == "canceled"
    assert approved_charges(stripe_emulator, card.id) == []
    [stored] = await rows(funding.pool, "SELECT card_id, active FROM issuing_cards")
    assert stored == {"card_id": card.id, "active": False}


async def test_giving_up_on_a_top_up_whose_card_creation_crashed_cancels_the_card_stripe_made(
    funding, paid_order, platform_card, zendit_emulator, stripe_emulator
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    txn = event.transaction_id
    topup_id = f"tu_{txn}"
    card = await platform_card(topup_id, MIN_TOPUP)
    await leave_requested_topup(funding.pool, txn=txn, topup_id=topup_id)

    await funding.app.state.fund_order.give_up(txn, "retries_exhausted")

    [found] = cards_for(stripe_emulator, topup_id)
    assert found["id"] == card.id and found["status"] == "canceled"
    assert approved_charges(stripe_emulator, card.id) == []
    [topup] = await rows(funding.pool, "SELECT status, card_id FROM wallet_topups")
    assert topup == {"status": "failed", "card_id": card.id}


async def test_continues_from_submitted_after_the_charge_landed_without_charging_again(
    funding,
    paid_order,
    platform_card,
    zendit_emulator,
    zendit_client,
    stripe_emulator,
    topup_gateway_client,
    stripe_gateway,
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    topup_id = f"tu_{event.transaction_id}"
    card = await platform_card(topup_id, MIN_TOPUP)
    # The crashed worker had handed the card to the gateway, which charged it; then it died.
    await topup_gateway_client.topup(
        amount=MIN_TOPUP, currency="USD", card=await stripe_gateway.reveal_card(card.id), reference=topup_id
    )
    await _leave_topup(
        funding.pool, txn=event.transaction_id, topup_id=topup_id, card=card, status="submitted"
    )

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED)

    assert len(approved_charges(stripe_emulator, card.id)) == 1
    assert len(await credits(zendit_client)) == 1
    assert wallet(zendit_emulator)["wallet"]["balance"] == 1_000 + MIN_TOPUP
    [stored] = await rows(funding.pool, "SELECT active FROM issuing_cards")
    assert stored["active"] is False


# ------------------------------------------------------------------------------------ failure paths


async def _assert_refunded_once(funding, stripe_emulator, event: OrderPaid, reason: str) -> None:
    order = await get_order(funding.pool, event.transaction_id)
    assert order.status == S.REFUNDED and order.failure_reason == reason
    refunds = stripe_emulator.state.find("refund", payment_intent=event.payment_intent_id)
    assert len(refunds) == 1 and refunds[0]["amount"] == PRICE.amount
    path = await rows(
        funding.pool,
        "SELECT to_status FROM order_transitions WHERE transaction_id = $1 ORDER BY id",
        event.transaction_id,
    )
    assert [p["to_status"] for p in path][-3:] == ["topup_failed", "refund_pending", "refunded"]
    await eventually(
        lambda: funding.handled("failed_permanently", "dead_lettered") >= 1,
        within=10,
        what="failure path ran",
    )
    failed = await funding.messages("notify.order-failed")
    assert [(m["step"], m["reason"]) for m in failed] == [("funding", reason)]
    refunded = await funding.messages("reconcile.order-refunded")
    assert [(m["refund_id"], m["amount"]["amount"]) for m in refunded] == [(refunds[0]["id"], PRICE.amount)]
    assert await funding.messages("provisioning.order-funded") == []


async def test_a_declined_topup_fails_the_order_and_refunds_it_once(
    funding, paid_order, zendit_emulator, stripe_emulator, declining_card_network
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    topup_id = f"tu_{event.transaction_id}"

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.REFUNDED)

    await _assert_refunded_once(funding, stripe_emulator, event, "topup_declined")
    assert funding.handled("failed_permanently") == 1
    [topup] = await rows(funding.pool, "SELECT status, failure_reason FROM wallet_topups")
    assert topup == {"status": "declined", "failure_reason": "CARD_DECLINED"}
    [card] = cards_for(stripe_emulator, topup_id)
    assert card["status"] == "canceled"
    [stored] = await rows(funding.pool, "SELECT active, cancelled_at FROM issuing_cards")
    assert stored["active"] is False and stored["cancelled_at"] is not None
    assert wallet(zendit_emulator)["wallet"]["balance"] == 1_000

    # A late redelivery finds the order refunded: no second refund, no second card.
    await funding.deliver(event)
    await funding.wait_handled(2)
    assert len(stripe_emulator.state.find("refund", payment_intent=event.payment_intent_id)) == 1
    assert len(cards_for(stripe_emulator, topup_id)) == 1


async def test_a_low_issuing_float_fails_fast_with_an_operator_alert_and_no_card(
    funding, paid_order, zendit_emulator, stripe_emulator, caplog
):
    set_wallet(zendit_emulator, 1_000)
    event = await paid_order()
    saved = dict(stripe_emulator.state.issuing_available)
    stripe_emulator.state.issuing_available["usd"] = MIN_TOPUP - 1
    try:
        await funding.deliver(event)
        await funding.wait_status(event.transaction_id, S.REFUNDED)
    finally:
        stripe_emulator.state.issuing_available.update(saved)

    await _assert_refunded_once(funding, stripe_emulator, event, "issuing_float_low")
    assert cards_for(stripe_emulator, f"tu_{event.transaction_id}") == []
    [topup] = await rows(funding.pool, "SELECT status, failure_reason, card_id FROM wallet_topups")
    assert topup == {"status": "failed", "failure_reason": "issuing_float_low", "card_id": None}
    alerts = [r for r in caplog.records if getattr(r, "alert", None) == "issuing_float_low"]
    assert len(alerts) == 1 and alerts[0].issuing_available == MIN_TOPUP - 1


async def test_a_card_creation_stripe_answers_with_a_500_is_retried_under_a_new_key(
    funding, paid_order, zendit_emulator, stripe_emulator
):
    # Stripe keeps the 500 as the key's first result for 24 h: the same key would fail all day.
    set_wallet(zendit_emulator, 1_000)
    stripe_emulator.inject_fault("/v1/issuing/cards", method="POST", status=500, count=1)
    event = await paid_order()

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED, within=30)

    [topup] = await rows(funding.pool, "SELECT id, status, card_attempts, card_id FROM wallet_topups")
    assert topup["status"] == "succeeded" and topup["card_attempts"] == 2
    [card] = cards_for(stripe_emulator, topup["id"])
    assert card["id"] == topup["card_id"] and card["status"] == "canceled"
    assert len(approved_charges(stripe_emulator, card["id"])) == 1


@pytest.mark.parametrize(
    ("status", "count", "reason"),
    [(403, 1, "card_refused_403"), (500, 10, "retries_exhausted")],
    ids=["refused", "stripe-down"],
)
async def test_a_card_stripe_will_not_make_fails_the_top_up_and_refunds_the_order(
    status, count, reason, funding, paid_order, zendit_emulator, stripe_emulator
):
    set_wallet(zendit_emulator, 1_000)
    stripe_emulator.inject_fault("/v1/issuing/cards", method="POST", status=status, count=count)
    event = await paid_order()

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.REFUNDED, within=40)  # tiers: 1 s + 3 s + 10 s

    stripe_emulator.clear_faults()
    order = await get_order(funding.pool, event.transaction_id)
    assert order.failure_reason == reason
    [topup] = await rows(funding.pool, "SELECT id, status, failure_reason, card_id FROM wallet_topups")
    assert topup["status"] == "failed" and topup["card_id"] is None
    assert topup["failure_reason"] == reason
    assert cards_for(stripe_emulator, topup["id"]) == []
    assert len(stripe_emulator.state.find("refund", payment_intent=event.payment_intent_id)) == 1


async def test_an_offer_priced_in_another_currency_than_the_wallet_is_refunded(
    funding, paid_order, zendit_emulator, stripe_emulator
):
    event = await paid_order(offer_id="ESIM-GB-30D-3GB-GBP", cost=Money(735, "GBP"))

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.REFUNDED)

    await _assert_refunded_once(funding, stripe_emulator, event, "currency_mismatch")
    assert await rows(funding.pool, "SELECT id FROM wallet_topups") == []


async def test_a_gateway_that_never_answers_is_given_up_the_card_cancelled_and_the_order_refunded(
    funding, paid_order, zendit_emulator, stripe_emulator, caplog
):
    set_wallet(zendit_emulator, 1_000)
    zendit_emulator.control("POST", "faults", {"endpoint": "wallet_topup", "status": 503, "count": 10})
    event = await paid_order()
    topup_id = f"tu_{event.transaction_id}"

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.REFUNDED, within=40)  # tiers: 1 s + 3 s + 10 s

    await _assert_refunded_once(funding, stripe_emulator, event, "retries_exhausted")
    [card] = cards_for(stripe_emulator, topup_id)
    assert card["status"] == "canceled" and approved_charges(stripe_emulator, card["id"]) == []
    [topup] = await rows(funding.pool, "SELECT status, failure_reason, attempts FROM wallet_topups")
    assert topup == {"status": "failed", "failure_reason": "retries_exhausted", "attempts": 4}
    assert any(getattr(r, "alert", None) == "topup_outcome_unknown" for r in caplog.records)


# ------------------------------------------------------------------------------------ prefunded mode


async def test_in_prefunded_mode_a_short_order_waits_for_the_operator_then_is_funded(
    service_settings, amqp_url, stripe_gateway, stripe_emulator, zendit_emulator, caplog
):
    settings = service_settings.model_copy(update={"funding_mode": FundingMode.PREFUNDED})
    set_wallet(zendit_emulator, 1_000)
    async with running(settings, amqp_url) as funding:
        event = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)

        await funding.deliver(event)
        await funding.wait_status(event.transaction_id, S.AWAITING_FUNDS)
        await eventually(lambda: funding.handled("deferred") >= 1, within=10, what="deferred")
        set_wallet(zendit_emulator, 1_000 + 2_000)  # the operator adds 20.00 in the Zendit console
        await funding.wait_status(event.transaction_id, S.FUNDED, within=30)

        await eventually(lambda: funding.handled("ok") >= 1, within=10, what="funded delivery acked")
        assert [m["transaction_id"] for m in await funding.messages("provisioning.order-funded")] == [
            event.transaction_id
        ]
        # The operator's email is notify's: one operator.alert for the shortage, through the outbox.
        operator_alerts = await funding.messages("notify.operator-alert")
        episode = await wait_episode(funding.pool, event.transaction_id)
    assert cards_for(stripe_emulator, f"tu_{event.transaction_id}") == []
    alerts = [r for r in caplog.records if getattr(r, "alert", None) == "wallet_short"]
    assert len(alerts) == 1 and alerts[0].amount_to_add == COST.amount - 1_000
    assert [
        (m["alert"], m["alert_key"], m["transaction_id"], m["amount_to_add"], m["facts"])
        for m in operator_alerts
    ] == [
        (
            "wallet_short",
            f"wallet_short:{event.transaction_id}:{episode}",
            event.transaction_id,
            {"amount": COST.amount - 1_000, "currency": "USD"},
            {"orders_waiting": "1", "wallet_available": "10.00 USD"},
        )
    ]


async def test_a_wallet_short_alert_whose_publish_was_lost_is_published_by_the_orders_next_delivery(
    service_settings, amqp_url, stripe_gateway, stripe_emulator, zendit_emulator
):
    """The alert was committed with the order's move to awaiting_funds, then the process died before
    publishing it: the next delivery of that order publishes it, once."""
    from esim_common import outbox
    from funding.fund_order import LATEST_WAIT, shortage_alert

    settings = service_settings.model_copy(update={"funding_mode": FundingMode.PREFUNDED})
    set_wallet(zendit_emulator, 1_000)
    async with running(settings, amqp_url) as funding:
        event = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)
        txn = event.transaction_id
        async with funding.pool.acquire() as conn, conn.transaction():
            await transition(conn, txn, S.FUNDING)
            await transition(conn, txn, S.AWAITING_FUNDS, reason="wallet short")
            episode = await conn.fetchval(LATEST_WAIT, txn)
            await outbox.add(conn, shortage_alert(txn, episode, Money(1_415, "USD"), {"orders_waiting": "1"}))

        await funding.deliver(event)
        await eventually(lambda: funding.handled("deferred") >= 1, within=10, what="deferred")
        await funding.deliver(event)  # a duplicate: the alert is published already
        await eventually(lambda: funding.handled("deferred") >= 2, within=10, what="duplicate deferred")
        operator_alerts = await funding.messages("notify.operator-alert")

    assert [(m["alert_key"], m["amount_to_add"]) for m in operator_alerts] == [
        (f"wallet_short:{txn}:{episode}", {"amount": 1_415, "currency": "USD"})
    ]


async def wait_episode(pool, txn: str) -> int:
    """The id of the order's latest move to awaiting_funds (the wallet_short alert's episode marker)."""
    from funding.fund_order import LATEST_WAIT

    return await pool.fetchval(LATEST_WAIT, txn)


async def test_the_same_order_short_again_after_being_funded_and_sent_back_raises_a_second_alert(
    service_settings, amqp_url, stripe_gateway, stripe_emulator, zendit_emulator
):
    """Funded, then sent back to funding (Zendit said INSUFFICIENT_FUNDS), then short again: a new
    shortage, so the operator must hear about it again."""
    settings = service_settings.model_copy(update={"funding_mode": FundingMode.PREFUNDED})
    set_wallet(zendit_emulator, 1_000)
    async with running(settings, amqp_url) as funding:
        event = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)
        txn = event.transaction_id
        await funding.deliver(event)
        await funding.wait_status(txn, S.AWAITING_FUNDS)
        first_wait = await wait_episode(funding.pool, txn)
        set_wallet(zendit_emulator, 1_000 + 2_000)
        await funding.wait_status(txn, S.FUNDED, within=30)
        # Provisioning's INSUFFICIENT_FUNDS path: purchasing, then back to funding with order.paid again.
        async with funding.pool.acquire() as conn, conn.transaction():
            await transition(conn, txn, S.PURCHASING)
            await transition(conn, txn, S.FUNDING, reason="zendit INSUFFICIENT_FUNDS")
        set_wallet(zendit_emulator, 1_000)
        await funding.deliver(event)
        await eventually(
            lambda: _moved_to_awaiting_funds_twice(funding.pool, txn), within=20, what="second wait"
        )
        await eventually(lambda: _alerts_published(funding, 2), within=20, what="second alert")
        second_wait = await wait_episode(funding.pool, txn)
        operator_alerts = await funding.messages("notify.operator-alert")

    assert second_wait != first_wait
    assert [m["alert_key"] for m in operator_alerts] == [
        f"wallet_short:{txn}:{first_wait}",
        f"wallet_short:{txn}:{second_wait}",
    ]


async def _moved_to_awaiting_funds_twice(pool, txn: str) -> bool:
    count = await pool.fetchval(
        "SELECT count(*) FROM order_transitions WHERE transaction_id = $1 AND to_status = 'awaiting_funds'",
        txn,
    )
    return count >= 2


async def _alerts_published(funding, n: int) -> bool:
    published = await funding.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'operator.alert' AND published_at IS NOT NULL"
    )
    return published >= n
