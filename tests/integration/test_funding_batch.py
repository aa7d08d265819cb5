"""Funding decisions in batches, on the real broker and database against the emulators.

A decision that funds its order funds every other waiting order the wallet pays for, in payment order,
and publishes their order.funded after the commit. Each of those orders was moved to funding by its
own order.paid delivery (here: `in_flight`), which then finds it funded and, without the wallet lock or
a Zendit call, publishes its order.funded only if the batch's publish was lost: exactly one per order.
An order that drives a top-up not settled yet is left out (its own delivery settles it first).
The SQL sum of reservations is compared with the domain rule on a mixed set of rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from esim_common import compensation
from esim_common.events import Event, OrderFunded, OrderPaid
from esim_common.money import Money
from esim_common.order_repository import create_order, get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import IllegalTransition, transition
from esim_common.publisher import PublishFailed
from funding import domain, handlers
from funding import repository as repo
from funding.domain import OrderCost
from tests.fixtures.funding import (
    COST,
    Funding,
    approved_charges,
    cards_for,
    leave_stalled_topup,
    leave_stalled_topup_with_card,
    rows,
    set_wallet,
)
from tests.fixtures.polling import eventually

pytestmark = [pytest.mark.broker, pytest.mark.db]

S = OrderStatus


async def in_flight(funding: Funding, *events: OrderPaid) -> None:
    """As each order's own order.paid delivery leaves it before it decides: in funding."""
    async with funding.pool.acquire() as conn:
        for event in events:
            await transition(conn, event.transaction_id, S.FUNDING)


def count_balance_reads(funding: Funding, monkeypatch) -> list[object]:
    zendit = funding.app.state.fund_order._zendit
    reads: list[object] = []
    original = zendit.get_balance

    async def counted():
        reads.append(object())
        return await original()

    monkeypatch.setattr(zendit, "get_balance", counted)
    return reads


@asynccontextmanager
async def wallet_lock_held(funding: Funding) -> AsyncIterator[None]:
    """The wallet lock held by someone else (a decision that does not end) while the block runs."""
    conn: asyncpg.Connection = await asyncpg.connect(funding.settings.database_url)
    try:
        async with conn.transaction():
            await conn.execute(repo.LOCK_WALLET)
            yield
    finally:
        await conn.close()


async def statuses(funding: Funding, *events: OrderPaid) -> list[OrderStatus]:
    return [(await get_order(funding.pool, e.transaction_id)).status for e in events]


def announced(messages: list[dict[str, Any]]) -> list[str]:
    return sorted(m["transaction_id"] for m in messages)


def txns(*events: OrderPaid) -> list[str]:
    return sorted(e.transaction_id for e in events)


# ------------------------------------------------------------------------------------ batches


async def test_one_decision_funds_every_waiting_order_the_wallet_covers_and_each_is_announced_once(
    funding, paid_order, zendit_emulator, monkeypatch
):
    set_wallet(zendit_emulator, 4 * COST.amount + 100)  # pays for four of the five, in payment order
    a, b, c, d, e = [await paid_order() for _ in range(5)]
    await in_flight(funding, b, c, d, e)
    reads = count_balance_reads(funding, monkeypatch)

    await funding.deliver(a)
    await funding.wait_handled(1)

    assert await statuses(funding, a, b, c, d, e) == [S.FUNDED] * 4 + [S.FUNDING]
    assert len(reads) == 1
    assert announced(await funding.messages("provisioning.order-funded")) == txns(a, b, c, d)

    # Their own deliveries find them funded: with the wallet lock held elsewhere and no Zendit call,
    # each finishes, and none publishes a second order.funded.
    async with wallet_lock_held(funding):
        for event in (b, c, d):
            await funding.deliver(event)
        await funding.wait_handled(4, within=10)
    assert funding.handled("ok") == 4
    assert len(reads) == 1
    assert await funding.messages("provisioning.order-funded") == []


