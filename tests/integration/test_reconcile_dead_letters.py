"""Dead letters through the admin API on the real broker and database: a message dead-lettered by the
real consumer path is listed, peeked without being taken, replayed to a now-working handler exactly
once, or discarded with an audit row; the token comes first; the depth gauge follows the DLQs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import httpx
import pytest
from prometheus_client import REGISTRY

from esim_common.consumer import consume
from esim_common.errors import RetryLater
from esim_common.events import OrderPaid
from esim_common.money import Money
from esim_common.publisher import EVENT_TYPE_HEADER, EventPublisher, create_broker, publish_raw
from esim_common.service import ServiceContext
from esim_common.topology import (
    ATTEMPT_HEADER,
    FAILED_AT_HEADER,
    LAST_ERROR_HEADER,
    ORIGIN_QUEUE_HEADER,
    ConsumerQueue,
)
from reconcile.dlq_monitor import DeadLetterMonitor
from tests.fixtures.reconcile_app import reconcile_in_process

pytestmark = [pytest.mark.broker, pytest.mark.db]

TOKEN = "admin-token-for-dead-letters-0123456789"
BASE = "/api/admin/dead-letters"
QUEUE = "funding.order-paid"
PAN = "4242424242424242"  # Luhn-valid test card


@pytest.fixture
async def service(service_settings) -> AsyncIterator[tuple[httpx.AsyncClient, ServiceContext]]:
    """The reconcile app (its dead-letter router included by main.py), started in-process."""
    async with reconcile_in_process(service_settings, token=TOKEN) as running:
        yield running


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


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


async def wait_for_depth(amqp_url: str, name: str, expected: int, timeout: float = 5.0) -> None:
    """Returned (peeked) messages reappear asynchronously on a quorum queue: poll, do not sample once."""
    deadline = time.monotonic() + timeout
    while (found := await depth(amqp_url, name)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} holds {found} messages, not {expected}")
        await asyncio.sleep(0.05)


async def dead_letter_directly(
    ctx: ServiceContext, work: ConsumerQueue, event: OrderPaid, *, body: bytes | None = None, **headers
) -> None:
    """A message as `MessageRouter.to_dlq` leaves it after the retries ran out (attempt 4)."""
    await publish_raw(
        ctx.broker,
        event.model_dump_json().encode() if body is None else body,
        exchange=None,
        routing_key=work.dlq,
        message_id=str(event.event_id),
        correlation_id=event.transaction_id,
        headers={
            EVENT_TYPE_HEADER: "OrderPaid",
            ATTEMPT_HEADER: 4,
            LAST_ERROR_HEADER: "RetryLater: zendit answered 503",
            ORIGIN_QUEUE_HEADER: work.name,
            FAILED_AT_HEADER: "2026-11-30T12:00:00+00:00",
            **headers,
        },
    )


class Handler:
    """funding.order-paid's stand-in: raises what it is told to, records what it processed."""

    def __init__(self, *raises: BaseException) -> None:
        self.raises = list(raises)
        self.calls: list[str] = []
        self.processed: list[str] = []

    async def __call__(self, event: OrderPaid) -> None:
        self.calls.append(str(event.event_id))
        if self.raises:
            raise self.raises.pop(0)
        self.processed.append(str(event.event_id))


