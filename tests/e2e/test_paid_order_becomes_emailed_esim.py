"""End to end, through real HTTP, real RabbitMQ messages and real Postgres rows: a paid order becomes an
emailed eSIM, duplicates change nothing, bad webhooks are refused, failures are refunded once."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import json
import time
import uuid

import asyncpg
import httpx
import PIL.Image
import pytest
import stripe
import zxingcpp

from esim_common.lpa import lpa_string
from esim_sandbox.stack import Stack
from esim_sandbox.stripe_emulator.webhooks import sign

pytestmark = [pytest.mark.broker, pytest.mark.db]

OFFER = "ESIM-GLOBAL-30D-5GB"
FINAL = {"delivered", "refunded", "needs_attention"}
ORDER_TIMEOUT_SECONDS = 30


def checkout(stack: Stack, email_address: str, offer: str = OFFER) -> dict:
    response = httpx.post(
        f"{stack.url('webhook')}/api/create-checkout-session",
        json={"offerId": offer, "recipientEmail": email_address, "fullName": "Ada Lovelace"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def pay(stack: Stack, session_id: str) -> dict:
    response = httpx.post(f"{stack.url('stripe')}/_sandbox/checkout/sessions/{session_id}/pay", timeout=30)
    response.raise_for_status()
    return response.json()


async def wait_for_final(stack: Stack, txn: str, timeout: float = ORDER_TIMEOUT_SECONDS) -> asyncpg.Record:
    conn = await asyncpg.connect(stack.database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            order = await conn.fetchrow("SELECT * FROM esim_purchases WHERE transaction_id = $1", txn)
            if order is not None and order["status"] in FINAL:
                return order
            await asyncio.sleep(0.2)
        logs = "\n".join(f"--- {name}\n{p.log_tail(15)}" for name, p in stack.processes.items())
        raise AssertionError(f"order {txn} is {order and order['status']} after {timeout}s\n{logs}")
    finally:
        await conn.close()


def zendit(stack: Stack, path: str, **kwargs) -> httpx.Response:
    return httpx.get(
        f"{stack.url('zendit')}/v1/{path}",
        headers={"Authorization": "Bearer sand_test_key"},
        timeout=10,
        **kwargs,
    )


def zendit_control(stack: Stack, method: str, path: str, body: dict | None = None) -> dict:
    response = httpx.request(method, f"{stack.url('zendit')}/_sandbox/{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json() if response.content else {}


def stripe_client(stack: Stack) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_e2e", base_addresses={"api": stack.url("stripe")})


def emails_to(stack: Stack, recipient: str) -> list[email.message.EmailMessage]:
    found = []
    for path in sorted(stack.mail_dir.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if recipient in str(message["To"]):
            found.append(message)
    return found


def purchases_of(stack: Stack, txn: str) -> dict:
    return {
        tid: p for tid, p in zendit_control(stack, "GET", "state")["purchases"].items() if tid.startswith(txn)
    }


async def test_a_paid_order_is_delivered_with_one_card_one_topup_one_purchase_and_a_qr_that_decodes(stack):
    recipient = f"ada-{uuid.uuid4().hex[:6]}@example.com"
    session = checkout(stack, recipient)
    pay(stack, session["sessionId"])
    order = await wait_for_final(stack, session["transactionId"])

    assert order["status"] == "delivered", order["failure_reason"]
    # The sandbox wallet starts empty, so this first order needed exactly one single-use card top-up.
    cards = stripe_client(stack).v1.issuing.cards.list().data
    assert len(cards) == 1 and cards[0].status == "canceled"
    topups = zendit_control(stack, "GET", "state")["topups"]
    assert len(topups) == 1 and next(iter(topups.values()))["status"] == "SUCCEEDED"
    assert list(purchases_of(stack, session["transactionId"])) == [order["zendit_transaction_id"]]

    purchase = zendit(stack, f"esim/purchases/{order['zendit_transaction_id']}").json()
    expected_lpa = lpa_string(
        purchase["confirmation"]["smdpAddress"], purchase["confirmation"]["activationCode"]
    )
    [message] = emails_to(stack, recipient)
    images = [part for part in message.walk() if part.get_content_type() == "image/png"]
    assert images, "the email carries the QR code"
    decoded = {
        r.text
        for part in images
        for r in zxingcpp.read_barcodes(PIL.Image.open(io.BytesIO(part.get_content())))
    }
    assert decoded == {expected_lpa}
    assert order["paid_at"] < order["funded_at"] < order["qr_stored_at"] <= order["emailed_at"]


async def test_duplicate_and_reordered_payment_events_buy_one_esim_and_send_one_email(stack):
    recipient = f"dup-{uuid.uuid4().hex[:6]}@example.com"
    session = checkout(stack, recipient)
    paid = pay(stack, session["sessionId"])
    # Stripe delivers at least once: send every event of this payment again, newest first.
    client = stripe_client(stack)
    for event_id in reversed(paid["event_ids"]):
        body = json.dumps(client.v1.events.retrieve(event_id).to_dict()).encode()
        for _ in range(2):
            response = httpx.post(
                f"{stack.url('webhook')}/api/webhooks/stripe",
                content=body,
                headers={"Stripe-Signature": sign(body, "whsec_sandbox"), "Content-Type": "application/json"},
            )
            assert response.status_code == 200
    order = await wait_for_final(stack, session["transactionId"])
    await asyncio.sleep(1.0)  # let any duplicate that was going to happen, happen

    assert order["status"] == "delivered"
    assert len(purchases_of(stack, session["transactionId"])) == 1
    assert len(emails_to(stack, recipient)) == 1


async def test_a_webhook_with_a_bad_signature_is_refused_and_leaves_nothing_behind(stack):
    recipient = f"bad-{uuid.uuid4().hex[:6]}@example.com"
    session = checkout(stack, recipient)
    event_id = f"evt_forged_{uuid.uuid4().hex[:8]}"
    forged = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "checkout.session.completed",
            "data": {"object": {"id": session["sessionId"], "client_reference_id": session["transactionId"]}},
        }
    ).encode()
    response = httpx.post(
        f"{stack.url('webhook')}/api/webhooks/stripe",
        content=forged,
        headers={"Stripe-Signature": sign(forged, "whsec_not_ours")},
    )
    assert response.status_code == 400
    conn = await asyncpg.connect(stack.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM stripe_events WHERE event_id = $1", event_id) == 0
        status = await conn.fetchval(
            "SELECT status FROM esim_purchases WHERE transaction_id = $1", session["transactionId"]
        )
    finally:
        await conn.close()
    assert status == "pending_payment"


async def test_a_topup_declined_by_the_gateway_refunds_the_order_once_and_tells_the_customer(stack):
    zendit_control(stack, "POST", "wallet", {"balance": 0})
    zendit_control(stack, "POST", "faults", {"endpoint": "wallet_topup", "count": 1, "status": 402})
    recipient = f"declined-{uuid.uuid4().hex[:6]}@example.com"
    session = checkout(stack, recipient)
    paid = pay(stack, session["sessionId"])
    order = await wait_for_final(stack, session["transactionId"])
    zendit_control(stack, "DELETE", "faults")

    assert order["status"] == "refunded"
    refunds = stripe_client(stack).v1.refunds.list({"payment_intent": paid["payment_intent"]["id"]}).data
    assert len(refunds) == 1 and refunds[0].amount == order["price"]
    assert purchases_of(stack, session["transactionId"]) == {}
    await asyncio.sleep(1.0)
    assert len(emails_to(stack, recipient)) == 1


async def test_a_zendit_purchase_that_fails_is_refunded_once_and_the_customer_told(stack):
    zendit_control(stack, "POST", "wallet", {"balance": 1_000_000})
    zendit_control(stack, "POST", "purchase_failures", {"code": "PRODUCT_UNAVAILABLE", "count": 1})
    recipient = f"failed-{uuid.uuid4().hex[:6]}@example.com"
    session = checkout(stack, recipient)
    paid = pay(stack, session["sessionId"])
    order = await wait_for_final(stack, session["transactionId"])

    assert order["status"] == "refunded"
    conn = await asyncpg.connect(stack.database_url)
    try:
        timeline = [
            r["to_status"]
            for r in await conn.fetch(
                "SELECT to_status FROM order_transitions WHERE transaction_id = $1 ORDER BY id",
                session["transactionId"],
            )
        ]
    finally:
        await conn.close()
    assert "purchase_failed" in timeline
    refunds = stripe_client(stack).v1.refunds.list({"payment_intent": paid["payment_intent"]["id"]}).data
    assert len(refunds) == 1
    await asyncio.sleep(1.0)
    assert len(emails_to(stack, recipient)) == 1


async def test_killing_and_restarting_a_service_mid_run_loses_no_order(stack):
    zendit_control(stack, "POST", "wallet", {"balance": 1_000_000})
    zendit_control(stack, "POST", "purchase_delay", {"seconds": 2.0})
    recipients = [f"crash-{i}-{uuid.uuid4().hex[:6]}@example.com" for i in range(3)]
    sessions = [checkout(stack, r) for r in recipients]
    for session in sessions:
        pay(stack, session["sessionId"])
    await asyncio.sleep(0.5)
    stack.processes["provisioning"].kill()  # SIGKILL while purchases are in flight
    await asyncio.sleep(1.0)
    stack.processes["provisioning"].start()
    stack.wait_healthy("provisioning")
    orders = [await wait_for_final(stack, s["transactionId"], timeout=60) for s in sessions]
    zendit_control(stack, "POST", "purchase_delay", {"seconds": 0.5})

    assert [o["status"] for o in orders] == ["delivered"] * 3
    for session, recipient in zip(sessions, recipients, strict=True):
        assert len(purchases_of(stack, session["transactionId"])) == 1
        assert len(emails_to(stack, recipient)) == 1
