"""Zendit webhooks at the edge: authenticated by the console's custom header, used only as a hint.

The webhook service runs in-process (ASGITransport) on the real broker and database; hints go to
`provisioning.purchase-hint`, which nothing consumes here, so the tests read exactly what was
published. The last tests let the Zendit emulator check the URL and deliver over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aio_pika
import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from esim_common.money import Money
from esim_common.order_repository import create_order
from esim_common.topology import declare_from_url, delete
from esim_sandbox.serve import free_port, serve_in_thread
from tests.integration import test_webhook_checkout as shop
from tests.integration.test_webhook_checkout import Edge
from webhook.main import create_app
from webhook.zendit_webhooks import MAX_BODY_BYTES, order_of_purchase

pytestmark = [pytest.mark.broker, pytest.mark.db]

edge = shop.edge
make_edge = shop.make_edge

WEBHOOK = "/api/webhooks/zendit"
HEADER = "X-Zendit-Webhook-Secret"  # the defaults service_settings runs with
SECRET = "zendit_webhook_sandbox"
HINT_QUEUE = "provisioning.purchase-hint"


# ------------------------------------------------------------------------------------------ helpers


def new_transaction_id() -> str:
    return f"txn_{uuid.uuid4().hex[:24]}"


async def make_order(app: Edge) -> str:
    txn = new_transaction_id()
    async with app.ctx.pool.acquire() as conn:
        await create_order(
            conn,
            transaction_id=txn,
            offer_id="ESIM-US-7D-1GB",
            price=Money(999, "USD"),
            zendit_cost=Money(450, "USD"),
            recipient_email="ada@example.com",
            recipient_name="Ada Lovelace",
        )
    return txn


def purchase_body(zendit_id: str, status: str = "DONE", **extra: Any) -> dict[str, Any]:
    """Shaped like Zendit's purchase (GET /esim/purchases/{id}); only transactionId may be used."""
    return {
        "transactionId": zendit_id,
        "offerId": "ESIM-US-7D-1GB",
        "status": status,
        "confirmation": {"iccid": "8901", "smdpAddress": "smdp.example", "activationCode": "CODE-1"},
        **extra,
    }


async def notify(
    app: Edge, body: dict[str, Any] | bytes, *, headers: dict[str, str] | None = None
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **({HEADER: SECRET} if headers is None else headers)}
    return await app.client.post(WEBHOOK, content=content, headers=sent)


