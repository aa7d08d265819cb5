"""Stripe webhooks at the edge: verified, recorded, applied once per order, announced exactly once.

The Stripe emulator makes the real events (Checkout pay → payment_intent.* and checkout.session.*);
most tests deliver them through ASGITransport, signed the way Stripe signs them, so that order,
duplicates and tampering are under the test's control. The last test lets the emulator deliver over
real HTTP to the app served by uvicorn.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import httpx
import pytest
from pydantic import SecretStr

from esim_common.db import create_pool
from esim_common.settings import CaptureMode
from esim_common.topology import declare_from_url, delete
from esim_sandbox.serve import serve_in_thread
from esim_sandbox.stripe_emulator.webhooks import sign
from tests.integration import test_webhook_checkout as shop
from tests.integration.test_webhook_checkout import US_OFFER, US_OFFER_PRICE, Edge, EdgeFactory, checkout_ok
from webhook import stripe_webhooks
from webhook.main import create_app
from webhook.stripe_webhooks import MAX_BODY_BYTES

pytestmark = [pytest.mark.broker, pytest.mark.db]

# The fixtures of test_webhook_checkout.py, shared: the app in-process, and a factory for variants.
edge = shop.edge
make_edge = shop.make_edge

SECRET = "whsec_sandbox"  # what both the emulator and service_settings use
WEBHOOK = "/api/webhooks/stripe"
COMPLETED = "checkout.session.completed"
SUCCEEDED = "payment_intent.succeeded"


# ------------------------------------------------------------------------------------------ helpers


def emulator_event(stripe_emulator, event_id: str) -> dict[str, Any]:
    """A private copy of an event the emulator created (tests may alter it before delivering)."""
    for record in stripe_emulator.events():
        if record.event["id"] == event_id:
            return copy.deepcopy(record.event)
    raise AssertionError(f"the emulator made no event {event_id}")


def synthetic_event(event_type: str, data_object: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"evt_test_{uuid.uuid4().hex[:16]}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
        "data": {"object": data_object},
    }


def variant(event: dict[str, Any], event_type: str, **object_fields: Any) -> dict[str, Any]:
    """Another event about the same object (new id, other type, some fields changed)."""
    return synthetic_event(event_type, {**copy.deepcopy(event["data"]["object"]), **object_fields})


async def deliver(
    app: Edge, event: dict[str, Any] | bytes, *, secret: str = SECRET, signature: str | None = None
) -> httpx.Response:
    """POST like Stripe: raw JSON signed with `secret` (or the given `signature`; "" sends none)."""
    body = event if isinstance(event, bytes) else json.dumps(event, indent=2).encode()
    headers = {"Content-Type": "application/json"}
    if signature != "":
        headers["Stripe-Signature"] = signature or sign(body, secret)
    return await app.client.post(WEBHOOK, content=body, headers=headers)


async def pay(app: Edge, stripe_emulator) -> tuple[str, dict[str, dict[str, Any]]]:
    """Check out and pay: the transaction id and the emulator's events by type (not yet delivered)."""
    created = await checkout_ok(app)
    paid = stripe_emulator.pay(created["sessionId"])
    events = [emulator_event(stripe_emulator, event_id) for event_id in paid["event_ids"]]
    return created["transactionId"], {event["type"]: event for event in events}


async def take_messages(amqp_url: str, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Everything waiting in `queue_name` (nothing consumes it in these tests)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=False)
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages


async def order_paid_messages(app: Edge) -> list[dict[str, Any]]:
    messages = await take_messages(app.settings.amqp_url, app.queue_name("funding.order-paid"))
    return [json.loads(message.body) | {"_message_id": message.message_id} for message in messages]


async def stripe_event_rows(app: Edge) -> list[dict[str, Any]]:
    rows = await app.ctx.pool.fetch("SELECT * FROM stripe_events ORDER BY received_at")
    return [dict(row) for row in rows]


# ------------------------------------------------------------------------------------ the happy path


