"""The scheduled sweep on the real Postgres and RabbitMQ: which orders it re-drives (stuck past their state's
deadline, not re-driven within it, never terminal ones: the SQL agrees with stuck_rules.is_stuck), one
replica at a time, the checks on one replica per interval without the re-drive lock, checks that fail
without stopping the run, and the pruning of old run rows.

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
from reconcile.ledger_checks import scheduled_check
from reconcile.main import create_app
from reconcile.order_actions import redrive_from_state
from reconcile.order_ops import AUTO_REDRIVE_ACTION, REDRIVE_ACTIONS, MovedOn
from reconcile.stuck_rules import StuckRules, stuck_rules
from reconcile.sweep import ReconcileSweep
from reconcile.sweep_queries import (
    LEDGER_JOB,
    RUN_HISTORY_RETENTION,
    SWEEP_LOCK_CLASS,
    StuckOrder,
    claim_job,
    stuck_orders,
)
from tests.fixtures.polling import eventually
from tests.integration.test_reconcile_order_admin import make_order, provisioned_facts, published

pytestmark = [pytest.mark.broker, pytest.mark.db]

S = OrderStatus
ELEVEN_MINUTES = timedelta(minutes=11)  # past the 10-minute deadline of paid, funding and funded
HOUR = timedelta(hours=1)
HELD = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1"


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


def sweep(
    ctx: ServiceContext, *, checks=(), rules: StuckRules | None = None, checks_every: timedelta = timedelta(0)
) -> ReconcileSweep:
    """A replica's sweep; by default its checks are due on every run (none was claimed `0` ago)."""
    return ReconcileSweep(
        pool=lambda: ctx.pool,
        publisher=ctx.publisher,
        rules=rules or stuck_rules(ctx.settings),
        interval_seconds=ctx.settings.reconcile_interval,
        checks=checks,
        checks_every=checks_every,
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

    stuck = StuckOrder(transaction_id=txn, status=S.PAID, updated_at=found, deadline=timedelta(minutes=10))

    with pytest.raises(MovedOn):
        await redrive_from_state(
            reconcile.pool, reconcile.publisher, txn, action=AUTO_REDRIVE_ACTION, found_stuck=stuck
        )

    assert await actions(db, txn) == []
    assert (await published(reconcile))["funding.order-paid"] == []


async def test_an_order_an_operator_redrove_after_the_sweep_found_it_is_not_redriven_again(db, reconcile):
    txn = await make_order(db, S.PAID)
    await unchanged_for(db, txn, ELEVEN_MINUTES)
    [found] = await stuck_orders(db, stuck_rules(reconcile.settings))
    # Between the sweep's search and its row lock, an operator re-drives the order (which leaves its
    # status and updated_at as they were).
    await redrive_from_state(reconcile.pool, reconcile.publisher, txn, note="looked stuck")

    with pytest.raises(MovedOn, match="re-driven since"):
        await redrive_from_state(
            reconcile.pool, reconcile.publisher, txn, action=AUTO_REDRIVE_ACTION, found_stuck=found
        )

    assert await actions(db, txn) == ["redrive"]
    assert len((await published(reconcile))["funding.order-paid"]) == 1


async def test_the_sweeps_sql_selects_exactly_the_orders_stuck_rules_calls_stuck(db, reconcile):
    rules = stuck_rules(reconcile.settings)
    minute = timedelta(minutes=1)
    cases: dict[str, bool] = {}
    for status in (S.PAID, S.PURCHASING, S.PROVISIONED, S.NEEDS_ATTENTION, S.DELIVERED):
        deadline = rules.deadline(status) or timedelta(days=30)
        path = (S.PAID, S.NEEDS_ATTENTION) if status == S.NEEDS_ATTENTION else None
        # Last action on the order: none; re-drives (by anyone) within and past the deadline; and an
        # action that is no re-drive, which must not hold the sweep off.
        last_actions = [
            None,
            ("redrive", deadline - minute),
            ("auto_redrive", deadline + minute),
            ("auto_redrive_refused", minute),
            ("retry_refund", minute),
        ]
        for unchanged in (deadline - minute, deadline + minute):
            for last in last_actions:
                txn = await make_order(db, status, path=path)
                await unchanged_for(db, txn, unchanged)
                since = None
                if last is not None:
                    action, ago = last
                    await db.execute(
                        "INSERT INTO operator_actions (transaction_id, action, created_at)"
                        " VALUES ($1, $2, now() - $3::interval)",
                        txn,
                        action,
                        ago,
                    )
                    since = ago if action in REDRIVE_ACTIONS else None
                cases[txn] = rules.is_stuck(status, unchanged, since)

    selected = {order.transaction_id for order in await stuck_orders(db, rules)}

    assert selected == {txn for txn, stuck in cases.items() if stuck}
    assert 0 < len(selected) < len(cases)


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


async def test_a_replica_that_finds_the_redrive_lock_taken_skips_its_redrives(db, reconcile):
    stuck = [await make_order(db, S.PAID) for _ in range(3)]
    for txn in stuck:
        await unchanged_for(db, txn, ELEVEN_MINUTES)
    await claim_job(db, LEDGER_JOB, HOUR)  # the checks are not due either
    skipped = count("esim_reconcile_runs_total", outcome="skipped")

    async with db.acquire() as other_replica, other_replica.transaction():
        await other_replica.execute("SELECT pg_advisory_xact_lock($1, 0)", SWEEP_LOCK_CLASS)
        assert await sweep(reconcile, checks_every=HOUR).run_once() == 0

    assert count("esim_reconcile_runs_total", outcome="skipped") == skipped + 1
    for txn in stuck:
        assert await actions(db, txn) == []
    assert await sweep(reconcile, checks_every=HOUR).run_once() == 3  # the lock went with its transaction
    assert await db.fetchval(HELD, SWEEP_LOCK_CLASS) == 0  # and none is left on a pooled connection


async def test_two_replicas_sweeping_at_once_redrive_each_order_once(db, reconcile):
    stuck = [await make_order(db, S.PAID) for _ in range(5)]
    for txn in stuck:
        await unchanged_for(db, txn, ELEVEN_MINUTES)

    redriven = await asyncio.gather(sweep(reconcile).run_once(), sweep(reconcile).run_once())

    assert sum(redriven) == 5
    for txn in stuck:
        assert await actions(db, txn) == [AUTO_REDRIVE_ACTION]
    assert queued_orders(await published(reconcile))["funding.order-paid"] == sorted(stuck)


async def test_the_checks_run_on_one_replica_per_interval_and_hold_no_lock_meanwhile(db, reconcile):
    in_check, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def pages_stripe_and_zendit() -> None:
        ran.append("first")
        in_check.set()
        await release.wait()

    async def same_checks_elsewhere() -> None:
        ran.append("second")

    first = asyncio.create_task(
        sweep(reconcile, checks=[pages_stripe_and_zendit], checks_every=HOUR).run_once()
    )
    await asyncio.wait_for(in_check.wait(), 10)
    try:
        # While the first replica's checks run, an order gets stuck and another replica re-drives it.
        assert await db.fetchval(HELD, SWEEP_LOCK_CLASS) == 0
        txn = await make_order(db, S.PAID)
        await unchanged_for(db, txn, ELEVEN_MINUTES)
        assert await sweep(reconcile, checks=[same_checks_elsewhere], checks_every=HOUR).run_once() == 1
    finally:
        release.set()
    assert await first == 0
    assert ran == ["first"]  # the checks were claimed for the hour: the second replica left them

    await db.execute("UPDATE reconcile_schedule SET claimed_at = claimed_at - $1::interval", HOUR)
    await sweep(reconcile, checks=[same_checks_elsewhere], checks_every=HOUR).run_once()
    assert ran == ["first", "second"]  # an hour on, the first replica to ask runs them


async def test_replicas_claiming_the_checks_at_once_get_them_once(db):
    claims = await asyncio.gather(*(claim_job(db, LEDGER_JOB, HOUR) for _ in range(4)))
    assert sorted(claims) == [False, False, False, True]


async def test_the_checks_prune_run_rows_older_than_the_retention(db, reconcile):
    insert = """
        INSERT INTO reconcile_runs (started_at, kinds_checked, sources_failed, found, opened, resolved)
        VALUES (now() - $1::interval, '{}', '{}', 0, 0, 0) RETURNING id
    """
    old = await db.fetchval(insert, RUN_HISTORY_RETENTION + timedelta(hours=1))
    recent = await db.fetchval(insert, RUN_HISTORY_RETENTION - timedelta(hours=1))

    await sweep(reconcile).run_once()

    assert [r["id"] for r in await db.fetch("SELECT id FROM reconcile_runs ORDER BY id")] == [recent]
    assert old != recent


async def test_a_failing_check_does_not_stop_the_redrives_or_the_other_checks(db, reconcile, caplog):
    txn = await make_order(db, S.PAID)
    await unchanged_for(db, txn, ELEVEN_MINUTES)
    ran = []

    async def ledger_unreachable() -> None:
        raise ConnectionError("ledger down")

    async def other_check() -> None:
        ran.append("other")

    degraded = count("esim_reconcile_runs_total", outcome="degraded")
    ok = count("esim_reconcile_runs_total", outcome="ok")
    one_sweep = sweep(reconcile, checks=[ledger_unreachable, other_check])
    # Exported at 0 before any failure: increase() in ReconcileChecksFailing sees the first one.
    failures = REGISTRY.get_sample_value(
        "esim_reconcile_check_failures_total", {"check": "ledger_unreachable"}
    )
    assert failures is not None

    assert await one_sweep.run_once() == 1

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


async def test_the_ledger_checks_failures_are_counted_under_their_name(db, reconcile, service_settings):
    def database_away() -> asyncpg.Pool:
        raise ConnectionError("database away")

    ledger = scheduled_check(database_away, service_settings)
    failures = count("esim_reconcile_check_failures_total", check="ledger")

    await sweep(reconcile, checks=[ledger]).run_once()

    assert count("esim_reconcile_check_failures_total", check="ledger") == failures + 1


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
        checks_every=HOUR,
    )
    failed = count("esim_reconcile_runs_total", outcome="failed")
    task = asyncio.create_task(loop.run_forever())
    try:
        await eventually(lambda: actions(db, txn), within=10, what="the run after the failed one re-drove it")
    finally:
        task.cancel()
    assert count("esim_reconcile_runs_total", outcome="failed") == failed + 1
    assert "reconciliation run failed" in caplog.text
    # What ReconcileNotRunning compares the last success with (deploy/prometheus/alerts.yml).
    assert count("esim_reconcile_interval_seconds") == 0.05
    assert abs(count("esim_reconcile_sweep_started_timestamp_seconds") - time.time()) < 60
