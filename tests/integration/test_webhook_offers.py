"""`GET /api/offers`: the shop's catalogue, served from a cache of Zendit's offers loaded in pages at
start-up and refreshed in the background.

The webhook app runs with its real lifespan (which starts the catalogue's refresh task) against the
Zendit and Stripe emulators, real PostgreSQL and RabbitMQ; requests go through httpx's ASGITransport.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from esim_common.settings import PricingRule, Settings
from webhook.catalogue import Catalogue
from webhook.main import create_app

pytestmark = [pytest.mark.broker, pytest.mark.db]

US_OFFER = "ESIM-US-7D-1GB"  # cost 4.50 USD, Zendit suggests 9.99 USD
# Of the emulator's offers, the shop must not list these: GBP cost on a USD wallet, and disabled.
NOT_SELLABLE = {"ESIM-GB-30D-3GB-GBP", "ESIM-TH-8D-5GB"}
SHOP_OFFER_FIELDS = {
    "offerId",
    "country",
    "regions",
    "dataGB",
    "dataUnlimited",
    "durationDays",
    "notes",
    "amount",
    "currency",
}


@dataclass
class Shop:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def catalogue(self) -> Catalogue:
        return self.app.state.ports.catalogue

    async def offers(self, **params: str) -> httpx.Response:
        return await self.client.get("/api/offers", params=params)

    async def offer_ids(self, **params: str) -> set[str]:
        response = await self.offers(**params)
        assert response.status_code == 200, response.text
        return {offer["offerId"] for offer in response.json()["offers"]}


ShopFactory = Callable[..., Awaitable[Shop]]


@pytest.fixture
async def make_shop(service_settings: Settings, stripe_emulator) -> AsyncIterator[ShopFactory]:
    """Start the webhook app through its lifespan, optionally with a small Zendit page size; the
    catalogue's first load is awaited unless `wait=False`."""
    stripe_emulator.set_webhook(None)
    async with AsyncExitStack() as stack:

        async def make(*, page_size: int | None = None, wait: bool = True, **overrides: Any) -> Shop:
            settings = service_settings.model_copy(update=overrides)
            app = create_app(settings)
            if page_size is not None:
                app.state.ports.catalogue.page_size = page_size
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://webhook")
            stack.push_async_callback(client.aclose)
            shop = Shop(app=app, client=client, settings=settings)
            if wait:
                await asyncio.wait_for(shop.catalogue.wait_until_loaded(), timeout=20)
            return shop

        yield make


@pytest.fixture
async def shop(make_shop: ShopFactory) -> Shop:
    return await make_shop()


def offer_list_calls(outcome: str = "ok") -> float:
    labels = {"provider": "zendit", "endpoint": "GET /esim/offers", "outcome": outcome}
    return REGISTRY.get_sample_value("esim_provider_calls_total", labels) or 0.0


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


# ---------------------------------------------------------------------------------------- loading


async def test_the_whole_catalogue_is_loaded_page_by_page_at_start_up(
    make_shop: ShopFactory, zendit_emulator
):
    listed = len(zendit_emulator.state.offers)
    assert listed == 13  # five pages of 3 below: the last one part-full
    calls_before = offer_list_calls()

    shop = await make_shop(page_size=3)

    assert offer_list_calls() - calls_before == 5
    assert await shop.offer_ids() == set(zendit_emulator.state.offers) - NOT_SELLABLE
    assert sample("esim_catalogue_offers", kind="listed") == listed
    assert sample("esim_catalogue_offers", kind="sellable") == listed - len(NOT_SELLABLE)


async def test_thousands_of_offers_load_in_pages_of_1024(make_shop: ShopFactory, zendit_emulator):
    template = zendit_emulator.state.offers[US_OFFER]
    for n in range(2500):
        offer = copy.deepcopy(template)
        offer["offerId"] = f"ESIM-BULK-{n:04d}"
        offer["country"] = ("US", "FR", "JP", "BR")[n % 4]
        zendit_emulator.state.offers[offer["offerId"]] = offer
    calls_before = offer_list_calls()

    shop = await make_shop()  # the default page size: Zendit's maximum

    assert offer_list_calls() - calls_before == 3  # 2,513 offers: 1024 + 1024 + 465
    everything = await shop.offer_ids()
    assert len(everything) == 2513 - len(NOT_SELLABLE)
    assert {f"ESIM-BULK-{n:04d}" for n in (0, 1023, 1024, 2047, 2048, 2499)} <= everything
    assert len(await shop.offer_ids(country="BR")) == 625


