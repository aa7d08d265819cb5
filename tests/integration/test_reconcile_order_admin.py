"""The admin order API on the real Postgres and RabbitMQ, with the Stripe and Zendit emulators: listing,
timelines, re-drives, refund retries and resolutions, each behind the bearer token and audited.

The reconcile app is built by `reconcile.main.create_app` with the order router included (if main does
not include it already) and its context started, as in test_reconcile_admin_api.py. Only reconcile's own
consumers run, so what a re-drive publishes waits in the work queues of funding, provisioning and notify,
where the tests read it; the end-to-end test starts provisioning and notify in-process too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from pydantic import SecretStr

from esim_common import outbox
from esim_common.compensation import fail_and_refund
from esim_common.events import OrderPaid
from esim_common.money import Money
from esim_common.order_repository import create_order, get_order, record
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.providers.stripe import StripeGateway
from esim_common.publisher import PublishFailed
from esim_common.service import ServiceContext
from esim_common.settings import Settings
from esim_common.topology import delete
from reconcile.main import create_app

pytestmark = [pytest.mark.broker, pytest.mark.db]

S = OrderStatus
TOKEN = "admin-token-for-tests-0123456789"
OFFER = "ESIM-US-7D-1GB"  # 4.50 USD at the Zendit emulator: its 100 USD wallet pays for it
PRICE = Money(999, "USD")
COST = Money(450, "USD")
WAIT_SECONDS = 30.0

PATHS: dict[OrderStatus, tuple[OrderStatus, ...]] = {
    S.PAID: (S.PAID,),
    S.FUNDING: (S.PAID, S.FUNDING),
    S.AWAITING_FUNDS: (S.PAID, S.FUNDING, S.AWAITING_FUNDS),
    S.FUNDED: (S.PAID, S.FUNDING, S.FUNDED),
    S.PURCHASING: (S.PAID, S.FUNDING, S.FUNDED, S.PURCHASING),
    S.PROVISIONED: (S.PAID, S.FUNDING, S.FUNDED, S.PURCHASING, S.PROVISIONED),
    S.DELIVERED: (S.PAID, S.FUNDING, S.FUNDED, S.PURCHASING, S.PROVISIONED, S.DELIVERED),
    S.REFUND_PENDING: (S.PAID, S.FUNDING, S.TOPUP_FAILED, S.REFUND_PENDING),
}


# ------------------------------------------------------------------------------------------- harness
@pytest.fixture
def admin_settings(service_settings: Settings) -> Settings:
    return service_settings.model_copy(update={"admin_api_token": SecretStr(TOKEN)})


@pytest.fixture
async def reconcile_app(admin_settings: Settings) -> AsyncIterator[FastAPI]:
    """The reconcile app with its context started (broker, pool, reconcile's own consumers)."""
    app = create_app(admin_settings)
    ctx: ServiceContext = app.state.ctx
    await ctx.start()
    try:
        yield app
    finally:
        await ctx.stop()
        connection = await aio_pika.connect(admin_settings.amqp_url)
        async with connection:
            await delete(await connection.channel(), ctx.topology)


@pytest.fixture
def reconcile(reconcile_app: FastAPI) -> ServiceContext:
    return reconcile_app.state.ctx


@pytest.fixture
async def admin(reconcile_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client sending the right token."""
    transport = httpx.ASGITransport(app=reconcile_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://reconcile", headers=auth()) as client:
        yield client


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def taken(ctx: ServiceContext, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message waiting in one of the topology's work queues (removed from it)."""
    connection = await aio_pika.connect(ctx.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(ctx.topology.queue(queue_name).name)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(message)
        return found


WORK_QUEUES = ("funding.order-paid", "provisioning.order-funded", "notify.order-provisioned")


async def published(ctx: ServiceContext) -> dict[str, list[aio_pika.abc.AbstractIncomingMessage]]:
    return {name: await taken(ctx, name) for name in WORK_QUEUES}


async def make_order(
    db: asyncpg.Pool,
    status: OrderStatus,
    *,
    path: tuple[OrderStatus, ...] | None = None,
    txn: str | None = None,
    payment_intent_id: str | None = None,
    **facts: Any,
) -> str:
    """An order walked to `status` through legal transitions, with `facts` recorded on it."""
    txn = txn or f"txn_{uuid.uuid4().hex[:16]}"
    async with db.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id=OFFER,
            price=PRICE,
            zendit_cost=COST,
            recipient_email="ada@example.com",
            recipient_name="Ada Lovelace",
        )
        await record(conn, txn, stripe_payment_intent_id=payment_intent_id or f"pi_{txn}", **facts)
        for state in PATHS[status] if path is None else path:
            await transition(conn, txn, state, reason=f"test: {state.value}")
    return txn


async def paid_order(
    db: asyncpg.Pool, stripe_emulator, stripe_gateway: StripeGateway, status: OrderStatus
) -> str:
    """An order a customer really paid in the Stripe emulator (a PaymentIntent to refund), at `status`."""
    txn = f"txn_{uuid.uuid4().hex[:16]}"
    session = await stripe_gateway.create_checkout_session(
        transaction_id=txn,
        amount=PRICE.amount,
        currency=PRICE.currency,
        product_name=OFFER,
        success_url="http://shop.test/ok",
        cancel_url="http://shop.test/cancel",
    )
    paid = await asyncio.to_thread(stripe_emulator.pay, session.id)
    return await make_order(db, status, txn=txn, payment_intent_id=paid["payment_intent"]["id"])


def provisioned_facts(txn: str) -> dict[str, Any]:
    return {
        "zendit_transaction_id": txn,
        "zendit_status": "DONE",
        "qr_code_url": f"https://storage.test/esim-qrcodes/{txn}.png?token=signed-secret",
        "iccid": "8944500102198304826",
        "smdp_address": "smdp.example.com",
        "activation_code": "K2-SECRET-ACTIVATION",
    }


async def actions_of(db: asyncpg.Pool, txn: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM operator_actions WHERE transaction_id = $1 ORDER BY id", txn)


async def wait_for_status(
    db: asyncpg.Pool, txn: str, status: OrderStatus, within: float = WAIT_SECONDS
) -> None:
    deadline = time.monotonic() + within
    while (order := await get_order(db, txn)) is not None and order.status != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"order {txn} is {order.status.value} after {within}s, not {status.value}")
        await asyncio.sleep(0.05)


def handled(ctx: ServiceContext, queue_name: str) -> float:
    """Messages of a work queue a consumer in this process handled and acked ("ok")."""
    labels = {"queue": ctx.topology.queue(queue_name).name, "outcome": "ok"}
    return REGISTRY.get_sample_value("esim_messages_processed_total", labels) or 0.0


async def wait_until_handled(
    ctx: ServiceContext, counts: dict[str, float], within: float = WAIT_SECONDS
) -> None:
    """Until each queue's consumer has handled at least that many messages (see `handled`)."""
    deadline = time.monotonic() + within
    while True:
        seen = {name: handled(ctx, name) for name in counts}
        if all(seen[name] >= count for name, count in counts.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"handled {seen} after {within}s, expected at least {counts}")
        await asyncio.sleep(0.05)


def refusing(ctx: ServiceContext, monkeypatch: pytest.MonkeyPatch, routing_key: str) -> None:
    """Make the broker refuse every `routing_key` event the app publishes (as a nack would)."""
    publish = ctx.publisher.publish

    async def refuse(event: Any) -> None:
        if event.routing_key == routing_key:
            raise PublishFailed(f"broker did not confirm {routing_key!r}: test")
        await publish(event)

    monkeypatch.setattr(ctx.publisher, "publish", refuse)


# ------------------------------------------------------------------------------------------- auth
ENDPOINTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/admin/orders", None),
    ("GET", "/api/admin/orders/txn_unknown", None),
    ("POST", "/api/admin/orders/txn_unknown/redrive", {}),
    ("POST", "/api/admin/orders/txn_unknown/retry-refund", {}),
    ("POST", "/api/admin/orders/txn_unknown/resolve", {"outcome": "delivered", "note": "sent by hand"}),
]
BAD_HEADERS = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": "Bearer "},
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
async def test_every_order_endpoint_answers_401_without_the_right_bearer_token(
    reconcile_app, method, path, body
):
    transport = httpx.ASGITransport(app=reconcile_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://reconcile") as client:
        for headers in BAD_HEADERS:
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert TOKEN not in response.text
        if method == "POST":  # the body is not even read before the token is accepted
            garbage = await client.post(
                path, content=b"{not json", headers={"Content-Type": "application/json"}
            )
            assert garbage.status_code == 401
        # with the token, the same request gets through the guard
        allowed = await client.request(method, path, json=body, headers=auth())
        assert allowed.status_code in (200, 404), allowed.text


# ------------------------------------------------------------------------------------------- list
async def test_orders_are_listed_by_state_and_age_most_recently_stuck_first(admin, db):
    long_ago = await make_order(db, S.FUNDED)
    a_while_ago = await make_order(db, S.PURCHASING)
    just_now = await make_order(db, S.FUNDED)
    await make_order(db, S.DELIVERED)
    for txn, minutes in ((long_ago, 90), (a_while_ago, 45)):
        await db.execute(
            "UPDATE order_transitions SET at = at - make_interval(mins => $2) WHERE transaction_id = $1",
            txn,
            minutes,
        )

    response = await admin.get(
        "/api/admin/orders", params={"status": ["funded", "purchasing"], "older_than_minutes": 30}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["statuses"] == ["funded", "purchasing"] and body["count"] == 2
    assert [o["transaction_id"] for o in body["orders"]] == [a_while_ago, long_ago]
    first = body["orders"][0]
    assert first["status"] == "purchasing" and first["price"] == {"amount": 999, "currency": "USD"}
    assert 45 * 60 <= first["age_seconds"] < 50 * 60 and first["paid_at"] is not None
    everything = (await admin.get("/api/admin/orders", params={"limit": 1})).json()
    assert everything["count"] == 3  # every order not final (the delivered one is), one of them listed
    assert [o["transaction_id"] for o in everything["orders"]] == [just_now]


async def test_an_unknown_status_is_refused_with_the_valid_ones_listed(admin):
    response = await admin.get("/api/admin/orders", params={"status": ["funded", "stuckish"]})
    assert response.status_code == 422
    assert all(s.value in response.json()["detail"] for s in OrderStatus)
    assert "stuckish" not in response.text
    assert (await admin.get("/api/admin/orders", params={"limit": 0})).status_code == 422


# ------------------------------------------------------------------------------------------- timeline
async def test_an_orders_timeline_shows_every_record_of_it_and_no_secret(admin, db, reconcile):
    txn = await make_order(db, S.DELIVERED, **provisioned_facts(uuid.uuid4().hex))
    async with db.acquire() as conn:
        await conn.execute(
            """INSERT INTO wallet_topups (id, amount, currency, status, card_id, order_ids)
               VALUES ('top_1', 5000, 'USD', 'succeeded', 'ic_1', ARRAY[$1])""",
            txn,
        )
        await conn.execute(
            """INSERT INTO issuing_cards (card_id, card_last4, card_exp, active, amount, currency, topup_id)
               VALUES ('ic_1', '4242', '12/2030', false, 5000, 'USD', 'top_1')"""
        )
        await conn.execute(
            """INSERT INTO sent_emails (transaction_id, template, recipient, status)
               VALUES ($1, 'esim_delivery', 'ada@example.com', 'sent')""",
            txn,
        )
        await conn.execute(
            "INSERT INTO stripe_events (event_id, type, transaction_id, outcome) VALUES ('evt_1', "
            "'checkout.session.completed', $1, 'paid')",
            txn,
        )
        await outbox.add(
            conn, OrderPaid(transaction_id=txn, offer_id=OFFER, price=PRICE, payment_intent_id="pi_1")
        )

    response = await admin.get(f"/api/admin/orders/{txn}")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["order"]["status"] == "delivered" and body["order"]["price"] == {
        "amount": 999,
        "currency": "USD",
    }
    assert body["order"]["zendit"]["cost"] == {"amount": 450, "currency": "USD"}
    assert body["order"]["zendit"]["qr_code_url"].endswith(".png")
    assert [(t["from_status"], t["to_status"]) for t in body["transitions"]] == [
        (a.value, b.value) for a, b in itertools.pairwise((S.PENDING_PAYMENT, *PATHS[S.DELIVERED]))
    ]
    assert body["transitions"][0]["reason"] == "test: paid"
    assert [(e["routing_key"], e["published_at"]) for e in body["events"]] == [("order.paid", None)]
    assert [(e["template"], e["status"]) for e in body["emails"]] == [("esim_delivery", "sent")]
    assert [e["event_id"] for e in body["stripe_events"]] == ["evt_1"]
    assert body["topups"] == [
        {
            **body["topups"][0],
            "id": "top_1",
            "amount": 5000,
            "status": "succeeded",
            "card_id": "ic_1",
            "card_last4": "4242",
            "card_active": False,
        }
    ]
    assert body["operator_actions"] == []
    for secret in ("K2-SECRET-ACTIVATION", "signed-secret", "token=", "12/2030", TOKEN):
        assert secret not in response.text


async def test_the_timeline_of_an_unknown_order_is_a_404_that_says_so(admin):
    response = await admin.get("/api/admin/orders/txn_nobody")
    assert response.status_code == 404
    assert response.json() == {"detail": "no order with transaction id txn_nobody"}


# ------------------------------------------------------------------------------------------- re-drive
@pytest.mark.parametrize(
    ("status", "queue", "routing_key"),
    [
        (S.PAID, "funding.order-paid", "order.paid"),
        (S.FUNDING, "funding.order-paid", "order.paid"),
        (S.AWAITING_FUNDS, "funding.order-paid", "order.paid"),
        (S.FUNDED, "provisioning.order-funded", "order.funded"),
        (S.PURCHASING, "provisioning.order-funded", "order.funded"),
        (S.PROVISIONED, "notify.order-provisioned", "order.provisioned"),
    ],
)
async def test_a_redrive_puts_the_states_driving_event_on_its_queue_once_per_call(
    admin, db, reconcile, status, queue, routing_key
):
    facts = provisioned_facts(uuid.uuid4().hex) if status == S.PROVISIONED else {}
    txn = await make_order(db, status, **facts)

    first = await admin.post(f"/api/admin/orders/{txn}/redrive")
    second = await admin.post(f"/api/admin/orders/{txn}/redrive", json={"note": "still stuck"})

    assert first.status_code == second.status_code == 200, first.text
    assert (first.json()["event_source"], second.json()["event_source"]) == ("rebuilt", "republished")
    assert first.json()["event_id"] == second.json()["event_id"]  # the same event again: a redelivery
    messages = await published(reconcile)
    assert {name: len(found) for name, found in messages.items()} == {
        name: 2 if name == queue else 0 for name in WORK_QUEUES
    }
    bodies = [json.loads(m.body) for m in messages[queue]]
    assert {m.message_id for m in messages[queue]} == {first.json()["event_id"]}
    assert bodies[0] == bodies[1] and bodies[0]["transaction_id"] == txn
    assert "token=" not in json.dumps(bodies)
    order = await get_order(db, txn)
    assert order.status == status  # a re-drive from the current state moves nothing itself
    actions = await actions_of(db, txn)
    assert [(a["action"], a["note"]) for a in actions] == [("redrive", None), ("redrive", "still stuck")]
    assert json.loads(actions[0]["detail"])["routing_key"] == routing_key


async def test_a_redrive_republishes_the_event_the_service_published_with_its_id(admin, db, reconcile):
    txn = await make_order(db, S.FUNDING)
    original = OrderPaid(transaction_id=txn, offer_id=OFFER, price=PRICE, payment_intent_id=f"pi_{txn}")
    async with db.acquire() as conn:
        await outbox.add(conn, original)
        await conn.execute("UPDATE outbox SET published_at = now() WHERE event_id = $1", original.event_id)

    response = await admin.post(f"/api/admin/orders/{txn}/redrive")

    assert response.status_code == 200 and response.json()["event_source"] == "republished"
    [message] = (await published(reconcile))["funding.order-paid"]
    assert message.message_id == str(original.event_id)
    assert OrderPaid.model_validate_json(message.body) == original


async def test_a_redrive_publishes_an_event_left_unpublished_and_stamps_it(admin, db, reconcile):
    txn = await make_order(db, S.PAID)
    pending = OrderPaid(transaction_id=txn, offer_id=OFFER, price=PRICE, payment_intent_id=f"pi_{txn}")
    async with db.acquire() as conn:
        await outbox.add(conn, pending)

    response = await admin.post(f"/api/admin/orders/{txn}/redrive")

    assert response.status_code == 200 and response.json()["event_source"] == "pending"
    assert len((await published(reconcile))["funding.order-paid"]) == 1
    stamp = await db.fetchval("SELECT published_at FROM outbox WHERE event_id = $1", pending.event_id)
    assert stamp is not None  # the service's own publisher will not send it again


@pytest.mark.parametrize(
    ("status", "advice"),
    [
        (S.DELIVERED, "nothing left to drive"),
        (S.REFUND_PENDING, "retry-refund"),
        (S.NEEDS_ATTENTION, '"to": "funding"'),
        (S.PENDING_PAYMENT, "not paid"),
    ],
)
async def test_a_redrive_of_a_state_nothing_drives_is_a_409_that_says_what_to_do(
    admin, db, reconcile, status, advice
):
    path = (S.PAID, S.NEEDS_ATTENTION) if status == S.NEEDS_ATTENTION else PATHS.get(status, ())
    txn = await make_order(db, status, path=path, **provisioned_facts(uuid.uuid4().hex))

    response = await admin.post(f"/api/admin/orders/{txn}/redrive")

    assert response.status_code == 409 and advice in response.json()["detail"]
    assert await actions_of(db, txn) == []
    assert all(not found for found in (await published(reconcile)).values())


async def test_a_redrive_of_an_unknown_order_is_a_404(admin):
    response = await admin.post("/api/admin/orders/txn_nobody/redrive")
    assert response.status_code == 404 and "txn_nobody" in response.json()["detail"]


async def test_a_redrive_the_broker_does_not_take_is_recorded_and_the_next_one_publishes_it(
    admin, db, reconcile
):
    txn = await make_order(db, S.PROVISIONED, **provisioned_facts(uuid.uuid4().hex))
    connection = await aio_pika.connect(reconcile.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(reconcile.topology.queue("notify.order-provisioned").name)
        await queue.unbind(reconcile.topology.exchange, "order.provisioned")  # unroutable: not confirmed
        try:
            response = await admin.post(f"/api/admin/orders/{txn}/redrive")
        finally:
            await queue.bind(reconcile.topology.exchange, "order.provisioned")

    assert response.status_code == 503 and "waits in the outbox" in response.json()["detail"]
    assert (await get_order(db, txn)).status == S.PROVISIONED
    actions = await actions_of(db, txn)
    assert [a["action"] for a in actions] == ["redrive", "redrive_not_published"]
    assert json.loads(actions[1]["detail"])["error"] == "PublishFailed"
    [queued] = await db.fetch("SELECT * FROM outbox WHERE transaction_id = $1", txn)
    assert queued["published_at"] is None

    again = await admin.post(f"/api/admin/orders/{txn}/redrive")

    assert again.status_code == 200 and again.json()["event_source"] == "pending"
    [message] = (await published(reconcile))["notify.order-provisioned"]
    assert message.message_id == str(queued["event_id"]) == again.json()["event_id"]


@pytest.mark.parametrize("published_before", [False, True], ids=["rebuilt", "republished"])
async def test_a_redrive_publishes_after_its_audit_row_commits_and_holds_no_lock_meanwhile(
    admin, db, reconcile, monkeypatch, published_before
):
    """Published inside the transaction, an event could go out while its audit row rolled back, and the
    order's row would stay locked for as long as the broker takes to confirm."""
    txn = await make_order(db, S.PROVISIONED, **provisioned_facts(uuid.uuid4().hex))
    if published_before:
        assert (await admin.post(f"/api/admin/orders/{txn}/redrive")).status_code == 200
    publish = reconcile.publisher.publish
    seen: list[tuple[int, bool]] = []

    async def probe(event: Any) -> None:
        async with db.acquire() as conn, conn.transaction():
            audited = await conn.fetchval(
                "SELECT count(*) FROM operator_actions WHERE transaction_id = $1", txn
            )
            free = await conn.fetchval(
                "SELECT true FROM esim_purchases WHERE transaction_id = $1 FOR UPDATE SKIP LOCKED", txn
            )
        seen.append((audited, bool(free)))
        await publish(event)

    monkeypatch.setattr(reconcile.publisher, "publish", probe)
    response = await admin.post(f"/api/admin/orders/{txn}/redrive")

    assert response.status_code == 200, response.text
    assert seen == [(2 if published_before else 1, True)]


async def test_needs_attention_is_redriven_to_funding_with_a_note_and_one_order_paid(admin, db, reconcile):
    txn = await make_order(db, S.NEEDS_ATTENTION, path=(S.PAID, S.NEEDS_ATTENTION))

    refused = await admin.post(f"/api/admin/orders/{txn}/redrive", json={"to": "funding"})
    response = await admin.post(
        f"/api/admin/orders/{txn}/redrive", json={"to": "funding", "note": "amount checked with the customer"}
    )

    assert refused.status_code == 422 and "note" in refused.text
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["moved_from"]) == ("funding", "needs_attention")
    [message] = (await published(reconcile))["funding.order-paid"]
    event = OrderPaid.model_validate_json(message.body)
    assert (event.transaction_id, event.price, event.payment_intent_id) == (txn, PRICE, f"pi_{txn}")
    assert str(event.event_id) == response.json()["event_id"]
    last = await db.fetchrow(
        "SELECT * FROM order_transitions WHERE transaction_id = $1 ORDER BY id DESC LIMIT 1", txn
    )
    assert (last["from_status"], last["to_status"], last["reason"]) == (
        "needs_attention",
        "funding",
        "operator re-drive: amount checked with the customer",
    )
    [action] = await actions_of(db, txn)
    assert (
        json.loads(action["detail"])["to"] == "funding"
        and action["note"] == "amount checked with the customer"
    )
    stamp = await db.fetchval("SELECT published_at FROM outbox WHERE event_id = $1", event.event_id)
    assert stamp is not None


async def test_needs_attention_with_a_live_zendit_purchase_is_not_funded_again(admin, db, reconcile):
    txn = await make_order(
        db,
        S.NEEDS_ATTENTION,
        path=(*PATHS[S.PURCHASING], S.NEEDS_ATTENTION),
        zendit_transaction_id=f"zendit_{uuid.uuid4().hex}",
        zendit_status="PENDING",
    )

    response = await admin.post(f"/api/admin/orders/{txn}/redrive", json={"to": "funding", "note": "retry"})

    assert response.status_code == 409 and "second eSIM" in response.json()["detail"]
    assert (await get_order(db, txn)).status == S.NEEDS_ATTENTION
    assert await actions_of(db, txn) == []
    assert all(not found for found in (await published(reconcile)).values())


async def test_an_email_that_failed_for_good_is_redriven_to_provisioned_and_queued_when_the_broker_refuses(
    admin, db, reconcile
):
    """A publish after the move fails: the move and its queued event stay, and the next re-drive
    publishes exactly that event."""
    txn = await make_order(
        db,
        S.NEEDS_ATTENTION,
        path=(*PATHS[S.PROVISIONED], S.NEEDS_ATTENTION),
        **provisioned_facts(uuid.uuid4().hex),
    )
    connection = await aio_pika.connect(reconcile.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(reconcile.topology.queue("notify.order-provisioned").name)
        await queue.unbind(reconcile.topology.exchange, "order.provisioned")
        try:
            lost = await admin.post(
                f"/api/admin/orders/{txn}/redrive", json={"to": "provisioned", "note": "SMTP relay fixed"}
            )
        finally:
            await queue.bind(reconcile.topology.exchange, "order.provisioned")

    assert lost.status_code == 503 and "redrive (no body)" in lost.json()["detail"]
    assert (await get_order(db, txn)).status == S.PROVISIONED
    queued = await db.fetchrow("SELECT * FROM outbox WHERE transaction_id = $1 AND published_at IS NULL", txn)
    assert queued is not None and queued["routing_key"] == "order.provisioned"

    again = await admin.post(f"/api/admin/orders/{txn}/redrive")

    assert again.status_code == 200 and again.json()["event_source"] == "pending"
    assert again.json()["event_id"] == str(queued["event_id"])
    [message] = (await published(reconcile))["notify.order-provisioned"]
    assert message.message_id == again.json()["event_id"]
    assert json.loads(message.body)["qr_code_url"].endswith(".png") and b"token=" not in message.body
    assert [a["action"] for a in await actions_of(db, txn)] == ["redrive", "redrive_not_published", "redrive"]


async def test_a_stuck_funded_order_is_redriven_to_delivered_once(
    admin, db, reconcile, admin_settings, zendit_emulator, smtp_capture, stripe_emulator, stripe_gateway
):
    """End to end in one process: provisioning and notify consume what the re-drive publishes. Two
    re-drives in a row still buy one eSIM and send one email."""
    from notify.main import create_app as create_notify
    from provisioning.main import create_app as create_provisioning

    txn = await paid_order(db, stripe_emulator, stripe_gateway, S.FUNDED)  # funded, no message in flight
    async with AsyncExitStack() as services:
        for factory in (create_provisioning, create_notify):
            app = factory(admin_settings)
            await services.enter_async_context(app.router.lifespan_context(app))

        before = {name: handled(reconcile, name) for name in DRIVEN_BY}
        first = await admin.post(f"/api/admin/orders/{txn}/redrive", json={"note": "stuck after an outage"})
        second = await admin.post(f"/api/admin/orders/{txn}/redrive")
        assert first.status_code == 200 and second.status_code in (200, 409), second.text
        await wait_for_status(db, txn, S.DELIVERED)
        # "One eSIM, one email" means something only once the second message was handled too: wait
        # until every message that reached provisioning and notify was acked (provisioning's own
        # order.provisioned included), not for a fixed time.
        sent = [r.json()["routing_key"] for r in (first, second) if r.status_code == 200]
        expected = {name: before[name] + sent.count(key) for name, key in DRIVEN_BY.items()}
        expected["notify.order-provisioned"] += 1
        await wait_until_handled(reconcile, expected)

    order = await get_order(db, txn)
    assert order.zendit_transaction_id == txn and order.emailed_at is not None
    assert sorted(t for t in zendit_emulator.state.purchases if t.startswith(txn)) == [txn]
    [email] = smtp_capture.messages
    assert "ada@example.com" in email["To"]
    again = await admin.post(f"/api/admin/orders/{txn}/redrive")
    assert again.status_code == 409 and "nothing left to drive" in again.json()["detail"]


DRIVEN_BY = {"provisioning.order-funded": "order.funded", "notify.order-provisioned": "order.provisioned"}


# ------------------------------------------------------------------------------------------- refunds
async def test_a_refund_stripe_refused_is_retried_once_and_a_second_retry_only_announces_it_again(
    admin, db, reconcile, stripe_emulator, stripe_gateway
):
    txn = await paid_order(db, stripe_emulator, stripe_gateway, S.FUNDING)
    stripe_emulator.inject_fault("/v1/refunds", method="POST", status=403, count=1)
    final = await fail_and_refund(
        pool=db,
        stripe=stripe_gateway,
        publisher=reconcile.publisher,
        transaction_id=txn,
        failed_state=S.TOPUP_FAILED,
        step="funding",
        reason="card_declined",
    )
    assert final == S.NEEDS_ATTENTION

    first = await admin.post(
        f"/api/admin/orders/{txn}/retry-refund", json={"note": "Stripe permissions fixed"}
    )
    second = await admin.post(f"/api/admin/orders/{txn}/retry-refund")

    assert first.status_code == 200, first.text
    order = await get_order(db, txn)
    refunds = stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id)
    assert len(refunds) == 1 and refunds[0]["amount"] == PRICE.amount
    assert first.json() | {"action_id": 0} == {
        "transaction_id": txn,
        "status": "refunded",
        "refund_id": refunds[0]["id"],
        "refund_status": refunds[0]["status"],
        "announced_again": False,
        "action_id": 0,
    }
    assert (stripe_emulator.api_key, f"refund:{txn}") in stripe_emulator.state.idempotency
    assert second.status_code == 200 and second.json()["announced_again"] is True
    assert second.json()["refund_id"] == refunds[0]["id"]
    assert order.failure_reason == "card_declined"  # the failed step's reason, not the refund's
    moves = [
        (r["from_status"], r["to_status"])
        for r in await db.fetch(
            "SELECT from_status, to_status FROM order_transitions WHERE transaction_id = $1 ORDER BY id", txn
        )
    ]
    assert moves[-3:] == [
        ("refund_pending", "needs_attention"),
        ("needs_attention", "refund_pending"),
        ("refund_pending", "refunded"),
    ]
    actions = await actions_of(db, txn)
    assert [a["action"] for a in actions] == ["retry_refund", "retry_refund"]
    assert [json.loads(a["detail"])["announce_only"] for a in actions] == [False, True]
    assert json.loads(actions[0]["detail"])["step"] == "funding"


async def test_a_refund_made_before_a_crash_is_found_again_not_made_twice(
    admin, db, reconcile, stripe_emulator, stripe_gateway
):
    """The service refunded at Stripe and died before recording it (the order stays refund_pending):
    the retry's Stripe call carries the same key, so Stripe answers with that first refund."""
    txn = await paid_order(db, stripe_emulator, stripe_gateway, S.REFUND_PENDING)
    order = await get_order(db, txn)
    made = await stripe_gateway.create_refund(
        transaction_id=txn, payment_intent_id=order.stripe_payment_intent_id, amount=order.price
    )

    responses = [await admin.post(f"/api/admin/orders/{txn}/retry-refund") for _ in range(2)]

    assert [r.status_code for r in responses] == [200, 200]
    assert [r.json()["refund_id"] for r in responses] == [made.id, made.id]
    assert len(stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id)) == 1
    assert (await get_order(db, txn)).status == S.REFUNDED
    # The second call announced it again, as the same event: notify emails once per order and template.
    messages = await taken(reconcile, "notify.order-failed")
    assert [json.loads(m.body)["step"] for m in messages] == ["funding", "funding"]
    assert len({m.message_id for m in messages}) == 1


async def test_a_refund_whose_announcement_the_broker_refused_is_announced_by_a_retry_and_emailed_once(
    admin, db, reconcile, admin_settings, smtp_capture, stripe_emulator, stripe_gateway, monkeypatch
):
    """Refunded, but order.refunded was refused: the customer would never hear of it. The retry
    announces it (nothing is refunded again); notify, started after two announcements, emails once."""
    from notify.main import create_app as create_notify

    txn = await paid_order(db, stripe_emulator, stripe_gateway, S.REFUND_PENDING)
    with monkeypatch.context() as broker_down:
        refusing(reconcile, broker_down, "order.refunded")
        lost = await admin.post(f"/api/admin/orders/{txn}/retry-refund")

    assert lost.status_code == 503 and "did not take its announcement" in lost.json()["detail"]
    order = await get_order(db, txn)
    assert order.status == S.REFUNDED
    actions = await actions_of(db, txn)
    assert [a["action"] for a in actions] == ["retry_refund", "retry_refund_interrupted"]
    assert json.loads(actions[1]["detail"]) == {
        "from": "refund_pending",
        "left": "refunded",
        "error": "PublishFailed",
    }

    again = [await admin.post(f"/api/admin/orders/{txn}/retry-refund") for _ in range(2)]

    assert [(r.status_code, r.json().get("announced_again")) for r in again] == [(200, True), (200, True)]
    assert len(stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id)) == 1
    notify = create_notify(admin_settings)
    before = handled(reconcile, "notify.order-failed")
    async with notify.router.lifespan_context(notify):
        await wait_until_handled(reconcile, {"notify.order-failed": before + 2})
    [email] = smtp_capture.messages
    assert "ada@example.com" in email["To"]


async def test_two_operators_retrying_the_same_refund_at_once_refund_once(
    admin, db, reconcile, stripe_emulator, stripe_gateway
):
    txn = await paid_order(db, stripe_emulator, stripe_gateway, S.REFUND_PENDING)

    responses = await asyncio.gather(*(admin.post(f"/api/admin/orders/{txn}/retry-refund") for _ in range(2)))

    assert sorted(r.status_code for r in responses)[0] == 200
    assert all(r.status_code in (200, 409, 503) for r in responses), [r.text for r in responses]
    order = await get_order(db, txn)
    assert order.status == S.REFUNDED
    assert len(stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id)) == 1


