"""The provisioning service in-process against the real RabbitMQ, the real Postgres and the emulators.

Each test pays a real Checkout Session in the Stripe emulator (so refunds have a real PaymentIntent),
inserts the order and walks it to `funded`, publishes `order.funded` to a private topology, and reads
what the service announced from the queues of the consumers that are not running (notify, funding,
reconcile).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import PIL.Image
import pytest
import zxingcpp
from fastapi import FastAPI
from prometheus_client import REGISTRY

from esim_common.errors import CheckAgainLater, FailPermanently
from esim_common.events import OrderFunded
from esim_common.money import Money
from esim_common.order_repository import Order, create_order, get_order, record
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.providers.zendit import Purchase, ZenditClient
from esim_common.service import ServiceContext
from esim_common.settings import Settings
from esim_common.topology import delete, esim_topology
from provisioning.main import create_app
from provisioning.storage import QrStorage, QrStorageError

pytestmark = [pytest.mark.broker, pytest.mark.db]

OFFER = "ESIM-US-7D-1GB"  # costs 4.50 USD: the 100 USD sandbox wallet pays for many
PRICE = Money(999, "USD")
COST = Money(450, "USD")
WAIT_SECONDS = 20.0


# ------------------------------------------------------------------------------------------- harness
@dataclass
class Provisioning:
    """A started provisioning service and the handles a test needs around it."""

    app: FastAPI
    settings: Settings
    amqp_url: str

    @property
    def ctx(self) -> ServiceContext:
        return self.app.state.ctx

    def queue(self, name: str) -> str:
        return self.ctx.topology.queue(name).name

    async def publish_funded(self, txn: str, *, event_id: uuid.UUID | None = None) -> OrderFunded:
        event = OrderFunded(
            transaction_id=txn, offer_id=OFFER, zendit_cost=COST, event_id=event_id or uuid.uuid4()
        )
        await self.ctx.publisher.publish(event)
        return event

    async def drain(self, queue_name: str) -> list[dict[str, Any]]:
        """Every message now in one of the topology's work queues (removed from it)."""
        return await self.drain_raw(self.queue(queue_name))

    async def drain_raw(self, full_queue_name: str) -> list[dict[str, Any]]:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(full_queue_name, passive=True)
            bodies = []
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                bodies.append(json.loads(message.body))
            return bodies


@pytest.fixture
async def start_provisioning(
    service_settings: Settings,
) -> AsyncIterator[Callable[..., Awaitable[Provisioning]]]:
    """Start the service (its real lifespan) with settings overrides; stop it and delete its queues after."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Provisioning:
            settings = service_settings.model_copy(update=overrides)
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            return Provisioning(app=app, settings=settings, amqp_url=settings.amqp_url)

        yield start
    connection = await aio_pika.connect(service_settings.amqp_url)
    async with connection:
        topology = esim_topology(
            exchange=service_settings.exchange_name, prefix=service_settings.topology_prefix
        )
        await asyncio.wait_for(delete(await connection.channel(), topology), timeout=10)


@pytest.fixture
async def funded_order(db: asyncpg.Pool, stripe_emulator, stripe_gateway) -> Callable[[], Awaitable[str]]:
    """Make an order that a customer really paid (a PaymentIntent to refund) and funding moved to funded."""

    async def make() -> str:
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
            await record(
                conn,
                txn,
                stripe_checkout_session_id=session.id,
                stripe_payment_intent_id=paid["payment_intent"]["id"],
            )
            for status in (OrderStatus.PAID, OrderStatus.FUNDING, OrderStatus.FUNDED):
                await transition(conn, txn, status)
        return txn

    return make


async def order_of(db: asyncpg.Pool, txn: str) -> Order:
    order = await get_order(db, txn)
    assert order is not None
    return order


async def wait_for_status(
    db: asyncpg.Pool, txn: str, *statuses: OrderStatus, within: float = WAIT_SECONDS
) -> Order:
    deadline = time.monotonic() + within
    while (order := await order_of(db, txn)).status not in statuses:
        if time.monotonic() > deadline:
            raise AssertionError(f"order {txn} is {order.status} after {within}s, expected {statuses}")
        await asyncio.sleep(0.05)
    return order


async def wait_for_messages(
    service: Provisioning, queue_name: str, count: int, *, within: float = 10.0, settle: float = 0.5
) -> list[dict[str, Any]]:
    """Collect messages from a queue until `count` arrived, then a moment more to catch extras."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while len(found) < count and time.monotonic() < deadline:
        found += await service.drain(queue_name)
        await asyncio.sleep(0.05)
    await asyncio.sleep(settle)
    return found + await service.drain(queue_name)


