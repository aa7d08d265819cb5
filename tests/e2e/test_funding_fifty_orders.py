"""Fifty orders at once against a Zendit wallet that covers ten, through the whole system as processes:
the wallet is never overdrawn, a few coalesced top-ups pay for the rest, every order is delivered once,
and every card ends cancelled."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from esim_sandbox.stack import Stack
from tests.e2e.test_paid_order_becomes_emailed_esim import emails_to, stripe_client, zendit_control

pytestmark = [pytest.mark.broker, pytest.mark.db]

OFFER = "ESIM-GLOBAL-30D-5GB"
COST = 2415  # the offer's Zendit cost, USD cents
ORDERS = 50
MIN_TOPUP = 20_000


@pytest.fixture(scope="module")
def stack(e2e_database_url: str, amqp_url: str, tmp_path_factory) -> Iterator[Stack]:
    running = Stack(
        database_url=e2e_database_url,
        amqp_url=amqp_url,
        workdir=tmp_path_factory.mktemp("stack"),
        topology_prefix=f"e2e-{uuid.uuid4().hex[:8]}.",
        extra_env={"ZENDIT_MIN_TOPUP": str(MIN_TOPUP)},
    )
    try:
        running.start()
        yield running
    finally:
        running.stop(delete_topology=True)


async def place_and_pay(client: httpx.AsyncClient, stack: Stack, recipient: str) -> str:
    response = await client.post(
        f"{stack.url('webhook')}/api/create-checkout-session",
        json={"offerId": OFFER, "recipientEmail": recipient, "fullName": "Ada Lovelace"},
    )
    assert response.status_code == 200, response.text
    session = response.json()
    paid = await client.post(f"{stack.url('stripe')}/_sandbox/checkout/sessions/{session['sessionId']}/pay")
    paid.raise_for_status()
    return str(session["transactionId"])


async def wait_until_final(conn: asyncpg.Connection, txns: list[str], within: float) -> list[asyncpg.Record]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        orders = await conn.fetch(
            "SELECT transaction_id, status FROM esim_purchases WHERE transaction_id = ANY($1::text[])", txns
        )
        if all(o["status"] in ("delivered", "refunded", "needs_attention") for o in orders):
            return orders
        if asyncio.get_running_loop().time() > deadline:
            waiting = sorted({o["status"] for o in orders if o["status"] != "delivered"})
            raise AssertionError(f"orders still in {waiting} after {within}s")
        await asyncio.sleep(0.5)


async def test_fifty_orders_against_a_wallet_for_ten_are_all_delivered_without_overdrawing_it(stack):
    start_balance = 10 * COST
    zendit_control(stack, "POST", "wallet", {"balance": start_balance})
    zendit_control(stack, "POST", "purchase_delay", {"seconds": 0.5})
    recipients = [f"burst-{i}-{uuid.uuid4().hex[:6]}@example.com" for i in range(ORDERS)]

    limits = httpx.Limits(max_connections=10)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        txns = await asyncio.gather(*(place_and_pay(client, stack, r) for r in recipients))

    conn = await asyncpg.connect(stack.database_url)
    try:
        orders = await wait_until_final(conn, list(txns), within=240)
        topups = await conn.fetch("SELECT id, amount, status FROM wallet_topups")
        stored_cards = await conn.fetch("SELECT card_id, active FROM issuing_cards")
    finally:
        await conn.close()

    assert {o["status"] for o in orders} == {"delivered"}
    state = zendit_control(stack, "GET", "state")
    # Never overdrawn: Zendit refuses a purchase it cannot hold the money for (INSUFFICIENT_FUNDS).
    ours = {tid: p for tid, p in state["purchases"].items() if tid.split("-r")[0] in set(txns)}
    assert [p["error"] for p in ours.values() if p["error"]] == []
    assert len(ours) == ORDERS and {p["status"] for p in ours.values()} == {"DONE"}
    # Coalesced: at most one top-up per ZENDIT_MIN_TOPUP of total shortfall, plus one.
    assert 1 <= len(topups) <= math.ceil((ORDERS * COST - start_balance) / MIN_TOPUP) + 1
    assert {t["status"] for t in topups} == {"succeeded"}
    assert state["wallet"]["balance"] == start_balance + sum(t["amount"] for t in topups) - ORDERS * COST
    assert state["wallet"]["balance"] >= 0 and state["wallet"]["holds"] == {}
    # Every card ended cancelled at Stripe and in our books, after exactly one charge.
    stripe = stripe_client(stack)
    authorizations = httpx.get(
        f"{stack.url('stripe')}/_sandbox/events", params={"type": "issuing_authorization.created"}, timeout=10
    ).json()["data"]
    for card in stored_cards:
        assert not card["active"]
        assert stripe.v1.issuing.cards.retrieve(card["card_id"]).status == "canceled"
        charges = [
            e["event"]["data"]["object"]
            for e in authorizations
            if e["event"]["data"]["object"]["card"]["id"] == card["card_id"]
        ]
        assert [a["approved"] for a in charges] == [True]
    assert len(stored_cards) == len(topups)
    for recipient in recipients:
        assert len(emails_to(stack, recipient)) == 1
