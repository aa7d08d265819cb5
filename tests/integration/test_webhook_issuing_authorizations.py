"""Stripe Issuing's real-time authorisation endpoint, asked by the Stripe emulator over real HTTP.

The webhook app is served by uvicorn on the test's own database; the Stripe emulator is pointed at its
`/api/webhooks/stripe/issuing-authorization` and sends `issuing_authorization.request` (signed with the
webhook secret, waiting 2 s, approving only on 200 + Stripe-Version + `{"approved": true}`) for every
authorisation that passes its own checks. Local state is written the way the funding service writes it:
an `issuing_cards` row for a card really created in the emulator, and its `wallet_topups` row.

The database outage tests put a small TCP proxy (`tests.fixtures.tcp_proxy`) between the app and Postgres
that can stall (every byte held: queries hang) or refuse (connections reset, new ones refused).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import stripe
from prometheus_client import REGISTRY
from pydantic import SecretStr

from esim_common.providers.stripe import BillingAddress, IssuedCard, StripeGateway
from esim_common.settings import Settings
from esim_sandbox.serve import LOOPBACK, ServerHandle, serve_in_thread
from esim_sandbox.stripe_emulator.webhooks import sign
from tests.fixtures.stripe_emulator import STRIPE_WEBHOOK_SECRET
from tests.fixtures.tcp_proxy import TcpProxy, through
from tests.integration import test_funding_service as funding_tests
from webhook.main import create_app

pytestmark = [pytest.mark.broker, pytest.mark.db]

PATH = "/api/webhooks/stripe/issuing-authorization"
TOPUP_AMOUNT = 5000  # USD cents: the card's spending limits are exactly this


# ------------------------------------------------------------------------------------------ harness


@dataclass
class Edge:
    url: str
    settings: Settings
    server: ServerHandle

    async def post(self, body: bytes, signature: str | None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            return await client.post(PATH, content=body, headers=headers)


def serve_edge(settings: Settings, stripe_emulator) -> Edge:
    server = serve_in_thread(create_app(settings))  # its lifespan opens the pool in the server's loop
    stripe_emulator.set_issuing_authorization_webhook(f"{server.url}{PATH}")
    return Edge(url=server.url, settings=settings, server=server)


def stop_edge(edge: Edge, stripe_emulator) -> None:
    stripe_emulator.set_issuing_authorization_webhook(None)
    edge.server.stop()


@pytest.fixture
def edge(service_settings, stripe_emulator) -> Iterator[Edge]:
    served = serve_edge(service_settings, stripe_emulator)
    yield served
    stop_edge(served, stripe_emulator)


async def platform_cardholder(gateway: StripeGateway) -> str:
    holder = await gateway.ensure_cardholder(
        name="Platform Cardholder",
        email="operator@example.com",
        billing_address=BillingAddress(
            line1="123 Main St", city="San Francisco", state="CA", postal_code="94111", country="US"
        ),
    )
    return holder.id


async def new_card(gateway: StripeGateway, topup_id: str) -> IssuedCard:
    """A single-use card made exactly as the funding service makes one."""
    return await gateway.create_single_use_card(
        topup_id=topup_id,
        cardholder_id=await platform_cardholder(gateway),
        amount=TOPUP_AMOUNT,
        currency="USD",
    )


async def record_topup(
    db: asyncpg.Pool,
    card: IssuedCard,
    topup_id: str,
    *,
    status: str = "submitted",
    currency: str = "USD",
    card_active: bool = True,
) -> None:
    """The rows the funding service has committed by the time it hands the card to the gateway."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO wallet_topups (id, amount, currency, status, card_id, gateway_reference)"
            " VALUES ($1, $2, $3, $4, $5, $1)",
            topup_id,
            TOPUP_AMOUNT,
            currency,
            status,
            card.id,
        )
        await conn.execute(
            "INSERT INTO issuing_cards (card_id, card_last4, card_exp, active, amount, currency, topup_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            card.id,
            card.last4,
            f"{card.exp_month:02d}/{card.exp_year}",
            card_active,
            TOPUP_AMOUNT,
            currency,
            topup_id,
        )


async def charge(stripe_client: stripe.StripeClient, card_id: str, amount: int = TOPUP_AMOUNT) -> Any:
    """A merchant authorises the card (Stripe's test helper: the emulator asks our endpoint first)."""
    return await stripe_client.v1.test_helpers.issuing.authorizations.create_async(
        params={"card": card_id, "amount": amount, "currency": "usd", "merchant_data": {"name": "Zendit"}}
    )