def zendit_purchases(zendit_emulator, txn: str) -> list[str]:
    return sorted(tid for tid in zendit_emulator.state.purchases if tid.startswith(txn))


def expected_lpa(zendit_emulator, zendit_id: str) -> str:
    confirmation = zendit_emulator.state.purchases[zendit_id].confirmation
    return f"LPA:1${confirmation['smdpAddress']}${confirmation['activationCode']}"


def zendit_posts() -> float:
    """Purchase POSTs sent to Zendit by this process so far, whatever their outcome."""
    return sum(
        REGISTRY.get_sample_value(
            "esim_provider_calls_total",
            {"provider": "zendit", "endpoint": "POST /esim/purchases", "outcome": outcome},
        )
        or 0.0
        for outcome in ("ok", "transient_error", "permanent_error")
    )


def zendit_gets() -> float:
    """Purchase GETs sent to Zendit by this process so far, whatever their outcome."""
    return sum(
        REGISTRY.get_sample_value(
            "esim_provider_calls_total",
            {"provider": "zendit", "endpoint": "GET /esim/purchases/{id}", "outcome": outcome},
        )
        or 0.0
        for outcome in ("ok", "not_found", "transient_error", "permanent_error")
    )


def decode(png: bytes) -> list[str]:
    return [r.text for r in zxingcpp.read_barcodes(PIL.Image.open(io.BytesIO(png)))]


def refunds_of(stripe_emulator, order: Order) -> list[dict[str, Any]]:
    return stripe_emulator.state.find("refund", payment_intent=order.stripe_payment_intent_id)


# ------------------------------------------------------------------------------------------- happy path
async def test_a_funded_order_buys_one_esim_and_stores_a_qr_code_that_decodes_to_its_lpa_string(
    start_provisioning, funded_order, db, zendit_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    gets_before, posts_before = zendit_gets(), zendit_posts()

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED)
    announced = await wait_for_messages(service, "notify.order-provisioned", 1)

    assert zendit_purchases(zendit_emulator, txn) == [txn]
    # One GET (404, under the row lock) before the one POST, one GET that finds it DONE: no look twice.
    assert (zendit_gets() - gets_before, zendit_posts() - posts_before) == (2, 1)
    qr_file = Path(service.settings.qr_storage_dir) / f"{txn}.png"
    lpa = expected_lpa(zendit_emulator, txn)
    assert decode(qr_file.read_bytes()) == [lpa]
    assert order.qr_code_url == f"{service.settings.qr_public_base_url}/{txn}.png"
    assert (
        order.zendit_transaction_id == txn and order.purchase_attempts == 1 and order.zendit_status == "DONE"
    )
    assert lpa == f"LPA:1${order.smdp_address}${order.activation_code}" and order.iccid
    assert order.purchased_at is not None and order.qr_stored_at is not None
    assert [(m["transaction_id"], m["zendit_transaction_id"], m["qr_code_url"]) for m in announced] == [
        (txn, txn, order.qr_code_url)
    ]


async def test_the_stored_qr_code_is_served_and_nothing_outside_the_store_is(
    start_provisioning, funded_order, db, tmp_path
):
    service = await start_provisioning()
    txn = await funded_order()
    await service.publish_funded(txn)
    await wait_for_status(db, txn, OrderStatus.PROVISIONED)
    (tmp_path / "secret.png").write_bytes(b"not yours")

    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://provisioning") as client:
        served = await client.get(f"/qrcodes/{txn}.png")
        unknown = await client.get("/qrcodes/txn_unknown.png")
        traversal = [
            await client.get(path)
            for path in (
                "/qrcodes/..%2Fsecret.png",
                "/qrcodes/%2E%2E.png",
                "/qrcodes/a.b.png",
                "/qrcodes/.png",
            )
        ]

    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert served.content == (Path(service.settings.qr_storage_dir) / f"{txn}.png").read_bytes()
    assert "no-store" in served.headers["cache-control"]
    assert unknown.status_code == 404
    assert [r.status_code for r in traversal] == [404] * len(traversal)


