"""Funding under concurrency: reservations, coalesced top-ups, payment order, prefunded waiting.

The funding service runs in-process on the real broker and database against the Stripe and Zendit
emulators (the harness of test_funding_service.py). Orders are paid one after the other (so their
payment order is known), then their order.paid messages are published together.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from prometheus_client import REGISTRY

from esim_common.events import OrderPaid
from esim_common.order_repository import get_order
from esim_common.order_states import OrderStatus
from esim_common.settings import FundingMode
from tests.fixtures.funding import (
    COST,
    Funding,
    approved_charges,
    credits,
    leave_stalled_topup,
    pay_for_order,
    rows,
    running,
    set_wallet,
    wallet,
)
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db]

S = OrderStatus


async def pay_for(funding: Funding, stripe_gateway, stripe_emulator, count: int) -> list[OrderPaid]:
    """`count` paid orders, in payment order."""
    return [await pay_for_order(funding.pool, stripe_gateway, stripe_emulator) for _ in range(count)]


async def deliver_together(funding: Funding, events: list[OrderPaid]) -> None:
    await asyncio.gather(*(funding.deliver(event) for event in events))


async def wait_all(funding: Funding, events: list[OrderPaid], status: OrderStatus, within: float) -> None:
    async def all_there() -> bool:
        found = await rows(
            funding.pool,
            "SELECT count(*) AS n FROM esim_purchases WHERE status = $1 AND transaction_id = ANY($2::text[])",
            status.value,
            [e.transaction_id for e in events],
        )
        return found[0]["n"] == len(events)

    await eventually(all_there, within=within, what=f"{len(events)} orders {status.value}")


def cards(stripe_emulator, topups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Issuing cards made for these top-ups (the emulator lives for the whole module)."""
    ids = {t["id"] for t in topups}
    return [c for c in stripe_emulator.state.find("issuing.card") if c["metadata"].get("topup_id") in ids]


def shortfall_gauge() -> float | None:
    return REGISTRY.get_sample_value("esim_funding_wallet_shortfall_minor_units", {"currency": "USD"})


def alerts(caplog, reason: str) -> list[Any]:
    return [r for r in caplog.records if getattr(r, "alert", None) == reason]


# ------------------------------------------------------------------------------------ issuing_card mode


async def test_fifty_orders_against_a_wallet_for_ten_share_few_topups_and_are_each_funded_once(
    service_settings, amqp_url, stripe_gateway, stripe_emulator, zendit_emulator, zendit_client
):
    min_topup = 20_000
    settings = service_settings.model_copy(update={"zendit_min_topup": min_topup, "broker_prefetch": 50})
    start_balance = 10 * COST.amount
    set_wallet(zendit_emulator, start_balance)
    async with running(settings, amqp_url) as funding:
        events = await pay_for(funding, stripe_gateway, stripe_emulator, 50)

        await deliver_together(funding, events)
        await wait_all(funding, events, S.FUNDED, within=120)

        announced = await funding.messages("provisioning.order-funded")
        topups = await rows(funding.pool, "SELECT id, amount, status, order_ids FROM wallet_topups")
        stored_cards = await rows(funding.pool, "SELECT card_id, active FROM issuing_cards")

    total_shortfall = 50 * COST.amount - start_balance
    # Without coalescing every order arriving during a top-up would start its own (up to 40).
    assert 1 <= len(topups) <= math.ceil(total_shortfall / min_topup) + 1, topups
    assert {t["status"] for t in topups} == {"succeeded"}
    # Never over-promised: the wallet holds at least what the funded orders were promised.
    balance = wallet(zendit_emulator)["wallet"]["balance"]
    assert balance == start_balance + sum(t["amount"] for t in topups)
    assert balance >= 50 * COST.amount
    assert len(await credits(zendit_client)) == len(topups)
    # One card per top-up, charged once, cancelled at Stripe and in our books.
    issued = cards(stripe_emulator, topups)
    assert sorted(c["metadata"]["topup_id"] for c in issued) == sorted(t["id"] for t in topups)
    for card in issued:
        assert card["status"] == "canceled"
        assert len(approved_charges(stripe_emulator, card["id"])) == 1
    assert len(stored_cards) == len(topups) and not any(c["active"] for c in stored_cards)
    # Exactly one order.funded per order (the outbox), however often the orders re-checked.
    assert sorted(m["transaction_id"] for m in announced) == sorted(e.transaction_id for e in events)


