"""End to end, the whole system as processes with RECONCILE_INTERVAL=1: an order whose driving message was
lost is found by reconcile's scheduled sweep and re-driven through the normal path to `delivered`, with
one Zendit purchase and one email. Time passing is played by moving the order's `updated_at` back past
its state's deadline (stuck_rules), which is all the sweep reads."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta

import aio_pika
import asyncpg
import httpx
import pytest

from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.topology import esim_topology
from esim_sandbox.stack import Stack
from tests.e2e.test_paid_order_becomes_emailed_esim import (
    checkout,
    emails_to,
    pay,
    purchases_of,
    wait_for_final,
)
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db, pytest.mark.timeout(180)]

S = OrderStatus
ORDER_TIMEOUT_SECONDS = 60


@pytest.fixture(scope="module")
def stack(e2e_database_url: str, amqp_url: str, tmp_path_factory) -> Iterator[Stack]:
    running = Stack(
        database_url=e2e_database_url,
        amqp_url=amqp_url,
        workdir=tmp_path_factory.mktemp("stack"),
        topology_prefix=f"e2e-{uuid.uuid4().hex[:8]}.",
        extra_env={"RECONCILE_INTERVAL": "1"},
    )
    try:
        running.start()
        yield running
    finally:
        running.stop(delete_topology=True)


async def auto_redrives(conn: asyncpg.Connection, txn: str) -> list[dict]:
    rows = await conn.fetch(
        "SELECT detail::text FROM operator_actions WHERE transaction_id = $1 AND action = 'auto_redrive'", txn
    )
    return [json.loads(r["detail"]) for r in rows]


def hold_stripe_webhooks(stack: Stack) -> None:
    response = httpx.post(f"{stack.url('stripe')}/_sandbox/webhook_delivery", json={"hold": True}, timeout=10)
    response.raise_for_status()


def release_stripe_webhooks(stack: Stack) -> None:
    response = httpx.delete(f"{stack.url('stripe')}/_sandbox/webhook_delivery", timeout=10)
    response.raise_for_status()


async def test_a_paid_order_whose_order_paid_was_lost_is_redriven_by_the_sweep_to_one_emailed_esim(stack):
    recipient = f"lost-paid-{uuid.uuid4().hex[:6]}@example.com"
    session = checkout(stack, recipient)
    txn = session["transactionId"]
    hold_stripe_webhooks(stack)  # the customer pays, and no webhook reaches us: we mark it paid below
    try:
        paid = pay(stack, session["sessionId"])
    finally:
        release_stripe_webhooks(stack)
    conn = await asyncpg.connect(stack.database_url)
    try:
        # Paid in our database eleven minutes ago, and no order.paid anywhere: not in a queue, not in
        # the outbox. Nothing but the sweep can move it.
        async with conn.transaction():
            await conn.execute(
                "UPDATE esim_purchases SET stripe_payment_intent_id = $2 WHERE transaction_id = $1",
                txn,
                paid["payment_intent"]["id"],
            )
            await transition(conn, txn, S.PAID, reason="stripe_payment_succeeded")
            await conn.execute(
                "UPDATE esim_purchases SET updated_at = now() - $2::interval WHERE transaction_id = $1",
                txn,
                timedelta(minutes=11),
            )

        order = await wait_for_final(stack, txn, timeout=ORDER_TIMEOUT_SECONDS)

        assert order["status"] == "delivered", order["failure_reason"]
        [redrive] = await auto_redrives(conn, txn)
        assert (redrive["from"], redrive["routing_key"], redrive["event_source"]) == (
            "paid",
            "order.paid",
            "rebuilt",
        )
    finally:
        await conn.close()
    assert list(purchases_of(stack, txn)) == [order["zendit_transaction_id"]]
    assert len(emails_to(stack, recipient)) == 1


async def test_a_provisioned_order_whose_order_provisioned_was_lost_is_emailed_once_after_the_sweep(stack):
    stack.processes["notify"].stop()  # the eSIM email waits: order.provisioned stays in notify's queue
    recipient = f"lost-provisioned-{uuid.uuid4().hex[:6]}@example.com"
    session = checkout(stack, recipient)
    txn = session["transactionId"]
    pay(stack, session["sessionId"])
    conn = await asyncpg.connect(stack.database_url)
    try:

        async def provisioned() -> bool:
            status = await conn.fetchval("SELECT status FROM esim_purchases WHERE transaction_id = $1", txn)
            return status == S.PROVISIONED.value

        await eventually(provisioned, within=ORDER_TIMEOUT_SECONDS, what=f"order {txn} provisioned")
        # The message is lost (purged), and the order has sat provisioned past EMAIL_GIVE_UP_SECONDS
        # and the margin: past every timer notify has.
        queue = esim_topology(prefix=stack.topology_prefix).queue("notify.order-provisioned").name
        broker = await aio_pika.connect(stack.amqp_url)
        async with broker:
            channel = await broker.channel()
            await (await channel.get_queue(queue)).purge()
        await conn.execute(
            "UPDATE esim_purchases SET updated_at = now() - $2::interval WHERE transaction_id = $1",
            txn,
            timedelta(hours=2),
        )
        stack.restart("notify")

        order = await wait_for_final(stack, txn, timeout=ORDER_TIMEOUT_SECONDS)

        assert order["status"] == "delivered", order["failure_reason"]
        [redrive] = await auto_redrives(conn, txn)
        assert (redrive["from"], redrive["routing_key"], redrive["event_source"]) == (
            "provisioned",
            "order.provisioned",
            "republished",
        )
    finally:
        if not stack.processes["notify"].running:
            stack.restart("notify")
        await conn.close()
    assert list(purchases_of(stack, txn)) == [order["zendit_transaction_id"]]
    assert len(emails_to(stack, recipient)) == 1