async def hints(amqp_url: str, queue_name: str) -> list[dict[str, Any]]:
    """Every hint waiting in the queue (removed from it), with its AMQP ids."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=False)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(
                json.loads(message.body)
                | {"_message_id": message.message_id, "_correlation_id": message.correlation_id}
            )
        return found


async def published_hints(app: Edge) -> list[dict[str, Any]]:
    return await hints(app.settings.amqp_url, app.queue_name(HINT_QUEUE))


def webhook_count(outcome: str) -> float:
    return REGISTRY.get_sample_value("esim_zendit_webhooks_total", {"outcome": outcome}) or 0.0


# ------------------------------------------------------------------------------------ pure id mapping


@pytest.mark.parametrize(
    ("zendit_id", "order"),
    [
        ("txn_0123456789abcdef01234567", "txn_0123456789abcdef01234567"),
        ("txn_0123456789abcdef01234567-r2", "txn_0123456789abcdef01234567"),
        ("txn_0123456789abcdef01234567-r12", "txn_0123456789abcdef01234567"),
        ("txn_0123456789abcdef01234567-r1", None),  # the first attempt has no suffix
        ("txn_0123456789abcdef01234567-r02", None),
        ("txn_0123456789ABCDEF01234567", None),
        ("txn_0123456789abcdef0123456", None),
        ("txn_0123456789abcdef01234567\n", None),
        ("ORDER-42", None),
        ("", None),
    ],
)
def test_only_our_purchase_ids_map_to_an_order(zendit_id: str, order: str | None):
    assert order_of_purchase(zendit_id) == order


# ------------------------------------------------------------------------------------ the happy path


async def test_head_answers_200_with_an_empty_body_for_the_console_url_check(edge: Edge):
    response = await edge.client.head(WEBHOOK)  # no secret header: the console's check may not send it

    assert response.status_code == 200 and response.content == b""
    assert await published_hints(edge) == []


@pytest.mark.parametrize("attempt_suffix", ["", "-r2"])
async def test_an_authentic_notification_publishes_one_hint_with_nothing_but_the_purchase_id(
    edge: Edge, attempt_suffix: str
):
    txn = await make_order(edge)
    before = webhook_count("hinted")

    response = await notify(edge, purchase_body(f"{txn}{attempt_suffix}", cost=1, error=None))

    assert response.status_code == 200 and response.json() == {"received": True}
    [hint] = await published_hints(edge)
    assert hint["transaction_id"] == txn and hint["zendit_transaction_id"] == f"{txn}{attempt_suffix}"
    # The event carries ids only: the body's status and activation data go nowhere.
    assert set(hint) - {"_message_id", "_correlation_id"} == {
        "schema_version",
        "event_id",
        "transaction_id",
        "occurred_at",
        "zendit_transaction_id",
    }
    assert hint["_message_id"] == hint["event_id"] and hint["_correlation_id"] == txn
    assert webhook_count("hinted") - before == 1
    assert (await edge.order(txn)).status == "pending_payment"  # the edge itself changes no order


async def test_a_custom_header_name_from_the_settings_is_the_one_checked(make_edge):
    app = await make_edge(
        zendit_webhook_header="X-Shop-Token", zendit_webhook_secret=SecretStr("s3cr3t-value")
    )
    txn = await make_order(app)

    default_header = await notify(app, purchase_body(txn), headers={HEADER: "s3cr3t-value"})
    custom_header = await notify(app, purchase_body(txn), headers={"x-shop-token": "s3cr3t-value"})

    assert default_header.status_code == 401 and custom_header.status_code == 200
    assert [hint["transaction_id"] for hint in await published_hints(app)] == [txn]


# --------------------------------------------------------------------------------------- refusals


async def test_an_empty_configured_secret_lets_nothing_in_not_even_an_empty_header(make_edge):
    app = await make_edge(zendit_webhook_secret=SecretStr(""))
    txn = await make_order(app)

    empty_header = await notify(app, purchase_body(txn), headers={HEADER: ""})
    no_header = await notify(app, purchase_body(txn), headers={})

    assert (empty_header.status_code, no_header.status_code) == (401, 401)
    assert await published_hints(app) == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {HEADER: ""},
        {HEADER: "zendit_webhook_sandboX"},  # same length, one byte off
        {HEADER: f"{SECRET} "},
        {HEADER: f"Bearer {SECRET}"},
        {"X-Other-Header": SECRET},
        {"Authorization": f"Bearer {SECRET}"},
    ],
    ids=[
        "missing",
        "empty",
        "one-byte-off",
        "trailing-space",
        "bearer-prefix",
        "other-header",
        "authorization",
    ],
)
async def test_a_missing_or_wrong_secret_is_401_and_publishes_nothing(edge: Edge, headers: dict[str, str]):
    txn = await make_order(edge)
    before = webhook_count("unauthorized")
    body = purchase_body(txn, marker="ECHO-CANARY-7f3a")

    response = await notify(edge, body, headers=headers)

    assert response.status_code == 401
    assert (
        "ECHO-CANARY-7f3a" not in response.text and SECRET not in response.text and txn not in response.text
    )
    assert await published_hints(edge) == []
    assert webhook_count("unauthorized") - before == 1


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"\xff\xfe\x00",
        b'["txn_0123456789abcdef01234567"]',
        b'"txn_0123456789abcdef01234567"',
        b'{"status": "DONE"}',
        b'{"transactionId": 42}',
        b'{"transactionId": ""}',
        b'{"transactionId": null}',
    ],
    ids=["broken", "empty", "not-utf8", "array", "string", "no-id", "number-id", "empty-id", "null-id"],
)
async def test_a_body_that_is_not_a_purchase_is_400_and_publishes_nothing(edge: Edge, body: bytes):
    await make_order(edge)

    response = await notify(edge, body)

    assert response.status_code == 400
    assert "error" in response.json()
    assert await published_hints(edge) == []


async def test_an_oversized_body_is_413_and_publishes_nothing(edge: Edge):
    txn = await make_order(edge)
    body = json.dumps(purchase_body(txn, padding="x" * MAX_BODY_BYTES)).encode()

    response = await notify(edge, body)

    assert response.status_code == 413
    assert await published_hints(edge) == []


async def test_purchases_that_are_not_ours_or_name_no_order_get_200_and_publish_nothing(edge: Edge):
    known = await make_order(edge)
    before = webhook_count("unknown_order"), webhook_count("foreign")

    answers = [
        await notify(edge, purchase_body(zendit_id))
        for zendit_id in (
            new_transaction_id(),  # ours in shape, but no such order
            f"{new_transaction_id()}-r2",
            "ORDER-42",  # another system on the same Zendit account
            f"{known}-r1",
            f"{known.upper()}",
            f"{known}/../x",
        )
    ]

    # The same answer as for a real order: the endpoint does not tell which orders exist.
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"received": True})] * len(answers)
    assert await published_hints(edge) == []
    assert webhook_count("unknown_order") - before[0] == 2
    assert webhook_count("foreign") - before[1] == 4


async def test_a_publish_that_fails_is_a_503_and_zendits_retry_publishes(edge: Edge):
    txn = await make_order(edge)
    connection = await aio_pika.connect(edge.settings.amqp_url)
    async with connection:  # zendit.purchase-updated becomes unroutable
        await (await connection.channel()).queue_delete(edge.queue_name(HINT_QUEUE))

    failed = await notify(edge, purchase_body(txn))

    assert failed.status_code == 503
    assert txn not in failed.text
    await declare_from_url(edge.settings.amqp_url, edge.ctx.topology)  # the broker is fixed
    retried = await notify(edge, purchase_body(txn))
    assert retried.status_code == 200
    assert [hint["transaction_id"] for hint in await published_hints(edge)] == [txn]


# ------------------------------------------------------------------------- the emulator, over real HTTP


async def test_the_emulator_checks_the_url_with_head_then_posts_final_purchases_with_the_header(
    service_settings, zendit_emulator, zendit_client, db
):
    app = create_app(service_settings)
    server = serve_in_thread(app)  # its lifespan starts the context in the server's own event loop
    try:
        configured = zendit_emulator.control(
            "POST", "webhook", {"url": f"{server.url}{WEBHOOK}", "header": HEADER, "secret": SECRET}
        )
        txn = new_transaction_id()
        async with db.acquire() as conn:
            await create_order(
                conn,
                transaction_id=txn,
                offer_id="ESIM-US-7D-1GB",
                price=Money(999, "USD"),
                zendit_cost=Money(450, "USD"),
                recipient_email="ada@example.com",
                recipient_name="Ada Lovelace",
            )
        await zendit_client.purchase(transaction_id=txn, offer_id="ESIM-US-7D-1GB")
        deadline = time.monotonic() + 10
        while not (deliveries := zendit_emulator.control("GET", "webhook")["deliveries"]) or any(
            d["outcome"] == "pending" for d in deliveries
        ):
            assert time.monotonic() < deadline, deliveries
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a second (intermediate or duplicate) delivery would show by now
        deliveries = zendit_emulator.control("GET", "webhook")["deliveries"]
    finally:
        zendit_emulator.control("DELETE", "webhook")
        server.stop()
    topology = app.state.ctx.topology
    found = await hints(service_settings.amqp_url, topology.queue(HINT_QUEUE).name)
    connection = await aio_pika.connect(service_settings.amqp_url)
    async with connection:
        await delete(await connection.channel(), topology)

    assert configured["configured"] is True and configured["header"] == HEADER
    assert SECRET not in json.dumps(configured)  # the console shows the header's name, not its value
    # Only the final status is sent by default; the header made it through the constant-time check.
    assert [(d["transactionId"], d["status"], d["outcome"], d["attempts"]) for d in deliveries] == [
        (txn, "DONE", "delivered", [200])
    ]
    assert [(h["transaction_id"], h["zendit_transaction_id"]) for h in found] == [(txn, txn)]


def test_the_emulator_refuses_a_webhook_url_whose_head_check_fails(zendit_emulator):
    nobody_listens = f"http://127.0.0.1:{free_port()}{WEBHOOK}"

    response = httpx.post(
        f"{zendit_emulator.root_url}/_sandbox/webhook",
        json={"url": nobody_listens, "header": HEADER, "secret": SECRET},
    )

    assert response.status_code == 400 and "HEAD" in response.json()["message"]
    assert zendit_emulator.control("GET", "webhook")["configured"] is False