# ------------------------------------------------------------------------------------------- never blocking
SLOW_PURCHASE_SECONDS = 5.0  # the case; real purchases take ~15 s, an outage hours


async def test_a_purchase_that_takes_5_s_does_not_hold_the_consumer_and_other_orders_complete_meanwhile(
    start_provisioning, funded_order, db, zendit_emulator
):
    # One unacknowledged message at a time: a handler that waited for DONE would block everything.
    service = await start_provisioning(broker_prefetch=1)
    slow = await funded_order()
    others = [await funded_order() for _ in range(3)]

    zendit_emulator.control("POST", "purchase_delay", {"seconds": SLOW_PURCHASE_SECONDS})
    await service.publish_funded(slow)
    deadline = time.monotonic() + 5
    while slow not in zendit_emulator.state.purchases:
        assert time.monotonic() < deadline, "the slow purchase was never placed"
        await asyncio.sleep(0.05)
    slow_done_at = time.monotonic() + SLOW_PURCHASE_SECONDS  # Zendit finishes it then, not before
    zendit_emulator.control("POST", "purchase_delay", {"seconds": 0.2})
    for txn in others:
        await service.publish_funded(txn)

    delivered = [
        await wait_for_status(
            db, txn, OrderStatus.PROVISIONED, within=max(0.1, slow_done_at - time.monotonic())
        )
        for txn in others
    ]
    slow_at_zendit = zendit_emulator.control("GET", "state")["purchases"][slow]["status"]
    slow_meanwhile = await order_of(db, slow)
    slow_order = await wait_for_status(db, slow, OrderStatus.PROVISIONED)

    assert zendit_emulator.state.purchases[slow].delay == SLOW_PURCHASE_SECONDS
    assert slow_at_zendit in {"ACCEPTED", "PENDING", "AUTHORIZED", "IN_PROGRESS"}  # all done meanwhile
    assert slow_meanwhile.status == OrderStatus.PURCHASING
    assert slow_meanwhile.zendit_status in {"ACCEPTED", "PENDING", "AUTHORIZED", "IN_PROGRESS"}
    assert all(order.qr_stored_at < slow_order.qr_stored_at for order in delivered)
    assert zendit_purchases(zendit_emulator, slow) == [slow]


# ------------------------------------------------------------------------------------------- idempotency
async def test_a_redelivered_order_funded_buys_one_esim_and_announces_it_once(
    start_provisioning, funded_order, db, zendit_emulator
):
    service = await start_provisioning()
    txn = await funded_order()

    posts_before = zendit_posts()
    first = await service.publish_funded(txn)
    await service.publish_funded(txn, event_id=first.event_id)  # the same message, delivered twice
    await wait_for_status(db, txn, OrderStatus.PROVISIONED)
    announced = await wait_for_messages(service, "notify.order-provisioned", 1)
    await service.publish_funded(txn, event_id=first.event_id)  # and once more after the fact
    again = await wait_for_messages(service, "notify.order-provisioned", 1, within=3.0)

    assert zendit_purchases(zendit_emulator, txn) == [txn]
    assert zendit_posts() - posts_before == 1
    assert (await order_of(db, txn)).purchase_attempts == 1
    # order.provisioned goes out once (outbox): a redelivery finds it published. A publish that was
    # lost is published by the next delivery instead (test_provisioning_hints.py).
    assert [m["transaction_id"] for m in announced] == [txn] and again == []


