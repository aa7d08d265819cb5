"""Scorecard R1, webhook gatekeeping, over real HTTP: the webhook app served by uvicorn on a loopback
port, the real RabbitMQ and PostgreSQL behind it, requests made with httpx the way Stripe (or anyone on
the internet) would make them.

Every case starts from a real order: checked out through the app, paid in the Stripe emulator, whose
`checkout.session.completed` event (the bytes Stripe would send) is then delivered bent in one way.
A rejected request must answer its 4xx with a message a person can act on, and leave nothing behind:
no `stripe_events` row, no `outbox` row, the order exactly as it was, and no `order.paid` on the
funding queue. The accepted cases prove those checks can see an effect when there is one.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from esim_common.settings import Settings
from esim_sandbox.serve import ServerHandle, serve_in_thread
from esim_sandbox.stripe_emulator.webhooks import encode, sign
from tests.integration.test_webhook_checkout import US_OFFER, US_OFFER_PRICE
from tests.integration.test_webhook_stripe_events import emulator_event, take_messages
from webhook.main import create_app
from webhook.stripe_webhooks import MAX_BODY_BYTES

pytestmark = [pytest.mark.broker, pytest.mark.db]

SECRET = "whsec_sandbox"  # what both the emulator and service_settings use
WEBHOOK = "/api/webhooks/stripe"
TOLERANCE_SECONDS = 300  # Stripe's, and ours
HTTP_TIMEOUT_SECONDS = 30.0


# ------------------------------------------------------------------------------------------ harness


@dataclass
class ServedEdge:
    """The webhook app on a real port, and this test's view of its database and queue."""

    url: str
    settings: Settings
    queue_name: str  # the prefixed funding.order-paid queue: where order.paid lands, nothing consumes it
    db: asyncpg.Pool
    handle: ServerHandle


@pytest.fixture
async def served(service_settings: Settings, stripe_emulator, db: asyncpg.Pool) -> AsyncIterator[ServedEdge]:
    stripe_emulator.set_webhook(None)  # the emulator delivers nothing: every request here is the test's
    app = create_app(service_settings)
    handle = serve_in_thread(app)  # the lifespan declares the topology and starts the pools in that thread
    try:
        queue_name = app.state.ctx.topology.queue("funding.order-paid").name
        yield ServedEdge(handle.url, service_settings, queue_name, db, handle)
    finally:
        handle.stop()  # service_settings deletes the prefixed topology afterwards


@dataclass(frozen=True)
class PaidOrder:
    transaction_id: str
    event: dict[str, Any]  # checkout.session.completed as the emulator made it
    body: bytes  # ... and as Stripe puts it on the wire (pretty-printed JSON)


async def paid_order(edge: ServedEdge, client: httpx.AsyncClient, stripe_emulator) -> PaidOrder:
    checkout = await client.post(
        "/api/create-checkout-session",
        json={"offerId": US_OFFER, "recipientEmail": "ada@example.com", "fullName": "Ada Lovelace"},
    )
    assert checkout.status_code == 200, checkout.text
    created = checkout.json()
    paid = stripe_emulator.pay(created["sessionId"])
    events = [emulator_event(stripe_emulator, event_id) for event_id in paid["event_ids"]]
    [completed] = [event for event in events if event["type"] == "checkout.session.completed"]
    return PaidOrder(created["transactionId"], completed, encode(completed))


@dataclass(frozen=True)
class Footprint:
    """Everything a delivery could have left behind."""

    stripe_events: int
    outbox: list[dict[str, Any]]
    order: dict[str, Any]
    transitions: int
    order_paid_messages: list[dict[str, Any]]


async def footprint(edge: ServedEdge, transaction_id: str) -> Footprint:
    """Read (and drain: nothing else consumes it) the funding queue, and the rows a delivery touches."""
    messages = await take_messages(edge.settings.amqp_url, edge.queue_name)
    order = await edge.db.fetchrow("SELECT * FROM esim_purchases WHERE transaction_id = $1", transaction_id)
    assert order is not None
    return Footprint(
        stripe_events=await edge.db.fetchval("SELECT count(*) FROM stripe_events"),
        outbox=[dict(row) for row in await edge.db.fetch("SELECT * FROM outbox")],
        order=dict(order),
        transitions=await edge.db.fetchval(
            "SELECT count(*) FROM order_transitions WHERE transaction_id = $1", transaction_id
        ),
        order_paid_messages=[json.loads(message.body) for message in messages],
    )


# -------------------------------------------------------------------------------------- the requests

# A case turns the genuine event (its dict and its exact bytes) into what is actually sent: a body
# (bytes, or an async iterator for a body without Content-Length) and the headers.
Request = tuple[Any, dict[str, str]]
Bend = Callable[[dict[str, Any], bytes], Request]


