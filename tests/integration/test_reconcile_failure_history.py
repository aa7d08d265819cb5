"""The failure history on the real broker and database: a handler that fails for good leaves its message
in the DLQ (replayable and discardable as before) and one row in reconcile's history, shown by the
dead-letter list; a redelivered observation copy counts once; a copy naming no DLQ is dead-lettered by
the observer; `order.failed` events show per step with the latest reason in GET /api/admin/failures.
The observer rides out a database blip on a copy whose own retries ran out, and a copy replayed from
the observer's DLQ is recorded as the dead letter it was; without the database the list still shows
the depths."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import httpx
import pytest
from prometheus_client import REGISTRY

from esim_common.consumer import consume
from esim_common.errors import FailPermanently, RetryLater
from esim_common.events import OrderFailed, OrderPaid
from esim_common.money import Money
from esim_common.publisher import EventPublisher, create_broker, publish_raw
from esim_common.service import ServiceContext
from esim_common.topology import ATTEMPT_HEADER, FAILED_AT_HEADER, LAST_ERROR_HEADER, ORIGIN_QUEUE_HEADER
from reconcile import handlers
from tests.fixtures.polling import eventually
from tests.fixtures.reconcile_app import reconcile_in_process

pytestmark = [pytest.mark.broker, pytest.mark.db]

TOKEN = "admin-token-for-failure-history-0123456789"
DEAD_LETTERS = "/api/admin/dead-letters"
FAILURES = "/api/admin/failures"
QUEUE = "funding.order-paid"
OBSERVER = "reconcile.dead-letters"
PAN = "4242424242424242"


@pytest.fixture
async def service(service_settings) -> AsyncIterator[tuple[httpx.AsyncClient, ServiceContext]]:
    """The reconcile app, its consumers (the dead-letter observer included) started in-process."""
    async with reconcile_in_process(service_settings, token=TOKEN) as running:
        yield running


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def paid_event() -> OrderPaid:
    return OrderPaid(
        transaction_id=f"txn_{uuid.uuid4().hex[:12]}",
        offer_id="ESIM-US-7D-1GB",
        price=Money(amount=1299, currency="USD"),
        payment_intent_id="pi_test",
    )


async def depth(amqp_url: str, name: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def depth_is(amqp_url: str, name: str, expected: int) -> bool:
    return await depth(amqp_url, name) == expected


async def queue_row(client: httpx.AsyncClient, dlq: str) -> dict:
    response = await client.get(DEAD_LETTERS, headers=AUTH)
    assert response.status_code == 200, response.text
    return {row["queue"]: row for row in response.json()["queues"]}[dlq]


def counted(queue: str) -> float:
    return REGISTRY.get_sample_value("esim_dead_letters_total", {"queue": queue}) or 0.0


def observer_settled(ctx: ServiceContext, outcome: str = "ok") -> float:
    labels = {"queue": ctx.topology.queue(OBSERVER).name, "outcome": outcome}
    return REGISTRY.get_sample_value("esim_messages_processed_total", labels) or 0.0


class Handler:
    """funding.order-paid's stand-in: fails (for good, with a card number in the error, unless told
    otherwise) until told not to."""

    def __init__(self, error: Exception | None = None) -> None:
        self.failing = True
        self.error = error or FailPermanently("offer_disabled", f"card {PAN} on a disabled offer")
        self.processed: list[str] = []

    async def __call__(self, event: OrderPaid) -> None:
        if self.failing:
            raise self.error
        self.processed.append(str(event.event_id))


async def failed_at_in(client: httpx.AsyncClient, dlq: str) -> datetime:
    """When the consumer dead-lettered the one message in `dlq` (its header, read by a peek)."""
    response = await client.get(f"{DEAD_LETTERS}/{dlq}", headers=AUTH)
    [message] = response.json()["messages"]
    return datetime.fromisoformat(message["failed_at"])


async def test_a_permanent_failure_stays_replayable_in_the_dlq_and_is_counted_once_in_the_history(
    service, db
):
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    amqp_url = ctx.settings.amqp_url
    before = counted(work.dlq)
    handler = Handler()
    consumer = create_broker(amqp_url)
    consume(consumer, ctx.topology, QUEUE, OrderPaid, handler)  # no failure hook: straight to the DLQ
    await consumer.start()
    try:
        event = paid_event()
        await EventPublisher(consumer, ctx.topology).publish(event)

        async def recorded() -> bool:
            return (await queue_row(client, work.dlq))["dead_lettered_total"] == 1

        await eventually(recorded, within=10, what="the dead letter in the history")
        row = await queue_row(client, work.dlq)
        assert row["depth"] == 1 and row["consumers"] == 0, "observing took nothing from the DLQ"
        assert row["dead_lettered_recent"] == 1
        assert row["last_error"].startswith("FailPermanently: offer_disabled: card ")
        assert PAN not in row["last_error"]
        assert row["last_message_id"] == str(event.event_id)
        assert row["last_transaction_id"] == event.transaction_id
        assert datetime.fromisoformat(row["last_at"]) > datetime.now(UTC) - timedelta(minutes=1)
        assert counted(work.dlq) == before + 1
        stored = await db.fetchrow("SELECT * FROM dead_letter_events")
        assert (stored["routing_key"], stored["event_type"], stored["attempt"]) == (
            "order.paid",
            "OrderPaid",
            1,
        )

        # The DLQ's message is untouched by the observer: the existing replay route takes it back.
        handler.failing = False
        replay = await client.post(
            f"{DEAD_LETTERS}/{work.dlq}/replay", json={"message_ids": [str(event.event_id)]}, headers=AUTH
        )
        assert replay.status_code == 200 and replay.json()["replayed"] == 1
        await eventually(
            lambda: handler.processed == [str(event.event_id)], within=10, what="the replay processed"
        )
    finally:
        await consumer.stop()
    await eventually(lambda: depth_is(amqp_url, work.dlq, 0), within=10, what="the DLQ emptied")
    row = await queue_row(client, work.dlq)
    assert (row["depth"], row["dead_lettered_total"]) == (0, 1), "the history outlives the replay"
    assert await db.fetchval("SELECT count(*) FROM dead_letter_events") == 1
    assert counted(work.dlq) == before + 1


async def test_a_redelivered_observation_copy_is_counted_once(service, db):
    client, ctx = service
    work, observer = ctx.topology.queue(QUEUE), ctx.topology.queue(OBSERVER)
    before_count, before_settled = counted(work.dlq), observer_settled(ctx)
    headers = {
        ORIGIN_QUEUE_HEADER: work.name,
        LAST_ERROR_HEADER: "KeyError: 'bug'",
        FAILED_AT_HEADER: "2026-11-30T12:00:00+00:00",
    }
    for _ in range(2):  # the same copy twice, as a redelivery after a lost ack brings it
        await publish_raw(
            ctx.broker,
            paid_event().model_dump_json().encode(),
            exchange=None,
            routing_key=observer.name,
            message_id="evt-redelivered",
            correlation_id=None,
            headers=headers,
        )

    await eventually(
        lambda: observer_settled(ctx) == before_settled + 2, within=10, what="both copies settled"
    )
    assert await db.fetchval("SELECT count(*) FROM dead_letter_events") == 1
    assert counted(work.dlq) == before_count + 1
    row = await queue_row(client, work.dlq)
    assert (row["dead_lettered_total"], row["last_error"], row["depth"]) == (1, "KeyError: 'bug'", 0)


async def test_a_discarded_dead_letter_keeps_its_history_and_the_observer_never_took_it(service, db):
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    event = paid_event()
    consumer = create_broker(ctx.settings.amqp_url)
    consume(consumer, ctx.topology, QUEUE, OrderPaid, Handler())
    await consumer.start()
    try:
        await EventPublisher(consumer, ctx.topology).publish(event)
        await eventually(
            lambda: db.fetchval("SELECT count(*) = 1 FROM dead_letter_events"), within=10, what="one row"
        )
    finally:
        await consumer.stop()
    peek = await client.get(f"{DEAD_LETTERS}/{work.dlq}", headers=AUTH)
    assert [m["message_id"] for m in peek.json()["messages"]] == [str(event.event_id)]

    discard = await client.post(
        f"{DEAD_LETTERS}/{work.dlq}/discard",
        json={"message_ids": [str(event.event_id)], "note": "offer withdrawn"},
        headers=AUTH,
    )

    assert discard.status_code == 200 and discard.json()["discarded"] == 1
    await eventually(lambda: depth_is(ctx.settings.amqp_url, work.dlq, 0), within=10, what="the DLQ emptied")
    row = await queue_row(client, work.dlq)
    assert row["dead_lettered_total"] == 1 and row["last_message_id"] == str(event.event_id)


async def test_a_copy_naming_no_dlq_is_dead_lettered_by_the_observer_and_not_counted(service, db):
    client, ctx = service
    observer = ctx.topology.queue(OBSERVER)
    await publish_raw(
        ctx.broker,
        b"{}",
        exchange=None,
        routing_key=observer.name,
        message_id="evt-forged",
        correlation_id=None,
        headers={ORIGIN_QUEUE_HEADER: "someone-elses-queue"},
    )

    await eventually(
        lambda: observer_settled(ctx, "dead_lettered") >= 1, within=10, what="the observer dead-lettered it"
    )
    assert await depth(ctx.settings.amqp_url, observer.dlq) == 1
    assert await db.fetchval("SELECT count(*) FROM dead_letter_events") == 0
    assert await depth(ctx.settings.amqp_url, observer.name) == 0, "its own dead letter did not come back"
    row = await queue_row(client, observer.dlq)  # shown like every DLQ, by its depth
    assert (row["depth"], row["dead_lettered_total"]) == (1, 0)


async def test_order_failures_show_per_step_with_the_latest_reason(service, db):
    client, ctx = service
    now = datetime.now(UTC)
    first = OrderFailed(
        transaction_id="txn_a",
        step="funding",
        reason="topup_declined",
        occurred_at=now - timedelta(minutes=5),
    )
    latest = OrderFailed(transaction_id="txn_b", step="funding", reason="float_too_low", occurred_at=now)
    refund = OrderFailed(transaction_id="txn_c", step="refund", reason="refund_failed", occurred_at=now)
    old = OrderFailed(
        transaction_id="txn_d", step="purchase", reason="offer_gone", occurred_at=now - timedelta(hours=30)
    )
    failed_queue = ctx.topology.queue("reconcile.order-failed")
    labels = {"queue": failed_queue.name, "outcome": "ok"}
    for event in (first, latest, refund, old, latest):  # `latest` delivered twice: counted once
        await ctx.publisher.publish(event)

    await eventually(
        lambda: REGISTRY.get_sample_value("esim_messages_processed_total", labels) == 5,
        within=10,
        what="five order.failed events handled",
    )
    assert await db.fetchval("SELECT count(*) FROM order_failures") == 4
    assert await depth(ctx.settings.amqp_url, failed_queue.dlq) == 0, "the duplicate was no error"
    response = await client.get(FAILURES, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    steps = {s["step"]: s for s in body["steps"]}
    assert (body["since_hours"], body["total"]) == (24, 3)
    assert (steps["funding"]["failures"], steps["funding"]["last_reason"]) == (2, "float_too_low")
    assert steps["funding"]["last_transaction_id"] == "txn_b"
    assert (steps["refund"]["failures"], steps["refund"]["last_reason"]) == (1, "refund_failed")
    assert (steps["purchase"]["failures"], steps["purchase"]["last_reason"]) == (0, None)

    wider = (await client.get(FAILURES, params={"since_hours": 48}, headers=AUTH)).json()
    assert {s["step"]: s["failures"] for s in wider["steps"]}["purchase"] == 1


async def test_the_failures_endpoint_wants_the_token_and_a_sane_window(service):
    client, _ = service
    assert (await client.get(FAILURES)).status_code == 401
    assert (await client.get(FAILURES, headers={"Authorization": "Bearer wrong"})).status_code == 401
    for bad in (0, -1, 90 * 24 + 1, "day"):
        assert (await client.get(FAILURES, params={"since_hours": bad}, headers=AUTH)).status_code == 422
    assert (await client.get(DEAD_LETTERS, params={"recent_hours": 0}, headers=AUTH)).status_code == 422


async def test_without_the_database_the_dlq_list_still_shows_the_depths_and_failures_answer_503(service, db):
    """The incident that fills the DLQs may be a database outage: their depths must stay visible."""
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    healthy = (await client.get(DEAD_LETTERS, headers=AUTH)).json()
    assert healthy["history_available"] is True
    assert {(q["dead_lettered_total"], q["dead_lettered_recent"]) for q in healthy["queues"]} == {(0, 0)}
    await publish_raw(  # a dead letter the broker put there itself (no history row)
        ctx.broker,
        b"{}",
        exchange=None,
        routing_key=work.dlq,
        message_id="evt-unobserved",
        correlation_id=None,
        headers={},
    )
    await eventually(lambda: depth_is(ctx.settings.amqp_url, work.dlq, 1), within=10, what="in the DLQ")
    await db.execute("ALTER TABLE dead_letter_events RENAME TO dead_letter_events_away")
    await db.execute("ALTER TABLE order_failures RENAME TO order_failures_away")

    response = await client.get(DEAD_LETTERS, headers=AUTH)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["history_available"], body["total"]) == (False, 1)
    rows = {row["queue"]: row for row in body["queues"]}
    assert (rows[work.dlq]["depth"], rows[work.dlq]["consumers"]) == (1, 0)
    history_fields = ("dead_lettered_total", "dead_lettered_recent", "last_error", "last_at")
    assert all(row[field] is None for row in rows.values() for field in history_fields), "unknown, not 0"
    failures = await client.get(FAILURES, headers=AUTH)
    assert failures.status_code == 503 and failures.json()["detail"] == "the database is unavailable"


async def test_a_copy_whose_retries_ran_out_survives_a_database_blip_with_its_original_error(
    service, db, monkeypatch
):
    """The copy carries the consumer's x-esim-attempt 4; the observer's first insert fails with a
    connection error. It is retried after 1 s (not dead-lettered), and recorded as the consumer saw it."""
    client, ctx = service
    work, observer = ctx.topology.queue(QUEUE), ctx.topology.queue(OBSERVER)
    retried_before, count_before = observer_settled(ctx, "retried"), counted(work.dlq)
    blips: list[str | None] = []
    insert = handlers.insert_dead_letter_event

    async def insert_after_a_blip(pool, record):
        if not blips:
            blips.append(record.error)
            raise ConnectionResetError("connection to the database was reset")
        return await insert(pool, record)

    monkeypatch.setattr(handlers, "insert_dead_letter_event", insert_after_a_blip)
    consumer = create_broker(ctx.settings.amqp_url)
    consume(consumer, ctx.topology, QUEUE, OrderPaid, Handler(RetryLater("zendit answered 503")))
    await consumer.start()
    try:
        event = paid_event()
        await publish_raw(  # on its last attempt: this failure dead-letters it
            consumer,
            event.model_dump_json().encode(),
            exchange=None,
            routing_key=work.name,
            message_id=str(event.event_id),
            correlation_id=event.transaction_id,
            headers={ATTEMPT_HEADER: 4},
        )
        await eventually(
            lambda: db.fetchval("SELECT count(*) = 1 FROM dead_letter_events"), within=15, what="recorded"
        )
    finally:
        await consumer.stop()

    stored = await db.fetchrow("SELECT * FROM dead_letter_events")
    assert blips == ["RetryLater: zendit answered 503"], "the first try failed"
    assert (stored["queue"], stored["event_id"], stored["error"], stored["attempt"]) == (
        work.dlq,
        str(event.event_id),
        "RetryLater: zendit answered 503",
        4,
    )
    assert stored["dead_lettered_at"] == await failed_at_in(client, work.dlq)
    assert observer_settled(ctx, "retried") == retried_before + 1
    assert counted(work.dlq) == count_before + 1
    assert await depth(ctx.settings.amqp_url, observer.dlq) == 0, "the observer kept it"


async def test_a_copy_replayed_from_the_observers_own_dlq_is_recorded_as_the_dead_letter_it_was(service, db):
    """A missing table is a bug, not a blip: the observer dead-letters the copy to its own DLQ. Once
    fixed, an operator replays it there and it is recorded with the original queue, error and time."""
    client, ctx = service
    work, observer = ctx.topology.queue(QUEUE), ctx.topology.queue(OBSERVER)
    amqp_url = ctx.settings.amqp_url
    await db.execute("ALTER TABLE dead_letter_events RENAME TO dead_letter_events_away")
    consumer = create_broker(amqp_url)
    consume(consumer, ctx.topology, QUEUE, OrderPaid, Handler())
    await consumer.start()
    try:
        event = paid_event()
        await EventPublisher(consumer, ctx.topology).publish(event)
        await eventually(lambda: depth_is(amqp_url, observer.dlq, 1), within=10, what="in the observer's DLQ")
    finally:
        await consumer.stop()
    [held] = (await client.get(f"{DEAD_LETTERS}/{observer.dlq}", headers=AUTH)).json()["messages"]
    assert held["last_error"].startswith("UndefinedTableError"), "its own DLQ shows why it failed"
    await db.execute("ALTER TABLE dead_letter_events_away RENAME TO dead_letter_events")

    replay = await client.post(f"{DEAD_LETTERS}/{observer.dlq}/replay", json={"all": True}, headers=AUTH)

    assert replay.status_code == 200 and replay.json()["replayed"] == 1
    await eventually(
        lambda: db.fetchval("SELECT count(*) = 1 FROM dead_letter_events"), within=10, what="recorded"
    )
    stored = await db.fetchrow("SELECT * FROM dead_letter_events")
    assert (stored["queue"], stored["event_id"], stored["attempt"]) == (work.dlq, str(event.event_id), 1)
    assert stored["error"].startswith("FailPermanently: offer_disabled: card ") and PAN not in stored["error"]
    assert stored["dead_lettered_at"] == await failed_at_in(client, work.dlq)
    assert await depth(amqp_url, observer.dlq) == 0, "not dead-lettered again"


async def test_a_dead_letter_replayed_and_failing_again_is_a_second_row_with_its_new_error(service, db):
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    handler = Handler()
    consumer = create_broker(ctx.settings.amqp_url)
    consume(consumer, ctx.topology, QUEUE, OrderPaid, handler)
    await consumer.start()
    try:
        event = paid_event()
        await EventPublisher(consumer, ctx.topology).publish(event)
        await eventually(
            lambda: db.fetchval("SELECT count(*) = 1 FROM dead_letter_events"), within=10, what="first row"
        )
        handler.error = FailPermanently("offer_gone", "withdrawn by the provider")
        replay = await client.post(
            f"{DEAD_LETTERS}/{work.dlq}/replay", json={"message_ids": [str(event.event_id)]}, headers=AUTH
        )
        assert replay.status_code == 200 and replay.json()["replayed"] == 1
        await eventually(
            lambda: db.fetchval("SELECT count(*) = 2 FROM dead_letter_events"), within=10, what="second row"
        )
    finally:
        await consumer.stop()
    row = await queue_row(client, work.dlq)
    assert (row["dead_lettered_total"], row["depth"]) == (2, 1)
    assert row["last_error"] == "FailPermanently: offer_gone: withdrawn by the provider"