async def test_a_paid_checkout_moves_the_order_to_paid_and_publishes_order_paid(edge: Edge, stripe_emulator):
    txn, events = await pay(edge, stripe_emulator)

    response = await deliver(edge, events[COMPLETED])

    assert response.status_code == 200
    order = await edge.order(txn)
    assert order.status == "paid" and order.paid_at is not None
    intent_id = events[SUCCEEDED]["data"]["object"]["id"]
    assert order.stripe_payment_intent_id == intent_id
    [message] = await order_paid_messages(edge)
    assert message["transaction_id"] == txn and message["offer_id"] == US_OFFER
    assert message["price"] == {"amount": US_OFFER_PRICE, "currency": "USD"}
    assert message["payment_intent_id"] == intent_id
    assert message["_message_id"] == message["event_id"]
    [row] = await stripe_event_rows(edge)
    assert (row["event_id"], row["type"], row["transaction_id"], row["outcome"]) == (
        events[COMPLETED]["id"],
        COMPLETED,
        txn,
        "order_paid",
    )


@pytest.mark.parametrize("first,second", [(COMPLETED, SUCCEEDED), (SUCCEEDED, COMPLETED)])
async def test_both_payment_events_each_delivered_twice_publish_exactly_one_order_paid(
    edge: Edge, stripe_emulator, first: str, second: str
):
    txn, events = await pay(edge, stripe_emulator)

    answers = [await deliver(edge, events[kind]) for kind in (first, first, second, second)]

    assert [answer.status_code for answer in answers] == [200, 200, 200, 200]
    assert (await edge.order(txn)).status == "paid"
    assert len(await order_paid_messages(edge)) == 1
    outcomes = {row["type"]: row["outcome"] for row in await stripe_event_rows(edge)}
    assert outcomes == {first: "order_paid", second: "already_paid"}
    transitions = await edge.count(
        "SELECT count(*) FROM order_transitions WHERE transaction_id = $1 AND to_status = 'paid'", txn
    )
    assert transitions == 1


async def test_payment_events_arriving_at_the_same_moment_publish_exactly_one_order_paid(
    edge: Edge, stripe_emulator
):
    txn, events = await pay(edge, stripe_emulator)

    answers = await asyncio.gather(*(deliver(edge, events[kind]) for kind in (COMPLETED, SUCCEEDED) * 3))

    assert all(answer.status_code == 200 for answer in answers)
    assert (await edge.order(txn)).status == "paid"
    assert len(await order_paid_messages(edge)) == 1


async def test_manual_capture_treats_the_authorisation_as_paid(make_edge: EdgeFactory, stripe_emulator):
    app = await make_edge(capture_mode=CaptureMode.MANUAL)
    txn, events = await pay(app, stripe_emulator)
    assert events[COMPLETED]["data"]["object"]["payment_status"] == "unpaid"

    unpaid_session = await deliver(app, events[COMPLETED])
    assert unpaid_session.status_code == 200 and (await app.order(txn)).status == "pending_payment"
    authorised = await deliver(app, events["payment_intent.amount_capturable_updated"])

    assert authorised.status_code == 200
    assert (await app.order(txn)).status == "paid"
    [message] = await order_paid_messages(app)
    assert message["price"]["amount"] == US_OFFER_PRICE


async def test_a_delayed_payment_is_paid_when_it_succeeds_and_failed_when_it_fails(
    edge: Edge, stripe_emulator
):
    paid_txn, paid_events = await pay(edge, stripe_emulator)
    failed_txn, failed_events = await pay(edge, stripe_emulator)
    succeeded = variant(paid_events[COMPLETED], "checkout.session.async_payment_succeeded")
    failed_type = "checkout.session.async_payment_failed"
    failed = variant(failed_events[COMPLETED], failed_type, payment_status="unpaid")

    assert (await deliver(edge, succeeded)).status_code == 200
    assert (await deliver(edge, failed)).status_code == 200

    assert (await edge.order(paid_txn)).status == "paid"
    failed_order = await edge.order(failed_txn)
    assert failed_order.status == "payment_failed" and failed_order.failure_reason == "async_payment_failed"
    assert [message["transaction_id"] for message in await order_paid_messages(edge)] == [paid_txn]