async def test_two_workers_racing_on_duplicate_messages_place_one_purchase(
    start_provisioning, funded_order, db, zendit_emulator
):
    first_worker = await start_provisioning()
    await start_provisioning()  # a second replica: competing consumer on the same queue and database
    txn = await funded_order()
    posts_before = zendit_posts()

    event = await first_worker.publish_funded(txn)
    for _ in range(5):
        await first_worker.publish_funded(txn, event_id=event.event_id)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED)
    await asyncio.sleep(1.0)  # let the duplicates finish

    assert zendit_purchases(zendit_emulator, txn) == [txn]
    assert zendit_posts() - posts_before == 1
    assert order.purchase_attempts == 1


@pytest.mark.parametrize(
    "fault",
    [
        {"sleepSeconds": 2.0, "status": None},  # the client times out (1 s) while Zendit takes it
        {"status": 503},  # Zendit took it, then answered 503
    ],
    ids=["timeout", "5xx"],
)
async def test_a_purchase_post_that_failed_in_transit_but_landed_is_found_by_get_and_not_bought_twice(
    start_provisioning, funded_order, db, zendit_emulator, fault
):
    service = await start_provisioning(zendit_timeout_seconds=1.0)
    txn = await funded_order()
    zendit_emulator.control("POST", "faults", {"endpoint": "create_purchase", "when": "after", **fault})
    posts_before = zendit_posts()

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED)

    assert zendit_emulator.control("GET", "state")["faults"] == []  # the fault did happen
    assert zendit_posts() - posts_before == 1  # the GET found it: no second POST was even tried
    assert zendit_purchases(zendit_emulator, txn) == [txn]
    assert order.purchase_attempts == 1
    assert decode((Path(service.settings.qr_storage_dir) / f"{txn}.png").read_bytes()) == [
        expected_lpa(zendit_emulator, txn)
    ]


