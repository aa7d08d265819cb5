"""The shop's side of the edge: checkout sessions priced on the server, and the public order status.

Real PostgreSQL, RabbitMQ, Stripe and Zendit emulators; the app runs in-process (`ctx.start()` and
httpx's ASGITransport). The fixtures here are shared with test_webhook_stripe_events.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from esim_common.money import Money
from esim_common.order_repository import Order, create_order, get_order
from esim_common.providers import stripe_gateway
from esim_common.service import ServiceContext
from esim_common.settings import CaptureMode, Settings
from esim_common.topology import delete
from esim_sandbox.serve import free_port
from webhook import idempotency_repository as keys
from webhook.checkout import FINGERPRINT_ENDPOINT, KEY_LEASE_SECONDS
from webhook.idempotency import request_fingerprint
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

    async def checkout(
        self, offer_id: str = US_OFFER, *, idempotency_key: str | bytes | None = None, **fields: Any
    ) -> httpx.Response:
        body = {
            "offerId": offer_id,
            "recipientEmail": "ada@example.com",
            "fullName": "Ada Lovelace",
            **fields,
        }
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        return await self.client.post("/api/create-checkout-session", json=body, headers=headers)

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


async def test_the_order_keeps_the_offers_data_and_validity_for_the_esim_email(edge: Edge, zendit_emulator):
    """Migration 0006: data in whole MB without float error (2.01 GB is 2010 MB, though 2.01 * 1000 is
    2009.9999999999998 in floats); an unlimited offer's dataGB 0 is no data amount at all."""
    zendit_emulator.state.offers["ESIM-FR-10D-3GB"]["dataGB"] = 2.01
    facts = {}
    for offer_id in (US_OFFER, "ESIM-FR-10D-3GB", "ESIM-JP-7D-UL"):
        order = await edge.order((await checkout_ok(edge, offer_id))["transactionId"])
        facts[offer_id] = (order.offer_data_mb, order.offer_data_unlimited, order.offer_duration_days)

    assert facts == {
        US_OFFER: (1000, False, 7),
        "ESIM-FR-10D-3GB": (2010, False, 10),
        "ESIM-JP-7D-UL": (None, True, 7),
    }


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


async def test_a_404_from_zendits_balance_is_a_misconfiguration_not_an_unknown_offer(
    edge: Edge, zendit_emulator, caplog
):
    # What a wrong ZENDIT_API_BASE looks like: the offer answers, our wallet's balance is "not found".
    zendit_emulator.control("POST", "faults", {"endpoint": "get_balance", "status": 404})
    with caplog.at_level("ERROR", logger="esim.webhook.checkout"):
        response = await edge.checkout()

    assert response.status_code == 502
    assert "misconfigured" in response.json()["detail"] and US_OFFER not in response.json()["detail"]
    assert [r.levelname for r in caplog.records if "wallet balance" in r.getMessage()] == ["ERROR"]
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0
    assert (await edge.checkout()).status_code == 200  # the fault was for one call: nothing cached


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


# ------------------------------------------------------------------------------- Idempotency-Key


# What `Edge.checkout()` sends, in its canonical (validated) form.
DEFAULT_REQUEST = {
    "offer_id": US_OFFER,
    "recipient_email": "ada@example.com",
    "full_name": "Ada Lovelace",
    "user_id": None,
}


def new_key() -> str:
    return f"checkout-{uuid.uuid4()}"


def unique_email() -> str:
    return f"ada-{uuid.uuid4().hex[:10]}@example.com"


def sessions_for(stripe_emulator, email: str) -> list[dict[str, Any]]:
    """Checkout Sessions the (module-wide) emulator holds for this test's unique email."""
    return stripe_emulator.state.find("checkout.session", customer_email=email)


async def key_rows(edge: Edge) -> list[dict[str, Any]]:
    return [dict(r) for r in await edge.ctx.pool.fetch("SELECT * FROM checkout_idempotency_keys")]