async def test_before_the_first_successful_load_the_offers_are_a_503(make_shop: ShopFactory, zendit_emulator):
    zendit_emulator.control("POST", "faults", {"endpoint": "list_offers", "status": 503, "count": 1000})
    shop = await make_shop(wait=False)
    assert await shop.catalogue.run_once() == 0  # whatever the background task did meanwhile failed too

    response = await shop.offers()
    assert response.status_code == 503
    assert response.json()["detail"] == "catalogue not loaded yet; retry"
    assert response.headers["Retry-After"] == "5"
    health = await shop.client.get("/healthz")
    assert health.status_code == 200  # the edge serves (webhooks!) whatever Zendit's catalogue does

    zendit_emulator.control("DELETE", "faults")
    assert await shop.catalogue.run_once() == 13 - len(NOT_SELLABLE)
    assert (await shop.offers()).status_code == 200


async def test_a_failed_refresh_keeps_the_last_good_copy_and_says_so(
    shop: Shop, zendit_emulator, caplog: pytest.LogCaptureFixture
):
    before = await shop.offers()
    failures_before = sample("esim_catalogue_refreshes_total", outcome="failed") or 0.0
    zendit_emulator.control("POST", f"offers/{US_OFFER}", {"enabled": False})
    zendit_emulator.control("POST", "faults", {"endpoint": "list_offers", "status": 500, "count": 1})

    with caplog.at_level(logging.WARNING, logger="esim.webhook.catalogue"):
        assert await shop.catalogue.run_once() == 0

    after = await shop.offers()
    assert after.status_code == 200 and after.content == before.content
    assert sample("esim_catalogue_refreshes_total", outcome="failed") == failures_before + 1
    [warning] = [r for r in caplog.records if r.getMessage() == "catalogue refresh failed"]
    assert warning.serving_last_good_copy is True and "500" in warning.error

    assert await shop.catalogue.run_once() > 0  # Zendit is back: the change shows
    assert US_OFFER not in await shop.offer_ids()


async def test_a_refresh_that_lists_nothing_does_not_empty_the_shop(shop: Shop, zendit_emulator):
    before = await shop.offer_ids()
    zendit_emulator.state.offers.clear()
    assert await shop.catalogue.run_once() == 0
    assert await shop.offer_ids() == before


async def test_the_catalogue_refreshes_itself_in_the_background(make_shop: ShopFactory, zendit_emulator):
    shop = await make_shop(catalogue_refresh_seconds=1)
    assert US_OFFER in await shop.offer_ids()
    zendit_emulator.control("POST", f"offers/{US_OFFER}", {"enabled": False})

    deadline = time.monotonic() + 10
    while US_OFFER in await shop.offer_ids():
        assert time.monotonic() < deadline, "the catalogue was not refreshed within 10 s"
        await asyncio.sleep(0.2)


async def test_the_catalogue_age_is_exported_and_reset_by_each_load(shop: Shop):
    await asyncio.sleep(0.3)
    aged = sample("esim_catalogue_age_seconds")
    assert aged is not None and aged >= 0.3
    await shop.catalogue.run_once()
    fresh = sample("esim_catalogue_age_seconds")
    assert fresh is not None and fresh < aged
    metrics = (await shop.client.get("/metrics")).text
    assert "esim_catalogue_age_seconds" in metrics and 'esim_catalogue_offers{kind="sellable"}' in metrics


async def test_stopping_the_app_stops_the_refresh_task(service_settings: Settings, stripe_emulator):
    stripe_emulator.set_webhook(None)
    app = create_app(service_settings)
    async with app.router.lifespan_context(app):
        task = app.state.ports.catalogue._task
        assert task is not None and not task.done()
    assert task.done() and app.state.ports.catalogue._task is None