def decisions(decision: str, reason: str) -> float:
    labels = {"decision": decision, "reason": reason}
    return REGISTRY.get_sample_value("esim_issuing_authorizations_total", labels) or 0.0


def request_event(stripe_emulator, authorization_id: str) -> Any:
    """The emulator's record of the `issuing_authorization.request` it sent for this authorisation."""
    [record] = [
        r
        for r in stripe_emulator.events("issuing_authorization.request")
        if r.event["data"]["object"]["id"] == authorization_id
    ]
    return record


def signed_request(data_object: dict[str, Any], event_type: str = "issuing_authorization.request") -> bytes:
    return json.dumps(
        {
            "id": f"evt_test_{uuid.uuid4().hex[:16]}",
            "object": "event",
            "api_version": stripe.api_version,
            "created": int(time.time()),
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
            "data": {"object": data_object},
        },
        indent=2,
    ).encode()


def authorization_object(card_id: str, amount: int = TOPUP_AMOUNT, currency: str = "usd") -> dict[str, Any]:
    return {
        "id": f"iauth_{uuid.uuid4().hex[:16]}",
        "object": "issuing.authorization",
        "amount": 0,
        "approved": False,
        "card": {"id": card_id, "object": "issuing.card", "metadata": {}},
        "currency": currency,
        "merchant_data": {"name": "Zendit"},
        "metadata": {},
        "pending_request": {
            "amount": amount,
            "currency": currency,
            "merchant_amount": amount,
            "merchant_currency": currency,
        },
        "status": "pending",
    }


# ------------------------------------------------------------------------------- approve / decline


async def test_the_gateway_charging_a_submitted_topup_card_for_its_exact_amount_is_approved(
    edge: Edge, db, stripe_gateway, stripe_client, stripe_emulator
):
    topup_id = f"tu_{uuid.uuid4().hex[:12]}"
    card = await new_card(stripe_gateway, topup_id)
    await record_topup(db, card, topup_id)
    before = decisions("approved", "topup_match")

    started = time.monotonic()
    auth = await charge(stripe_client, card.id)
    elapsed = time.monotonic() - started

    assert auth.approved is True and auth.status == "pending"
    assert auth.request_history[-1].reason == "webhook_approved"
    record = request_event(stripe_emulator, auth.id)
    assert [a.status_code for a in record.attempts] == [200]
    assert decisions("approved", "topup_match") == before + 1
    assert elapsed < 2.0
    # Nothing was written: the endpoint only reads.
    assert await db.fetchval("SELECT status FROM wallet_topups WHERE id = $1", topup_id) == "submitted"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("smaller_amount", "amount_mismatch"),  # a larger one never reaches us: the spending limit stops it
        ("other_currency", "currency_mismatch"),
        ("unknown_card", "unknown_card"),
        ("topup_succeeded", "topup_closed"),
        ("topup_declined", "topup_closed"),
        ("card_cancelled_by_us", "card_inactive"),
        ("card_not_handed_over", "topup_not_submitted"),
    ],
)
async def test_any_other_charge_is_declined_by_our_endpoint(
    case: str, reason: str, edge: Edge, db, stripe_gateway, stripe_client, stripe_emulator
):
    topup_id = f"tu_{uuid.uuid4().hex[:12]}"
    card = await new_card(stripe_gateway, topup_id)
    amount = TOPUP_AMOUNT - 1 if case == "smaller_amount" else TOPUP_AMOUNT
    if case != "unknown_card":
        await record_topup(
            db,
            card,
            topup_id,
            # The emulator only authorises in the card's currency, so the mismatch is on our side.
            currency="EUR" if case == "other_currency" else "USD",
            status={
                "topup_succeeded": "succeeded",
                "topup_declined": "declined",
                "card_not_handed_over": "card_created",
            }.get(case, "submitted"),
            card_active=case != "card_cancelled_by_us",
        )
    before = decisions("declined", reason)

    auth = await charge(stripe_client, card.id, amount)

    assert auth.approved is False and auth.status == "closed"
    assert auth.request_history[-1].reason == "webhook_declined"  # we answered, in time, "no"
    assert [a.status_code for a in request_event(stripe_emulator, auth.id).attempts] == [200]
    assert decisions("declined", reason) == before + 1


