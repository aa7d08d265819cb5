"""The scheduled sweep on the real Postgres and RabbitMQ: which orders it re-drives (stuck past their state's
deadline, not re-driven within it, never terminal ones), one replica at a time, and checks that fail
without stopping the run.

Orders are made stuck by moving their `updated_at` back (as time passing would); what a re-drive
publishes waits in the work queues of funding, provisioning and notify, where the tests read it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import aio_pika
import asyncpg
import pytest
from prometheus_client import REGISTRY

from esim_common.order_states import OrderStatus
from esim_common.service import ServiceContext
from esim_common.settings import Settings
from esim_common.topology import delete
from reconcile.main import create_app
from reconcile.order_actions import redrive_from_state
from reconcile.order_ops import AUTO_REDRIVE_ACTION, MovedOn
from reconcile.stuck_rules import StuckRules, stuck_rules
from reconcile.sweep import ReconcileSweep
from reconcile.sweep_queries import SWEEP_LOCK_CLASS
from tests.fixtures.polling import eventually
from tests.integration.test_reconcile_order_admin import make_order, provisioned_facts, published

pytestmark = [pytest.mark.broker, pytest.mark.db]

S = OrderStatus
ELEVEN_MINUTES = timedelta(minutes=11)  # past the 10-minute deadline of paid, funding and funded


@pytest.fixture
async def reconcile(service_settings: Settings) -> AsyncIterator[ServiceContext]:
    """The reconcile service's context, started (broker, pool, topology); its loops are not running."""
    app = create_app(service_settings)
    ctx: ServiceContext = app.state.ctx
    await ctx.start()
    try:
        yield ctx
    finally:
        await ctx.stop()
        connection = await aio_pika.connect(service_settings.amqp_url)
        async with connection:
            await delete(await connection.channel(), ctx.topology)


def sweep(ctx: ServiceContext, *, checks=(), rules: StuckRules | None = None) -> ReconcileSweep:
    return ReconcileSweep(
        pool=lambda: ctx.pool,
        publisher=ctx.publisher,
        rules=rules or stuck_rules(ctx.settings),
        interval_seconds=ctx.settings.reconcile_interval,
        checks=checks,
    )


async def unchanged_for(db: asyncpg.Pool, txn: str, age: timedelta) -> None:
    await db.execute(
        "UPDATE esim_purchases SET updated_at = now() - $2::interval WHERE transaction_id = $1", txn, age
    )


async def actions(db: asyncpg.Pool, txn: str) -> list[str]:
    rows = await db.fetch("SELECT action FROM operator_actions WHERE transaction_id = $1 ORDER BY id", txn)
    return [r["action"] for r in rows]


def queued_orders(messages: dict[str, list[aio_pika.abc.AbstractIncomingMessage]]) -> dict[str, list[str]]:
    return {
        queue: sorted(json.loads(m.body)["transaction_id"] for m in found)
        for queue, found in messages.items()
    }


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_stuck_orders_are_redriven_fresh_and_finished_ones_are_not(db, reconcile):
    stuck_paid = await make_order(db, S.PAID)
    stuck_funded = await make_order(db, S.FUNDED)
    stuck_provisioned = await make_order(db, S.PROVISIONED, **provisioned_facts("z1"))
    fresh_paid = await make_order(db, S.PAID)
    emailing = await make_order(db, S.PROVISIONED, **provisioned_facts("z2"))  # within EMAIL_GIVE_UP
    finished = [await make_order(db, s) for s in (S.DELIVERED, S.REFUND_PENDING)] + [
        await make_order(db, S.PENDING_PAYMENT, path=()),
        await make_order(db, S.NEEDS_ATTENTION, path=(S.PAID, S.NEEDS_ATTENTION)),
    ]
    for txn in (stuck_paid, stuck_funded):
        await unchanged_for(db, txn, ELEVEN_MINUTES)
    await unchanged_for(db, stuck_provisioned, timedelta(hours=2))
    await unchanged_for(db, emailing, timedelta(minutes=59))
    for txn in finished:
        await unchanged_for(db, txn, timedelta(days=30))
    before = count("esim_reconcile_redrives_total", status="redriven")

    assert await sweep(reconcile).run_once() == 3

    assert queued_orders(await published(reconcile)) == {
        "funding.order-paid": [stuck_paid],
        "provisioning.order-funded": [stuck_funded],
        "notify.order-provisioned": [stuck_provisioned],
    }
    for txn in (stuck_paid, stuck_funded, stuck_provisioned):
        assert await actions(db, txn) == [AUTO_REDRIVE_ACTION]
    for txn in (fresh_paid, emailing, *finished):
        assert await actions(db, txn) == []
    assert count("esim_reconcile_redrives_total", status="redriven") == before + 3
    [row] = await db.fetch(
        "SELECT detail::text, note FROM operator_actions WHERE transaction_id = $1", stuck_paid
    )
    assert row["note"] is None
    assert json.loads(row["detail"])["routing_key"] == "order.paid"


async def test_an_order_redriven_within_its_deadline_is_left_alone_until_the_deadline_passes(db, reconcile):
    txn = await make_order(db, S.FUNDING)
    by_operator = await make_order(db, S.PAID)
    for order in (txn, by_operator):
        await unchanged_for(db, order, timedelta(hours=1))
    await redrive_from_state(reconcile.pool, reconcile.publisher, by_operator, note="looked stuck")

    assert await sweep(reconcile).run_once() == 1
    assert await sweep(reconcile).run_once() == 0  # the first re-drive is recent
    assert await actions(db, txn) == [AUTO_REDRIVE_ACTION]
    assert await actions(db, by_operator) == ["redrive"]

    await db.execute("UPDATE operator_actions SET created_at = created_at - interval '11 minutes'")
    assert await sweep(reconcile).run_once() == 2
    assert await actions(db, txn) == [AUTO_REDRIVE_ACTION] * 2
    assert len((await published(reconcile))["funding.order-paid"]) == 4


