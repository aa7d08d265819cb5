"""Zendit webhook hints in the provisioning service: a DONE purchase is delivered as soon as Zendit says
so, yet nothing a webhook claims is believed, and the hint and the scheduled poll never both act.

Real RabbitMQ, Postgres and emulators, the service in-process (harness of test_provisioning_service.py).
Two tests run the whole chain: the Zendit emulator's webhook → the webhook service over real HTTP →
`zendit.purchase-updated` → provisioning. To tell a hint's work from the poll's, the poll is parked in
the 10 s delay tier: the attempt is made to look 200 s old, past the fast-polling window.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from prometheus_client import REGISTRY

from esim_common.consumer import MessageRouter
from esim_common.events import PurchaseUpdateHint
from esim_common.order_repository import create_order, record
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.topology import declare_from_url
from esim_sandbox.serve import serve_in_thread
from provisioning import domain
from provisioning.storage import QrStorage
from tests.fixtures.polling import eventually
from tests.integration import test_provisioning_service as svc
from tests.integration.test_provisioning_service import (
    COST,
    OFFER,
    PRICE,
    Provisioning,
    decode,
    expected_lpa,
    order_of,
    refunds_of,
    wait_for_messages,
    wait_for_status,
    zendit_purchases,
)
from webhook.main import create_app as create_webhook_app

pytestmark = [pytest.mark.broker, pytest.mark.db]

start_provisioning = svc.start_provisioning

POLL_QUEUE = "provisioning.order-funded"
HINT_QUEUE = "provisioning.purchase-hint"
# Past domain.MEDIUM_POLL_WINDOW_SECONDS (180 s): the poll looks again only every 10 s.
OLD_ATTEMPT_SECONDS = 200
LONGEST_TIER_SECONDS = 10


# ------------------------------------------------------------------------------------------- harness
@pytest.fixture
async def funded_order(db: asyncpg.Pool, stripe_emulator, stripe_gateway) -> Callable[[], Awaitable[str]]:
    """A paid order walked to funded, with a transaction id of the real shape (`txn_` + 24 hex), which
    the webhook service insists on."""

    async def make() -> str:
        txn = f"txn_{uuid.uuid4().hex[:24]}"
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


@pytest.fixture
def zendit_webhooks_to_the_edge(service_settings, zendit_emulator) -> Iterator[str]:
    """The webhook service over real HTTP, and the Zendit emulator's webhook pointed at it as an
    operator would set it up in Zendit's console."""
    app = create_webhook_app(service_settings)
    server = serve_in_thread(app)
    try:
        zendit_emulator.control(
            "POST",
            "webhook",
            {
                "url": f"{server.url}/api/webhooks/zendit",
                "header": service_settings.zendit_webhook_header,
                "secret": service_settings.zendit_webhook_secret.get_secret_value(),
            },
        )
        yield server.url
    finally:
        zendit_emulator.control("DELETE", "webhook")
        server.stop()


@dataclass
class CountingStorage:
    """Wraps the service's QR storage to count how many QR codes were stored."""

    inner: QrStorage
    saves: int = 0

    async def save(self, name: str, png: bytes) -> str:
        self.saves += 1
        return await self.inner.save(name, png)


def count_saves(service: Provisioning) -> CountingStorage:
    provisioner = service.app.state.provisioner
    counting = CountingStorage(provisioner.storage)
    provisioner.storage = counting
    return counting


async def publish_hint(service: Provisioning, txn: str, zendit_id: str) -> None:
    await service.ctx.publisher.publish(
        PurchaseUpdateHint(transaction_id=txn, zendit_transaction_id=zendit_id)
    )


def hints(outcome: str) -> float:
    return REGISTRY.get_sample_value("esim_zendit_purchase_hints_total", {"outcome": outcome}) or 0.0


def purchase_outcomes(outcome: str) -> float:
    return REGISTRY.get_sample_value("esim_zendit_purchase_outcomes_total", {"outcome": outcome}) or 0.0


async def waiting_in_tier(service: Provisioning, delay: int) -> int:
    """Messages parked in the order-funded queue's `delay` s retry tier."""
    connection = await aio_pika.connect(service.amqp_url)
    async with connection:
        channel = await connection.channel()
        tier = service.ctx.topology.queue(POLL_QUEUE).retry_tier(delay)
        queue = await channel.declare_queue(tier, passive=True)
        return int(queue.declaration_result.message_count or 0)


@dataclass(frozen=True)
class Deferral:
    """A message a consumer parked with CheckAgainLater, and the delay tier the router chose for it."""

    queue: str
    transaction_id: str
    tier_seconds: int