async def test_an_order_whose_batch_publish_was_lost_is_announced_once_by_its_own_delivery(
    funding, paid_order, zendit_emulator
):
    set_wallet(zendit_emulator, 10 * COST.amount)
    a, b, c = [await paid_order() for _ in range(3)]
    await in_flight(funding, b, c)
    fund_order = funding.app.state.fund_order
    publisher = fund_order._publisher

    class LosesB:
        """The broker refuses b's order.funded once (as if the deciding worker died before it)."""

        lost = False

        async def publish(self, event: Event) -> None:
            if isinstance(event, OrderFunded) and event.transaction_id == b.transaction_id and not self.lost:
                self.lost = True
                raise PublishFailed("broker gone")
            await publisher.publish(event)

    fund_order._publisher = LosesB()

    await funding.deliver(a)  # funds a, b, c; publishes a, loses b (and so never gets to c); retried
    await eventually(lambda: funding.handled("ok") >= 1, within=15, what="a's retry")
    assert await statuses(funding, a, b, c) == [S.FUNDED] * 3
    for event in (b, c):
        await funding.deliver(event)
    await funding.wait_handled(4, within=15)  # a (retried once, then ok), b, c

    assert funding.handled("retried") == 1 and funding.handled("ok") == 3
    assert announced(await funding.messages("provisioning.order-funded")) == txns(a, b, c)


async def test_an_order_waits_for_a_publish_of_its_order_funded_under_way_and_publishes_nothing(
    funding, paid_order, zendit_emulator
):
    set_wallet(zendit_emulator, 10 * COST.amount)
    a, b = [await paid_order() for _ in range(2)]
    await in_flight(funding, b)
    fund_order = funding.app.state.fund_order
    publisher = fund_order._publisher
    publishing_b = asyncio.Event()
    go_on = asyncio.Event()

    class Slow:
        async def publish(self, event: Event) -> None:
            if isinstance(event, OrderFunded) and event.transaction_id == b.transaction_id:
                publishing_b.set()
                await go_on.wait()
            await publisher.publish(event)

    fund_order._publisher = Slow()
    await funding.deliver(a)
    await asyncio.wait_for(publishing_b.wait(), timeout=10)  # a's batch holds b's outbox row now

    b_announces = asyncio.create_task(fund_order.announce(b.transaction_id))  # b's own delivery
    await asyncio.sleep(0.5)
    assert not b_announces.done()  # it waits for the row
    go_on.set()
    await asyncio.wait_for(b_announces, timeout=10)
    await funding.wait_handled(1)

    assert announced(await funding.messages("provisioning.order-funded")) == txns(a, b)


async def test_a_batch_publish_skips_an_order_funded_its_own_delivery_is_publishing(
    funding, paid_order, zendit_emulator
):
    set_wallet(zendit_emulator, 10 * COST.amount)
    a, b = [await paid_order() for _ in range(2)]
    await in_flight(funding, a, b)
    fund_order = funding.app.state.fund_order
    async with funding.pool.acquire() as conn, conn.transaction():  # a decision, without its publish
        await transition(conn, a.transaction_id, S.FUNDED)
        await transition(conn, b.transaction_id, S.FUNDED)
        for event in (a, b):
            await repo.add_announcement(
                conn,
                OrderFunded(transaction_id=event.transaction_id, offer_id=event.offer_id, zendit_cost=COST),
            )
    holder: asyncpg.Connection = await asyncpg.connect(funding.settings.database_url)
    try:
        async with holder.transaction():  # b's own delivery, publishing it right now
            await holder.fetch(repo.SELECT_UNPUBLISHED_FUNDED, b.transaction_id)
            await asyncio.wait_for(fund_order._announce_batch((a.transaction_id, b.transaction_id)), 5)
            assert announced(await funding.messages("provisioning.order-funded")) == txns(a)
    finally:
        await holder.close()

    await fund_order.announce(b.transaction_id)  # what b's delivery does when it gets the row
    await fund_order.announce(a.transaction_id)  # a redelivery of a: published already
    assert announced(await funding.messages("provisioning.order-funded")) == txns(b)


# ------------------------------------------------------------------------------------ top-ups


