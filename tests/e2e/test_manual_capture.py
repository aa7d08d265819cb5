"""End to end with CAPTURE_MODE=manual: Checkout only authorises the card, the eSIM is delivered, and only
then is the payment captured, once, through real HTTP, real messages and real rows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
import stripe

from esim_sandbox.stack import Stack

pytestmark = [pytest.mark.broker, pytest.mark.db]

OFFER = "ESIM-GLOBAL-30D-5GB"
TIMEOUT_SECONDS = 30


@pytest.fixture(scope="module")
def stack(e2e_database_url: str, amqp_url: str, tmp_path_factory) -> Iterator[Stack]:
    running = Stack(
        database_url=e2e_database_url,
        amqp_url=amqp_url,
        workdir=tmp_path_factory.mktemp("stack-manual"),
        topology_prefix=f"e2e-{uuid.uuid4().hex[:8]}.",
        extra_env={"CAPTURE_MODE": "manual"},
    )
    try:
        running.start()
        yield running
    finally:
        running.stop(delete_topology=True)


async def wait_for_capture(stack: Stack, txn: str) -> asyncpg.Record:
    conn = await asyncpg.connect(stack.database_url)
    try:
        deadline = time.monotonic() + TIMEOUT_SECONDS
        order = None
        while time.monotonic() < deadline:
            order = await conn.fetchrow("SELECT * FROM esim_purchases WHERE transaction_id = $1", txn)
            if order is not None and (
                order["capture_status"] or order["status"] in ("refunded", "needs_attention")
            ):
                return order
            await asyncio.sleep(0.2)
        logs = "\n".join(f"--- {name}\n{p.log_tail(15)}" for name, p in stack.processes.items())
        raise AssertionError(
            f"order {txn} not captured after {TIMEOUT_SECONDS}s: {order and dict(order)}\n{logs}"
        )
    finally:
        await conn.close()


def sandbox_events(stack: Stack, event_type: str, intent_id: str) -> list[dict]:
    response = httpx.get(f"{stack.url('stripe')}/_sandbox/events", params={"type": event_type}, timeout=10)
    response.raise_for_status()
    found = []
    for summary in response.json()["data"]:
        obj = summary["event"]["data"]["object"]
        if intent_id in (obj.get("id"), obj.get("payment_intent")):
            found.append(obj)
    return found


async def test_an_authorised_order_is_captured_after_its_esim_is_emailed(stack):
    recipient = f"ada-{uuid.uuid4().hex[:6]}@example.com"
    created = httpx.post(
        f"{stack.url('webhook')}/api/create-checkout-session",
        json={"offerId": OFFER, "recipientEmail": recipient, "fullName": "Ada Lovelace"},
        timeout=30,
    )
    assert created.status_code == 200, created.text
    session = created.json()
    paid = httpx.post(
        f"{stack.url('stripe')}/_sandbox/checkout/sessions/{session['sessionId']}/pay", timeout=30
    )
    paid.raise_for_status()
    assert paid.json()["payment_intent"]["status"] == "requires_capture"  # authorised, not yet charged

    order = await wait_for_capture(stack, session["transactionId"])

    assert (order["status"], order["capture_method"], order["capture_status"]) == (
        "delivered",
        "manual",
        "captured",
    )
    assert order["captured_at"] >= order["emailed_at"]  # the money is taken only once the eSIM is out
    intent_id = order["stripe_payment_intent_id"]
    intent = stripe.StripeClient(
        "sk_test_e2e", base_addresses={"api": stack.url("stripe")}
    ).v1.payment_intents.retrieve(intent_id)
    assert (intent.status, intent.amount_received) == ("succeeded", order["price"])
    assert len(sandbox_events(stack, "charge.captured", intent_id)) == 1
    assert sandbox_events(stack, "charge.refunded", intent_id) == []