@pytest.mark.parametrize(
    ("status", "path", "advice"),
    [
        (S.DELIVERED, None, "never refunded automatically"),
        (S.NEEDS_ATTENTION, (*PATHS[S.PURCHASING], S.NEEDS_ATTENTION), "may still deliver"),
        (S.NEEDS_ATTENTION, (S.PAID, S.NEEDS_ATTENTION), "no automatic refund was attempted"),
        (S.FUNDED, None, "nothing to refund"),
    ],
    ids=["delivered", "purchase-unresolved", "payment-held", "in-flight"],
)
async def test_a_refund_retry_is_refused_where_the_system_must_not_refund(
    admin, db, reconcile, stripe_emulator, stripe_gateway, status, path, advice
):
    txn = await make_order(db, status, path=path)

    response = await admin.post(f"/api/admin/orders/{txn}/retry-refund")

    assert response.status_code == 409 and advice in response.json()["detail"]
    assert (await get_order(db, txn)).status == status and await actions_of(db, txn) == []
    assert stripe_emulator.state.find("refund", payment_intent=f"pi_{txn}") == []


async def test_a_refund_stripe_refuses_again_is_a_502_and_the_order_waits_for_an_operator(
    admin, db, reconcile, stripe_emulator, stripe_gateway
):
    txn = await paid_order(db, stripe_emulator, stripe_gateway, S.REFUND_PENDING)
    stripe_emulator.inject_fault("/v1/refunds", method="POST", status=403, count=1)

    response = await admin.post(f"/api/admin/orders/{txn}/retry-refund")

    assert response.status_code == 502 and "Stripe dashboard" in response.json()["detail"]
    assert (await get_order(db, txn)).status == S.NEEDS_ATTENTION