async def start_consumer(ctx: ServiceContext, handler: Handler):
    broker = create_broker(ctx.settings.amqp_url)
    consume(broker, ctx.topology, QUEUE, OrderPaid, handler)
    await broker.start()
    return broker


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_a_dead_lettered_message_is_listed_peeked_without_loss_and_replayed_exactly_once(service, db):
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    amqp_url = ctx.settings.amqp_url
    handler = Handler(RuntimeError("a bug in the handler"))  # unexpected error: straight to the DLQ
    consumer = await start_consumer(ctx, handler)
    try:
        event = paid_event()
        await EventPublisher(consumer, ctx.topology).publish(event)
        await wait_for_depth(amqp_url, work.dlq, 1)

        listing = await client.get(BASE, headers=auth())
        assert listing.status_code == 200
        rows = {row["queue"]: row for row in listing.json()["queues"]}
        assert set(rows) == {q.dlq for q in ctx.topology.queues}
        depth_fields = {k: rows[work.dlq][k] for k in ("queue", "origin_queue", "depth", "consumers")}
        assert depth_fields == {"queue": work.dlq, "origin_queue": work.name, "depth": 1, "consumers": 0}
        assert listing.json()["total"] == 1

        for look in (1, 2):  # peeking twice shows the same message: nothing was taken
            peek = await client.get(f"{BASE}/{work.dlq}", params={"limit": 5}, headers=auth())
            assert peek.status_code == 200
            body = peek.json()
            assert body["queue"] == work.dlq and body["depth"] == 1 and len(body["messages"]) == 1
            message = body["messages"][0]
            assert message["message_id"] == str(event.event_id)
            assert message["transaction_id"] == event.transaction_id
            assert message["event_type"] == "OrderPaid" and message["origin_queue"] == work.name
            assert message["last_error"] == "RuntimeError: a bug in the handler"
            assert message["failed_at"] and event.transaction_id in message["body_preview"]
            assert message["redelivered"] is (look == 2)  # the documented side effect of a peek
            # The broker's return count, so an operator sees one nearing RabbitMQ 4.0-4.2's limit of 20.
            assert message["delivery_count"] == message["headers"].get("x-delivery-count")
            await wait_for_depth(amqp_url, work.dlq, 1)

        replay = await client.post(
            f"{BASE}/{work.dlq}/replay", json={"message_ids": [str(event.event_id)]}, headers=auth()
        )
        assert replay.status_code == 200
        assert replay.json() == {
            "queue": work.dlq,
            "replayed": 1,
            "replayed_message_ids": [str(event.event_id)],
            "origin_queues": [work.name],
            "not_found": [],
            "scanned": 1,
        }
        await wait_until(lambda: handler.processed)
        await asyncio.sleep(0.5)  # room for a second delivery, were there one
    finally:
        await consumer.stop()

    assert handler.processed == [str(event.event_id)]
    assert handler.calls == [str(event.event_id)] * 2  # the failed delivery and the replayed one
    await wait_for_depth(amqp_url, work.dlq, 0)
    assert await depth(amqp_url, work.name) == 0
    row = await db.fetchrow("SELECT * FROM operator_actions WHERE action = 'dlq_replay'")
    assert row["transaction_id"] == event.transaction_id
    detail = json.loads(row["detail"])
    assert (detail["message_id"], detail["queue"], detail["origin_queue"], detail["status"]) == (
        str(event.event_id),
        work.dlq,
        work.name,
        "attempted",
    )


async def test_an_origin_header_naming_another_work_queue_is_ignored(service, caplog):
    """A message in X.dlq goes back to X: never into the consumer of the queue a header names."""
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    other = ctx.topology.queue("notify.order-failed")  # a work queue without a consumer in this app
    event = paid_event()
    await dead_letter_directly(ctx, work, event, **{ORIGIN_QUEUE_HEADER: other.name})
    caplog.set_level(logging.WARNING, logger="esim.reconcile.dlq")

    peek = await client.get(f"{BASE}/{work.dlq}", headers=auth())
    assert peek.json()["messages"][0]["origin_queue"] == work.name
    replay = await client.post(f"{BASE}/{work.dlq}/replay", json={"all": True}, headers=auth())

    assert replay.status_code == 200 and replay.json()["origin_queues"] == [work.name]
    await wait_for_depth(ctx.settings.amqp_url, work.name, 1)
    assert await depth(ctx.settings.amqp_url, other.name) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "esim.reconcile.dlq"]
    assert warnings and all(r.origin_header == other.name for r in warnings)


async def test_a_replayed_message_gets_every_retry_tier_again(service):
    """It died with attempt 4 (all tiers used); replayed, a transient error is retried, not dead-lettered."""
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    event = paid_event()
    await dead_letter_directly(ctx, work, event)
    handler = Handler(RetryLater("zendit answered 503 once more"))
    consumer = await start_consumer(ctx, handler)
    try:
        replay = await client.post(f"{BASE}/{work.dlq}/replay", json={"all": True}, headers=auth())
        assert replay.status_code == 200 and replay.json()["replayed"] == 1
        await wait_until(lambda: handler.processed, timeout=8)  # after the 1 s tier
    finally:
        await consumer.stop()
    assert handler.processed == [str(event.event_id)] and len(handler.calls) == 2
    await wait_for_depth(ctx.settings.amqp_url, work.dlq, 0)