async def test_a_batch_leaves_out_the_orders_busy_with_a_top_up_and_its_driver_then_settles_it_and_funds(
    funding, paid_order, zendit_emulator, stripe_emulator
):
    set_wallet(zendit_emulator, 4 * COST.amount + 100)
    a, busy, joined, d, e = [await paid_order() for _ in range(5)]
    topup_id = await leave_stalled_topup(funding.pool, txn=busy.transaction_id, amount=50_00)
    # `joined` waits for busy's top-up (open): left to its own delivery too, which would take the top-up
    # over should it stall.
    await funding.pool.execute(
        "UPDATE wallet_topups SET order_ids = order_ids || $2::text WHERE id = $1",
        topup_id,
        joined.transaction_id,
    )
    await in_flight(funding, joined, d, e)

    await funding.deliver(a)
    await funding.wait_handled(1)

    # busy and joined keep their places: e, who would fit in the money their costs leave, is not given it.
    left_to_themselves = [S.FUNDED, S.FUNDING, S.FUNDING, S.FUNDED, S.FUNDING]
    assert await statuses(funding, a, busy, joined, d, e) == left_to_themselves
    assert announced(await funding.messages("provisioning.order-funded")) == txns(a, d)
    [topup] = await rows(funding.pool, "SELECT status FROM wallet_topups WHERE id = $1", topup_id)
    assert topup["status"] == "pending"

    await funding.deliver(busy)  # busy's own delivery: settles its top-up first, then funds itself
    await funding.wait_status(busy.transaction_id, S.FUNDED)
    await funding.wait_handled(2)

    [topup] = await rows(funding.pool, "SELECT status FROM wallet_topups WHERE id = $1", topup_id)
    [card] = cards_for(stripe_emulator, topup_id)
    assert topup["status"] == "succeeded" and card["status"] == "canceled"
    assert len(approved_charges(stripe_emulator, card["id"])) == 1
    # The top-up settled, joined is no longer busy: busy's decision funds it (and e) with itself.
    assert await statuses(funding, joined, e) == [S.FUNDED, S.FUNDED]
    assert announced(await funding.messages("provisioning.order-funded")) == txns(busy, joined, e)


async def test_a_stalled_top_up_whose_driver_is_gone_is_taken_over_by_an_order_that_joined_it(
    funding, paid_order, platform_card, zendit_emulator, stripe_emulator
):
    # The wallet covers a, driver and joined: no batch may fund joined while the top-up it joined is
    # open, or nobody would ever settle that top-up (driver's delivery is in the DLQ) nor its card.
    set_wallet(zendit_emulator, 3 * COST.amount + 100)
    a, driver, joined = [await paid_order() for _ in range(3)]
    card = await platform_card(f"tu_{driver.transaction_id}", 50_00)
    topup_id = await leave_stalled_topup_with_card(
        funding.pool, card, txn=driver.transaction_id, amount=50_00
    )
    await funding.pool.execute(
        "UPDATE wallet_topups SET order_ids = order_ids || $2::text WHERE id = $1",
        topup_id,
        joined.transaction_id,
    )
    await in_flight(funding, joined)

    await funding.deliver(a)
    await funding.wait_handled(1)
    assert await statuses(funding, a, driver, joined) == [S.FUNDED, S.FUNDING, S.FUNDING]

    await funding.deliver(joined)  # its own delivery: takes the stalled top-up over, settles it, funds
    await funding.wait_status(joined.transaction_id, S.FUNDED)

    [topup] = await rows(funding.pool, "SELECT status, driven_by FROM wallet_topups WHERE id = $1", topup_id)
    assert topup == {"status": "succeeded", "driven_by": joined.transaction_id}
    [found] = cards_for(stripe_emulator, topup_id)
    assert found["id"] == card.id and found["status"] == "canceled"
    assert len(approved_charges(stripe_emulator, card.id)) == 1
    [(active,)] = await funding.pool.fetch("SELECT active FROM issuing_cards WHERE card_id = $1", card.id)
    assert active is False