async def test_an_expired_checkout_session_fails_its_order_and_a_declined_attempt_does_not(
    edge: Edge, stripe_emulator
):
    expired = await checkout_ok(edge)
    declined = await checkout_ok(edge)
    async with stripe_emulator.sdk() as client:
        await client.v1.checkout.sessions.expire_async(expired["sessionId"])
    [expiry] = [
        copy.deepcopy(record.event)
        for record in stripe_emulator.events("checkout.session.expired")
        if record.event["data"]["object"]["id"] == expired["sessionId"]
    ]
    attempt = synthetic_event(
        "payment_intent.payment_failed",
        {
            "id": "pi_declined",
            "object": "payment_intent",
            "status": "requires_payment_method",
            "amount": US_OFFER_PRICE,
            "currency": "usd",
            "metadata": {"transaction_id": declined["transactionId"]},
        },
    )

    assert (await deliver(edge, expiry)).status_code == 200
    assert (await deliver(edge, attempt)).status_code == 200

    expired_order = await edge.order(expired["transactionId"])
    assert expired_order.status == "payment_failed"
    assert expired_order.failure_reason == "checkout_session_expired"
    assert (await edge.order(declined["transactionId"])).status == "pending_payment"  # may still pay
    outcomes = {row["event_id"]: row["outcome"] for row in await stripe_event_rows(edge)}
    assert outcomes == {expiry["id"]: "payment_failed", attempt["id"]: "payment_attempt_failed"}
    assert await order_paid_messages(edge) == []


# ---------------------------------------------------------------------------------- refused deliveries


@pytest.mark.parametrize(
    "how", ["missing header", "wrong secret", "tampered body", "garbage signature", "stale timestamp"]
)
async def test_a_delivery_without_a_valid_signature_is_a_400_and_records_nothing(
    edge: Edge, stripe_emulator, how: str
):
    txn, events = await pay(edge, stripe_emulator)
    body = json.dumps(events[COMPLETED]).encode()
    if how == "missing header":
        response = await deliver(edge, body, signature="")
    elif how == "wrong secret":
        response = await deliver(edge, body, secret="whsec_not_ours")
    elif how == "tampered body":
        response = await deliver(edge, body.replace(b'"paid"', b'"paid" '), signature=sign(body, SECRET))
    elif how == "garbage signature":
        response = await deliver(edge, body, signature="t=1,v1=00")
    else:
        response = await deliver(edge, body, signature=sign(body, SECRET, timestamp=int(time.time()) - 3600))

    assert response.status_code == 400
    assert await stripe_event_rows(edge) == []
    assert (await edge.order(txn)).status == "pending_payment"
    assert await order_paid_messages(edge) == []


async def test_a_signed_body_that_is_not_a_stripe_event_is_a_400(edge: Edge):
    response = await deliver(edge, b'{"hello": "world"}')
    assert response.status_code == 400 and await stripe_event_rows(edge) == []


async def test_either_secret_is_accepted_during_a_rotation(make_edge: EdgeFactory):
    app = await make_edge(stripe_webhook_secrets=[SecretStr("whsec_old"), SecretStr(SECRET)])
    old = synthetic_event("customer.created", {"id": "cus_1"})
    new = synthetic_event("customer.created", {"id": "cus_2"})
    assert (await deliver(app, old, secret="whsec_old")).status_code == 200
    assert (await deliver(app, new, secret=SECRET)).status_code == 200
    assert len(await stripe_event_rows(app)) == 2


async def test_an_oversized_body_is_a_413_and_records_nothing(edge: Edge):
    padding = "x" * MAX_BODY_BYTES
    response = await deliver(edge, synthetic_event("customer.created", {"id": "cus_1", "note": padding}))
    assert response.status_code == 413
    assert await stripe_event_rows(edge) == []


async def test_an_oversized_body_without_a_content_length_is_a_413(edge: Edge):
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    response = await edge.client.post(WEBHOOK, content=chunks(), headers={"Stripe-Signature": "t=1,v1=00"})
    assert response.status_code == 413


# ---------------------------------------------------------------------------- events we do not act on


async def test_a_payment_that_does_not_match_the_order_needs_attention_and_is_never_announced(
    edge: Edge, stripe_emulator
):
    txn, events = await pay(edge, stripe_emulator)
    underpaid = events[SUCCEEDED]
    underpaid["data"]["object"]["amount_received"] = US_OFFER_PRICE - 1

    answers = [await deliver(edge, underpaid), await deliver(edge, events[COMPLETED])]

    assert [answer.status_code for answer in answers] == [200, 200]
    order = await edge.order(txn)
    assert order.status == "needs_attention" and order.failure_reason == "payment_amount_mismatch"
    assert order.stripe_payment_intent_id == underpaid["data"]["object"]["id"]  # for the operator's refund
    assert await order_paid_messages(edge) == []
    assert [row["outcome"] for row in await stripe_event_rows(edge)] == ["amount_mismatch", "already_paid"]