async def test_replaying_all_takes_the_oldest_up_to_the_limit(service):
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    events = [paid_event() for _ in range(3)]
    for event in events:
        await dead_letter_directly(ctx, work, event)

    replay = await client.post(f"{BASE}/{work.dlq}/replay", json={"all": True, "limit": 2}, headers=auth())

    assert replay.status_code == 200
    assert replay.json()["replayed_message_ids"] == [str(e.event_id) for e in events[:2]]
    await wait_for_depth(ctx.settings.amqp_url, work.dlq, 1)
    await wait_for_depth(ctx.settings.amqp_url, work.name, 2)
    peek = await client.get(f"{BASE}/{work.dlq}", headers=auth())
    assert [m["message_id"] for m in peek.json()["messages"]] == [str(events[2].event_id)]


async def test_discard_removes_only_the_named_message_and_keeps_it_in_the_audit_table(service, db):
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    dropped, kept = paid_event(), paid_event()
    await dead_letter_directly(ctx, work, dropped)
    await dead_letter_directly(ctx, work, kept)

    response = await client.post(
        f"{BASE}/{work.dlq}/discard",
        json={"message_ids": [str(dropped.event_id), "no-such-id"], "note": "order cancelled by hand"},
        headers=auth(),
    )

    assert response.status_code == 200
    assert response.json() == {
        "queue": work.dlq,
        "discarded": 1,
        "discarded_message_ids": [str(dropped.event_id)],
        "not_found": ["no-such-id"],
        "scanned": 2,
    }
    await wait_for_depth(ctx.settings.amqp_url, work.dlq, 1)
    peek = await client.get(f"{BASE}/{work.dlq}", headers=auth())
    assert [m["message_id"] for m in peek.json()["messages"]] == [str(kept.event_id)]
    assert await depth(ctx.settings.amqp_url, work.name) == 0  # dropped, not replayed

    rows = await db.fetch("SELECT * FROM operator_actions")
    assert len(rows) == 1
    row = rows[0]
    assert (row["action"], row["transaction_id"], row["note"]) == (
        "dlq_discard",
        dropped.transaction_id,
        "order cancelled by hand",
    )
    detail = json.loads(row["detail"])
    assert detail["message_id"] == str(dropped.event_id) and detail["queue"] == work.dlq
    assert OrderPaid.model_validate_json(detail["body"]) == dropped  # the whole message is kept
    assert detail["headers"][LAST_ERROR_HEADER] == "RetryLater: zendit answered 503"


async def test_a_discarded_body_that_is_not_utf8_is_redacted_before_it_reaches_the_audit(service, db):
    """A latin-1 poison message with a card number: the row (served back by the order timeline)
    holds redacted text and a hash, never the raw bytes (base64 would hide the number from redaction)."""
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    event = paid_event()
    poison = f'{{"transaction_id": "{event.transaction_id}", "card": "{PAN}'.encode() + b'\xe9"}\x00'
    await dead_letter_directly(ctx, work, event, body=poison)

    response = await client.post(
        f"{BASE}/{work.dlq}/discard",
        json={"message_ids": [str(event.event_id)], "note": "poison message"},
        headers=auth(),
    )

    assert response.status_code == 200 and response.json()["discarded"] == 1
    row = await db.fetchrow("SELECT transaction_id, detail::text AS detail FROM operator_actions")
    assert PAN not in row["detail"] and base64.b64encode(poison).decode() not in row["detail"]
    detail = json.loads(row["detail"])
    assert (detail["body_encoding"], detail["body_redacted"]) == ("latin-1", True)
    assert detail["body_sha256"] == hashlib.sha256(poison).hexdigest()
    assert event.transaction_id in detail["body"] and "é" in detail["body"]
    await wait_for_depth(ctx.settings.amqp_url, work.dlq, 0)


async def test_a_discard_without_a_note_is_refused_and_removes_nothing(service, db):
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    event = paid_event()
    await dead_letter_directly(ctx, work, event)
    for body in ({"message_ids": [str(event.event_id)]}, {"message_ids": [str(event.event_id)], "note": " "}):
        response = await client.post(f"{BASE}/{work.dlq}/discard", json=body, headers=auth())
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "note"]
    await wait_for_depth(ctx.settings.amqp_url, work.dlq, 1)
    assert await db.fetchval("SELECT count(*) FROM operator_actions") == 0