async def test_an_order_that_only_joined_a_top_up_leaves_it_to_the_order_driving_it(
    funding, paid_order, zendit_emulator, stripe_emulator
):
    set_wallet(zendit_emulator, 0)
    driver, joined = [await paid_order() for _ in range(2)]
    await in_flight(funding, driver)
    topup_id = f"tu_{driver.transaction_id}"  # under way: its driver's delivery is finishing it
    await funding.pool.execute(
        "INSERT INTO wallet_topups (id, amount, currency, gateway_reference, order_ids)"
        " VALUES ($1, 5000, 'USD', $1, $2)",
        topup_id,
        [driver.transaction_id, joined.transaction_id],
    )

    await funding.deliver(joined)
    await eventually(lambda: funding.handled("deferred") >= 1, within=10, what="joined waits")

    assert cards_for(stripe_emulator, topup_id) == []
    [topup] = await rows(funding.pool, "SELECT status FROM wallet_topups WHERE id = $1", topup_id)
    assert topup["status"] == "pending"


# ------------------------------------------------------------------------------------ the failure path


@pytest.mark.parametrize("race", ["funded_before", "funded_during_the_refund"])
async def test_an_order_funded_by_a_batch_while_its_own_delivery_fails_is_announced_not_refunded(
    funding, paid_order, stripe_gateway, stripe_emulator, monkeypatch, race
):
    event = await paid_order()
    async with funding.pool.acquire() as conn, conn.transaction():  # another order's batch funded it
        await transition(conn, event.transaction_id, S.FUNDING)
        await transition(conn, event.transaction_id, S.FUNDED)
        await repo.add_announcement(
            conn, OrderFunded(transaction_id=event.transaction_id, offer_id=event.offer_id, zendit_cost=COST)
        )
    if race == "funded_during_the_refund":  # the refund read `funding`, then the batch moved it first

        async def refund_loses_the_race(**_: object) -> None:
            raise IllegalTransition(event.transaction_id, S.FUNDED, S.TOPUP_FAILED)

        monkeypatch.setattr(handlers, "fail_and_refund", refund_loses_the_race)
    fund_order = funding.app.state.fund_order

    await handlers.funding_failed(funding.ctx, fund_order, stripe_gateway, event, "topup_declined")

    assert (await get_order(funding.pool, event.transaction_id)).status == S.FUNDED
    assert stripe_emulator.state.find("refund", payment_intent=event.payment_intent_id) == []
    assert announced(await funding.messages("provisioning.order-funded")) == [event.transaction_id]
    assert await funding.messages("notify.order-failed") == []


@pytest.mark.parametrize("moved_on_to", [S.PURCHASING, S.PROVISIONED, S.DELIVERED])
async def test_an_order_a_batch_funded_and_provisioning_moved_on_is_neither_refunded_nor_retried(
    funding, paid_order, stripe_gateway, stripe_emulator, monkeypatch, caplog, moved_on_to
):
    event = await paid_order()
    txn = event.transaction_id
    async with funding.pool.acquire() as conn:
        await transition(conn, txn, S.FUNDING)
    # The refund reads the order in funding; before its move to topup_failed, a batch funds the order
    # and provisioning moves it on: the guarded move then finds it there.
    read_in_funding = await get_order(funding.pool, txn)
    async with funding.pool.acquire() as conn:
        for status in (S.FUNDED, S.PURCHASING, S.PROVISIONED, S.DELIVERED):
            await transition(conn, txn, status)
            if status == moved_on_to:
                break

    async def stale_read(pool: object, transaction_id: str, **_: object) -> object:
        return read_in_funding

    monkeypatch.setattr(compensation, "get_order", stale_read)
    fund_order = funding.app.state.fund_order
    caplog.set_level(logging.INFO, logger="esim.funding")

    await handlers.funding_failed(funding.ctx, fund_order, stripe_gateway, event, "retries_exhausted")

    assert (await get_order(funding.pool, txn)).status == moved_on_to
    assert stripe_emulator.state.find("refund", payment_intent=event.payment_intent_id) == []
    assert await funding.messages("provisioning.order-funded") == []  # announced only while funded
    assert await funding.messages("notify.order-failed") == []
    [said] = [r for r in caplog.records if r.getMessage().startswith("not refunded")]
    assert said.levelname == "INFO" and said.status == moved_on_to.value


