"""The seed's gauges are computed from the rows in Postgres and exposed on reconcile's /metrics."""

from __future__ import annotations

import asyncio
import math
import uuid

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from reconcile.business_metrics import BusinessMetrics
from reconcile.main import create_app

pytestmark = [pytest.mark.db]


async def insert_order(
    pool: asyncpg.Pool, status: str, *, issue_seconds: float | None = None, refund_id=None
) -> None:
    txn = f"txn-{uuid.uuid4().hex[:16]}"
    await pool.execute(
        """INSERT INTO esim_purchases (transaction_id, offer_id, price, currency, recipient_email,
                                       recipient_name, status, paid_at, emailed_at, refund_id)
           VALUES ($1, 'ESIM-GLOBAL-30D-5GB', 1000, 'USD', 'c@example.com', 'C', $2,
                   now() - interval '1 hour',
                   now() - interval '1 hour' + make_interval(secs => $3::float8), $4)""",
        txn,
        status,
        issue_seconds,
        refund_id,
    )


def gauge(name: str, text: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


async def test_three_delivered_and_one_refunded_order_is_a_success_rate_of_75(db):
    await insert_order(db, "delivered", issue_seconds=10)
    await insert_order(db, "delivered", issue_seconds=20)
    await insert_order(db, "delivered", issue_seconds=30)
    await insert_order(db, "refunded", refund_id="re_1")
    await insert_order(db, "payment_failed")  # never paid: not part of the success rate
    await insert_order(db, "purchasing")  # still in flight: not finished
    await db.execute(
        """INSERT INTO wallet_topups (id, amount, currency, status) VALUES
           ('t1', 5000, 'USD', 'declined'), ('t2', 5000, 'USD', 'failed'), ('t3', 5000, 'USD', 'succeeded')"""
    )

    finished = await BusinessMetrics(lambda: db).run_once()

    assert finished == 4
    assert REGISTRY.get_sample_value("esim_success_rate") == 75.0
    assert REGISTRY.get_sample_value("zendit_topup_failures") == 2.0
    assert REGISTRY.get_sample_value("stripe_refunds_issued") == 1.0
    assert REGISTRY.get_sample_value("average_time_to_issue_esim_ms") == pytest.approx(20_000, abs=1)


async def test_before_any_order_finishes_the_ratios_are_unknown_not_zero(db):
    await insert_order(db, "purchasing")
    assert await BusinessMetrics(lambda: db).run_once() == 0

    assert math.isnan(REGISTRY.get_sample_value("esim_success_rate"))
    assert math.isnan(REGISTRY.get_sample_value("average_time_to_issue_esim_ms"))


async def test_a_running_reconcile_service_serves_the_gauges_on_metrics(service_settings, db):
    await insert_order(db, "delivered", issue_seconds=4)
    await insert_order(db, "needs_attention")
    app = create_app(service_settings)
    async with app.router.lifespan_context(app):  # starts the service and its refresh loop
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            for _ in range(100):
                text = (await client.get("/metrics")).text
                if "esim_success_rate 50.0" in text:
                    break
                await asyncio.sleep(0.05)
    assert gauge("esim_success_rate", text) == 50.0
    assert gauge("average_time_to_issue_esim_ms", text) == pytest.approx(4000, abs=1)


async def test_unfinished_orders_are_counted_per_state_with_the_age_of_the_oldest(db):
    await insert_order(db, "purchasing")
    await insert_order(db, "purchasing")
    await insert_order(db, "needs_attention")
    await insert_order(db, "delivered", issue_seconds=5)  # finished: no series of its own
    await db.execute(
        "UPDATE esim_purchases SET updated_at = now() - interval '40 minutes'"
        " WHERE status = 'needs_attention'"
    )

    await BusinessMetrics(lambda: db).run_once()

    def sample(name: str, status: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"status": status})

    assert sample("esim_orders_unfinished", "purchasing") == 2
    assert sample("esim_orders_unfinished", "needs_attention") == 1
    assert sample("esim_oldest_unfinished_order_seconds", "needs_attention") == pytest.approx(2400, abs=60)
    assert sample("esim_oldest_unfinished_order_seconds", "purchasing") < 60
    # Empty unfinished states are 0 (not stale from an earlier refresh); finished states have no series.
    assert sample("esim_orders_unfinished", "awaiting_funds") == 0
    assert sample("esim_oldest_unfinished_order_seconds", "awaiting_funds") == 0
    assert sample("esim_orders_unfinished", "delivered") is None