async def test_a_reopened_refund_stripe_cannot_answer_goes_back_to_needs_attention_and_is_recorded(
    admin, db, reconcile, stripe_emulator, stripe_gateway
):
    """Left in refund_pending, the order would wait for a message nobody sends."""
    txn = await paid_order(db, stripe_emulator, stripe_gateway, S.REFUND_PENDING)
    stripe_emulator.inject_fault("/v1/refunds", method="POST", status=403, count=1)
    assert (await admin.post(f"/api/admin/orders/{txn}/retry-refund")).status_code == 502
    refused = await get_order(db, txn)
    stripe_emulator.inject_fault("/v1/refunds", method="POST", status=429, count=10)

    response = await admin.post(f"/api/admin/orders/{txn}/retry-refund", json={"note": "Stripe fixed?"})

    assert response.status_code == 503 and "needs_attention" in response.json()["detail"]
    order = await get_order(db, txn)
    assert (order.status, order.failure_reason) == (S.NEEDS_ATTENTION, refused.failure_reason)
    last = await db.fetchrow(
        "SELECT * FROM order_transitions WHERE transaction_id = $1 ORDER BY id DESC LIMIT 1", txn
    )
    assert (last["from_status"], last["to_status"]) == ("refund_pending", "needs_attention")
    actions = await actions_of(db, txn)
    assert [a["action"] for a in actions][-2:] == ["retry_refund", "retry_refund_interrupted"]
    assert json.loads(actions[-1]["detail"]) == {
        "from": "needs_attention",
        "left": "needs_attention",
        "error": "StripeTransientError",
    }
    stripe_emulator.clear_faults()
    assert (await admin.post(f"/api/admin/orders/{txn}/retry-refund")).status_code == 200
    assert len(stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id)) == 1