# ------------------------------------------------------------------------------------ entering funding


async def test_a_delivery_that_read_awaiting_funds_does_not_move_back_an_order_already_being_bought(
    funding, paid_order, zendit_emulator, monkeypatch
):
    set_wallet(zendit_emulator, 10 * COST.amount)
    event = await paid_order()
    txn = event.transaction_id
    async with funding.pool.acquire() as conn:  # left in awaiting_funds (by prefunded mode, say)
        await transition(conn, txn, S.FUNDING)
        await transition(conn, txn, S.AWAITING_FUNDS)
    fund_order = funding.app.state.fund_order
    read = fund_order._order

    async def read_then_overtaken(transaction_id: str) -> object:
        """The delivery reads awaiting_funds; then a batch funds the order and provisioning starts
        buying it, before the delivery moves it to funding."""
        order = await read(transaction_id)
        monkeypatch.setattr(fund_order, "_order", read)
        async with funding.pool.acquire() as conn:
            await transition(conn, transaction_id, S.FUNDED)
            await transition(conn, transaction_id, S.PURCHASING)
        return order

    monkeypatch.setattr(fund_order, "_order", read_then_overtaken)

    await fund_order(event)

    assert (await get_order(funding.pool, txn)).status == S.PURCHASING
    moves = await rows(
        funding.pool, "SELECT from_status, to_status FROM order_transitions WHERE transaction_id = $1", txn
    )
    assert {"from_status": "purchasing", "to_status": "funding"} not in moves
    assert await funding.messages("provisioning.order-funded") == []


async def test_entering_funding_moves_only_from_the_status_read_and_records_the_move(db):
    async with db.acquire() as conn:
        await create_order(
            conn,
            transaction_id="t-enter",
            offer_id="OFFER",
            price=Money(3_900, "USD"),
            zendit_cost=COST,
            recipient_email="ada@example.com",
            recipient_name="Ada Lovelace",
        )
        await transition(conn, "t-enter", S.PAID)
        with pytest.raises(IllegalTransition):  # a stale read: the order is not awaiting_funds
            await transition(conn, "t-enter", S.FUNDING, reason="stale read", expected_from=S.AWAITING_FUNDS)
        moved = await transition(
            conn, "t-enter", S.FUNDING, reason="order.paid received", expected_from=S.PAID
        )
        assert moved.changed
        again = await transition(conn, "t-enter", S.FUNDING, reason="a second delivery", expected_from=S.PAID)
        assert not again.changed  # already there: a no-op, not a second move
        await transition(conn, "t-enter", S.FUNDED)
        await transition(conn, "t-enter", S.PURCHASING)
        with pytest.raises(IllegalTransition):  # purchasing → funding is legal, but not what was read
            await transition(conn, "t-enter", S.FUNDING, reason="stale read", expected_from=S.AWAITING_FUNDS)
        with pytest.raises(ValueError):
            await transition(conn, "t-enter", S.FUNDING, reason="never from there", expected_from=S.DELIVERED)
        order = await get_order(conn, "t-enter")
        moves = await conn.fetch(
            "SELECT from_status, to_status, reason FROM order_transitions WHERE transaction_id = $1"
            " ORDER BY id",
            "t-enter",
        )
    assert order.status == S.PURCHASING
    assert ("paid", "funding", "order.paid received") in [tuple(m) for m in moves]
    assert [tuple(m)[:2] for m in moves].count(("paid", "funding")) == 1
    assert ("purchasing", "funding") not in [tuple(m)[:2] for m in moves]


# ------------------------------------------------------------------------------------ the SQL


ZENDIT_STATUSES = [None, "ACCEPTED", "PENDING", "AUTHORIZED", "IN_PROGRESS", "DONE", "FAILED"]
STATUSES = [S.PAID, S.FUNDING, S.FUNDED, S.PURCHASING, S.PROVISIONED, S.PURCHASE_FAILED]


