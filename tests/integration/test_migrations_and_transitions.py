"""Migrations on a real Postgres, and guarded order transitions racing on real rows."""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import pytest
from prometheus_client import REGISTRY

from esim_common.migrate import MigrationError, apply_migrations, load_migrations, migrate
from esim_common.order_states import OrderStatus
from esim_common.orders import IllegalTransition, TransitionResult, transition

pytestmark = pytest.mark.db

EXPECTED_TABLES = {
    "esim_purchases",
    "order_transitions",
    "stripe_events",
    "wallet_topups",
    "issuing_cards",
    "sent_emails",
    "outbox",
    "schema_migrations",
}


async def insert_order(pool: asyncpg.Pool, status: OrderStatus = OrderStatus.PENDING_PAYMENT) -> str:
    txn = f"txn_{uuid.uuid4().hex[:16]}"
    await pool.execute(
        """INSERT INTO esim_purchases (transaction_id, offer_id, price, currency, recipient_email,
                                       recipient_name, status)
           VALUES ($1, 'ESIM-US-7D-1GB', 1299, 'USD', 'a@example.com', 'Ada', $2)""",
        txn,
        status.value,
    )
    return txn


async def test_migrations_create_the_schema_on_an_empty_database_and_are_idempotent(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert EXPECTED_TABLES <= tables
        applied_before = await conn.fetch(
            "SELECT version, applied_at FROM schema_migrations ORDER BY version"
        )
        assert [r["version"] for r in applied_before] == [m.version for m in load_migrations()]
    finally:
        await conn.close()

    assert await migrate(database_url) == []  # second run: nothing to do

    conn = await asyncpg.connect(database_url)
    try:
        applied_after = await conn.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert applied_after == applied_before


async def test_a_migration_edited_after_it_was_applied_is_refused(database_url):
    edited = [m.__class__(version=m.version, sql=m.sql + "\n-- edited") for m in load_migrations()]
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await apply_migrations(conn, edited)
    finally:
        await conn.close()


async def test_the_card_table_holds_four_digits_at_most_and_no_column_holds_float_money(db):
    await db.execute("INSERT INTO wallet_topups (id, amount, currency) VALUES ('tu_1', 5000, 'USD')")
    with pytest.raises((asyncpg.CheckViolationError, asyncpg.StringDataRightTruncationError)):
        await db.execute(
            """INSERT INTO issuing_cards (card_id, card_last4, card_exp, amount, currency, topup_id)
               VALUES ('ic_1', '4242424242424242', '12/2030', 5000, 'USD', 'tu_1')"""
        )
    assert await db.fetchval("SELECT count(*) FROM issuing_cards") == 0
    columns = await db.fetch(
        """SELECT table_name, column_name, data_type FROM information_schema.columns
           WHERE table_schema = 'public' AND data_type IN ('real', 'double precision', 'numeric')"""
    )
    assert columns == []


async def test_a_legal_transition_moves_the_order_stamps_the_step_and_records_the_timeline(db):
    txn = await insert_order(db)
    async with db.acquire() as conn:
        result = await transition(conn, txn, OrderStatus.PAID, reason="checkout.session.completed")
    assert result.changed and result.previous == OrderStatus.PENDING_PAYMENT
    row = await db.fetchrow("SELECT status, paid_at FROM esim_purchases WHERE transaction_id = $1", txn)
    assert row["status"] == "paid" and row["paid_at"] is not None
    timeline = await db.fetch(
        "SELECT from_status, to_status FROM order_transitions WHERE transaction_id=$1", txn
    )
    assert [(r["from_status"], r["to_status"]) for r in timeline] == [("pending_payment", "paid")]


async def test_an_illegal_transition_is_refused_logged_counted_and_changes_nothing(db, caplog):
    txn = await insert_order(db, OrderStatus.DELIVERED)
    labels = {"from_state": "delivered", "to_state": "refund_pending"}
    counted_before = REGISTRY.get_sample_value("esim_illegal_transitions_total", labels) or 0.0
    async with db.acquire() as conn:
        with (
            caplog.at_level(logging.WARNING, logger="esim.orders"),
            pytest.raises(IllegalTransition, match="is delivered; cannot move it to refund_pending"),
        ):
            await transition(conn, txn, OrderStatus.REFUND_PENDING)
    assert REGISTRY.get_sample_value("esim_illegal_transitions_total", labels) == counted_before + 1
    assert [r.getMessage() for r in caplog.records] == ["illegal order transition refused"]
    assert (
        await db.fetchval("SELECT status FROM esim_purchases WHERE transaction_id = $1", txn) == "delivered"
    )
    assert await db.fetchval("SELECT count(*) FROM order_transitions WHERE transaction_id = $1", txn) == 0


async def test_a_transition_of_an_unknown_order_is_refused(db):
    async with db.acquire() as conn:
        with pytest.raises(IllegalTransition, match="does not exist"):
            await transition(conn, "txn_missing", OrderStatus.PAID)


async def test_repeating_a_transition_is_a_no_op(db):
    txn = await insert_order(db)
    async with db.acquire() as conn:
        await transition(conn, txn, OrderStatus.PAID)
        again = await transition(conn, txn, OrderStatus.PAID)
    assert not again.changed
    assert await db.fetchval("SELECT count(*) FROM order_transitions WHERE transaction_id = $1", txn) == 1


async def test_two_workers_racing_on_one_order_move_it_once(db):
    txn = await insert_order(db)

    async def pay() -> bool:
        async with db.acquire() as conn:
            return (await transition(conn, txn, OrderStatus.PAID)).changed

    results = await asyncio.gather(*(pay() for _ in range(5)))
    assert sorted(results) == [False, False, False, False, True]
    assert await db.fetchval("SELECT count(*) FROM order_transitions WHERE transaction_id = $1", txn) == 1


async def test_a_move_made_legal_by_a_commit_it_waited_for_is_made_and_recorded_from_the_new_state(db):
    """The statement's snapshot still shows the old status; the lock returns the committed one, and the
    guard must judge that one (not refuse a legal move, nor report the old state)."""
    txn = await insert_order(db, OrderStatus.FUNDING)
    async with db.acquire() as other:
        moving = other.transaction()
        await moving.start()
        await other.execute("UPDATE esim_purchases SET status = 'funded' WHERE transaction_id = $1", txn)
        async with db.acquire() as conn:
            waiting = asyncio.create_task(transition(conn, txn, OrderStatus.PURCHASING))
            await asyncio.sleep(0.3)  # the transition's statement has started and waits for the lock
            assert not waiting.done()
            await moving.commit()
            result = await waiting
    assert result == TransitionResult(changed=True, previous=OrderStatus.FUNDED)
    assert (
        await db.fetchval("SELECT status FROM esim_purchases WHERE transaction_id = $1", txn) == "purchasing"
    )
    row = await db.fetchrow(
        "SELECT from_status, to_status FROM order_transitions WHERE transaction_id = $1", txn
    )
    assert (row["from_status"], row["to_status"]) == ("funded", "purchasing")


async def test_only_a_manual_capture_order_records_a_capture_and_captured_means_a_capture_time(db):
    automatic, manual = await insert_order(db), await insert_order(db)
    await db.execute("UPDATE esim_purchases SET capture_method = 'manual' WHERE transaction_id = $1", manual)
    set_capture = """UPDATE esim_purchases SET capture_status = $2, captured_at = CASE WHEN $3 THEN now() END
                      WHERE transaction_id = $1"""
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(set_capture, automatic, "failed", False)
    # A NULL status must not carry a capture time either (a CHECK that is NULL would pass).
    for status, with_time in (("captured", False), ("failed", True), (None, True)):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(set_capture, manual, status, with_time)
    for status, with_time in ((None, False), ("failed", False), ("captured", True)):  # what funding writes
        await db.execute(set_capture, manual, status, with_time)
    assert await db.fetchval(
        "SELECT capture_status FROM esim_purchases WHERE transaction_id = $1", manual
    ) == ("captured")
