"""esim_time_to_esim_seconds: payment to eSIM email, observed once per order by the delivery that moves
it to delivered, never again by a redelivery or a duplicate that finds the email sent."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from esim_common.order_repository import Order, get_order
from esim_common.service import ServiceContext
from notify import handlers
from tests.fixtures.notify import running_notify
from tests.integration.test_notify_delivery import (
    provisioned_event,
    provisioned_order,
    queue_depth,
    wait_until,
)

pytestmark = [pytest.mark.broker, pytest.mark.db]

PAID_AGO = 120.0  # provisioned_order pays the order two minutes before now


def observed() -> tuple[float, float]:
    """The histogram's count and sum so far (it has no labels: compare before and after)."""
    count = REGISTRY.get_sample_value("esim_time_to_esim_seconds_count") or 0.0
    total = REGISTRY.get_sample_value("esim_time_to_esim_seconds_sum") or 0.0
    return count, total


def bucket(le: str) -> float:
    return REGISTRY.get_sample_value("esim_time_to_esim_seconds_bucket", {"le": le}) or 0.0


async def announced(ctx: ServiceContext, n: int) -> bool:
    return await queue_depth(ctx, ctx.topology.queue("reconcile.order-delivered").name) == n


async def test_time_to_esim_is_observed_once_and_not_again_on_redeliveries(
    service_settings, db, smtp_capture, monkeypatch
):
    txn = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    as_provisioned = await get_order(db, txn)
    count, total = observed()
    two_minutes, five_minutes = bucket("120.0"), bucket("300.0")
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: announced(ctx, 1))
        await ctx.publisher.publish(provisioned_event(txn))  # a redelivery: finds the order delivered
        await wait_until(lambda: announced(ctx, 2))

        # A duplicate that read the order just before the first delivery moved it: it finds the email
        # sent and the order already delivered when it tries to move it.
        async def stale(pool: object, transaction_id: str) -> Order | None:
            return as_provisioned

        monkeypatch.setattr(handlers, "get_order", stale)
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: announced(ctx, 3))

    assert len(smtp_capture.messages) == 1
    new_count, new_total = observed()
    assert new_count == count + 1
    assert PAID_AGO <= new_total - total < PAID_AGO + 60
    assert (bucket("120.0"), bucket("300.0")) == (two_minutes, five_minutes + 1)


async def test_an_order_emailed_before_a_crash_is_observed_by_the_delivery_that_completes_it(
    service_settings, db, smtp_capture
):
    """The email went out but the process died before the order moved: the redelivery finds it sent and
    records the delivery, and is the one observation of this order (the crashed one made none)."""
    txn = await provisioned_order(db, Path(service_settings.qr_storage_dir))
    await db.execute(
        """INSERT INTO sent_emails (transaction_id, template, recipient, status, message_id, sent_at)
           VALUES ($1, 'esim_delivery', 'ada@example.com', 'sent', '<earlier@example.com>', now())""",
        txn,
    )
    count, _ = observed()
    async with running_notify(service_settings) as ctx:
        await ctx.publisher.publish(provisioned_event(txn))
        await wait_until(lambda: announced(ctx, 1))

    assert smtp_capture.messages == []
    assert observed()[0] == count + 1