async def test_a_zendit_outage_while_polling_is_waited_out_rather_than_failed(
    start_provisioning, funded_order, db, zendit_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    # More failures than the consumer's three retry tiers would tolerate.
    zendit_emulator.control("POST", "faults", {"endpoint": "get_purchase", "status": 503, "count": 6})

    await service.publish_funded(txn)
    order = await wait_for_status(
        db, txn, OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED
    )

    assert order.status == OrderStatus.PROVISIONED
    assert zendit_emulator.control("GET", "state")["faults"] == []  # all six 503s were answered
    assert zendit_purchases(zendit_emulator, txn) == [txn]


@dataclass
class LockProbingZendit:
    """The service's Zendit client, noting for each purchase GET whether the order's row was locked
    meanwhile (a GET under the lock holds the row and a pooled connection while Zendit answers)."""

    inner: ZenditClient
    pool: asyncpg.Pool
    row_locked: list[bool] = field(default_factory=list)

    async def get_purchase(self, transaction_id: str) -> Purchase:
        self.row_locked.append(await row_is_locked(self.pool, transaction_id))
        return await self.inner.get_purchase(transaction_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_poll_after_a_zendit_error_looks_without_the_row_lock_before_it_places_the_purchase(
    start_provisioning, funded_order, db, zendit_emulator
):
    """Only the delivery that has just started the attempt looks under the row lock alone. A later poll
    with no Zendit status recorded (the last look met a Zendit error) looks without the lock first: in
    a Zendit brownout, slow GETs must not hold rows and pooled connections from healthy orders."""
    service = await start_provisioning()
    provisioner = service.app.state.provisioner
    zendit = LockProbingZendit(provisioner.zendit, db)
    provisioner.zendit = zendit
    txn = await funded_order()
    event = OrderFunded(transaction_id=txn, offer_id=OFFER, zendit_cost=COST)
    zendit_emulator.control("POST", "faults", {"endpoint": "get_purchase", "status": 503, "count": 1})

    with pytest.raises(CheckAgainLater):  # starts the attempt; its one GET, under the lock, meets a 503
        await provisioner.on_order_funded(event)
    first_delivery, zendit.row_locked = zendit.row_locked, []
    after_the_error = await order_of(db, txn)
    zendit_emulator.control("POST", "purchase_stalls", {"count": 1})
    with pytest.raises(CheckAgainLater):  # the next poll: looks (404), then places it under the lock
        await provisioner.on_order_funded(event)

    assert after_the_error.status == OrderStatus.PURCHASING and after_the_error.zendit_status is None
    assert zendit_emulator.control("GET", "state")["faults"] == []  # the 503 was met
    assert first_delivery == [True]
    assert zendit.row_locked == [False, True]
    assert zendit_purchases(zendit_emulator, txn) == [txn]


# ------------------------------------------------------------------------------------------- failures
async def test_a_failed_purchase_is_refunded_exactly_once_and_announced_as_failed(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    zendit_emulator.control("POST", "purchase_failures", {"code": "PRODUCT_UNAVAILABLE"})

    first = await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.REFUNDED, OrderStatus.NEEDS_ATTENTION)
    failed = await wait_for_messages(service, "notify.order-failed", 1)
    await service.publish_funded(txn, event_id=first.event_id)  # a redelivery afterwards changes nothing
    await asyncio.sleep(1.0)

    assert order.status == OrderStatus.REFUNDED
    assert order.failure_reason == "zendit_product_unavailable" and order.zendit_status == "FAILED"
    timeline = [
        r["to_status"]
        for r in await db.fetch(
            "SELECT to_status FROM order_transitions WHERE transaction_id = $1 ORDER BY id", txn
        )
    ]
    assert timeline[-3:] == ["purchase_failed", "refund_pending", "refunded"]
    refunds = refunds_of(stripe_emulator, order)
    assert len(refunds) == 1 and refunds[0]["amount"] == PRICE.amount and refunds[0]["id"] == order.refund_id
    assert [(m["step"], m["reason"]) for m in failed] == [("purchase", "zendit_product_unavailable")]
    assert len(await service.drain("reconcile.order-refunded")) == 1
    assert await service.drain("notify.order-failed") == []
    assert zendit_purchases(zendit_emulator, txn) == [txn]
    assert not (Path(service.settings.qr_storage_dir) / f"{txn}.png").exists()


async def test_insufficient_funds_sends_the_order_back_to_funding_and_the_next_attempt_uses_a_new_id(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    zendit_emulator.control("POST", "purchase_failures", {"code": "INSUFFICIENT_FUNDS"})

    await service.publish_funded(txn)
    back = await wait_for_status(
        db, txn, OrderStatus.FUNDING, OrderStatus.REFUNDED, OrderStatus.NEEDS_ATTENTION
    )
    paid = await wait_for_messages(service, "funding.order-paid", 1)

    assert back.status == OrderStatus.FUNDING
    assert back.zendit_status is None and back.purchase_attempts == 1  # cleared: funding reserves again
    assert [(m["transaction_id"], m["offer_id"], m["price"], m["payment_intent_id"]) for m in paid] == [
        (txn, OFFER, {"amount": PRICE.amount, "currency": PRICE.currency}, back.stripe_payment_intent_id)
    ]
    assert refunds_of(stripe_emulator, back) == []

    # Funding tops up and announces the order funded again (done by hand here: funding is not running).
    async with db.acquire() as conn:
        await transition(conn, txn, OrderStatus.FUNDED)
    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED)

    assert zendit_purchases(zendit_emulator, txn) == [txn, f"{txn}-r2"]
    assert order.zendit_transaction_id == f"{txn}-r2" and order.purchase_attempts == 2
    assert decode((Path(service.settings.qr_storage_dir) / f"{txn}.png").read_bytes()) == [
        expected_lpa(zendit_emulator, f"{txn}-r2")
    ]


async def test_a_purchase_still_open_at_the_deadline_needs_an_operator_and_is_not_refunded(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator, caplog
):
    service = await start_provisioning(purchase_deadline_seconds=3)
    txn = await funded_order()
    zendit_emulator.control("POST", "purchase_stalls", {"count": 1})  # a supplier outage: IN_PROGRESS

    with caplog.at_level(logging.ERROR, logger="esim.provisioning"):
        await service.publish_funded(txn)
        order = await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED, within=15)

    assert order.status == OrderStatus.NEEDS_ATTENTION
    assert order.failure_reason == "purchase_deadline_exceeded" and order.zendit_status == "IN_PROGRESS"
    assert refunds_of(stripe_emulator, order) == []
    alerts = [r for r in caplog.records if getattr(r, "alert", None) == "purchase_needs_attention"]
    assert len(alerts) == 1 and alerts[0].zendit_transaction_id == txn
    assert await service.drain("notify.order-failed") == []


def processed(service: Provisioning, outcome: str) -> float:
    """order.funded deliveries the service settled with `outcome` (ok, deferred, retried, ...)."""
    labels = {"queue": service.queue("provisioning.order-funded"), "outcome": outcome}
    return REGISTRY.get_sample_value("esim_messages_processed_total", labels) or 0.0


@dataclass
class FailingStorage:
    """The service's QR storage, down (QrStorageError, transient) for its first `failures` saves."""

    inner: QrStorage
    failures: int
    saves: int = 0

    async def save(self, name: str, png: bytes) -> str:
        self.saves += 1
        if self.saves <= self.failures:
            raise QrStorageError("the storage service answered 503 (test)")
        return await self.inner.save(name, png)


async def test_a_storage_outage_longer_than_the_retry_tiers_is_waited_out_and_delivered_once(
    start_provisioning, funded_order, db, zendit_emulator
):
    service = await start_provisioning(purchase_deadline_seconds=120)  # not reached
    provisioner = service.app.state.provisioner
    # More failed saves than the consumer's three retry tiers would tolerate.
    storage = FailingStorage(provisioner.storage, failures=len(service.ctx.topology.retry_delays) + 3)
    provisioner.storage = storage
    txn = await funded_order()
    retried_before, deferred_before = processed(service, "retried"), processed(service, "deferred")

    await service.publish_funded(txn)
    order = await wait_for_status(
        db, txn, OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED
    )
    announced = await wait_for_messages(service, "notify.order-provisioned", 1)

    assert order.status == OrderStatus.PROVISIONED and order.zendit_status == "DONE"
    assert storage.saves == storage.failures + 1
    # Looked at again with the poll's backoff (deferred, attempts unchanged): no retry tier used up.
    assert processed(service, "retried") == retried_before
    assert processed(service, "deferred") - deferred_before >= storage.failures
    assert [m["transaction_id"] for m in announced] == [txn]
    assert zendit_purchases(zendit_emulator, txn) == [txn]
    assert decode((Path(service.settings.qr_storage_dir) / f"{txn}.png").read_bytes()) == [
        expected_lpa(zendit_emulator, txn)
    ]


@dataclass
class LockProbingStorage:
    """The service's QR storage, noting for each save whether the order's row was locked meanwhile
    (an upload under the row lock would hold the row and a pooled connection while it waits)."""

    inner: QrStorage
    pool: asyncpg.Pool
    row_locked: list[bool] = field(default_factory=list)

    async def save(self, name: str, png: bytes) -> str:
        self.row_locked.append(await row_is_locked(self.pool, name))
        return await self.inner.save(name, png)


async def row_is_locked(pool: asyncpg.Pool, txn: str) -> bool:
    """Whether another transaction holds the order's row lock just now."""
    async with pool.acquire() as conn, conn.transaction():
        try:
            await conn.execute(
                "SELECT 1 FROM esim_purchases WHERE transaction_id = $1 FOR UPDATE NOWAIT", txn
            )
        except asyncpg.LockNotAvailableError:
            return True
        return False


async def test_the_qr_code_is_stored_before_the_orders_row_is_locked(start_provisioning, funded_order, db):
    service = await start_provisioning()
    provisioner = service.app.state.provisioner
    storage = LockProbingStorage(provisioner.storage, db)
    provisioner.storage = storage
    txn = await funded_order()

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION)

    assert order.status == OrderStatus.PROVISIONED
    assert storage.row_locked == [False]


