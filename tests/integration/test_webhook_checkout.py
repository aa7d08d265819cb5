"""The shop's side of the edge: checkout sessions priced on the server, and the public order status.

Real PostgreSQL, RabbitMQ, Stripe and Zendit emulators; the app runs in-process (`ctx.start()` and
httpx's ASGITransport). The fixtures here are shared with test_webhook_stripe_events.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from esim_common.order_repository import Order, get_order
from esim_common.service import ServiceContext
from esim_common.settings import CaptureMode, Settings
from esim_common.topology import delete
from esim_sandbox.serve import free_port
from webhook.main import create_app

pytestmark = [pytest.mark.broker, pytest.mark.db]

US_OFFER = "ESIM-US-7D-1GB"  # cost 4.50 USD, Zendit suggests 9.99 USD
US_OFFER_COST, US_OFFER_PRICE = 450, 999


@dataclass
class Edge:
    """The webhook service running in-process, and a client talking to it."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def ctx(self) -> ServiceContext:
        return self.app.state.ctx

    async def checkout(self, offer_id: str = US_OFFER, **fields: Any) -> httpx.Response:
        body = {
            "offerId": offer_id,
            "recipientEmail": "ada@example.com",
            "fullName": "Ada Lovelace",
            **fields,
        }
        return await self.client.post("/api/create-checkout-session", json=body)

    async def order(self, transaction_id: str) -> Order:
        order = await get_order(self.ctx.pool, transaction_id)
        assert order is not None, f"no order {transaction_id}"
        return order

    async def count(self, sql: str, *args: Any) -> int:
        return int(await self.ctx.pool.fetchval(sql, *args))

    def queue_name(self, name: str) -> str:
        return self.ctx.topology.queue(name).name


EdgeFactory = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def make_edge(service_settings: Settings, stripe_emulator) -> AsyncIterator[EdgeFactory]:
    """Start the webhook app with `service_settings` changed by keyword; stopped (and its private
    topology deleted) after the test. Emulator webhooks are off: tests deliver events themselves."""
    stripe_emulator.set_webhook(None)
    started: list[Edge] = []

    async def make(**overrides: Any) -> Edge:
        settings = service_settings.model_copy(update=overrides)
        app = create_app(settings)
        await app.state.ctx.start()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://webhook")
        edge = Edge(app=app, client=client, settings=settings)
        started.append(edge)
        return edge

    yield make
    for edge in started:
        await edge.client.aclose()
        await edge.ctx.stop()
        await edge.app.state.ports.aclose()
        connection = await aio_pika.connect(edge.settings.amqp_url)
        async with connection:
            await delete(await connection.channel(), edge.ctx.topology)


@pytest.fixture
async def edge(make_edge: EdgeFactory) -> Edge:
    return await make_edge()


async def checkout_ok(edge: Edge, offer_id: str = US_OFFER, **fields: Any) -> dict[str, Any]:
    response = await edge.checkout(offer_id, **fields)
    assert response.status_code == 200, response.text
    return response.json()


# --------------------------------------------------------------------------------------- checkout


async def test_a_checkout_creates_a_pending_order_at_the_server_computed_price(edge: Edge):
    created = await checkout_ok(edge, userId="user-42")

    order = await edge.order(created["transactionId"])
    assert created["transactionId"].startswith("txn_") and len(created["transactionId"]) == 28
    assert created["amount"] == US_OFFER_PRICE and created["currency"] == "USD"
    assert order.status == "pending_payment"
    assert (order.price, order.currency) == (US_OFFER_PRICE, "USD")
    assert (order.zendit_cost, order.zendit_cost_currency) == (US_OFFER_COST, "USD")
    assert (order.recipient_email, order.recipient_name, order.user_id) == (
        "ada@example.com",
        "Ada Lovelace",
        "user-42",
    )
    assert order.stripe_checkout_session_id == created["sessionId"]
    assert order.capture_method == "automatic"