def now() -> int:
    return int(time.time())


def signed(body: bytes, **sign_kwargs: Any) -> Request:
    return body, {"Content-Type": "application/json", "Stripe-Signature": sign(body, SECRET, **sign_kwargs)}


def with_signature(body: bytes, header: str) -> Request:
    return body, {"Content-Type": "application/json", "Stripe-Signature": header}


def digest(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    """Only the hex v1 value of a signature."""
    return sign(body, secret, timestamp).split("v1=", 1)[1]


def header_at(body: bytes, template: str) -> Request:
    """A Stripe-Signature header from `template`: {t} is now, {ours} our digest for it and {old} the
    digest under another secret (one timestamp for all: two clock reads could straddle a second)."""
    t = now()
    ours, old = digest(body, SECRET, t), digest(body, "whsec_old", t)
    return with_signature(body, template.format(t=t, ours=ours, old=old))


def tampered(event: dict[str, Any], body: bytes) -> Request:
    """Signed as Stripe sent it, then the amount changed on the way."""
    altered = json.loads(body)
    altered["data"]["object"]["amount_total"] = 1
    return encode(altered), signed(body)[1]


def reserialised(event: dict[str, Any], body: bytes) -> Request:
    """The same JSON, compacted after signing: verification must be over the raw bytes."""
    return json.dumps(json.loads(body), separators=(",", ":")).encode(), signed(body)[1]


def padded(event: dict[str, Any]) -> bytes:
    """A genuine-looking event just over the size limit."""
    big = json.loads(json.dumps(event))
    big["data"]["object"]["metadata"]["padding"] = "x" * MAX_BODY_BYTES
    return encode(big)


def oversized_chunked(event: dict[str, Any], body: bytes) -> Request:
    """Over the limit, streamed with Transfer-Encoding: chunked, so no Content-Length warns the server."""
    big = padded(event)
    headers = signed(big)[1]

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    return chunks(), headers


def not_an_event(document: Any) -> Bend:
    return lambda event, body: signed(json.dumps(document).encode())


def event_with(**fields: Any) -> Bend:
    """The genuine event with some top-level fields replaced, validly signed."""

    def bend(event: dict[str, Any], body: bytes) -> Request:
        return signed(encode({**event, **fields}))

    return bend


@dataclass(frozen=True)
class Refused:
    bend: Bend
    status: int
    says: tuple[str, ...]  # words the error message must contain, so a person knows what to fix


STALE = TOLERANCE_SECONDS + 1

REFUSED: dict[str, Refused] = {
    "no Stripe-Signature header": Refused(
        lambda e, b: (b, {"Content-Type": "application/json"}), 400, ("Stripe-Signature",)
    ),
    "empty Stripe-Signature header": Refused(lambda e, b: with_signature(b, ""), 400, ("Stripe-Signature",)),
    "garbled header": Refused(lambda e, b: with_signature(b, "garbled;;=="), 400, ("header is malformed",)),
    "no timestamp": Refused(lambda e, b: with_signature(b, f"v1={digest(b)}"), 400, ("header is malformed",)),
    "timestamp not a number": Refused(
        lambda e, b: with_signature(b, f"t=yesterday,v1={digest(b)}"), 400, ("header is malformed",)
    ),
    "no v1 scheme (v0 only)": Refused(
        lambda e, b: header_at(b, "t={t},v0={ours}"), 400, ("no v1 signature",)
    ),
    "empty v1 value": Refused(lambda e, b: with_signature(b, f"t={now()},v1="), 400, ("matches none",)),
    "signed with another secret": Refused(
        lambda e, b: with_signature(b, sign(b, "whsec_not_ours")), 400, ("matches none", "secret")
    ),
    "right digest under another timestamp": Refused(
        lambda e, b: with_signature(b, f"t={now() - 5},v1={digest(b, timestamp=now())}"),
        400,
        ("matches none",),
    ),
    f"stale timestamp ({STALE} s old)": Refused(
        lambda e, b: signed(b, timestamp=now() - STALE), 400, ("timestamp", "300 s old")
    ),
    "stale timestamp (a day old)": Refused(
        lambda e, b: signed(b, timestamp=now() - 86_400), 400, ("timestamp", "300 s old")
    ),
    "tampered body (signed, then the amount changed)": Refused(tampered, 400, ("matches none", "altered")),
    "body re-serialised after signing": Refused(reserialised, 400, ("matches none", "altered")),
    "oversized, with Content-Length": Refused(lambda e, b: signed(padded(e)), 413, ("larger than",)),
    "oversized, chunked (no Content-Length)": Refused(oversized_chunked, 413, ("larger than",)),
    "malformed JSON, validly signed": Refused(
        lambda e, b: signed(b[: len(b) // 2]), 400, ("not a Stripe event",)
    ),
    "not UTF-8, validly signed": Refused(lambda e, b: signed(b"\xff\xfe" + b), 400, ("not UTF-8",)),
    "JSON object that is not an event": Refused(
        not_an_event({"hello": "world"}), 400, ("not a Stripe event",)
    ),
    "JSON array": Refused(not_an_event([]), 400, ("not a Stripe event",)),
    "JSON string": Refused(not_an_event("evt_123"), 400, ("not a Stripe event",)),
    "event without data": Refused(event_with(data=None), 400, ("not a Stripe event",)),
    "event whose id is not a string": Refused(event_with(id=42), 400, ("not a Stripe event",)),
    "event whose type is not a string": Refused(
        event_with(type=["checkout.session.completed"]), 400, ("not a Stripe event",)
    ),
}

ACCEPTED: dict[str, Bend] = {
    "signed as Stripe signs": lambda e, b: signed(b),
    "several v1 values, one of them ours": lambda e, b: header_at(
        b, "t={t},v1=" + "0" * 64 + ",v1={old},v1={ours}"
    ),
    "v1 and v0 values (Stripe's test-mode header)": lambda e, b: header_at(
        b, "t={t},v1={ours},v0=" + "0" * 64
    ),
    # Inside the tolerance by a wide margin, so a slow machine cannot push it over.
    f"signed {TOLERANCE_SECONDS - 60} s ago": lambda e, b: signed(
        b, timestamp=now() - TOLERANCE_SECONDS + 60
    ),
    # Stripe's libraries only refuse old timestamps: a clock ahead of ours is skew, and only the holder
    # of the secret can sign any timestamp at all.
    "timestamp 10 minutes ahead of our clock": lambda e, b: signed(b, timestamp=now() + 600),
}


async def send(client: httpx.AsyncClient, request: Request) -> httpx.Response:
    content, headers = request
    return await client.post(WEBHOOK, content=content, headers=headers)


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
async def test_a_refused_delivery_answers_its_4xx_and_leaves_nothing_behind(
    served: ServedEdge, stripe_emulator, case
):
    refused = REFUSED[case]
    async with httpx.AsyncClient(base_url=served.url, timeout=HTTP_TIMEOUT_SECONDS) as client:
        order = await paid_order(served, client, stripe_emulator)
        before = await footprint(served, order.transaction_id)

        response = await send(client, refused.bend(order.event, order.body))

    assert response.status_code == refused.status, response.text
    message = response.json()["error"]
    assert all(word.lower() in message.lower() for word in refused.says), message
    after = await footprint(served, order.transaction_id)
    assert after.stripe_events == 0
    assert after.outbox == []
    assert after.order == before.order and after.order["status"] == "pending_payment"
    assert after.transitions == before.transitions
    assert after.order_paid_messages == []


@pytest.mark.parametrize("case", list(ACCEPTED), ids=list(ACCEPTED))
async def test_a_genuine_delivery_is_a_200_and_announces_the_order_once(
    served: ServedEdge, stripe_emulator, case
):
    async with httpx.AsyncClient(base_url=served.url, timeout=HTTP_TIMEOUT_SECONDS) as client:
        order = await paid_order(served, client, stripe_emulator)

        response = await send(client, ACCEPTED[case](order.event, order.body))

    assert response.status_code == 200, response.text
    assert response.json() == {"received": True}
    after = await footprint(served, order.transaction_id)
    assert after.stripe_events == 1
    [outbox] = after.outbox
    assert outbox["transaction_id"] == order.transaction_id and outbox["published_at"] is not None
    assert after.order["status"] == "paid"
    [message] = after.order_paid_messages
    assert message["transaction_id"] == order.transaction_id
    assert message["price"] == {"amount": US_OFFER_PRICE, "currency": "USD"}


async def test_a_refused_delivery_does_not_spoil_the_genuine_one_that_follows(
    served: ServedEdge, stripe_emulator
):
    """Stripe's own retry of the event an attacker (or a proxy) mangled first still gets through."""
    async with httpx.AsyncClient(base_url=served.url, timeout=HTTP_TIMEOUT_SECONDS) as client:
        order = await paid_order(served, client, stripe_emulator)
        refused = [await send(client, case.bend(order.event, order.body)) for case in REFUSED.values()]
        genuine = await send(client, signed(order.body))

    assert {response.status_code for response in refused} == {400, 413}
    assert genuine.status_code == 200
    after = await footprint(served, order.transaction_id)
    assert after.stripe_events == 1 and after.order["status"] == "paid"
    assert [message["transaction_id"] for message in after.order_paid_messages] == [order.transaction_id]