async def test_the_same_key_and_body_replay_the_first_answer_without_a_second_order_or_session(
    edge: Edge, stripe_emulator, zendit_emulator
):
    key, email = new_key(), unique_email()
    first = await edge.checkout(idempotency_key=key, recipientEmail=email)
    assert first.status_code == 200, first.text
    # The replay needs neither Zendit nor Stripe: it is answered from Postgres.
    zendit_emulator.control("POST", "faults", {"endpoint": "*", "status": 503, "count": 10})
    second = await edge.checkout(idempotency_key=key, recipientEmail=email)

    assert second.status_code == 200, second.text
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 1
    assert [s["id"] for s in sessions_for(stripe_emulator, email)] == [first.json()["sessionId"]]
    assert zendit_emulator.control("GET", "state")["faults"][0]["remaining"] == 10  # Zendit not asked


async def test_a_retry_that_serialises_the_same_request_differently_is_the_same_request(
    edge: Edge, stripe_emulator
):
    key, email = new_key(), unique_email()
    first = await edge.checkout(idempotency_key=key, recipientEmail=email, userId="u-1")
    retry = await edge.client.post(
        "/api/create-checkout-session",
        content=json.dumps(
            {
                "userId": "u-1",
                "fullName": "  Ada Lovelace ",
                "price": 1,  # ignored by the server, so not part of the request
                "recipientEmail": email,
                "offerId": US_OFFER,
            }
        ),
        headers={"Idempotency-Key": key, "Content-Type": "application/json"},
    )
    assert retry.status_code == 200 and retry.json() == first.json()
    assert len(sessions_for(stripe_emulator, email)) == 1


async def test_the_key_row_holds_the_request_fingerprint_and_the_answer(edge: Edge):
    key = new_key()
    created = await checkout_ok(edge, idempotency_key=key)
    [row] = await key_rows(edge)
    assert row["request_fingerprint"] == request_fingerprint(FINGERPRINT_ENDPOINT, DEFAULT_REQUEST)
    assert row["idempotency_key"] == key and row["transaction_id"] == created["transactionId"]
    assert (row["session_id"], row["session_url"]) == (created["sessionId"], created["url"])
    assert (row["amount"], row["currency"]) == (US_OFFER_PRICE, "USD")
    assert row["completed_at"] is not None


async def test_the_key_table_is_closed_to_supabase_api_roles(edge: Edge):
    assert await edge.ctx.pool.fetchval(
        "SELECT relrowsecurity FROM pg_class WHERE relname = 'checkout_idempotency_keys'"
    )


async def test_the_same_key_with_another_body_is_a_422_that_changes_nothing(edge: Edge, stripe_emulator):
    key, email = new_key(), unique_email()
    first = await checkout_ok(edge, idempotency_key=key, recipientEmail=email)
    other = await edge.checkout("ESIM-US-30D-10GB", idempotency_key=key, recipientEmail=email)

    assert other.status_code == 422
    assert "different request" in other.json()["detail"]
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 1
    assert len(sessions_for(stripe_emulator, email)) == 1
    [row] = await key_rows(edge)
    assert row["transaction_id"] == first["transactionId"]


async def test_five_concurrent_requests_with_one_key_make_one_order_and_one_session(
    edge: Edge, stripe_emulator, zendit_emulator
):
    key, email = new_key(), unique_email()
    # The first request holds its claim while Zendit answers slowly; the others arrive meanwhile.
    zendit_emulator.control("POST", "faults", {"endpoint": "get_offer", "status": None, "sleepSeconds": 0.5})
    answers = await asyncio.gather(
        *(edge.checkout(idempotency_key=key, recipientEmail=email) for _ in range(5))
    )

    ok = [a for a in answers if a.status_code == 200]
    busy = [a for a in answers if a.status_code == 409]
    assert len(ok) + len(busy) == 5 and len(ok) >= 1 and len(busy) >= 1
    assert all("still in progress" in a.json()["detail"] and a.headers["Retry-After"] == "1" for a in busy)
    later = await edge.checkout(idempotency_key=key, recipientEmail=email)  # what the shop's retry gets
    assert later.status_code == 200
    assert {a.json()["transactionId"] for a in [*ok, later]} == {later.json()["transactionId"]}
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 1
    assert len(sessions_for(stripe_emulator, email)) == 1


