"""The QR code a customer gets is one that was read back as the LPA string — ours, or Zendit's as the
fallback — and an order that no automation can finish is handed to an operator with exactly one
`operator.alert`, never refunded.

Real RabbitMQ, Postgres and emulators, the service in-process (harness of test_provisioning_service.py).
A catch-all queue bound with `#` to the test's exchange sees every event the service publishes. To make
our own rendering fail its read-back, `provisioning.qr.render_png` is patched to encode another string:
the real check then catches it, exactly as it would catch a renderer bug.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from prometheus_client import REGISTRY

from esim_common import outbox
from esim_common.events import Event
from esim_common.logging import JsonFormatter
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.publisher import EventPublisher, PublishFailed
from esim_sandbox.zendit_emulator import state as zendit_state
from esim_sandbox.zendit_emulator.activation import new_confirmation
from provisioning import domain, qr
from tests.fixtures.polling import eventually
from tests.integration import test_provisioning_service as svc
from tests.integration.test_provisioning_service import (
    Provisioning,
    decode,
    expected_lpa,
    order_of,
    refunds_of,
    wait_for_messages,
    wait_for_status,
    zendit_purchases,
)

pytestmark = [pytest.mark.broker, pytest.mark.db]

start_provisioning = svc.start_provisioning
funded_order = svc.funded_order

POLL_QUEUE = "provisioning.order-funded"
ALERT = "operator.alert"


# ------------------------------------------------------------------------------------------- harness
@dataclass
class Tap:
    """Every event published to the test's exchange, in order (a queue bound with `#`)."""

    queue: aio_pika.abc.AbstractQueue
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def messages(self, routing_key: str) -> list[dict[str, Any]]:
        """All messages with `routing_key` seen so far, with their AMQP message and correlation ids."""
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            body = json.loads(message.body)
            amqp = (message.message_id, message.correlation_id)
            self.seen.append({**body, "routing_key": message.routing_key, "amqp": amqp})
        return [m for m in self.seen if m["routing_key"] == routing_key]

    async def alerts(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        """The operator alerts seen, once there are at least `count`."""

        async def arrived() -> bool:
            return len(await self.messages(ALERT)) >= count

        await eventually(arrived, within=within, what=f"{count} operator alert(s)")
        return await self.messages(ALERT)


@asynccontextmanager
async def watching(service: Provisioning) -> AsyncIterator[Tap]:
    connection = await aio_pika.connect(service.amqp_url)
    async with connection:
        channel = await connection.channel()
        name = f"{service.settings.topology_prefix}tap-{uuid.uuid4().hex[:6]}"
        queue = await channel.declare_queue(name, exclusive=True)
        await queue.bind(service.ctx.topology.exchange, routing_key="#")
        yield Tap(queue)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def processed(service: Provisioning, outcome: str) -> float:
    queue = service.ctx.topology.queue(POLL_QUEUE).name
    return sample("esim_messages_processed_total", queue=queue, outcome=outcome)


def qr_fetches() -> float:
    """GET /esim/purchases/{id}/qrcode calls made by this process so far, whatever their outcome."""
    return sum(
        sample(
            "esim_provider_calls_total",
            provider="zendit",
            endpoint="GET /esim/purchases/{id}/qrcode",
            outcome=outcome,
        )
        for outcome in ("ok", "transient_error", "permanent_error")
    )


def zendit_qr_png(zendit_emulator, zendit_id: str) -> bytes:
    """What Zendit serves as the purchase's QR image."""
    response = httpx.get(
        f"{zendit_emulator.url}/esim/purchases/{zendit_id}/qrcode",
        headers={"Authorization": f"Bearer {zendit_emulator.api_key}"},
    )
    response.raise_for_status()
    return response.content


@pytest.fixture
def our_rendering_is_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our renderer encodes something else than it was given, with any mask; the read-back must catch it."""
    render = qr.render_png
    monkeypatch.setattr(qr, "render_png", lambda text, **options: render(text + "BROKEN", **options))


def stored_qr(service: Provisioning, txn: str) -> Path:
    return Path(service.settings.qr_storage_dir) / f"{txn}.png"


# ------------------------------------------------------------------------------------------- needs_attention
async def test_a_purchase_stalled_past_the_deadline_alerts_an_operator_once_and_is_never_refunded(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator
):
    service = await start_provisioning(purchase_deadline_seconds=2)
    txn = await funded_order()
    zendit_emulator.control("POST", "purchase_stalls", {"count": 1})  # a supplier outage: IN_PROGRESS

    async def handled(count: int) -> None:
        """Wait until `count` deliveries of order.funded were handled to the end (acked as ok): the
        first is the one that met the deadline, the others are redeliveries."""
        await eventually(lambda: processed(service, "ok") == count, within=10, what=f"{count} handled")

    async with watching(service) as tap:
        funded = await service.publish_funded(txn)
        order = await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED, within=15)
        await handled(1)
        [alert] = await tap.messages(ALERT)

        # Redeliveries find the alert published: nothing more goes out.
        for _ in range(2):
            await service.publish_funded(txn, event_id=funded.event_id)
        await handled(3)
        after_redeliveries = len(await tap.messages(ALERT))

        # A publish lost after the commit (the row left unstamped) is made by the next redelivery, once.
        event_id = outbox.stable_event_id(f"needs_attention:{txn}")
        await db.execute("UPDATE outbox SET published_at = NULL WHERE event_id = $1", event_id)
        await service.publish_funded(txn, event_id=funded.event_id)
        await handled(4)
        healed = (await tap.messages(ALERT))[-1]
        after_healing = len(await tap.messages(ALERT))
        await service.publish_funded(txn, event_id=funded.event_id)
        await handled(5)
        after_healed = len(await tap.messages(ALERT))
        failed = await tap.messages("order.failed") + await tap.messages("order.refunded")

    assert order.status == OrderStatus.NEEDS_ATTENTION
    assert order.failure_reason == "purchase_deadline_exceeded" and order.zendit_status == "IN_PROGRESS"
    assert (alert["alert"], alert["alert_key"], alert["reason"]) == (
        "needs_attention",
        f"needs_attention:{txn}",
        "purchase_deadline_exceeded",
    )
    assert alert["transaction_id"] == txn and alert["event_id"] == str(event_id)
    assert alert["amqp"] == (str(event_id), txn)
    assert alert["facts"] == {
        "zendit_transaction_id": txn,
        "purchase_attempts": "1",
        "zendit_status": "IN_PROGRESS",
        "offer_id": svc.OFFER,
    }
    assert (after_redeliveries, after_healing, after_healed) == (1, 2, 2) and failed == []
    assert healed["event_id"] == alert["event_id"]  # the same alert: notify emails once per key
    assert await db.fetchval("SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1", event_id)
    # The production binding delivers it to notify: once, then once more only for the lost publish.
    assert [m["alert_key"] for m in await service.drain("notify.operator-alert")] == [
        f"needs_attention:{txn}"
    ] * 2
    assert refunds_of(stripe_emulator, await order_of(db, txn)) == []
    assert (await order_of(db, txn)).status == OrderStatus.NEEDS_ATTENTION
    assert await service.drain("notify.order-failed") == []


async def test_an_order_re_driven_by_an_operator_that_gets_stuck_again_alerts_the_operator_again(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator
):
    service = await start_provisioning(purchase_deadline_seconds=2)
    txn = await funded_order()
    zendit_emulator.control("POST", "purchase_stalls", {"count": 2})  # both attempts stay IN_PROGRESS

    async with watching(service) as tap:
        await service.publish_funded(txn)
        await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED, within=15)
        await tap.alerts(1)
        # The operator re-drives it (the legal way back: needs_attention → funding → funded, funding's
        # part done by hand here) and it gets stuck again on its next attempt.
        async with db.acquire() as conn:
            await transition(conn, txn, OrderStatus.FUNDING, reason="re-driven by an operator")
            await transition(conn, txn, OrderStatus.FUNDED)
        await service.publish_funded(txn)
        alerts = await tap.alerts(2, within=15)
        order = await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED)

    assert order.status == OrderStatus.NEEDS_ATTENTION and order.purchase_attempts == 2
    assert zendit_purchases(zendit_emulator, txn) == [txn, f"{txn}-r2"]
    # One alert per attempt: notify emails once per key, so the second one must have its own.
    assert [(a["alert_key"], a["facts"]["zendit_transaction_id"]) for a in alerts] == [
        (f"needs_attention:{txn}", txn),
        (f"needs_attention:{txn}-r2", f"{txn}-r2"),
    ]
    assert [m["alert_key"] for m in await service.drain("notify.operator-alert")] == [
        a["alert_key"] for a in alerts
    ]
    assert refunds_of(stripe_emulator, order) == []


class FailingAlerts:
    """The service's publisher, refusing its first `failures` operator.alert publishes like a broker
    that does not confirm them."""

    def __init__(self, inner: EventPublisher, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def publish(self, event: Event) -> None:
        if event.routing_key == ALERT and self.failures > 0:
            self.failures -= 1
            raise PublishFailed("publish to 'operator.alert' failed: not confirmed (test)")
        await self.inner.publish(event)


async def test_an_alert_whose_publish_fails_until_the_retries_run_out_is_published_by_the_failure_path(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator
):
    service = await start_provisioning(purchase_deadline_seconds=1)
    # The first try and every retry tier fail; the failure path's try is the first to get through.
    failing = FailingAlerts(service.ctx.publisher, failures=1 + len(service.ctx.topology.retry_delays))
    service.ctx.publisher = failing  # type: ignore[assignment]
    txn = await funded_order()
    zendit_emulator.control("POST", "purchase_stalls", {"count": 1})
    dead_lettered_before = processed(service, "dead_lettered")

    async with watching(service) as tap:
        await service.publish_funded(txn)
        await eventually(
            lambda: processed(service, "dead_lettered") - dead_lettered_before == 1,
            within=40,
            what="the retries used up",
        )
        alerts = await tap.messages(ALERT)

    order = await order_of(db, txn)
    assert order.status == OrderStatus.NEEDS_ATTENTION
    assert order.failure_reason == "purchase_deadline_exceeded" and failing.failures == 0
    assert [a["alert_key"] for a in alerts] == [f"needs_attention:{txn}"]
    event_id = outbox.stable_event_id(f"needs_attention:{txn}")
    assert await db.fetchval("SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1", event_id)
    assert [m["alert_key"] for m in await service.drain("notify.operator-alert")] == [
        f"needs_attention:{txn}"
    ]
    # The message is kept in the DLQ (its retries ran out); nothing was refunded.
    dead_letters = await service.drain_raw(service.ctx.topology.queue(POLL_QUEUE).dlq)
    assert [m["transaction_id"] for m in dead_letters] == [txn]
    assert refunds_of(stripe_emulator, order) == []


# ------------------------------------------------------------------------------------------- QR fallback
async def test_when_our_qr_code_does_not_read_back_zendits_is_delivered_because_it_reads_as_the_lpa(
    start_provisioning, funded_order, db, zendit_emulator, our_rendering_is_broken
):
    service = await start_provisioning()
    txn = await funded_order()
    from_zendit_before = sample("esim_provisioning_qr_codes_total", source="zendit")
    matches_before = sample("esim_zendit_qr_checks_total", check="fallback", outcome="match")

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION)
    announced = await wait_for_messages(service, "notify.order-provisioned", 1)

    assert order.status == OrderStatus.PROVISIONED
    stored = stored_qr(service, txn).read_bytes()
    assert stored == zendit_qr_png(zendit_emulator, txn)  # Zendit's image, not our broken one
    assert decode(stored) == [expected_lpa(zendit_emulator, txn)]
    assert sample("esim_provisioning_qr_codes_total", source="zendit") - from_zendit_before == 1
    assert sample("esim_zendit_qr_checks_total", check="fallback", outcome="match") - matches_before == 1
    assert [m["transaction_id"] for m in announced] == [txn]


async def test_a_zendit_outage_while_its_qr_code_is_needed_is_waited_out_and_still_delivers(
    start_provisioning, funded_order, db, zendit_emulator, our_rendering_is_broken
):
    service = await start_provisioning()
    txn = await funded_order()
    # More 503s than the consumer's retry tiers would tolerate.
    outage = len(service.ctx.topology.retry_delays) + 2
    zendit_emulator.control("POST", "faults", {"endpoint": "get_qrcode", "status": 503, "count": outage})
    retried_before, deferred_before = processed(service, "retried"), processed(service, "deferred")

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION, within=20)

    assert order.status == OrderStatus.PROVISIONED
    assert zendit_emulator.control("GET", "state")["faults"] == []  # every 503 was met
    # Looked at again with the poll's backoff (deferred), no retry tier used up.
    assert processed(service, "retried") == retried_before
    assert processed(service, "deferred") - deferred_before >= outage
    assert decode(stored_qr(service, txn).read_bytes()) == [expected_lpa(zendit_emulator, txn)]


@pytest.mark.parametrize(
    "zendits_image",
    ["wrong", "blank", "unavailable"],
    ids=["reads-as-another-code", "no-code-in-it", "404"],
)
async def test_when_no_qr_code_reads_as_the_lpa_the_order_goes_to_an_operator_and_is_never_refunded(
    start_provisioning,
    funded_order,
    db,
    zendit_emulator,
    stripe_emulator,
    our_rendering_is_broken,
    zendits_image,
):
    service = await start_provisioning()
    txn = await funded_order()
    if zendits_image == "unavailable":
        zendit_emulator.control("POST", "faults", {"endpoint": "get_qrcode", "status": 404, "count": 5})
    else:
        zendit_emulator.control("POST", f"purchases/{txn}/qrcode", {"image": zendits_image})
    unverified_before = sample("esim_provisioning_operator_alerts_total", reason="qr_unverified")

    async with watching(service) as tap:
        await service.publish_funded(txn)
        order = await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED, within=10)
        [alert] = await tap.alerts(1)
        failed = await tap.messages("order.failed") + await tap.messages("order.refunded")

    assert order.status == OrderStatus.NEEDS_ATTENTION and order.failure_reason == "qr_unverified"
    assert (alert["alert_key"], alert["reason"]) == (f"needs_attention:{txn}", "qr_unverified")
    assert alert["facts"]["zendit_status"] == order.zendit_status == "DONE"  # Zendit delivered: no refund
    assert sample("esim_provisioning_operator_alerts_total", reason="qr_unverified") - unverified_before == 1
    assert refunds_of(stripe_emulator, order) == [] and failed == []
    assert not stored_qr(service, txn).exists()
    assert order.qr_code_url is None and order.activation_code is None
    assert await service.drain("notify.order-provisioned") == []
    assert zendit_purchases(zendit_emulator, txn) == [txn]


async def test_without_a_qr_decoder_nothing_unverified_is_sent_and_the_order_goes_to_an_operator(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator, monkeypatch
):
    # Start-up refuses without zxing-cpp (tests/unit/test_provisioning_qr.py); this is the per-order
    # guard behind it: with no decoder, nothing unverified is ever stored or sent.
    service = await start_provisioning()
    monkeypatch.setattr(qr, "zxingcpp", None)
    txn = await funded_order()
    fetches_before = qr_fetches()

    async with watching(service) as tap:
        await service.publish_funded(txn)
        order = await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED, within=10)
        [alert] = await tap.alerts(1)

    assert order.status == OrderStatus.NEEDS_ATTENTION and alert["reason"] == "qr_unverified"
    assert qr_fetches() == fetches_before  # Zendit's image could not be read either: not fetched
    assert refunds_of(stripe_emulator, order) == [] and not stored_qr(service, txn).exists()


async def test_a_done_purchase_without_activation_data_goes_to_an_operator_and_is_never_refunded(
    start_provisioning, funded_order, db, zendit_emulator, stripe_emulator, monkeypatch
):
    # Zendit confirms the purchase DONE but without an activation code: no QR code can be made.
    monkeypatch.setattr(
        zendit_state, "new_confirmation", lambda iccid=None: {**new_confirmation(iccid), "activationCode": ""}
    )
    service = await start_provisioning()
    txn = await funded_order()

    async with watching(service) as tap:
        await service.publish_funded(txn)
        order = await wait_for_status(db, txn, OrderStatus.NEEDS_ATTENTION, OrderStatus.REFUNDED, within=10)
        [alert] = await tap.alerts(1)
        failed = await tap.messages("order.failed") + await tap.messages("order.refunded")

    assert order.failure_reason == "confirmation_incomplete" and order.zendit_status == "DONE"
    assert (alert["alert_key"], alert["reason"]) == (f"needs_attention:{txn}", "confirmation_incomplete")
    assert alert["facts"]["zendit_status"] == "DONE"
    assert refunds_of(stripe_emulator, order) == [] and failed == []
    assert not stored_qr(service, txn).exists()
    assert await service.drain_raw(service.ctx.topology.queue(POLL_QUEUE).dlq) == []


# ------------------------------------------------------------------------------------------- cross-check
async def test_without_the_cross_check_zendits_qr_code_is_not_even_fetched(
    start_provisioning, funded_order, db
):
    service = await start_provisioning()
    assert service.settings.zendit_qr_cross_check is False  # the default
    txn = await funded_order()
    fetches_before = qr_fetches()

    await service.publish_funded(txn)
    await wait_for_status(db, txn, OrderStatus.PROVISIONED)

    assert qr_fetches() == fetches_before


async def test_the_cross_check_finds_zendits_qr_code_reading_otherwise_and_alerts_but_delivers_ours(
    start_provisioning, funded_order, db, zendit_emulator, caplog
):
    """Ours is delivered whatever Zendit's image says, a mismatch is alerted once, and no activation
    code or LPA string reaches a log line (as the service writes it: JSON, every extra field, at
    DEBUG) or anything published."""
    service = await start_provisioning(zendit_qr_cross_check=True)
    agreeing, disagreeing, unavailable = await funded_order(), await funded_order(), await funded_order()
    zendit_emulator.control("POST", f"purchases/{disagreeing}/qrcode", {"image": "wrong"})

    def checks(outcome: str) -> float:
        return sample("esim_zendit_qr_checks_total", check="cross_check", outcome=outcome)

    before = {outcome: checks(outcome) for outcome in ("match", "mismatch", "unavailable")}
    alerts_before = sample("esim_provisioning_operator_alerts_total", reason="qr_mismatch_zendit")

    with caplog.at_level(logging.DEBUG):
        async with watching(service) as tap:
            orders, events = {}, {}
            for handled, txn in enumerate((agreeing, disagreeing, unavailable), start=1):
                if txn == unavailable:  # Zendit cannot give its image right now
                    zendit_emulator.control("POST", "faults", {"endpoint": "get_qrcode", "status": 503})
                events[txn] = await service.publish_funded(txn)
                orders[txn] = await wait_for_status(
                    db, txn, OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION
                )
                await eventually(
                    lambda n=handled: processed(service, "ok") == n, within=5, what=f"order {handled} done"
                )
            [alert] = await tap.messages(ALERT)
            # A redelivery announces the order again: the alert was published, nothing more goes out.
            await service.publish_funded(disagreeing, event_id=events[disagreeing].event_id)
            await eventually(lambda: processed(service, "ok") == 4, within=5, what="the redelivery")
            alerts = await tap.messages(ALERT)
            published = list(tap.seen)

    assert [o.status for o in orders.values()] == [OrderStatus.PROVISIONED] * 3  # ours went out every time
    for txn in orders:
        assert decode(stored_qr(service, txn).read_bytes()) == [expected_lpa(zendit_emulator, txn)]
    assert {outcome: checks(outcome) - before[outcome] for outcome in before} == {
        "match": 1,
        "mismatch": 1,
        "unavailable": 1,
    }
    assert zendit_emulator.control("GET", "state")["faults"] == []
    assert (alert["transaction_id"], alert["alert"], alert["alert_key"], alert["reason"]) == (
        disagreeing,
        "qr_mismatch",  # its own kind: notify's email says the order was delivered
        f"qr_mismatch:{disagreeing}",
        "qr_mismatch_zendit",
    )
    assert alert["facts"]["zendit_status"] == "DONE" and alerts == [alert]
    assert sample("esim_provisioning_operator_alerts_total", reason="qr_mismatch_zendit") - alerts_before == 1
    mismatch_logs = [r for r in caplog.records if getattr(r, "alert", None) == "qr_mismatch_zendit"]
    assert [r.zendit_transaction_id for r in mismatch_logs] == [disagreeing]
    # No activation code or LPA string in any log line, at any level, as the service's JSON formatter
    # writes it (extra fields included), nor in anything published (the alert included).
    formatter = JsonFormatter(service="provisioning")
    lines = [formatter.format(record) for record in caplog.records]
    secrets = [o.activation_code for o in orders.values()] + [
        expected_lpa(zendit_emulator, t) for t in orders
    ]
    assert all(secrets) and any(r.levelno == logging.DEBUG for r in caplog.records)
    assert [secret for secret in secrets for line in lines if secret in line] == []
    assert {m["routing_key"] for m in published} >= {ALERT, "order.provisioned"}
    assert [secret for secret in secrets for m in published if secret in json.dumps(m)] == []
    assert len(await wait_for_messages(service, "notify.order-provisioned", 3)) == 3


async def test_a_slow_zendit_qr_image_holds_up_the_delivery_only_for_the_cross_checks_own_timeout(
    start_provisioning, funded_order, db, zendit_emulator
):
    service = await start_provisioning(zendit_qr_cross_check=True, zendit_timeout_seconds=30.0)
    txn = await funded_order()
    # Zendit takes longer than the cross-check may wait (but well within the client's own timeout).
    slow = domain.CROSS_CHECK_TIMEOUT_SECONDS + 3
    zendit_emulator.control(
        "POST", "faults", {"endpoint": "get_qrcode", "status": None, "sleepSeconds": slow}
    )
    before = {
        o: sample("esim_zendit_qr_checks_total", check="cross_check", outcome=o)
        for o in ("match", "unavailable")
    }

    await service.publish_funded(txn)
    order = await wait_for_status(db, txn, OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION)

    after = {o: sample("esim_zendit_qr_checks_total", check="cross_check", outcome=o) for o in before}
    assert order.status == OrderStatus.PROVISIONED
    assert zendit_emulator.control("GET", "state")["faults"] == []  # the slow answer was asked for
    # Given up on after the cross-check's timeout (counted unavailable), not waited for (a match).
    assert {o: after[o] - before[o] for o in before} == {"match": 0, "unavailable": 1}
    assert decode(stored_qr(service, txn).read_bytes()) == [expected_lpa(zendit_emulator, txn)]