async def test_a_payment_in_another_currency_needs_attention(edge: Edge, stripe_emulator):
    txn, events = await pay(edge, stripe_emulator)
    events[COMPLETED]["data"]["object"]["currency"] = "eur"
    assert (await deliver(edge, events[COMPLETED])).status_code == 200
    assert (await edge.order(txn)).status == "needs_attention"
    assert await order_paid_messages(edge) == []


@pytest.mark.parametrize(
    "event_type",
    ["charge.succeeded", "refund.created", "issuing_card.created", "issuing_authorization.created", "x.y"],
)
async def test_event_types_we_do_not_act_on_are_acknowledged_and_recorded(edge: Edge, event_type: str):
    event = synthetic_event(event_type, {"id": "obj_1", "object": "thing", "metadata": {}})
    response = await deliver(edge, event)
    assert response.status_code == 200
    [row] = await stripe_event_rows(edge)
    assert (row["event_id"], row["type"], row["outcome"]) == (event["id"], event_type, "not_ours")


async def test_a_payment_for_an_order_we_do_not_know_is_acknowledged_and_ignored(edge: Edge, stripe_emulator):
    _txn, events = await pay(edge, stripe_emulator)
    stranger = variant(events[SUCCEEDED], SUCCEEDED, metadata={"transaction_id": "txn_from_another_shop"})
    response = await deliver(edge, stranger)
    assert response.status_code == 200
    assert [row["outcome"] for row in await stripe_event_rows(edge)] == ["unknown_order"]
    assert await order_paid_messages(edge) == []


async def test_an_event_for_our_order_of_another_type_is_recorded_against_it(edge: Edge, stripe_emulator):
    txn, events = await pay(edge, stripe_emulator)
    charge = variant(events[SUCCEEDED], "charge.succeeded")
    assert (await deliver(edge, charge)).status_code == 200
    [row] = await stripe_event_rows(edge)
    assert (row["transaction_id"], row["outcome"]) == (txn, "ignored_type")
    assert (await edge.order(txn)).status == "pending_payment"


# ------------------------------------------------------------------------------- failures and retries


async def test_a_publish_that_fails_is_a_503_and_the_redelivery_publishes(edge: Edge, stripe_emulator):
    txn, events = await pay(edge, stripe_emulator)
    connection = await aio_pika.connect(edge.settings.amqp_url)
    async with connection:  # order.paid becomes unroutable
        await (await connection.channel()).queue_delete(edge.queue_name("funding.order-paid"))

    failed = await deliver(edge, events[COMPLETED])

    assert failed.status_code == 503
    assert (await edge.order(txn)).status == "paid"  # the state change was committed
    assert [row["outcome"] for row in await stripe_event_rows(edge)] == ["order_paid"]
    await declare_from_url(edge.settings.amqp_url, edge.ctx.topology)  # the operator fixes the broker
    retried = await deliver(edge, events[COMPLETED])
    other = await deliver(edge, events[SUCCEEDED])

    assert retried.status_code == 200 and other.status_code == 200
    [message] = await order_paid_messages(edge)
    assert message["transaction_id"] == txn


async def test_a_database_outage_is_a_503_and_the_redelivery_completes_the_work(edge: Edge, stripe_emulator):
    txn, events = await pay(edge, stripe_emulator)
    await edge.ctx.pool.close()

    failed = await deliver(edge, events[SUCCEEDED])

    assert failed.status_code == 503
    assert await order_paid_messages(edge) == []
    edge.ctx._pool = await create_pool(edge.settings.database_url)  # the database is back
    assert await stripe_event_rows(edge) == []  # nothing half-recorded
    retried = await deliver(edge, events[SUCCEEDED])
    assert retried.status_code == 200
    assert (await edge.order(txn)).status == "paid"
    assert len(await order_paid_messages(edge)) == 1


# ----------------------------------------------------------------------------------- over real HTTP


