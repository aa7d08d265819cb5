"""Manual capture mode: the funding service captures a delivered order's authorised payment, once.

The funding service runs in-process on the real broker and database; payments are made for real in the
Stripe emulator (Checkout with `capture_method=manual` leaves the PaymentIntent in `requires_capture`),
and what Stripe ends up holding is read back with the official SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from esim_common.events import Event, OrderDelivered, OrderFailed, OrderPaid
from esim_common.money import Money
from esim_common.order_repository import create_order, get_order, record
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.providers.stripe import StripeGateway
from esim_common.publisher import PublishFailed
from esim_common.service import ServiceContext
from esim_common.settings import Settings
from funding.main import create_app
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db]

S = OrderStatus
PRICE = Money(3900, "USD")
COST = Money(2415, "USD")
OFFER = "ESIM-GLOBAL-30D-5GB"
CAPTURE_QUEUE = "funding.order-delivered"
DELIVERED_PATH = (S.PAID, S.FUNDING, S.FUNDED, S.PURCHASING, S.PROVISIONED, S.DELIVERED)


# ------------------------------------------------------------------------------------ harness


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def captures(outcome: str) -> float:
    return sample("esim_funding_payment_captures_total", outcome=outcome)


def alerts() -> float:
    return sample("esim_funding_operator_alerts_total", reason="capture_failed")


def stripe_calls(operation: str) -> float:
    return sum(
        sample("esim_provider_calls_total", provider="stripe", endpoint=operation, outcome=outcome)
        for outcome in ("ok", "transient_error", "permanent_error")
    )


@dataclass
class Funding:
    app: FastAPI
    amqp_url: str

    @property
    def ctx(self) -> ServiceContext:
        return self.app.state.ctx

    @property
    def pool(self) -> asyncpg.Pool:
        return self.ctx.pool

    def handled(self, outcome: str, queue: str = CAPTURE_QUEUE) -> float:
        name = self.ctx.topology.queue(queue).name
        return sample("esim_messages_processed_total", queue=name, outcome=outcome)

    async def wait_handled(
        self, outcome: str, count: int, *, queue: str = CAPTURE_QUEUE, within: float = 30
    ) -> None:
        await eventually(
            lambda: self.handled(outcome, queue) >= count, within=within, what=f"{count} {outcome}"
        )

    async def messages(self, queue: str) -> list[dict[str, Any]]:
        """Take every message waiting in a (prefixed) queue, DLQs included."""
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            source = await channel.get_queue(queue, ensure=False)
            taken = []
            while (message := await source.get(no_ack=True, fail=False)) is not None:
                taken.append(json.loads(message.body))
            return taken


@asynccontextmanager
async def running(settings: Settings, amqp_url: str) -> AsyncIterator[Funding]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield Funding(app=app, amqp_url=amqp_url)


@pytest.fixture
async def funding(service_settings, amqp_url) -> AsyncIterator[Funding]:
    async with running(service_settings, amqp_url) as service:
        yield service


async def paid_order(
    pool: asyncpg.Pool,
    gateway: StripeGateway,
    stripe_emulator,
    *,
    capture_method: str,
    path: tuple[OrderStatus, ...] = DELIVERED_PATH,
    offer_id: str = OFFER,
    cost: Money = COST,
) -> tuple[str, str]:
    """An order paid through Checkout (authorised only when `manual`), walked through `path`.
    Returns (transaction id, PaymentIntent id)."""
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    session = await gateway.create_checkout_session(
        transaction_id=txn,
        amount=PRICE.amount,
        currency=PRICE.currency,
        product_name=offer_id,
        success_url="http://shop.test/ok",
        cancel_url="http://shop.test/cancel",
        capture_method=capture_method,  # type: ignore[arg-type]  # "manual" | "automatic"
    )
    intent_id = (await asyncio.to_thread(stripe_emulator.pay, session.id))["payment_intent"]["id"]
    async with pool.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id=offer_id,
            price=PRICE,
            zendit_cost=cost,
            recipient_email="ada@example.com",
            recipient_name="Ada Lovelace",
            capture_method=capture_method,
        )
        await record(conn, txn, stripe_payment_intent_id=intent_id, stripe_checkout_session_id=session.id)
        for state in path:
            await transition(conn, txn, state)
    return txn, intent_id


def events_about(stripe_emulator, event_type: str, intent_id: str) -> list[dict[str, Any]]:
    found = []
    for event_record in stripe_emulator.events(event_type):
        obj = event_record.event["data"]["object"]
        if intent_id in (obj.get("id"), obj.get("payment_intent")):
            found.append(obj)
    return found


# ------------------------------------------------------------------------------------ manual capture


async def test_a_delivered_manual_order_is_captured_once_though_order_delivered_arrives_three_times(
    funding, stripe_gateway, stripe_emulator, stripe_client
):
    txn, intent_id = await paid_order(funding.pool, stripe_gateway, stripe_emulator, capture_method="manual")
    authorised = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert (authorised.status, authorised.amount_capturable, authorised.amount_received) == (
        "requires_capture",
        PRICE.amount,
        0,
    )
    captured_before, again_before = captures("captured"), captures("already_captured")

    event = OrderDelivered(transaction_id=txn)
    for _ in range(3):  # at-least-once: the same event, redelivered
        await funding.ctx.publisher.publish(event)
    await funding.wait_handled("ok", 3)

    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert (intent.status, intent.amount_received, intent.amount_capturable) == ("succeeded", PRICE.amount, 0)
    assert len(events_about(stripe_emulator, "charge.captured", intent_id)) == 1
    assert captures("captured") - captured_before == 1
    assert captures("already_captured") - again_before == 2
    order = await get_order(funding.pool, txn)
    assert (order.status, order.capture_status, order.capture_failure_reason) == (
        S.DELIVERED,
        "captured",
        None,
    )
    assert order.captured_at is not None and order.captured_at >= order.emailed_at
    assert stripe_emulator.state.find("refund", payment_intent=intent_id) == []


async def test_an_automatic_capture_order_is_left_alone(funding, stripe_gateway, stripe_emulator):
    txn, intent_id = await paid_order(
        funding.pool, stripe_gateway, stripe_emulator, capture_method="automatic"
    )
    calls_before = {op: stripe_calls(op) for op in ("retrieve_payment_intent", "capture_payment_intent")}
    not_required_before = captures("not_required")

    await funding.ctx.publisher.publish(OrderDelivered(transaction_id=txn))
    await funding.wait_handled("ok", 1)

    assert {op: stripe_calls(op) for op in calls_before} == calls_before  # Stripe was not even asked
    assert captures("not_required") - not_required_before == 1
    order = await get_order(funding.pool, txn)
    assert (order.capture_status, order.captured_at) == (None, None)
    assert events_about(stripe_emulator, "charge.captured", intent_id) == []


async def test_an_expired_authorisation_is_recorded_and_alerted_never_refunded_or_silenced(
    funding, stripe_gateway, stripe_emulator, stripe_client, caplog
):
    txn, intent_id = await paid_order(funding.pool, stripe_gateway, stripe_emulator, capture_method="manual")
    stripe_emulator.expire_authorization(intent_id)  # the 7 days passed before delivery
    alerts_before = sample("esim_funding_operator_alerts_total", reason="capture_failed")
    failed_before = captures("failed")
    money_calls_before = {op: stripe_calls(op) for op in ("create_refund", "cancel_payment_intent")}

    await funding.ctx.publisher.publish(OrderDelivered(transaction_id=txn))
    await funding.wait_handled("failed_permanently", 1)

    order = await get_order(funding.pool, txn)
    assert (order.status, order.capture_status, order.capture_failure_reason) == (
        S.DELIVERED,  # the customer has their eSIM: the order is not failed, its money is missing
        "failed",
        "authorisation_canceled_automatic",
    )
    assert order.captured_at is None and order.refund_id is None
    # The operator hears of it: a counter, an ERROR line with the alert key, and order.failed for notify.
    assert sample("esim_funding_operator_alerts_total", reason="capture_failed") - alerts_before == 1
    assert captures("failed") - failed_before == 1
    alerts = [r for r in caplog.records if getattr(r, "alert", None) == "capture_failed"]
    assert len(alerts) == 1 and alerts[0].payment_intent_id == intent_id
    announced = await funding.messages(funding.ctx.topology.queue("notify.order-failed").name)
    assert [(m["transaction_id"], m["step"], m["reason"]) for m in announced] == [
        (txn, "capture", "capture_failed: authorisation_canceled_automatic")
    ]
    # Settled by the failure path, not dropped into the DLQ without a word.
    assert await funding.messages(funding.ctx.topology.queue(CAPTURE_QUEUE).dlq) == []
    assert funding.handled("dead_lettered") == 0
    # Nothing was refunded or cancelled by us: Stripe released the hold itself.
    assert {op: stripe_calls(op) for op in money_calls_before} == money_calls_before
    assert stripe_emulator.state.find("refund", payment_intent=intent_id) == []
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert (intent.status, intent.cancellation_reason, intent.amount_received) == ("canceled", "automatic", 0)


async def test_a_redelivery_after_a_capture_failure_captures_nothing_and_never_overwrites_a_capture(
    funding, stripe_gateway, stripe_emulator
):
    """A recorded failure is tried again (an operator's re-drive), a recorded capture never is."""
    txn, intent_id = await paid_order(funding.pool, stripe_gateway, stripe_emulator, capture_method="manual")
    await funding.pool.execute(
        "UPDATE esim_purchases SET capture_status = 'failed', capture_failure_reason = 'retries_exhausted' "
        "WHERE transaction_id = $1",
        txn,
    )

    await funding.ctx.publisher.publish(OrderDelivered(transaction_id=txn))  # the re-drive
    await funding.wait_handled("ok", 1)
    order = await get_order(funding.pool, txn)
    assert (order.capture_status, order.capture_failure_reason) == ("captured", None)

    calls_before = stripe_calls("capture_payment_intent") + stripe_calls("retrieve_payment_intent")
    await funding.ctx.publisher.publish(OrderDelivered(transaction_id=txn))
    await funding.wait_handled("ok", 2)
    assert stripe_calls("capture_payment_intent") + stripe_calls("retrieve_payment_intent") == calls_before
    assert len(events_about(stripe_emulator, "charge.captured", intent_id)) == 1


# ------------------------------------------------------------------------------------ Stripe unreachable


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Link:
    """A TCP port in front of the emulator: connections are refused until `open()`, then forwarded."""

    def __init__(self, target_url: str) -> None:
        target = urlsplit(target_url)
        self._target = (target.hostname or "127.0.0.1", target.port or 80)
        self.port = _free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()

    async def _forward(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._writers |= {client_writer, upstream_writer}
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer)
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


def unreachable_stripe(settings: Settings, link: Link) -> Settings:
    # No SDK-level retries: each delivery fails fast and the capture's own backoff takes over.
    return settings.model_copy(update={"stripe_api_base": link.url, "stripe_max_network_retries": 0})


async def test_a_stripe_outage_longer_than_the_retry_tiers_is_waited_out_then_captured_without_an_alert(
    service_settings, amqp_url, stripe_gateway, stripe_emulator, stripe_client
):
    """The 1/3/10 s tiers are used up after 14 s; an authorisation lasts 7 days. A capture Stripe cannot
    take now is deferred (attempts unchanged) until a day before the hold lapses, not alerted."""
    link = Link(stripe_emulator.url)
    alerts_before, deferred_before = alerts(), captures("deferred")
    try:
        async with running(unreachable_stripe(service_settings, link), amqp_url) as funding:
            txn, intent_id = await paid_order(
                funding.pool, stripe_gateway, stripe_emulator, capture_method="manual"
            )
            await funding.ctx.publisher.publish(OrderDelivered(transaction_id=txn))
            await asyncio.sleep(16)  # past the 1 + 3 + 10 s of the retry tiers

            order = await get_order(funding.pool, txn)
            assert order.capture_status is None  # a transient failure is not a capture failure
            assert alerts() == alerts_before
            assert captures("deferred") - deferred_before >= 4  # attempts at 0, 1, 2, 5, 8 s ...
            assert funding.handled("deferred") >= 4
            assert funding.handled("retried") == funding.handled("dead_lettered") == 0

            await link.open()  # Stripe is back: the next try (at most 10 s later) captures
            await funding.wait_handled("ok", 1, within=15)
            order = await get_order(funding.pool, txn)
            assert order.capture_status == "captured" and order.capture_failure_reason is None
            assert funding.handled("failed_permanently") == funding.handled("dead_lettered") == 0
    finally:
        await link.close()
    assert alerts() == alerts_before
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert (intent.status, intent.amount_received) == ("succeeded", PRICE.amount)
    assert len(events_about(stripe_emulator, "charge.captured", intent_id)) == 1


async def test_stripe_still_unreachable_a_day_before_the_hold_lapses_alerts_and_dead_letters(
    service_settings, amqp_url, stripe_gateway, stripe_emulator
):
    """Past the deadline (no `capture_before` from Stripe: 7 days after payment, minus a day) the capture
    gets only the retry tiers; then the operator is alerted and the message waits in the DLQ."""
    link = Link(stripe_emulator.url)  # never opened
    alerts_before, deferred_before = alerts(), captures("deferred")
    try:
        async with running(unreachable_stripe(service_settings, link), amqp_url) as funding:
            txn, _ = await paid_order(funding.pool, stripe_gateway, stripe_emulator, capture_method="manual")
            await funding.pool.execute(
                "UPDATE esim_purchases SET paid_at = now() - interval '6 days 1 hour' "
                "WHERE transaction_id = $1",
                txn,
            )
            await funding.ctx.publisher.publish(OrderDelivered(transaction_id=txn))
            await funding.wait_handled("dead_lettered", 1, within=30)

            order = await get_order(funding.pool, txn)
            assert (order.status, order.capture_status, order.capture_failure_reason) == (
                S.DELIVERED,
                "failed",
                "retries_exhausted",
            )
            assert alerts() - alerts_before == 1
            assert captures("deferred") == deferred_before  # no waiting past the deadline
            assert funding.handled("retried") == 3  # the 1, 3 and 10 s tiers
            dead = await funding.messages(funding.ctx.topology.queue(CAPTURE_QUEUE).dlq)
            assert [m["transaction_id"] for m in dead] == [txn]  # for a re-drive once Stripe answers
            announced = await funding.messages(funding.ctx.topology.queue("notify.order-failed").name)
            assert [(m["step"], m["reason"]) for m in announced] == [
                ("capture", "capture_failed: retries_exhausted")
            ]
    finally:
        await link.close()


# ------------------------------------------------------------------------------------ Stripe answers 500


async def test_a_capture_stripe_answered_with_a_500_is_retried_under_a_new_key_and_captured_once(
    funding, stripe_gateway, stripe_emulator, stripe_client
):
    """Stripe saves a 500 under its idempotency key and replays it for 24 h: the retry needs a new key."""
    txn, intent_id = await paid_order(funding.pool, stripe_gateway, stripe_emulator, capture_method="manual")
    alerts_before = alerts()
    stripe_emulator.inject_fault("/v1/payment_intents/*", method="POST", status=500, count=1)
    try:
        await funding.ctx.publisher.publish(OrderDelivered(transaction_id=txn))
        await funding.wait_handled("ok", 1)
    finally:
        stripe_emulator.clear_faults()

    order = await get_order(funding.pool, txn)
    assert (order.capture_status, order.capture_failure_reason) == ("captured", None)
    assert (
        await funding.pool.fetchval(
            "SELECT capture_attempts FROM esim_purchases WHERE transaction_id = $1", txn
        )
        == 2
    )
    assert funding.handled("deferred") == 1 and alerts() == alerts_before
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert (intent.status, intent.amount_received, intent.amount_capturable) == ("succeeded", PRICE.amount, 0)
    assert len(events_about(stripe_emulator, "charge.captured", intent_id)) == 1


async def test_the_hold_end_is_read_from_the_charge(stripe_gateway, stripe_emulator):
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    session = await stripe_gateway.create_checkout_session(
        transaction_id=txn,
        amount=PRICE.amount,
        currency=PRICE.currency,
        product_name=OFFER,
        success_url="http://shop.test/ok",
        cancel_url="http://shop.test/cancel",
        capture_method="manual",
    )
    intent_id = (await asyncio.to_thread(stripe_emulator.pay, session.id))["payment_intent"]["id"]
    plain = await stripe_gateway.retrieve_payment_intent(intent_id)
    with_charge = await stripe_gateway.retrieve_payment_intent(intent_id, with_charge=True)
    assert plain.capture_before is None
    assert with_charge.latest_charge_id == plain.latest_charge_id and with_charge.latest_charge_id
    assert abs(with_charge.capture_before - (time.time() + 7 * 24 * 3600)) < 60


# ------------------------------------------------------------------------------------ the failure path twice


async def test_a_failure_path_that_runs_again_because_its_announcement_failed_alerts_only_once(
    funding, stripe_gateway, stripe_emulator, monkeypatch, caplog
):
    txn, intent_id = await paid_order(funding.pool, stripe_gateway, stripe_emulator, capture_method="manual")
    stripe_emulator.expire_authorization(intent_id)
    alerts_before, failed_before = alerts(), captures("failed")
    publish = funding.ctx.publisher.publish
    refused: list[Event] = []

    async def broker_refuses_the_first_order_failed(event: Event) -> None:
        if isinstance(event, OrderFailed) and not refused:
            refused.append(event)
            raise PublishFailed("the broker did not confirm order.failed")
        await publish(event)

    monkeypatch.setattr(funding.ctx.publisher, "publish", broker_refuses_the_first_order_failed)
    await funding.ctx.publisher.publish(OrderDelivered(transaction_id=txn))
    await funding.wait_handled("failed_permanently", 1)

    assert len(refused) == 1 and funding.handled("retried") == 1  # the failure path ran twice
    assert alerts() - alerts_before == 1 and captures("failed") - failed_before == 1
    assert len([r for r in caplog.records if getattr(r, "alert", None) == "capture_failed"]) == 1
    # ... and the announcement was made the second time.
    announced = await funding.messages(funding.ctx.topology.queue("notify.order-failed").name)
    assert [(m["transaction_id"], m["step"]) for m in announced] == [(txn, "capture")]
    order = await get_order(funding.pool, txn)
    assert (order.capture_status, order.capture_failure_reason) == (
        "failed",
        "authorisation_canceled_automatic",
    )


# ------------------------------------------------------------------------------------ fulfilment fails


async def test_in_manual_mode_a_failed_order_is_released_by_cancelling_not_refunding(
    funding, stripe_gateway, stripe_emulator, stripe_client
):
    """Funding fails for good (the offer's cost is in GBP, the wallet in USD): the authorisation is
    cancelled, so no card fees are lost; Stripe holds no refund."""
    txn, intent_id = await paid_order(
        funding.pool,
        stripe_gateway,
        stripe_emulator,
        capture_method="manual",
        path=(S.PAID,),
        offer_id="ESIM-GB-30D-3GB-GBP",
        cost=Money(735, "GBP"),
    )

    await funding.ctx.publisher.publish(
        OrderPaid(
            transaction_id=txn, offer_id="ESIM-GB-30D-3GB-GBP", price=PRICE, payment_intent_id=intent_id
        )
    )
    await funding.wait_handled("failed_permanently", 1, queue="funding.order-paid")

    order = await get_order(funding.pool, txn)
    # A released hold is no refund: no refund id (the PaymentIntent's id is not one).
    assert (order.status, order.refund_id, order.refund_status) == (S.REFUNDED, None, "canceled")
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert (intent.status, intent.cancellation_reason, intent.amount_received) == (
        "canceled",
        "requested_by_customer",
        0,
    )
    assert stripe_emulator.state.find("refund", payment_intent=intent_id) == []


async def test_in_manual_mode_a_failed_order_whose_authorisation_already_lapsed_needs_no_refund(
    funding, stripe_gateway, stripe_emulator
):
    """The hold is gone already (it expired, or our cancel landed before a crash): nothing to give back."""
    txn, intent_id = await paid_order(
        funding.pool,
        stripe_gateway,
        stripe_emulator,
        capture_method="manual",
        path=(S.PAID,),
        offer_id="ESIM-GB-30D-3GB-GBP",
        cost=Money(735, "GBP"),
    )
    stripe_emulator.expire_authorization(intent_id)

    await funding.ctx.publisher.publish(
        OrderPaid(
            transaction_id=txn, offer_id="ESIM-GB-30D-3GB-GBP", price=PRICE, payment_intent_id=intent_id
        )
    )
    await funding.wait_handled("failed_permanently", 1, queue="funding.order-paid")

    order = await get_order(funding.pool, txn)
    assert (order.status, order.refund_status) == (S.REFUNDED, "canceled")
    assert stripe_emulator.state.find("refund", payment_intent=intent_id) == []