async def test_the_answer_has_the_shape_stripe_requires(edge: Edge, db, stripe_gateway):
    topup_id = f"tu_{uuid.uuid4().hex[:12]}"
    card = await new_card(stripe_gateway, topup_id)
    await record_topup(db, card, topup_id)

    for amount, approved, reason in ((TOPUP_AMOUNT, True, "topup_match"), (1, False, "amount_mismatch")):
        body = signed_request(authorization_object(card.id, amount))
        response = await edge.post(body, sign(body, STRIPE_WEBHOOK_SECRET))

        assert response.status_code == 200
        assert response.headers["Stripe-Version"] == stripe.api_version
        assert response.headers["Content-Type"] == "application/json"
        assert response.json() == {"approved": approved, "metadata": {"esim_decision": reason}}


async def test_a_request_without_a_pending_amount_is_declined(edge: Edge):
    data = authorization_object("ic_whatever") | {"pending_request": None}
    body = signed_request(data)
    response = await edge.post(body, sign(body, STRIPE_WEBHOOK_SECRET))
    assert response.status_code == 200
    assert response.json() == {"approved": False, "metadata": {"esim_decision": "malformed_request"}}


# ------------------------------------------------------------------------------------ refusals (4xx)


async def test_a_bad_signature_is_a_400_and_decides_nothing(edge: Edge, db, stripe_gateway):
    topup_id = f"tu_{uuid.uuid4().hex[:12]}"
    card = await new_card(stripe_gateway, topup_id)
    await record_topup(db, card, topup_id)  # a charge that would be approved if it were Stripe asking
    body = signed_request(authorization_object(card.id))
    before = decisions("refused", "bad_signature")
    approved_before = decisions("approved", "topup_match")

    forged = await edge.post(body, sign(body, "whsec_not_ours"))
    unsigned = await edge.post(body, None)
    tampered = await edge.post(
        body.replace(b'"amount": 5000', b'"amount": 5001'), sign(body, STRIPE_WEBHOOK_SECRET)
    )

    assert [r.status_code for r in (forged, unsigned, tampered)] == [400, 400, 400]
    assert all("approved" not in r.json() for r in (forged, unsigned, tampered))
    assert decisions("refused", "bad_signature") == before + 3
    assert decisions("approved", "topup_match") == approved_before


async def test_stripe_signing_with_a_secret_we_do_not_know_gets_the_charge_declined(
    edge: Edge, db, stripe_gateway, stripe_client, stripe_emulator
):
    topup_id = f"tu_{uuid.uuid4().hex[:12]}"
    card = await new_card(stripe_gateway, topup_id)
    await record_topup(db, card, topup_id)
    stripe_emulator.set_issuing_authorization_secret("whsec_rotated_without_telling_us")
    try:
        auth = await charge(stripe_client, card.id)
    finally:
        stripe_emulator.set_issuing_authorization_secret(None)

    assert auth.approved is False
    assert auth.request_history[-1].reason == "webhook_error"  # our 400: Stripe applies its default
    assert [a.status_code for a in request_event(stripe_emulator, auth.id).attempts] == [400]


# ------------------------------------------------------------------- the endpoint's own signing secret

ISSUING_SECRET = "whsec_issuing_realtime_endpoint"


@pytest.fixture
def issuing_secret_edge(service_settings, stripe_emulator) -> Iterator[Edge]:
    """The app configured as in production: the real-time endpoint has a signing secret of its own."""
    settings = service_settings.model_copy(
        update={"stripe_issuing_webhook_secrets": [SecretStr(ISSUING_SECRET)]}
    )
    served = serve_edge(settings, stripe_emulator)
    yield served
    stop_edge(served, stripe_emulator)


async def test_with_its_own_secret_configured_the_endpoint_accepts_that_secret_and_no_other(
    issuing_secret_edge: Edge, db, stripe_gateway
):
    edge = issuing_secret_edge
    topup_id = f"tu_{uuid.uuid4().hex[:12]}"
    card = await new_card(stripe_gateway, topup_id)
    await record_topup(db, card, topup_id)
    body = signed_request(authorization_object(card.id))

    with_own_secret = await edge.post(body, sign(body, ISSUING_SECRET))
    with_webhook_secret = await edge.post(body, sign(body, STRIPE_WEBHOOK_SECRET))
    async with httpx.AsyncClient(base_url=edge.url) as client:  # and the ordinary endpoint keeps its own
        ordinary = await client.post(
            "/api/webhooks/stripe", content=body, headers={"Stripe-Signature": sign(body, ISSUING_SECRET)}
        )

    assert with_own_secret.status_code == 200
    assert with_own_secret.json() == {"approved": True, "metadata": {"esim_decision": "topup_match"}}
    assert with_webhook_secret.status_code == 400 and "approved" not in with_webhook_secret.json()
    assert ordinary.status_code == 400
    assert await db.fetchval("SELECT count(*) FROM stripe_events") == 0