async def test_the_emulator_delivering_over_http_gets_the_order_paid_and_announced_once(
    service_settings, stripe_emulator, db
):
    app = create_app(service_settings)
    server = serve_in_thread(app)  # its lifespan starts the context in the server's own event loop
    try:
        stripe_emulator.set_webhook(f"{server.url}{WEBHOOK}", SECRET)
        async with httpx.AsyncClient(base_url=server.url) as client:
            checkout = await client.post(
                "/api/create-checkout-session",
                json={"offerId": US_OFFER, "recipientEmail": "ada@example.com", "fullName": "Ada"},
            )
            created = checkout.json()
            paid = stripe_emulator.pay(created["sessionId"])
            records = [r for r in stripe_emulator.events() if r.event["id"] in paid["event_ids"]]
            deadline = time.monotonic() + 10
            while any(record.status != "delivered" for record in records):
                assert time.monotonic() < deadline, [(r.event["type"], r.status, r.attempts) for r in records]
                await asyncio.sleep(0.05)
            status = await client.get(
                f"/api/orders/{created['transactionId']}", params={"session_id": created["sessionId"]}
            )
    finally:
        stripe_emulator.set_webhook(None)
        server.stop()
    topology = app.state.ctx.topology
    messages = await take_messages(service_settings.amqp_url, topology.queue("funding.order-paid").name)
    connection = await aio_pika.connect(service_settings.amqp_url)
    async with connection:
        await delete(await connection.channel(), topology)

    assert status.json()["status"] == "paid"
    assert await db.fetchval("SELECT count(*) FROM stripe_events") == 2
    assert [json.loads(m.body)["transaction_id"] for m in messages] == [created["transactionId"]]


# ------------------------------------------------------------------------------------- load shedding


async def test_deliveries_over_the_in_flight_limit_get_a_quick_503_and_their_retry_lands(
    make_edge: EdgeFactory, stripe_emulator
):
    edge = await make_edge(webhook_max_in_flight=1)
    first_txn, first_events = await pay(edge, stripe_emulator)
    second_txn, second_events = await pay(edge, stripe_emulator)
    # Hold the first order's row lock elsewhere: its delivery waits on it, occupying the only slot.
    blocker = await edge.ctx.pool.acquire()
    blocking = blocker.transaction()
    await blocking.start()
    await blocker.execute("SELECT 1 FROM esim_purchases WHERE transaction_id = $1 FOR UPDATE", first_txn)
    try:
        held = asyncio.create_task(deliver(edge, first_events[SUCCEEDED]))
        deadline = time.monotonic() + 10
        while edge.app.state.ports.deliveries.in_flight < 1:  # verified, and waiting on the lock
            assert time.monotonic() < deadline and not held.done()
            await asyncio.sleep(0.02)

        started = time.monotonic()
        shed = await deliver(edge, second_events[SUCCEEDED])
        assert time.monotonic() - started < 1.0
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
        assert "retry" in shed.json()["error"]
        # Shed before anything was written.
        assert [row["event_id"] for row in await stripe_event_rows(edge)] == []
        assert (await edge.order(second_txn)).status == "pending_payment"
    finally:
        await blocking.rollback()
        await edge.ctx.pool.release(blocker)
    assert (await held).status_code == 200
    assert (await deliver(edge, second_events[SUCCEEDED])).status_code == 200  # Stripe's retry
    assert (await edge.order(second_txn)).status == "paid"
    paid = sorted(message["transaction_id"] for message in await order_paid_messages(edge))
    assert paid == sorted([first_txn, second_txn])


async def test_a_body_trickled_slower_than_the_read_deadline_is_a_408_and_holds_no_delivery_slot(
    make_edge: EdgeFactory, stripe_emulator, monkeypatch
):
    monkeypatch.setattr(stripe_webhooks, "BODY_READ_TIMEOUT_SECONDS", 1)
    edge = await make_edge(webhook_max_in_flight=1)
    txn, events = await pay(edge, stripe_emulator)
    release = asyncio.Event()
    reading = asyncio.Event()

    async def trickle():
        yield b'{"id": "evt_'
        reading.set()  # the route is reading this body now
        await release.wait()  # never sends the rest in time
        yield b'1"}'

    slow = asyncio.create_task(
        edge.client.post(WEBHOOK, content=trickle(), headers={"Stripe-Signature": "t=1,v1=00"})
    )
    await asyncio.wait_for(reading.wait(), timeout=5)
    # The slow client holds a connection, not the only in-flight slot: Stripe still gets through.
    assert (await deliver(edge, events[SUCCEEDED])).status_code == 200
    answer = await asyncio.wait_for(slow, timeout=5)
    release.set()
    assert answer.status_code == 408 and "not received within 1 s" in answer.json()["error"]
    assert [row["outcome"] for row in await stripe_event_rows(edge)] == ["order_paid"]
    assert (await edge.order(txn)).status == "paid"