async def test_a_qr_code_that_cannot_be_stored_by_the_deadline_goes_to_an_operator_and_is_never_refunded(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator, tmp_path
):
    blocked = tmp_path / "a-file-not-a-directory"
    blocked.write_text("storage is broken")
    service = await start_provisioning(qr_storage_dir=str(blocked), purchase_deadline_seconds=4)
    txn = await funded_order()
    retried_before = processed(service, "retried")

    await service.publish_funded(txn)
    # Waited out with the poll's backoff until the deadline, then handed to an operator.
    order = await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED, within=20)
    [alert] = await wait_for_messages(service, "notify.operator-alert", 1)

    assert order.status == OrderStatus.NEEDS_ATTENTION
    assert order.failure_reason == "qr_storage_deadline_exceeded"
    assert order.zendit_status == "DONE"  # recorded when the DONE was seen: the operator is told so
    assert (alert["reason"], alert["facts"]["zendit_status"]) == ("qr_storage_deadline_exceeded", "DONE")
    assert refunds_of(stripe_emulator, order) == []
    assert processed(service, "retried") == retried_before
    # Handed over, not failed: nothing dead-lettered, and nobody told the order failed (it did not).
    assert await service.drain_raw(service.ctx.topology.queue("provisioning.order-funded").dlq) == []
    assert await service.drain("notify.order-failed") == []