async def test_a_refund_retry_while_stripe_is_down_is_a_503_and_resumes_later(
    admin, db, reconcile, stripe_emulator, stripe_gateway
):
    txn = await paid_order(db, stripe_emulator, stripe_gateway, S.REFUND_PENDING)
    stripe_emulator.inject_fault("/v1/refunds", method="POST", status=429, count=10)

    response = await admin.post(f"/api/admin/orders/{txn}/retry-refund")

    assert response.status_code == 503 and "refund_pending" in response.json()["detail"]
    stripe_emulator.clear_faults()
    assert (await admin.post(f"/api/admin/orders/{txn}/retry-refund")).status_code == 200
    order = await get_order(db, txn)
    assert len(stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id)) == 1


# ------------------------------------------------------------------------------------------- resolve
@pytest.mark.parametrize("outcome", ["delivered", "refunded"])
async def test_a_needs_attention_order_is_resolved_by_hand_with_its_note(admin, db, reconcile, outcome):
    txn = await make_order(db, S.NEEDS_ATTENTION, path=(S.PAID, S.NEEDS_ATTENTION))

    response = await admin.post(
        f"/api/admin/orders/{txn}/resolve", json={"outcome": outcome, "note": "handled in ticket 42"}
    )

    assert response.status_code == 200, response.text
    assert response.json()["status"] == outcome
    assert (await get_order(db, txn)).status == OrderStatus(outcome)
    reason = await db.fetchval(
        "SELECT reason FROM order_transitions WHERE transaction_id = $1 AND to_status = $2", txn, outcome
    )
    assert reason == "operator resolved: handled in ticket 42"
    [action] = await actions_of(db, txn)
    assert (action["action"], action["note"], action["id"]) == (
        "resolve",
        "handled in ticket 42",
        response.json()["action_id"],
    )
    assert all(not found for found in (await published(reconcile)).values())  # nothing is announced