# ---------------------------------------------------------------------------------------- serving


async def test_each_offer_is_listed_with_our_price_and_never_with_our_cost(shop: Shop):
    response = await shop.offers()
    body = response.json()
    assert set(body) == {"offers", "updatedAt"}
    us = next(o for o in body["offers"] if o["offerId"] == US_OFFER)

    assert set(us) == SHOP_OFFER_FIELDS
    assert us == {
        "offerId": US_OFFER,
        "country": "US",
        "regions": ["North America"],
        "dataGB": 1,
        "dataUnlimited": False,
        "durationDays": 7,
        "notes": "",
        "amount": 999,
        "currency": "USD",
    }
    assert all(set(offer) == SHOP_OFFER_FIELDS for offer in body["offers"])
    assert "cost" not in response.text and "450" not in response.text
    regional = next(o for o in body["offers"] if o["offerId"] == "ESIM-GLOBAL-30D-5GB")
    assert regional["country"] is None and regional["regions"] == ["Global"]


async def test_every_listed_price_is_what_checkout_charges(shop: Shop, zendit_emulator):
    listed = (await shop.offers()).json()["offers"]
    for offer in listed:
        response = await shop.client.post(
            "/api/create-checkout-session",
            json={"offerId": offer["offerId"], "recipientEmail": "ada@example.com", "fullName": "Ada"},
        )
        assert response.status_code == 200, (offer["offerId"], response.text)
        assert (response.json()["amount"], response.json()["currency"]) == (
            offer["amount"],
            offer["currency"],
        )
    for offer_id in NOT_SELLABLE:  # and what the shop does not list, checkout refuses
        response = await shop.client.post(
            "/api/create-checkout-session",
            json={"offerId": offer_id, "recipientEmail": "ada@example.com", "fullName": "Ada"},
        )
        assert response.status_code in (404, 422)


async def test_under_cost_plus_markup_the_list_and_checkout_agree_on_the_markup_price(make_shop: ShopFactory):
    shop = await make_shop(pricing_rule=PricingRule.COST_PLUS_MARKUP, pricing_markup_percent=30)
    us = next(o for o in (await shop.offers()).json()["offers"] if o["offerId"] == US_OFFER)
    checkout = await shop.client.post(
        "/api/create-checkout-session",
        json={"offerId": US_OFFER, "recipientEmail": "ada@example.com", "fullName": "Ada"},
    )
    assert us["amount"] == checkout.json()["amount"] == 585  # 4.50 + 30%, not Zendit's 9.99


async def test_offers_that_cannot_earn_the_minimum_margin_are_not_listed(make_shop: ShopFactory):
    # Margins (suggested price - cost with fee): GLOBAL 42.99 - 24.15 = 18.84 exactly, DE 19.79,
    # AFRICA 28.24; every other sellable offer earns less than 18.84.
    shop = await make_shop(pricing_min_margin=1884)
    assert await shop.offer_ids() == {"ESIM-GLOBAL-30D-5GB", "ESIM-DE-30D-20GB", "ESIM-AFRICA-30D-10GB"}


async def test_a_country_filter_is_case_insensitive_and_only_lists_that_country(shop: Shop):
    upper, lower = await shop.offers(country="US"), await shop.offers(country="us")
    assert upper.status_code == lower.status_code == 200
    assert upper.json() == lower.json()
    assert {o["offerId"] for o in upper.json()["offers"]} == {"ESIM-US-7D-1GB", "ESIM-US-30D-10GB"}
    assert await shop.offer_ids(country="Gb") == {"ESIM-GB-15D-5GB"}  # its GBP-cost sibling is not for sale


async def test_a_country_without_offers_is_an_empty_list(shop: Shop):
    response = await shop.offers(country="zz")
    assert response.status_code == 200 and response.json()["offers"] == []


@pytest.mark.parametrize("country", ["USA", "U", "1A", "U-", "", "ü1"])
async def test_a_malformed_country_is_a_422(shop: Shop, country: str):
    response = await shop.offers(country=country)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "country"]