@pytest.fixture
def deferrals(monkeypatch: pytest.MonkeyPatch) -> list[Deferral]:
    """Every deferral of this process's consumers, noted as the router publishes it: the tier a poll
    was parked in, read from the decision itself and not from a queue its consumer may have emptied."""
    noted: list[Deferral] = []
    park = MessageRouter.check_again_later

    async def noting(self: MessageRouter, message, delay_seconds: float) -> int:
        tier = await park(self, message, delay_seconds)
        noted.append(Deferral(self.queue.name, json.loads(message.body)["transaction_id"], tier))
        return tier

    monkeypatch.setattr(MessageRouter, "check_again_later", noting)
    return noted


async def first_poll_tier(service: Provisioning, deferrals: list[Deferral], txn: str) -> int:
    """The delay tier the order's first poll was parked in."""
    queue = service.queue(POLL_QUEUE)

    def tiers() -> list[int]:
        return [d.tier_seconds for d in deferrals if (d.queue, d.transaction_id) == (queue, txn)]

    await eventually(tiers, within=5, what="the first poll parked")
    return tiers()[0]


def zendit_status(zendit_emulator, zendit_id: str) -> str | None:
    purchase = zendit_emulator.control("GET", "state")["purchases"].get(zendit_id)
    return purchase["status"] if purchase else None


async def purchasing_a_stalled_purchase(service: Provisioning, zendit_emulator, txn: str) -> None:
    """order.funded published; Zendit took the purchase and keeps it IN_PROGRESS (a supplier delay)."""
    zendit_emulator.control("POST", "purchase_stalls", {"count": 1})
    await service.publish_funded(txn)
    await eventually(
        lambda: zendit_status(zendit_emulator, txn) == "IN_PROGRESS", within=10, what="purchase in progress"
    )


async def poll_parked_for_ten_seconds(service: Provisioning, db: asyncpg.Pool, txn: str) -> None:
    """Make the attempt look old, so the poll's next look parks the message for 10 s."""
    await db.execute(
        "UPDATE order_transitions SET at = at - make_interval(secs => $2)"
        " WHERE transaction_id = $1 AND to_status = 'purchasing'",
        txn,
        float(OLD_ATTEMPT_SECONDS),
    )

    async def parked() -> bool:
        return await waiting_in_tier(service, LONGEST_TIER_SECONDS) == 1

    await eventually(parked, within=5, what="the poll parked in the 10 s tier")


# ------------------------------------------------------------------------------ the rule, pure
@pytest.mark.parametrize(
    ("status", "current", "hinted", "awaited"),
    [
        (OrderStatus.PURCHASING, "txn_a", "txn_a", True),
        (OrderStatus.PURCHASING, "txn_a-r2", "txn_a", False),  # an earlier attempt
        (OrderStatus.PURCHASING, "txn_a", "txn_a-r2", False),
        (OrderStatus.PROVISIONED, "txn_a", "txn_a", False),  # settled already
        (OrderStatus.DELIVERED, "txn_a", "txn_a", False),
        (OrderStatus.FUNDING, "txn_a", "txn_a", False),  # sent back to funding: the poll re-funds
        (OrderStatus.PURCHASE_FAILED, "txn_a", "txn_a", False),
        (OrderStatus.NEEDS_ATTENTION, "txn_a", "txn_a", False),
    ],
)
def test_only_the_purchase_an_order_is_waiting_for_can_settle_it(status, current, hinted, awaited):
    assert domain.awaits_purchase(status, current, hinted) is awaited


# ------------------------------------------------------------------------------ the whole chain, fast
async def test_a_done_webhook_delivers_the_esim_long_before_the_scheduled_poll_and_only_once(
    start_provisioning, funded_order, db, zendit_emulator, zendit_webhooks_to_the_edge
):
    service = await start_provisioning()
    storage = count_saves(service)
    txn = await funded_order()
    await purchasing_a_stalled_purchase(service, zendit_emulator, txn)
    await poll_parked_for_ten_seconds(service, db, txn)
    completed_before = hints("completed")

    started = time.monotonic()
    zendit_emulator.control("POST", f"purchases/{txn}/resolve", {"status": "DONE"})  # the supplier delivers
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, within=2.0)
    took = time.monotonic() - started
    poll_still_parked = await waiting_in_tier(service, LONGEST_TIER_SECONDS)

    assert poll_still_parked == 1, "the poll came back: this does not show the webhook's effect"
    assert took < 2.0 and hints("completed") - completed_before == 1
    qr_file = Path(service.settings.qr_storage_dir) / f"{txn}.png"
    assert decode(qr_file.read_bytes()) == [expected_lpa(zendit_emulator, txn)]
    assert order.zendit_status == "DONE" and order.qr_code_url
    deliveries = zendit_emulator.control("GET", "webhook")["deliveries"]
    assert [(d["transactionId"], d["status"], d["outcome"]) for d in deliveries] == [
        (txn, "DONE", "delivered")
    ]

    # The poll comes back, finds the order delivered and announced, and adds nothing.
    async def poll_came_back() -> bool:
        return await waiting_in_tier(service, LONGEST_TIER_SECONDS) == 0

    await eventually(poll_came_back, within=LONGEST_TIER_SECONDS + 5, what="the parked poll came back")
    announced = await wait_for_messages(service, "notify.order-provisioned", 2, within=1.0)
    assert [m["transaction_id"] for m in announced] == [txn]
    assert storage.saves == 1
    assert zendit_purchases(zendit_emulator, txn) == [txn]


