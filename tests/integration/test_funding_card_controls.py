"""What a single-use Issuing card may pay for, and the Issuing float alarm, in the running funding service.

`STRIPE_ISSUING_ALLOWED_CATEGORIES` / `STRIPE_ISSUING_ALLOWED_MERCHANT_COUNTRIES` become the card's
`spending_controls.allowed_categories` / `allowed_merchant_countries`, and the Stripe emulator's
authorisation rules (`esim_sandbox.stripe_emulator.auth_rules`) decline a charge from a merchant outside
them, as Stripe does. The Zendit emulator's top-up gateway charges the card as a telecommunications
merchant in the US (it sends no category or country, so the card network's defaults apply; the tests
check that on the authorisation itself, so a change in the emulator shows up here first).

The in-process harness (real broker, real database, both emulators) is `tests/fixtures/funding.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
from prometheus_client import REGISTRY

from esim_common.order_repository import get_order
from tests.fixtures.funding import (
    MIN_TOPUP,
    PRICE,
    Funding,
    S,
    approved_charges,
    cards_for,
    pay_for_order,
    rows,
    running,
    set_wallet,
    wallet,
)
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db]

# How the Zendit emulator's top-up gateway appears to the card network (see the module docstring).
ZENDIT_MERCHANT_CATEGORY = "telecommunication_services"
ZENDIT_MERCHANT_COUNTRY = "US"
SHORT_WALLET = 1_000  # the seed offer costs 24.15: 14.15 short, one top-up needed

StartFunding = Callable[..., AbstractAsyncContextManager[Funding]]


@pytest.fixture
def start_funding(service_settings, amqp_url) -> StartFunding:
    """The funding service with some settings changed: `async with start_funding(**update) as funding`."""

    @asynccontextmanager
    async def start(**update: Any) -> AsyncIterator[Funding]:
        async with running(service_settings.model_copy(update=update), amqp_url) as service:
            yield service

    return start


def authorizations(stripe_emulator, card_id: str) -> list[dict[str, Any]]:
    return stripe_emulator.state.find("issuing.authorization", card=card_id)


def float_low(currency: str = "USD") -> float | None:
    return REGISTRY.get_sample_value("esim_stripe_issuing_float_low", {"currency": currency})


# ------------------------------------------------------------------------------------ allow-lists


async def test_a_card_carries_the_configured_allow_lists_and_exact_single_use_limits(
    start_funding, stripe_gateway, stripe_client, stripe_emulator, zendit_emulator
):
    categories = [ZENDIT_MERCHANT_CATEGORY, "non_fi_stored_value_card_purchase_load"]
    countries = [ZENDIT_MERCHANT_COUNTRY, "GB"]
    set_wallet(zendit_emulator, SHORT_WALLET)
    async with start_funding(
        stripe_issuing_allowed_categories=categories,
        stripe_issuing_allowed_merchant_countries=countries,
    ) as funding:
        event = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)
        await funding.deliver(event)
        await funding.wait_status(event.transaction_id, S.FUNDED)

        [topup] = await rows(funding.pool, "SELECT id, amount, status, card_id FROM wallet_topups")
        assert topup["status"] == "succeeded" and topup["amount"] >= MIN_TOPUP

    [found] = cards_for(stripe_emulator, topup["id"])
    assert found["id"] == topup["card_id"]
    card = (
        await stripe_client.v1.issuing.cards.retrieve_async(found["id"])
    ).to_dict()  # as Stripe renders it
    controls = card["spending_controls"]
    assert controls["allowed_categories"] == categories
    assert controls["allowed_merchant_countries"] == countries
    assert sorted((limit["interval"], limit["amount"]) for limit in controls["spending_limits"]) == [
        ("all_time", topup["amount"]),
        ("per_authorization", topup["amount"]),
    ]
    assert all(limit["categories"] is None for limit in controls["spending_limits"])
    assert card["lifecycle_controls"]["cancel_after"]["payment_count"] == 1
    assert card["metadata"]["topup_id"] == topup["id"]
    assert card["status"] == "canceled"

    # The gateway's charge went through those controls: the merchant really is one the lists allow.
    [charge] = approved_charges(stripe_emulator, card["id"])
    merchant = charge["merchant_data"]
    assert (merchant["category"], merchant["country"]) == (ZENDIT_MERCHANT_CATEGORY, ZENDIT_MERCHANT_COUNTRY)
    assert [h["amount"] for h in charge["request_history"]] == [topup["amount"]]
    assert wallet(zendit_emulator)["wallet"]["balance"] == SHORT_WALLET + topup["amount"]


@pytest.mark.parametrize(
    "excluding",
    [
        pytest.param({"stripe_issuing_allowed_categories": ["financial_institutions"]}, id="category"),
        pytest.param({"stripe_issuing_allowed_merchant_countries": ["GB", "IE"]}, id="country"),
    ],
)
async def test_a_merchant_outside_the_allow_lists_is_declined_and_the_order_refunded_once(
    excluding, start_funding, stripe_gateway, stripe_emulator, zendit_emulator
):
    set_wallet(zendit_emulator, SHORT_WALLET)
    async with start_funding(**excluding) as funding:
        event = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)
        await funding.deliver(event)
        await funding.wait_status(event.transaction_id, S.REFUNDED)

        order = await get_order(funding.pool, event.transaction_id)
        assert order.failure_reason == "topup_declined"
        [topup] = await rows(funding.pool, "SELECT id, status, failure_reason, card_id FROM wallet_topups")
        assert (topup["status"], topup["failure_reason"]) == ("declined", "CARD_DECLINED")
        [stored] = await rows(funding.pool, "SELECT card_id, active, cancelled_at FROM issuing_cards")
        assert stored["card_id"] == topup["card_id"]
        assert stored["active"] is False and stored["cancelled_at"] is not None
        await eventually(
            lambda: funding.handled("failed_permanently") >= 1, within=10, what="failure path acked"
        )

    refunds = stripe_emulator.state.find("refund", payment_intent=event.payment_intent_id)
    assert [(r["amount"], r["status"]) for r in refunds] == [(PRICE.amount, "succeeded")]
    [card] = cards_for(stripe_emulator, topup["id"])
    assert card["id"] == topup["card_id"] and card["status"] == "canceled"
    # Declined by Stripe's own rules, before any real-time authorisation webhook could have a say.
    [auth] = authorizations(stripe_emulator, card["id"])
    assert auth["approved"] is False
    assert [h["reason"] for h in auth["request_history"]] == ["spending_controls"]
    assert auth["merchant_data"]["category"] == ZENDIT_MERCHANT_CATEGORY
    assert wallet(zendit_emulator)["wallet"]["balance"] == SHORT_WALLET


# ------------------------------------------------------------------------------------ float alarm


async def test_the_float_low_gauge_rises_when_issuing_cannot_pay_and_falls_with_the_next_card(
    start_funding, stripe_gateway, stripe_emulator, zendit_emulator
):
    set_wallet(zendit_emulator, SHORT_WALLET)
    saved = dict(stripe_emulator.state.issuing_available)
    issued = len(stripe_emulator.state.find("issuing.card"))
    async with start_funding() as funding:
        starved = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)
        stripe_emulator.state.issuing_available["usd"] = MIN_TOPUP - 1
        try:
            await funding.deliver(starved)
            await funding.wait_status(starved.transaction_id, S.REFUNDED)
        finally:
            stripe_emulator.state.issuing_available.update(saved)  # the operator funds Issuing
        assert len(stripe_emulator.state.find("issuing.card")) == issued  # failed fast, no card
        assert float_low() == 1

        later = await pay_for_order(funding.pool, stripe_gateway, stripe_emulator)
        await funding.deliver(later)
        await funding.wait_status(later.transaction_id, S.FUNDED)

        assert len(stripe_emulator.state.find("issuing.card")) == issued + 1
        assert float_low() == 0