async def test_an_operators_note_is_stored_redacted(admin, db, reconcile):
    txn = await make_order(db, S.NEEDS_ATTENTION, path=(S.PAID, S.NEEDS_ATTENTION))

    response = await admin.post(
        f"/api/admin/orders/{txn}/resolve",
        json={"outcome": "refunded", "note": "refunded card 4242 4242 4242 4242 by phone"},
    )

    assert response.status_code == 200, response.text
    [action] = await actions_of(db, txn)
    reason = await db.fetchval(
        "SELECT reason FROM order_transitions WHERE transaction_id = $1 ORDER BY id DESC LIMIT 1", txn
    )
    for stored in (action["note"], reason):
        assert "4242 4242" not in stored and "[REDACTED" in stored and "by phone" in stored


async def test_resolve_needs_a_note_and_a_needs_attention_order(admin, db):
    txn = await make_order(db, S.PURCHASING)
    attention = await make_order(db, S.NEEDS_ATTENTION, path=(S.PAID, S.NEEDS_ATTENTION))

    no_note = await admin.post(f"/api/admin/orders/{attention}/resolve", json={"outcome": "delivered"})
    too_long = await admin.post(
        f"/api/admin/orders/{attention}/resolve", json={"outcome": "delivered", "note": "x" * 501}
    )
    bad_outcome = await admin.post(
        f"/api/admin/orders/{attention}/resolve", json={"outcome": "lost", "note": "x"}
    )
    in_flight = await admin.post(
        f"/api/admin/orders/{txn}/resolve", json={"outcome": "delivered", "note": "x"}
    )

    assert [r.status_code for r in (no_note, too_long, bad_outcome)] == [422, 422, 422]
    assert "x" * 501 not in too_long.text  # the input is not echoed
    assert in_flight.status_code == 409 and "only a needs_attention order" in in_flight.json()["detail"]
    assert (await get_order(db, txn)).status == S.PURCHASING
    assert (await get_order(db, attention)).status == S.NEEDS_ATTENTION
    assert await db.fetchval("SELECT count(*) FROM operator_actions") == 0