async def test_the_checkout_session_carries_the_transaction_id_in_all_three_places(
    edge: Edge, stripe_emulator
):
    created = await checkout_ok(edge)
    txn = created["transactionId"]

    session = stripe_emulator.state.get("checkout.session", created["sessionId"])
    intent_data = stripe_emulator.state.private_of(created["sessionId"])["payment_intent_data"]
    assert session["client_reference_id"] == txn
    assert session["metadata"] == {
        "transaction_id": txn,
        "offer_id": US_OFFER,
        "recipient_email": "ada@example.com",
    }
    assert intent_data["metadata"] == session["metadata"]
    assert intent_data["capture_method"] == "automatic"
    assert session["customer_email"] == "ada@example.com"
    assert (session["amount_total"], session["currency"]) == (US_OFFER_PRICE, "usd")
    assert session["success_url"].startswith(f"{edge.settings.shop_base_url}/checkout/success?")
    assert "session_id={CHECKOUT_SESSION_ID}" in session["success_url"]
    assert session["cancel_url"].startswith(f"{edge.settings.shop_base_url}/checkout/cancel?")
    assert created["url"] == session["url"]


async def test_the_price_sent_by_a_client_is_ignored(edge: Edge):
    created = await checkout_ok(edge, price=1, amount=1)
    assert (await edge.order(created["transactionId"])).price == US_OFFER_PRICE


async def test_without_a_suggested_retail_price_the_order_is_priced_at_cost_plus_markup(
    make_edge: EdgeFactory, zendit_emulator
):
    del zendit_emulator.state.offers[US_OFFER]["price"]
    edge = await make_edge(pricing_markup_percent=33)
    created = await checkout_ok(edge)
    assert (await edge.order(created["transactionId"])).price == 599  # 450 * 1.33 = 598.5 → 599


async def test_manual_capture_mode_creates_a_manual_capture_session(make_edge: EdgeFactory, stripe_emulator):
    edge = await make_edge(capture_mode=CaptureMode.MANUAL)
    created = await checkout_ok(edge)
    intent_data = stripe_emulator.state.private_of(created["sessionId"])["payment_intent_data"]
    assert intent_data["capture_method"] == "manual"
    assert (await edge.order(created["transactionId"])).capture_method == "manual"


async def test_an_unknown_offer_is_a_404_naming_the_offer(edge: Edge):
    response = await edge.checkout("ESIM-NOWHERE-1D-1MB")
    assert response.status_code == 404
    assert "ESIM-NOWHERE-1D-1MB" in response.json()["detail"]
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0


async def test_a_disabled_offer_is_a_404(edge: Edge):
    response = await edge.checkout("ESIM-TH-8D-5GB")
    assert response.status_code == 404 and "ESIM-TH-8D-5GB" in response.json()["detail"]


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "two@@example.com", "sp ace@example.com", ""])
async def test_a_bad_recipient_email_is_a_422(edge: Edge, email: str):
    response = await edge.checkout(recipientEmail=email)
    assert response.status_code == 422
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0


async def test_a_missing_name_or_offer_is_a_422(edge: Edge):
    assert (await edge.checkout(fullName="")).status_code == 422
    no_offer = await edge.client.post(
        "/api/create-checkout-session", json={"recipientEmail": "ada@example.com", "fullName": "Ada"}
    )
    assert no_offer.status_code == 422


async def test_an_offer_costing_another_currency_than_the_wallet_is_a_422(edge: Edge):
    response = await edge.checkout("ESIM-GB-30D-3GB-GBP")  # GBP cost, USD wallet
    assert response.status_code == 422
    assert "GBP" in response.json()["detail"] and "USD" in response.json()["detail"]
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0


async def test_an_offer_that_cannot_earn_the_minimum_margin_is_a_422(make_edge: EdgeFactory):
    edge = await make_edge(pricing_min_margin=10_000)
    response = await edge.checkout()
    assert response.status_code == 422 and "margin" in response.json()["detail"]
    assert "4.50" not in response.json()["detail"]  # our cost is not the shop's business
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0


async def test_a_zendit_outage_is_a_503_and_creates_nothing(edge: Edge, zendit_emulator):
    zendit_emulator.control("POST", "faults", {"endpoint": "get_offer", "status": 503})
    response = await edge.checkout()
    assert response.status_code == 503
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0


async def test_stripe_unreachable_is_a_503_and_leaves_no_order_behind(make_edge: EdgeFactory):
    edge = await make_edge(stripe_api_base=f"http://127.0.0.1:{free_port()}", stripe_max_network_retries=0)
    response = await edge.checkout()
    assert response.status_code == 503 and "payment provider" in response.json()["detail"]
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0