async def test_a_webhook_claiming_done_while_zendit_says_in_progress_changes_nothing(
    start_provisioning, funded_order, db, zendit_emulator, zendit_webhooks_to_the_edge
):
    service = await start_provisioning()
    txn = await funded_order()
    await purchasing_a_stalled_purchase(service, zendit_emulator, txn)
    pending_before = hints("pending")

    zendit_emulator.control("POST", "webhook/lies", {"status": "DONE"})
    lie = zendit_emulator.control("POST", f"webhook/send/{txn}")
    await eventually(lambda: hints("pending") - pending_before == 1, within=5, what="the hint was checked")
    after_the_lie = await order_of(db, txn)

    assert (lie["status"], lie["actualStatus"], lie["lie"]) == ("DONE", "IN_PROGRESS", True)
    assert after_the_lie.status == OrderStatus.PURCHASING
    assert after_the_lie.qr_code_url is None and after_the_lie.activation_code is None
    assert not (Path(service.settings.qr_storage_dir) / f"{txn}.png").exists()
    assert await service.drain("notify.order-provisioned") == []

    # When Zendit really finishes, the customer gets Zendit's eSIM, not the webhook's made-up one.
    zendit_emulator.control("POST", f"purchases/{txn}/resolve", {"status": "DONE"})
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, within=5.0)
    assert order.activation_code != "NOT-FROM-ZENDIT"
    assert decode((Path(service.settings.qr_storage_dir) / f"{txn}.png").read_bytes()) == [
        expected_lpa(zendit_emulator, txn)
    ]


# ------------------------------------------------------------------------------------------- races
async def test_hints_and_polls_racing_on_one_done_purchase_deliver_it_once(
    start_provisioning, funded_order, db, zendit_emulator
):
    workers = [await start_provisioning(), await start_provisioning()]  # two replicas, one database
    storages = [count_saves(worker) for worker in workers]
    txn = await funded_order()
    zendit_emulator.control("POST", "purchase_stalls", {"count": 1})
    funded = await workers[0].publish_funded(txn)
    await eventually(
        lambda: zendit_status(zendit_emulator, txn) == "IN_PROGRESS", within=10, what="purchase in progress"
    )
    done_before, completed_before = purchase_outcomes("done"), hints("completed")

    zendit_emulator.control("POST", f"purchases/{txn}/resolve", {"status": "DONE"})
    await asyncio.gather(
        *(publish_hint(workers[i % 2], txn, txn) for i in range(6)),
        *(workers[1].publish_funded(txn, event_id=funded.event_id) for _ in range(2)),  # redeliveries
    )
    await wait_for_status(db, txn, OrderStatus.PROVISIONED)
    await asyncio.sleep(2.5)  # parked polls (1 s tier) and every duplicate come back and finish
    announced = await wait_for_messages(workers[0], "notify.order-provisioned", 2, within=1.0)
    into_provisioned = await db.fetchval(
        "SELECT count(*) FROM order_transitions WHERE transaction_id = $1 AND to_status = 'provisioned'", txn
    )

    assert [m["transaction_id"] for m in announced] == [txn]
    # The QR code is stored before the row lock is taken, so racers that saw the DONE at the same
    # moment may each store it (the same verified image, under the same name); one settles the order.
    assert sum(storage.saves for storage in storages) >= 1
    assert decode((Path(workers[0].settings.qr_storage_dir) / f"{txn}.png").read_bytes()) == [
        expected_lpa(zendit_emulator, txn)
    ]
    assert into_provisioned == 1
    assert purchase_outcomes("done") - done_before == 1
    assert hints("completed") - completed_before <= 1
    assert zendit_purchases(zendit_emulator, txn) == [txn]