async def test_an_operator_action_shows_in_the_orders_timeline(admin, db):
    txn = await make_order(db, S.NEEDS_ATTENTION, path=(S.PAID, S.NEEDS_ATTENTION))
    await admin.post(
        f"/api/admin/orders/{txn}/resolve", json={"outcome": "refunded", "note": "refunded in Stripe"}
    )

    body = (await admin.get(f"/api/admin/orders/{txn}")).json()

    [action] = body["operator_actions"]
    assert (action["action"], action["note"]) == ("resolve", "refunded in Stripe")
    assert action["detail"] == {"from": "needs_attention", "to": "refunded"}
    assert body["transitions"][-1]["reason"] == "operator resolved: refunded in Stripe"


# ------------------------------------------------------------------------------------------- OpenAPI
async def test_the_order_endpoints_are_documented_with_their_bodies_and_errors(admin):
    spec = (await admin.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {
        ("/api/admin/orders", "get"): {"200", "401", "422"},
        ("/api/admin/orders/{transaction_id}", "get"): {"200", "401", "404"},
        ("/api/admin/orders/{transaction_id}/redrive", "post"): {"200", "401", "404", "409", "422", "503"},
        ("/api/admin/orders/{transaction_id}/retry-refund", "post"): {
            "200",
            "401",
            "404",
            "409",
            "502",
            "503",
        },
        ("/api/admin/orders/{transaction_id}/resolve", "post"): {"200", "401", "404", "409", "422"},
    }
    for (path, method), codes in expected.items():
        operation = paths[path][method]
        assert codes <= set(operation["responses"]), (path, operation["responses"].keys())
        assert operation["summary"] and operation["description"]
    resolve_body = paths["/api/admin/orders/{transaction_id}/resolve"]["post"]["requestBody"]
    assert resolve_body["required"] is True
    assert set(resolve_body["content"]["application/json"]["schema"]["required"]) == {"outcome", "note"}
    redrive_body = paths["/api/admin/orders/{transaction_id}/redrive"]["post"]["requestBody"]
    assert redrive_body["required"] is False