async def test_an_order_that_moved_after_it_was_found_is_not_redriven(db, reconcile):
    txn = await make_order(db, S.PAID)
    found = await db.fetchval("SELECT updated_at FROM esim_purchases WHERE transaction_id = $1", txn)
    await db.execute("UPDATE esim_purchases SET updated_at = now() WHERE transaction_id = $1", txn)

    with pytest.raises(MovedOn):
        await redrive_from_state(
            reconcile.pool, reconcile.publisher, txn, action=AUTO_REDRIVE_ACTION, found_stuck=(S.PAID, found)
        )

    assert await actions(db, txn) == []
    assert (await published(reconcile))["funding.order-paid"] == []


async def test_a_stuck_order_whose_facts_refuse_a_redrive_is_alerted_once_per_deadline(db, reconcile, caplog):
    no_qr = await make_order(db, S.PROVISIONED)  # provisioned without a stored QR code: nothing to email
    await unchanged_for(db, no_qr, timedelta(hours=2))
    before = count("esim_reconcile_redrives_total", status="refused")

    assert await sweep(reconcile).run_once() == 0
    assert await sweep(reconcile).run_once() == 0

    assert await actions(db, no_qr) == ["auto_redrive_refused"]
    assert count("esim_reconcile_redrives_total", status="refused") == before + 1
    assert "OPERATOR ALERT: a stuck order cannot be re-driven automatically" in caplog.text
    assert (await published(reconcile))["notify.order-provisioned"] == []


async def test_two_sweeps_at_once_one_does_the_work_and_the_other_skips(db, reconcile):
    stuck = [await make_order(db, S.PAID) for _ in range(3)]
    for txn in stuck:
        await unchanged_for(db, txn, ELEVEN_MINUTES)
    holding, release = asyncio.Event(), asyncio.Event()
    second_checked = []

    async def hold_the_lock() -> None:
        holding.set()
        await release.wait()

    async def second_check() -> None:
        second_checked.append(True)

    skipped = count("esim_reconcile_runs_total", outcome="skipped")
    first = asyncio.create_task(sweep(reconcile, checks=[hold_the_lock]).run_once())
    await asyncio.wait_for(holding.wait(), 10)

    assert await sweep(reconcile, checks=[second_check]).run_once() == 0
    release.set()
    assert await first == 3

    assert second_checked == []
    assert count("esim_reconcile_runs_total", outcome="skipped") == skipped + 1
    for txn in stuck:
        assert await actions(db, txn) == [AUTO_REDRIVE_ACTION]
    # the lock ended with the first run (none is left on a pooled connection): the next run gets it
    held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1"
    assert await db.fetchval(held, SWEEP_LOCK_CLASS) == 0
    assert await sweep(reconcile, checks=[second_check]).run_once() == 0 and second_checked == [True]


async def test_a_failing_check_does_not_stop_the_redrives_or_the_other_checks(db, reconcile, caplog):
    txn = await make_order(db, S.PAID)
    await unchanged_for(db, txn, ELEVEN_MINUTES)
    ran = []

    async def ledger_unreachable() -> None:
        raise ConnectionError("ledger down")

    async def other_check() -> None:
        ran.append("other")

    failures = count("esim_reconcile_check_failures_total", check="ledger_unreachable")
    degraded = count("esim_reconcile_runs_total", outcome="degraded")
    ok = count("esim_reconcile_runs_total", outcome="ok")

    assert await sweep(reconcile, checks=[ledger_unreachable, other_check]).run_once() == 1

    assert ran == ["other"]
    assert await actions(db, txn) == [AUTO_REDRIVE_ACTION]
    assert count("esim_reconcile_check_failures_total", check="ledger_unreachable") == failures + 1
    assert count("esim_reconcile_runs_total", outcome="degraded") == degraded + 1
    assert count("esim_reconcile_runs_total", outcome="ok") == ok
    assert "reconciliation check failed" in caplog.text

    await sweep(reconcile, checks=[other_check]).run_once()
    assert count("esim_reconcile_runs_total", outcome="ok") == ok + 1
    last = count("esim_reconcile_last_success_timestamp_seconds")
    assert abs(last - time.time()) < 60


async def test_a_failed_run_is_counted_and_the_loop_keeps_sweeping(db, reconcile, caplog):
    txn = await make_order(db, S.PAID)
    await unchanged_for(db, txn, ELEVEN_MINUTES)
    calls = 0

    def pool_away_at_first() -> asyncpg.Pool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database away")
        return reconcile.pool

    loop = ReconcileSweep(
        pool=pool_away_at_first,
        publisher=reconcile.publisher,
        rules=stuck_rules(reconcile.settings),
        interval_seconds=0.05,
    )
    failed = count("esim_reconcile_runs_total", outcome="failed")
    task = asyncio.create_task(loop.run_forever())
    try:
        await eventually(lambda: actions(db, txn), within=10, what="the run after the failed one re-drove it")
    finally:
        task.cancel()
    assert count("esim_reconcile_runs_total", outcome="failed") == failed + 1
    assert "reconciliation run failed" in caplog.text