async def test_a_gateway_failing_twice_then_succeeding_makes_one_topup_and_one_charge(
    funding, paid_order, zendit_emulator, zendit_client, stripe_emulator
):
    set_wallet(zendit_emulator, 1_000)
    zendit_emulator.control("POST", "faults", {"endpoint": "wallet_topup", "status": 503, "count": 2})
    event = await paid_order()

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED, within=30)  # tiers: 1 s, then 3 s

    assert funding.handled("retried") == 2
    [topup] = await rows(funding.pool, "SELECT id, status, attempts, gateway_reference FROM wallet_topups")
    assert topup["status"] == "succeeded" and topup["attempts"] == 3
    assert topup["gateway_reference"] == topup["id"]  # the same reference on every attempt
    [card] = cards(stripe_emulator, [topup])
    assert len(approved_charges(stripe_emulator, card["id"])) == 1 and card["status"] == "canceled"
    assert len(await credits(zendit_client)) == 1
    assert list(wallet(zendit_emulator)["topups"]) == [topup["id"]]


async def test_a_declined_topup_fails_every_order_waiting_for_it_with_one_card_and_one_refund_each(
    service_settings, amqp_url, stripe_gateway, stripe_emulator, zendit_emulator, declining_card_network
):
    # A minimum top-up that covers all three: whichever order asks first, the others wait for its top-up
    # (however their deliveries interleave), so exactly one card is tried.
    settings = service_settings.model_copy(update={"zendit_min_topup": 4 * COST.amount})
    set_wallet(zendit_emulator, 0)
    async with running(settings, amqp_url) as funding:
        events = await pay_for(funding, stripe_gateway, stripe_emulator, 3)

        await deliver_together(funding, events)
        await wait_all(funding, events, S.REFUNDED, within=60)

        [topup] = await rows(funding.pool, "SELECT id, status, order_ids FROM wallet_topups")
        orders = [await get_order(funding.pool, e.transaction_id) for e in events]
        told = await funding.messages("notify.order-failed")

    # One card was declined; the orders that waited for it did not each try a card of their own.
    assert topup["status"] == "declined"
    assert sorted(topup["order_ids"]) == sorted(e.transaction_id for e in events)
    [card] = cards(stripe_emulator, [topup])
    assert card["status"] == "canceled"
    assert [o.failure_reason for o in orders] == ["topup_declined"] * 3
    for event in events:
        assert len(stripe_emulator.state.find("refund", payment_intent=event.payment_intent_id)) == 1
    assert sorted(m["transaction_id"] for m in told) == sorted(e.transaction_id for e in events)
    assert wallet(zendit_emulator)["wallet"]["balance"] == 0


async def test_orders_waiting_for_a_top_up_whose_driver_stopped_drive_it_themselves(
    funding, paid_order, stripe_emulator, zendit_emulator
):
    set_wallet(zendit_emulator, 0)
    # A top-up started by an order whose message went to the DLQ (a bug): open, and idle for 2 minutes.
    stranded = await paid_order()
    topup_id = await leave_stalled_topup(funding.pool, txn=stranded.transaction_id, amount=3 * COST.amount)
    event = await paid_order()

    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.FUNDED, within=30)

    [topup] = await rows(funding.pool, "SELECT id, status, order_ids FROM wallet_topups")
    assert topup["id"] == topup_id and topup["status"] == "succeeded"
    assert topup["order_ids"] == [stranded.transaction_id, event.transaction_id]
    [card] = cards(stripe_emulator, [topup])
    assert card["status"] == "canceled" and len(approved_charges(stripe_emulator, card["id"])) == 1


async def test_a_purchase_zendit_already_holds_is_not_counted_twice_before_topping_up(
    funding, paid_order, zendit_emulator, zendit_client
):
    # Order A's purchase was placed and Zendit holds its cost, but we last saw it ACCEPTED. The wallet
    # holds exactly A's cost plus B's: B needs no top-up once Zendit is asked about A.
    set_wallet(zendit_emulator, 2 * COST.amount)
    zendit_emulator.control("POST", "purchase_delay", {"seconds": 0.2})
    zendit_emulator.control("POST", "purchase_stalls", {"count": 1})  # held, then stays IN_PROGRESS
    a = await paid_order()
    await zendit_client.purchase(transaction_id=a.transaction_id, offer_id=a.offer_id)
    await eventually(
        lambda: wallet(zendit_emulator)["wallet"]["holds"] == {a.transaction_id: COST.amount},
        within=10,
        what="Zendit holding A's cost",
    )
    await funding.pool.execute(
        "UPDATE esim_purchases"
        " SET status = 'purchasing', zendit_transaction_id = $1, zendit_status = 'ACCEPTED'"
        " WHERE transaction_id = $1",
        a.transaction_id,
    )
    b = await paid_order()

    await funding.deliver(b)
    await funding.wait_status(b.transaction_id, S.FUNDED, within=30)

    assert await rows(funding.pool, "SELECT id FROM wallet_topups") == []