async def test_stripe_refusing_the_session_is_a_502_and_leaves_no_order_behind(make_edge: EdgeFactory):
    edge = await make_edge(stripe_api_key=SecretStr("not_a_stripe_key"))
    response = await edge.checkout()
    assert response.status_code == 502
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0


# ----------------------------------------------------------------------------------- order status


async def test_the_order_status_is_shown_to_the_holder_of_its_checkout_session(edge: Edge):
    created = await checkout_ok(edge)
    response = await edge.client.get(
        f"/api/orders/{created['transactionId']}", params={"session_id": created["sessionId"]}
    )
    assert response.status_code == 200
    view = response.json()
    assert view["transactionId"] == created["transactionId"]
    assert (view["status"], view["offerId"], view["amount"], view["currency"]) == (
        "pending_payment",
        US_OFFER,
        US_OFFER_PRICE,
        "USD",
    )
    assert view["qrCodeUrl"] is None and view["paidAt"] is None
    assert set(view) == {
        "transactionId",
        "status",
        "offerId",
        "amount",
        "currency",
        "createdAt",
        "updatedAt",
        "paidAt",
        "deliveredAt",
        "refundedAt",
        "qrCodeUrl",
    }


async def test_a_wrong_session_and_an_unknown_order_get_the_same_404(edge: Edge):
    created = await checkout_ok(edge)
    txn = created["transactionId"]
    wrong = await edge.client.get(f"/api/orders/{txn}", params={"session_id": "cs_test_someone_else"})
    missing = await edge.client.get(f"/api/orders/{txn}")
    unknown = await edge.client.get(
        f"/api/orders/txn_{uuid.uuid4().hex[:24]}", params={"session_id": created["sessionId"]}
    )
    assert wrong.status_code == missing.status_code == unknown.status_code == 404
    assert wrong.json() == missing.json() == unknown.json()


async def test_a_delivered_order_shows_its_qr_code_but_no_internal_details(edge: Edge):
    created = await checkout_ok(edge)
    txn = created["transactionId"]
    await edge.ctx.pool.execute(
        """UPDATE esim_purchases SET status = 'delivered', qr_code_url = 'https://qr.example/x.png',
                  emailed_at = now(), failure_reason = 'zendit said: secret internals',
                  stripe_payment_intent_id = 'pi_internal'
            WHERE transaction_id = $1""",
        txn,
    )
    response = await edge.client.get(f"/api/orders/{txn}", params={"session_id": created["sessionId"]})
    view = response.json()
    assert view["status"] == "delivered" and view["qrCodeUrl"] == "https://qr.example/x.png"
    assert view["deliveredAt"] is not None
    assert "secret internals" not in response.text and "pi_internal" not in response.text


async def test_the_order_status_is_a_503_while_the_database_is_unreachable(edge: Edge):
    created = await checkout_ok(edge)
    await edge.ctx.pool.close()
    response = await edge.client.get(
        f"/api/orders/{created['transactionId']}", params={"session_id": created["sessionId"]}
    )
    edge.ctx._pool = None  # already closed; the fixture's ctx.stop() has nothing left to close
    assert response.status_code == 503


async def test_checkout_returns_to_a_success_page_showing_the_order(edge: Edge, stripe_emulator):
    created = await checkout_ok(edge)
    session = stripe_emulator.state.get("checkout.session", created["sessionId"])
    success_url = session["success_url"].replace("{CHECKOUT_SESSION_ID}", created["sessionId"])
    page = await edge.client.get(success_url.removeprefix(edge.settings.shop_base_url))
    stranger = await edge.client.get(
        "/checkout/success", params={"transaction_id": created["transactionId"], "session_id": "cs_x"}
    )
    cancel = await edge.client.get(session["cancel_url"].removeprefix(edge.settings.shop_base_url))
    assert page.status_code == 200 and "pending_payment" in page.text
    assert created["transactionId"] in page.text
    assert "not found" in stranger.text and created["transactionId"] not in stranger.text
    assert cancel.status_code == 200 and "cancelled" in cancel.text


async def test_the_service_reports_ready_and_healthy(edge: Edge):
    ready = await edge.client.get("/readyz")
    health = await edge.client.get("/healthz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert health.status_code == 200