async def test_stripe_signing_with_the_endpoints_own_secret_gets_the_topup_charge_approved(
    issuing_secret_edge: Edge, db, stripe_gateway, stripe_client, stripe_emulator
):
    approved_id, refused_id = f"tu_{uuid.uuid4().hex[:12]}", f"tu_{uuid.uuid4().hex[:12]}"
    approved_card = await new_card(stripe_gateway, approved_id)
    refused_card = await new_card(stripe_gateway, refused_id)
    await record_topup(db, approved_card, approved_id)
    await record_topup(db, refused_card, refused_id)

    stripe_emulator.set_issuing_authorization_secret(ISSUING_SECRET)  # as the Issuing settings sign
    try:
        approved = await charge(stripe_client, approved_card.id)
    finally:
        stripe_emulator.set_issuing_authorization_secret(None)  # back to the webhook endpoint's secret
    refused = await charge(stripe_client, refused_card.id)

    assert approved.approved is True and approved.request_history[-1].reason == "webhook_approved"
    assert refused.approved is False and refused.request_history[-1].reason == "webhook_error"
    assert [a.status_code for a in request_event(stripe_emulator, refused.id).attempts] == [400]


@pytest.mark.parametrize("configured", [None, []], ids=["unset", "empty"])
async def test_without_its_own_secret_the_endpoint_verifies_with_the_webhook_secrets(
    configured, service_settings, stripe_emulator, db, stripe_gateway
):
    settings = service_settings.model_copy(update={"stripe_issuing_webhook_secrets": configured})
    edge = await asyncio.to_thread(serve_edge, settings, stripe_emulator)
    try:
        topup_id = f"tu_{uuid.uuid4().hex[:12]}"
        card = await new_card(stripe_gateway, topup_id)
        await record_topup(db, card, topup_id)
        body = signed_request(authorization_object(card.id))
        with_webhook_secret = await edge.post(body, sign(body, STRIPE_WEBHOOK_SECRET))
        with_other_secret = await edge.post(body, sign(body, ISSUING_SECRET))
    finally:
        await asyncio.to_thread(stop_edge, edge, stripe_emulator)

    assert with_webhook_secret.status_code == 200 and with_webhook_secret.json()["approved"] is True
    assert with_other_secret.status_code == 400


async def test_an_oversized_body_is_a_413(edge: Edge):
    body = b'{"padding": "' + b"x" * (64 * 1024) + b'"}'
    response = await edge.post(body, sign(body, STRIPE_WEBHOOK_SECRET))
    assert response.status_code == 413


async def test_another_event_type_is_refused_so_stripe_keeps_retrying_it(edge: Edge, db):
    body = signed_request(
        {"id": "cs_test_1", "object": "checkout.session", "client_reference_id": "txn_x", "metadata": {}},
        "checkout.session.completed",
    )
    before = decisions("refused", "wrong_event_type")

    response = await edge.post(body, sign(body, STRIPE_WEBHOOK_SECRET))

    assert response.status_code == 400
    assert decisions("refused", "wrong_event_type") == before + 1
    assert await db.fetchval("SELECT count(*) FROM stripe_events") == 0


async def test_the_ordinary_webhook_endpoint_acknowledges_issuing_authorization_events_and_does_nothing(
    edge: Edge, db, stripe_gateway
):
    topup_id = f"tu_{uuid.uuid4().hex[:12]}"
    card = await new_card(stripe_gateway, topup_id)
    await record_topup(db, card, topup_id)
    answers = []
    for event_type in ("issuing_authorization.request", "issuing_authorization.created"):
        body = signed_request(authorization_object(card.id), event_type)
        async with httpx.AsyncClient(base_url=edge.url) as client:
            answers.append(
                await client.post(
                    "/api/webhooks/stripe",
                    content=body,
                    headers={"Stripe-Signature": sign(body, STRIPE_WEBHOOK_SECRET)},
                )
            )

    assert [a.status_code for a in answers] == [200, 200]
    assert all("approved" not in a.json() for a in answers)  # it never answers an authorisation
    rows = await db.fetch("SELECT type, outcome, transaction_id FROM stripe_events ORDER BY type")
    assert [tuple(r) for r in rows] == [
        ("issuing_authorization.created", "not_ours", None),
        ("issuing_authorization.request", "not_ours", None),
    ]
    assert await db.fetchval("SELECT status FROM wallet_topups WHERE id = $1", topup_id) == "submitted"
    assert await db.fetchval("SELECT count(*) FROM esim_purchases") == 0