async def test_a_stripe_outage_does_not_burn_the_key_and_the_retry_succeeds(edge: Edge, stripe_emulator):
    key, email = new_key(), unique_email()
    ports = edge.app.state.ports
    working = ports.stripe
    dead = edge.settings.model_copy(
        update={"stripe_api_base": f"http://127.0.0.1:{free_port()}", "stripe_max_network_retries": 0}
    )
    ports.stripe = stripe_gateway(dead)
    try:
        failed = await edge.checkout(idempotency_key=key, recipientEmail=email)
    finally:
        await ports.stripe.aclose()
        ports.stripe = working
    assert failed.status_code == 503
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0
    assert await key_rows(edge) == []

    retried = await edge.checkout(idempotency_key=key, recipientEmail=email)
    assert retried.status_code == 200, retried.text
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 1
    assert len(sessions_for(stripe_emulator, email)) == 1


async def test_a_refused_checkout_releases_its_key_for_a_corrected_retry(edge: Edge, zendit_emulator):
    key = new_key()
    zendit_emulator.control("POST", f"offers/{US_OFFER}", {"enabled": False})
    refused = await edge.checkout(idempotency_key=key)
    assert refused.status_code == 404
    assert await key_rows(edge) == [] and await edge.count("SELECT count(*) FROM esim_purchases") == 0

    zendit_emulator.control("POST", f"offers/{US_OFFER}", {"enabled": True})
    assert (await edge.checkout(idempotency_key=key)).status_code == 200


@pytest.mark.parametrize(
    "key",
    ["", "k" * 256, "caf\u00e9".encode("latin-1"), "\u2603".encode(), "bell\x07"],
    ids=["empty", "256-chars", "latin-1", "utf-8", "control-char"],
)
async def test_a_malformed_key_is_a_400_that_creates_nothing(edge: Edge, stripe_emulator, key: str | bytes):
    email = unique_email()
    response = await edge.checkout(idempotency_key=key, recipientEmail=email)
    assert response.status_code == 400
    assert response.json()["detail"] == "Idempotency-Key must be 1 to 255 printable ASCII characters"
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 0
    assert await key_rows(edge) == []
    assert sessions_for(stripe_emulator, email) == []


async def test_a_bad_body_with_a_key_is_a_422_that_leaves_no_claim(edge: Edge):
    response = await edge.checkout(idempotency_key=new_key(), recipientEmail="not-an-email")
    assert response.status_code == 422
    assert await key_rows(edge) == [] and await edge.count("SELECT count(*) FROM esim_purchases") == 0


async def test_a_claim_abandoned_by_a_dead_process_is_taken_over_after_its_lease(edge: Edge):
    key = new_key()
    # What a crash between "order created" and "session recorded" leaves: a claim and a sessionless order.
    fingerprint = request_fingerprint(FINGERPRINT_ENDPOINT, DEFAULT_REQUEST)
    abandoned = "txn_" + "0" * 24
    await insert_sessionless_order(edge, abandoned)
    await edge.ctx.pool.execute(
        """INSERT INTO checkout_idempotency_keys (idempotency_key, request_fingerprint, transaction_id,
                                                  locked_at)
           VALUES ($1, $2, $3, now() - make_interval(secs => $4))""",
        key,
        fingerprint,
        abandoned,
        KEY_LEASE_SECONDS + 1,
    )
    created = await checkout_ok(edge, idempotency_key=key)

    assert created["transactionId"] != abandoned
    assert await edge.count("SELECT count(*) FROM esim_purchases WHERE transaction_id = $1", abandoned) == 0
    [row] = await key_rows(edge)
    assert row["transaction_id"] == created["transactionId"] and row["completed_at"] is not None


async def age_keys(edge: Edge, hours: int, *keys_to_age: str) -> None:
    await edge.ctx.pool.execute(
        "UPDATE checkout_idempotency_keys SET created_at = created_at - make_interval(hours => $1),"
        " locked_at = locked_at - make_interval(hours => $1), completed_at = completed_at"
        " - make_interval(hours => $1) WHERE idempotency_key = ANY($2::text[])",
        hours,
        list(keys_to_age),
    )