# ------------------------------------------------------------------------------------------- refunds
async def test_a_purchase_zendit_refuses_and_does_not_have_is_purchase_failed_and_refunded_once(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    # The POST is refused before anything is created; the GET that follows finds nothing.
    zendit_emulator.control("POST", "faults", {"endpoint": "create_purchase", "status": 400})

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.REFUNDED, OrderStatus.NEEDS_ATTENTION)
    failed = await wait_for_messages(service, "notify.order-failed", 1)

    assert order.status == OrderStatus.REFUNDED and order.failure_reason.startswith("zendit_")
    timeline = [
        r["to_status"]
        for r in await db.fetch(
            "SELECT to_status FROM order_transitions WHERE transaction_id = $1 ORDER BY id", txn
        )
    ]
    # Moved to purchase_failed under the row lock: that, not the reason, is what allows the refund.
    assert timeline[-4:] == ["purchasing", "purchase_failed", "refund_pending", "refunded"]
    assert len(refunds_of(stripe_emulator, order)) == 1
    assert [m["step"] for m in failed] == ["purchase"]
    assert zendit_purchases(zendit_emulator, txn) == []


async def test_a_purchase_seen_before_that_is_refused_and_not_found_is_never_refunded(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator
):
    """A purchase we saw at Zendit (IN_PROGRESS) may still be delivered: if a later look finds nothing
    and a POST is refused (a duplicate id, say), that is Zendit's confusion, not proof of no delivery."""
    service = await start_provisioning()
    txn = await funded_order()
    async with db.acquire() as conn:
        await transition(conn, txn, OrderStatus.PURCHASING, reason="test: an attempt in flight")
        await record(conn, txn, zendit_transaction_id=txn, purchase_attempts=1, zendit_status="IN_PROGRESS")
    zendit_emulator.control("POST", "faults", {"endpoint": "create_purchase", "status": 400})

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED)

    assert order.status == OrderStatus.NEEDS_ATTENTION
    assert order.failure_reason == "purchase_status_unreadable"
    assert refunds_of(stripe_emulator, order) == []
    assert await service.drain("notify.order-failed") == []


@dataclass
class RefusingStorage:
    """A storage whose refusal happens to carry a reason that reads like Zendit's."""

    saves: int = 0

    async def save(self, name: str, png: bytes) -> str:
        self.saves += 1
        raise FailPermanently("zendit_lookalike", "the storage refused the PNG (test)")


async def test_a_permanent_failure_whose_reason_reads_zendit_while_purchasing_is_never_refunded(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator
):
    service = await start_provisioning()
    storage = RefusingStorage()
    service.app.state.provisioner.storage = storage
    txn = await funded_order()

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED)

    # Zendit delivered (DONE); only storing failed. The order is still purchasing when the failure
    # path runs, so an operator decides: the `zendit_` reason does not make it refundable.
    assert storage.saves == 1
    assert order.status == OrderStatus.NEEDS_ATTENTION and order.failure_reason == "zendit_lookalike"
    assert order.zendit_status == "DONE"
    assert refunds_of(stripe_emulator, order) == []
    assert await service.drain("notify.order-failed") == []