# ------------------------------------------------------------------------------------ prefunded mode


@pytest.fixture
async def prefunded(service_settings, amqp_url):
    settings = service_settings.model_copy(
        update={"funding_mode": FundingMode.PREFUNDED, "awaiting_funds_recheck_seconds": 1}
    )
    async with running(settings, amqp_url) as service:
        yield service


async def funded_in_order(funding: Funding) -> list[str]:
    """The orders in the order their move to `funded` was committed."""
    found = await rows(
        funding.pool, "SELECT transaction_id FROM order_transitions WHERE to_status = 'funded' ORDER BY id"
    )
    return [r["transaction_id"] for r in found]


async def test_prefunded_orders_wait_with_one_alert_then_resume_in_payment_order(
    prefunded, stripe_gateway, stripe_emulator, zendit_emulator, caplog
):
    funding = prefunded
    set_wallet(zendit_emulator, 1_000)
    events = await pay_for(funding, stripe_gateway, stripe_emulator, 4)

    await deliver_together(funding, events)
    await wait_all(funding, events, S.AWAITING_FUNDS, within=30)
    await eventually(lambda: funding.handled("deferred") >= 12, within=30, what="several re-checks")
    # One shortage, one alert — not one per order, not one per re-check — saying what was missing for
    # the orders waiting when it began; the gauge keeps the amount current as more orders wait.
    [alert] = alerts(caplog, "wallet_short")
    assert COST.amount - 1_000 <= alert.amount_to_add <= 4 * COST.amount - 1_000
    assert shortfall_gauge() == 4 * COST.amount - 1_000
    assert REGISTRY.get_sample_value("esim_funding_awaiting_funds_orders") == 4

    # The operator adds enough for the first three (the wallet is short by 1,000 for the fourth).
    set_wallet(zendit_emulator, 3 * COST.amount)
    await wait_all(funding, events[:3], S.FUNDED, within=30)
    order = await get_order(funding.pool, events[3].transaction_id)
    assert order.status == S.AWAITING_FUNDS
    assert await funded_in_order(funding) == [e.transaction_id for e in events[:3]]

    set_wallet(zendit_emulator, 4 * COST.amount)
    await funding.wait_status(events[3].transaction_id, S.FUNDED, within=30)
    assert await funded_in_order(funding) == [e.transaction_id for e in events]
    announced = [m["transaction_id"] for m in await funding.messages("provisioning.order-funded")]
    assert sorted(announced) == sorted(e.transaction_id for e in events)  # once each
    assert len(alerts(caplog, "wallet_short")) == 1
    assert shortfall_gauge() == 0
    assert REGISTRY.get_sample_value("esim_funding_awaiting_funds_orders") == 0


async def test_a_prefunded_order_that_waited_too_long_is_refunded_and_the_customer_told(
    prefunded, stripe_gateway, stripe_emulator, zendit_emulator
):
    funding = prefunded
    set_wallet(zendit_emulator, 0)
    [event] = await pay_for(funding, stripe_gateway, stripe_emulator, 1)
    await funding.deliver(event)
    await funding.wait_status(event.transaction_id, S.AWAITING_FUNDS)

    # As if it was paid longer ago than AWAITING_FUNDS_MAX_AGE (6 h by default).
    await funding.pool.execute(
        "UPDATE esim_purchases SET paid_at = now() - interval '6 hours 1 minute' WHERE transaction_id = $1",
        event.transaction_id,
    )
    await funding.wait_status(event.transaction_id, S.REFUNDED, within=30)

    order = await get_order(funding.pool, event.transaction_id)
    assert order.failure_reason == "awaiting_funds_expired"
    assert len(stripe_emulator.state.find("refund", payment_intent=event.payment_intent_id)) == 1
    [told] = await funding.messages("notify.order-failed")
    assert told["transaction_id"] == event.transaction_id and told["step"] == "funding"
    assert await funding.messages("provisioning.order-funded") == []
    # Nobody waits any more: the gauges say so (they are not left at the refunded order's numbers).
    assert REGISTRY.get_sample_value("esim_funding_awaiting_funds_orders") == 0
    assert shortfall_gauge() in (None, 0)