@pytest.mark.parametrize("action", ["replay", "discard"])
async def test_without_the_audit_table_nothing_is_removed_from_the_dlq(service, db, action):
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    event = paid_event()
    await dead_letter_directly(ctx, work, event)
    await db.execute("ALTER TABLE operator_actions RENAME TO operator_actions_away")

    response = await client.post(
        f"{BASE}/{work.dlq}/{action}",
        json={"message_ids": [str(event.event_id)], "note": "try"},
        headers=auth(),
    )

    assert response.status_code == 503 and "nothing was published or removed" in response.json()["detail"]
    await wait_for_depth(ctx.settings.amqp_url, work.dlq, 1)
    # The audit comes first: no copy reached the work queue unrecorded (a retry cannot duplicate it).
    await asyncio.sleep(0.2)
    assert await depth(ctx.settings.amqp_url, work.name) == 0


async def test_a_replay_request_must_say_which_messages(service):
    client, ctx = service
    dlq = ctx.topology.queue(QUEUE).dlq
    for body in ({}, {"all": True, "message_ids": ["a"]}, {"all": True, "limit": 0}, {"message_ids": []}):
        response = await client.post(f"{BASE}/{dlq}/replay", json=body, headers=auth())
        assert response.status_code == 422, body
    response = await client.post(f"{BASE}/{dlq}/replay", json={}, headers=auth())
    assert "message_ids" in response.json()["detail"][0]["msg"]


ENDPOINTS = [
    ("GET", BASE, None),
    ("GET", f"{BASE}/{{dlq}}", None),
    ("POST", f"{BASE}/{{dlq}}/replay", {"all": True}),
    ("POST", f"{BASE}/{{dlq}}/discard", {"message_ids": ["a"], "note": "n"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=["list", "peek", "replay", "discard"])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "other-scheme"],
)
async def test_every_dead_letter_endpoint_answers_401_without_the_right_token(
    service, method, path, body, headers
):
    client, ctx = service
    work = ctx.topology.queue(QUEUE)
    event = paid_event()
    await dead_letter_directly(ctx, work, event)
    for url in (path.format(dlq=work.dlq), path.format(dlq="not-a-queue")):  # before the 404, too
        response = await client.request(method, url, json=body, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer" and TOKEN not in response.text
    garbage = await client.request(method, path.format(dlq=work.dlq), content=b"{not json", headers=headers)
    assert garbage.status_code == 401
    await wait_for_depth(ctx.settings.amqp_url, work.dlq, 1)


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS[1:], ids=["peek", "replay", "discard"])
@pytest.mark.parametrize("name", ["no-such-queue.dlq", "work-queue"])
async def test_an_unknown_queue_is_a_404_that_lists_the_valid_ones(service, method, path, body, name):
    client, ctx = service
    if name == "work-queue":  # a work queue, by its full name, is not a DLQ
        name = ctx.topology.queue(QUEUE).name
    response = await client.request(method, path.format(dlq=name), json=body, headers=auth())
    assert response.status_code == 404
    for queue in ctx.topology.queues:
        assert queue.dlq in response.json()["detail"]


async def test_a_dlq_is_found_by_its_name_without_the_deployments_prefix(service):
    client, _ = service
    response = await client.get(f"{BASE}/{QUEUE}.dlq", headers=auth())
    assert response.status_code == 200 and response.json()["depth"] == 0


async def test_the_depth_gauge_follows_every_dlq_without_taking_a_message(service):
    _, ctx = service
    work = ctx.topology.queue(QUEUE)
    for _ in range(2):
        await dead_letter_directly(ctx, work, paid_event())
    await wait_for_depth(ctx.settings.amqp_url, work.dlq, 2)
    monitor = DeadLetterMonitor(ctx.settings.amqp_url, ctx.topology)

    assert await monitor.run_once() == 2
    assert await monitor.run_once() == 2  # nothing was taken

    assert REGISTRY.get_sample_value("esim_dlq_depth", {"queue": work.dlq}) == 2
    other = ctx.topology.queue("notify.order-failed").dlq
    assert REGISTRY.get_sample_value("esim_dlq_depth", {"queue": other}) == 0
    assert await depth(ctx.settings.amqp_url, work.dlq) == 2


async def test_the_openapi_documents_every_dead_letter_endpoint_with_its_errors(service):
    client, _ = service
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert set(paths[BASE]["get"]["responses"]) >= {"200", "401", "503"}
    assert set(paths[f"{BASE}/{{queue}}"]["get"]["responses"]) >= {"200", "401", "404", "503"}
    for action in ("replay", "discard"):
        operation = paths[f"{BASE}/{{queue}}/{action}"]["post"]
        assert set(operation["responses"]) >= {"200", "401", "404", "413", "422", "503"}
        assert operation["requestBody"]["required"] is True