# ------------------------------------------------------------------------------------------- no-ops
async def test_a_hint_for_a_delivered_order_changes_nothing_and_asks_zendit_nothing(
    start_provisioning, funded_order, db, zendit_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    await service.publish_funded(txn)
    await wait_for_status(db, txn, OrderStatus.PROVISIONED)
    await wait_for_messages(service, "notify.order-provisioned", 1)
    async with db.acquire() as conn:
        await transition(conn, txn, OrderStatus.DELIVERED)  # notify emailed it (not running here)
    storage = count_saves(service)
    before = await order_of(db, txn)
    ignored_before, gets_before = hints("ignored"), zendit_gets()

    await publish_hint(service, txn, txn)
    await eventually(lambda: hints("ignored") - ignored_before == 1, within=5, what="the hint was handled")

    assert await order_of(db, txn) == before
    assert zendit_gets() == gets_before
    assert storage.saves == 0
    assert await service.drain("notify.order-provisioned") == []


async def test_a_hint_for_an_earlier_or_unknown_attempt_is_ignored(
    start_provisioning, funded_order, db, zendit_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    await purchasing_a_stalled_purchase(service, zendit_emulator, txn)
    await poll_parked_for_ten_seconds(service, db, txn)  # only hints can act for the next 10 s
    zendit_emulator.control("POST", f"purchases/{txn}/resolve", {"status": "DONE"})
    async with db.acquire() as conn:  # the order is on its second attempt now
        await record(conn, txn, zendit_transaction_id=f"{txn}-r2", purchase_attempts=2)
    ignored_before = hints("ignored")

    await publish_hint(service, txn, txn)  # the first attempt's purchase: DONE, but not current
    await publish_hint(service, txn, f"{txn}-r3")
    await eventually(lambda: hints("ignored") - ignored_before == 2, within=5, what="both hints handled")

    order = await order_of(db, txn)
    assert order.status == OrderStatus.PURCHASING and order.qr_code_url is None
    assert await service.drain("notify.order-provisioned") == []


# ------------------------------------------------------------------------------ the first poll, with hints
async def test_while_hints_arrive_the_first_poll_waits_3_s_and_still_delivers_an_order_whose_hint_is_lost(
    start_provisioning, funded_order, db, zendit_emulator, deferrals
):
    service = await start_provisioning()
    ignored_before, completed_before = hints("ignored"), hints("completed")
    # Any hint reaching the service shows that Zendit's webhooks are wired to us.
    await publish_hint(service, f"txn_{uuid.uuid4().hex[:24]}", "not-ours")
    await eventually(lambda: hints("ignored") - ignored_before == 1, within=5, what="a hint arrived")
    txn = await funded_order()

    await purchasing_a_stalled_purchase(service, zendit_emulator, txn)
    placed = time.monotonic()
    assert await first_poll_tier(service, deferrals, txn) == domain.HINTED_FIRST_POLL_SECONDS
    # Zendit finishes, but this purchase's webhook never comes: the poll delivers it all the same.
    zendit_emulator.control("POST", f"purchases/{txn}/resolve", {"status": "DONE"})
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, within=8.0)

    assert time.monotonic() - placed >= domain.HINTED_FIRST_POLL_SECONDS - 0.5
    assert hints("completed") == completed_before  # the poll's doing, not a hint's
    assert order.zendit_status == "DONE" and order.qr_code_url


@pytest.mark.parametrize("last_hint_seconds_ago", [None, domain.HINTS_RECENT_SECONDS + 1])
async def test_without_recent_hints_the_first_poll_comes_after_a_second(
    start_provisioning, funded_order, zendit_emulator, deferrals, last_hint_seconds_ago
):
    service = await start_provisioning()
    if last_hint_seconds_ago is not None:
        service.app.state.provisioner.last_hint_at = time.monotonic() - last_hint_seconds_ago
    txn = await funded_order()

    await purchasing_a_stalled_purchase(service, zendit_emulator, txn)

    assert await first_poll_tier(service, deferrals, txn) == domain.FAST_POLL_SECONDS


# ------------------------------------------------------------------------------------------- failures
async def test_a_hint_that_cannot_read_the_purchase_is_dropped_and_never_refunds(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    await purchasing_a_stalled_purchase(service, zendit_emulator, txn)
    await poll_parked_for_ten_seconds(service, db, txn)
    zendit_emulator.control("POST", "faults", {"endpoint": "get_purchase", "status": 403, "count": 1})
    failed_before = hints("failed")

    await publish_hint(service, txn, txn)
    await eventually(lambda: hints("failed") - failed_before == 1, within=5, what="the hint failed")
    await asyncio.sleep(0.3)

    order = await order_of(db, txn)
    assert zendit_emulator.control("GET", "state")["faults"] == []  # the hint met the 403
    assert order.status == OrderStatus.PURCHASING and order.failure_reason is None
    assert refunds_of(stripe_emulator, order) == []
    assert await service.drain("notify.order-failed") == []
    assert await waiting_in_tier(service, LONGEST_TIER_SECONDS) == 1  # the poll still owns the order


async def test_a_hint_that_meets_a_zendit_outage_is_retried_and_still_delivers_early(
    start_provisioning, funded_order, db, zendit_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    await purchasing_a_stalled_purchase(service, zendit_emulator, txn)
    await poll_parked_for_ten_seconds(service, db, txn)
    zendit_emulator.control("POST", f"purchases/{txn}/resolve", {"status": "DONE"})
    zendit_emulator.control("POST", "faults", {"endpoint": "get_purchase", "status": 503, "count": 1})

    await publish_hint(service, txn, txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, within=4.0)  # after the 1 s tier

    assert zendit_emulator.control("GET", "state")["faults"] == []
    assert await waiting_in_tier(service, LONGEST_TIER_SECONDS) == 1  # done by the hint's retry
    assert order.zendit_status == "DONE"


async def test_an_order_provisioned_publish_that_failed_is_published_once_by_the_next_delivery(
    start_provisioning, funded_order, db
):
    service = await start_provisioning()
    txn = await funded_order()
    connection = await aio_pika.connect(service.amqp_url)
    async with connection:  # order.provisioned becomes unroutable
        await (await connection.channel()).queue_delete(service.queue("notify.order-provisioned"))

    await service.publish_funded(txn)
    await wait_for_status(db, txn, OrderStatus.PROVISIONED)
    await eventually(
        lambda: db.fetchval("SELECT published_at IS NULL FROM outbox WHERE transaction_id = $1", txn),
        within=5,
        what="the announcement queued but not published",
    )
    await declare_from_url(service.amqp_url, service.ctx.topology)  # the broker is fixed
    announced = await wait_for_messages(service, "notify.order-provisioned", 1, within=15.0, settle=1.0)

    assert [m["transaction_id"] for m in announced] == [txn]
    published = await db.fetch("SELECT routing_key, published_at FROM outbox WHERE transaction_id = $1", txn)
    assert [(r["routing_key"], r["published_at"] is not None) for r in published] == [
        ("order.provisioned", True)
    ]


async def test_a_hint_for_a_provisioned_order_publishes_its_stuck_announcement_once(
    start_provisioning, funded_order, db, zendit_emulator
):
    service = await start_provisioning()
    txn = await funded_order()
    await service.publish_funded(txn)
    await wait_for_status(db, txn, OrderStatus.PROVISIONED)
    assert len(await wait_for_messages(service, "notify.order-provisioned", 1)) == 1
    # What a failed publish after the commit leaves, once the order.funded message is gone: the
    # announcement queued, unpublished, and nothing left to redeliver it but a hint (or reconcile).
    await db.execute("UPDATE outbox SET published_at = NULL WHERE transaction_id = $1", txn)
    storage = count_saves(service)
    settled_before, gets_before = hints("already_settled"), zendit_gets()

    await publish_hint(service, txn, txn)
    announced = await wait_for_messages(service, "notify.order-provisioned", 1, within=5.0)
    await publish_hint(service, txn, txn)  # a second hint finds it published: nothing more
    await eventually(
        lambda: hints("already_settled") - settled_before == 2, within=5, what="both hints handled"
    )

    assert [m["transaction_id"] for m in announced] == [txn]
    assert await service.drain("notify.order-provisioned") == []
    assert await db.fetchval("SELECT published_at IS NOT NULL FROM outbox WHERE transaction_id = $1", txn)
    assert (await order_of(db, txn)).status == OrderStatus.PROVISIONED
    assert zendit_gets() == gets_before and storage.saves == 0  # announced from our record alone


def zendit_gets() -> float:
    """GET /esim/purchases/{id} calls made by this process so far, whatever their outcome."""
    return sum(
        REGISTRY.get_sample_value(
            "esim_provider_calls_total",
            {"provider": "zendit", "endpoint": "GET /esim/purchases/{id}", "outcome": outcome},
        )
        or 0.0
        for outcome in ("ok", "transient_error", "permanent_error")
    )