# ------------------------------------------------------------------------------ the database is down


@pytest.fixture
async def proxied_edge(service_settings, stripe_emulator) -> AsyncIterator[tuple[Edge, TcpProxy]]:
    """The app with its database behind a TcpProxy (the test's `db` pool goes straight to Postgres)."""
    parts = urlsplit(service_settings.database_url)
    proxy = TcpProxy(parts.hostname or LOOPBACK, parts.port or 5432)
    settings = service_settings.model_copy(
        update={"database_url": through(proxy, service_settings.database_url)}
    )
    served = await asyncio.to_thread(serve_edge, settings, stripe_emulator)
    try:
        yield served, proxy
    finally:
        proxy.flow()  # let the abandoned queries finish so the pool closes cleanly
        await asyncio.to_thread(stop_edge, served, stripe_emulator)
        proxy.close()


async def test_a_database_that_hangs_gets_the_charge_declined_within_two_seconds(
    proxied_edge, db, stripe_gateway, stripe_client, stripe_emulator
):
    _, proxy = proxied_edge
    topup_id = f"tu_{uuid.uuid4().hex[:12]}"
    card = await new_card(stripe_gateway, topup_id)
    await record_topup(db, card, topup_id)  # it would be approved, could we read it
    before = decisions("declined", "lookup_timeout")
    proxy.stall()

    started = time.monotonic()
    auth = await charge(stripe_client, card.id)
    elapsed = time.monotonic() - started

    assert auth.approved is False
    # We answered (declined) before Stripe gave up waiting: not `webhook_timeout`.
    assert auth.request_history[-1].reason == "webhook_declined"
    assert [a.status_code for a in request_event(stripe_emulator, auth.id).attempts] == [200]
    # The whole test-helper round trip; the reason above is the proof that our answer took < 2 s.
    assert 1.0 < elapsed < 2.5
    assert decisions("declined", "lookup_timeout") == before + 1

    proxy.flow()  # the database is back: the next charge is decided on its merits again
    second_id = f"tu_{uuid.uuid4().hex[:12]}"
    second = await new_card(stripe_gateway, second_id)
    await record_topup(db, second, second_id)
    assert (await charge(stripe_client, second.id)).approved is True


async def test_a_database_that_refuses_connections_gets_the_charge_declined_at_once(
    proxied_edge, db, stripe_gateway, stripe_client, stripe_emulator
):
    _, proxy = proxied_edge
    topup_id = f"tu_{uuid.uuid4().hex[:12]}"
    card = await new_card(stripe_gateway, topup_id)
    await record_topup(db, card, topup_id)
    before = decisions("declined", "lookup_failed")
    proxy.refuse()

    started = time.monotonic()
    auth = await charge(stripe_client, card.id)
    elapsed = time.monotonic() - started

    assert auth.approved is False and auth.request_history[-1].reason == "webhook_declined"
    assert elapsed < 2.0
    assert decisions("declined", "lookup_failed") == before + 1


# --------------------------------------------------------------------- the funding service's top-up


async def test_a_wallet_topup_by_the_funding_service_passes_the_real_time_endpoint(
    edge: Edge, service_settings, amqp_url, stripe_gateway, stripe_emulator, zendit_emulator
):
    before = decisions("approved", "topup_match")
    async with funding_tests.running(service_settings, amqp_url) as funding:
        funding_tests.set_wallet(zendit_emulator, 1_000)  # short: one 50.00 top-up with a card
        event = await funding_tests.pay_for_order(funding.pool, stripe_gateway, stripe_emulator)
        topup_id = f"tu_{event.transaction_id}"

        await funding.deliver(event)
        await funding.wait_status(event.transaction_id, funding_tests.S.FUNDED)

        [card] = funding_tests.cards_for(stripe_emulator, topup_id)
        [auth] = funding_tests.approved_charges(stripe_emulator, card["id"])
        topup = await funding.pool.fetchrow(
            "SELECT status, amount FROM wallet_topups WHERE id = $1", topup_id
        )

    assert auth["request_history"][-1]["reason"] == "webhook_approved"  # asked, and we said yes
    assert [a.status_code for a in request_event(stripe_emulator, auth["id"]).attempts] == [200]
    assert dict(topup) == {"status": "succeeded", "amount": auth["request_history"][-1]["amount"]}
    assert decisions("approved", "topup_match") == before + 1
    assert funding_tests.wallet(zendit_emulator)["wallet"]["balance"] == 1_000 + funding_tests.MIN_TOPUP