async def test_a_key_answered_more_than_a_day_ago_is_claimed_anew_not_replayed(edge: Edge, stripe_emulator):
    key, email = new_key(), unique_email()
    first = await checkout_ok(edge, idempotency_key=key, recipientEmail=email)
    await age_keys(edge, 25, key)  # its Checkout Session has expired by now (Stripe: 24 h)

    again = await edge.checkout(idempotency_key=key, recipientEmail=email)

    assert again.status_code == 200, again.text
    assert "Idempotent-Replayed" not in again.headers
    assert again.json()["sessionId"] != first["sessionId"]
    assert again.json()["transactionId"] != first["transactionId"]
    assert len(sessions_for(stripe_emulator, email)) == 2
    [row] = await key_rows(edge)
    assert row["transaction_id"] == again.json()["transactionId"] and row["completed_at"] is not None
    # The same key with another request is a new checkout too, once the old answer has expired.
    await age_keys(edge, 25, key)
    other = await edge.checkout("ESIM-US-30D-10GB", idempotency_key=key, recipientEmail=email)
    assert other.status_code == 200 and "Idempotent-Replayed" not in other.headers


async def test_claims_prune_keys_answered_more_than_a_day_ago(edge: Edge):
    old_keys = [new_key() for _ in range(3)]
    for key in old_keys:
        await checkout_ok(edge, idempotency_key=key, recipientEmail=unique_email())
    recent = new_key()
    await checkout_ok(edge, idempotency_key=recent)
    await age_keys(edge, 25, *old_keys)
    # An old claim that never completed is left alone: taking it over discards its order (see claim).
    stuck = new_key()
    await edge.ctx.pool.execute(
        "INSERT INTO checkout_idempotency_keys (idempotency_key, request_fingerprint, transaction_id,"
        " created_at, locked_at) VALUES ($1, $2, 'txn_stuck', now() - interval '25 hours',"
        " now() - interval '25 hours')",
        stuck,
        "b" * 64,
    )

    fresh = new_key()
    await checkout_ok(edge, idempotency_key=fresh, recipientEmail=unique_email())

    left = {row["idempotency_key"] for row in await key_rows(edge)}
    assert left == {recent, stuck, fresh}


async def test_a_claim_within_its_lease_is_in_progress_and_nothing_is_created(edge: Edge):
    key = new_key()
    running = "txn_" + "1" * 24
    await insert_sessionless_order(edge, running)
    fingerprint = request_fingerprint(FINGERPRINT_ENDPOINT, DEFAULT_REQUEST)
    await edge.ctx.pool.execute(
        "INSERT INTO checkout_idempotency_keys (idempotency_key, request_fingerprint, transaction_id) "
        "VALUES ($1, $2, $3)",
        key,
        fingerprint,
        running,
    )
    response = await edge.checkout(idempotency_key=key)
    assert response.status_code == 409
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 1  # the running attempt's own


async def test_an_attempt_whose_claim_was_taken_over_can_neither_complete_nor_release_it(edge: Edge):
    pool, key = edge.ctx.pool, new_key()
    assert await keys.claim(pool, key, "a" * 64, "txn_first", KEY_LEASE_SECONDS) == keys.Claimed("txn_first")
    await pool.execute(
        "UPDATE checkout_idempotency_keys SET locked_at = now() - interval '1 hour' "
        "WHERE idempotency_key = $1",
        key,
    )
    assert await keys.claim(pool, key, "a" * 64, "txn_second", KEY_LEASE_SECONDS) == keys.Claimed(
        "txn_second", replaced_transaction_id="txn_first"
    )
    answer = keys.Answer("txn_first", "cs_test_first", "https://checkout.example/first", 999, "USD")
    async with pool.acquire() as conn:
        with pytest.raises(keys.ClaimLost):
            await keys.complete(conn, key, answer)
    assert await keys.release(pool, key, "txn_first") is False
    [row] = await key_rows(edge)
    assert (row["transaction_id"], row["completed_at"]) == ("txn_second", None)


async def test_without_a_key_every_request_is_a_new_checkout(edge: Edge):
    first, second = await checkout_ok(edge), await checkout_ok(edge)
    assert first["transactionId"] != second["transactionId"]
    assert await edge.count("SELECT count(*) FROM esim_purchases") == 2
    assert await key_rows(edge) == []


async def insert_sessionless_order(edge: Edge, transaction_id: str) -> None:
    async with edge.ctx.pool.acquire() as conn:
        await create_order(
            conn,
            transaction_id=transaction_id,
            offer_id=US_OFFER,
            price=Money(US_OFFER_PRICE, "USD"),
            zendit_cost=Money(US_OFFER_COST, "USD"),
            recipient_email="ada@example.com",
            recipient_name="Ada Lovelace",
        )


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