def mixed_rows() -> list[tuple[str, OrderCost]]:
    """Every status with every Zendit status, placed or not, in two currencies or without a cost."""
    found = []
    costs = [Money(2_415, "USD"), Money(1_300, "EUR"), None, Money(735, "USD")]
    n = 0
    for status in STATUSES:
        for zendit_status in ZENDIT_STATUSES:
            for placed in (False, True):
                n += 1
                cost = costs[n % len(costs)]
                found.append(
                    (f"mix-{n:03d}", OrderCost(status, zendit_status, cost, f"z-{n:03d}" if placed else None))
                )
    return found


async def test_the_sql_reservations_follow_the_domain_rule(db):
    orders = mixed_rows()
    async with db.acquire() as conn:
        for txn, order in orders:
            await create_order(
                conn,
                transaction_id=txn,
                offer_id="OFFER",
                price=Money(3_900, "USD"),
                zendit_cost=COST,
                recipient_email="ada@example.com",
                recipient_name="Ada Lovelace",
            )
            await conn.execute(
                "UPDATE esim_purchases SET status = $2, zendit_status = $3, zendit_transaction_id = $4,"
                " zendit_cost = $5, zendit_cost_currency = $6 WHERE transaction_id = $1",
                txn,
                order.status.value,
                order.zendit_status,
                order.zendit_transaction_id,
                order.cost.amount if order.cost else None,
                order.cost.currency if order.cost else None,
            )
        deciding = next(txn for txn, o in orders if domain.reserves_wallet(o) and o.cost is not None)
        found = await repo.reservations(conn, exclude=deciding)

    others = [o for txn, o in orders if txn != deciding]
    for currency in ("USD", "EUR", "GBP"):
        assert found.reserved(currency) == domain.reserved_amount(others, currency), currency
    assert found.reserved("USD").amount > 0 and found.reserved("EUR").amount > 0  # the mix reserves some
    key = lambda o: o.zendit_transaction_id or ""  # noqa: E731
    assert sorted(found.unsure, key=key) == sorted(filter(domain.status_unsure, others), key=key)
    assert found.unsure  # and some are unsure


async def test_the_drivers_of_unsettled_top_ups_are_found_through_their_orders(db):
    async def topup(
        topup_id: str, status: str, order_ids: list[str], card_active: bool | None = None
    ) -> None:
        await db.execute(
            "INSERT INTO wallet_topups (id, amount, currency, status, gateway_reference, order_ids)"
            " VALUES ($1, 5000, 'USD', $2, $1, $3)",
            topup_id,
            status,
            order_ids,
        )
        if card_active is not None:
            await db.execute(
                "INSERT INTO issuing_cards"
                " (card_id, card_last4, card_exp, amount, currency, topup_id, active)"
                " VALUES ($1, '4242', '12/2030', 5000, 'USD', $2, $3)",
                f"ic_{topup_id}",
                topup_id,
                card_active,
            )

    await topup("tu_open", "card_created", ["open", "joined"], card_active=True)
    await topup("tu_declined", "declined", ["declined"], card_active=True)  # its card not cancelled yet
    await topup("tu_done", "succeeded", ["done", "joined"], card_active=False)
    await topup("tu_failed", "failed", ["failed"])
    await topup("tu_open_joined", "submitted", ["starter", "waits"])
    async with db.acquire() as conn:
        names = ["open", "joined", "declined", "done", "failed", "waits", "other"]
        unsettled = await repo.unsettled_topups_of(conn, names)
        latest = await repo.latest_succeeded_topups(conn, names)

    assert sorted(unsettled, key=lambda t: t.id) == [
        domain.UnsettledTopup("tu_declined", None, ("declined",), is_open=False),
        domain.UnsettledTopup("tu_open", None, ("open", "joined"), is_open=True),
        domain.UnsettledTopup("tu_open_joined", None, ("starter", "waits"), is_open=True),
    ]
    # "joined" and "waits" joined a top-up still open; "declined" drives one whose card is active.
    assert domain.busy_with_topups(names, unsettled) == {"open", "joined", "declined", "waits"}
    assert latest == {"done": "tu_done", "joined": "tu_done"}
