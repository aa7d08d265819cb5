"""How many statements provisioning sends to Postgres for one happy-path order, step by step.

Each round trip costs CPU in the service and in Postgres; the pipeline is CPU-bound (bench/README.md).
The handlers are called directly on a started service (real Postgres, broker and emulators), and the
statements one handler call sends on any asyncpg connection are counted. Only that call's: the step
marks its own task's context (a ContextVar, inherited by the tasks it starts), so a hint or poll the
service's consumers handle meanwhile is not counted. BEGIN and COMMIT count: each is a round trip. The
budgets are upper bounds, so that a later saving does not break them.

Before merging reads and writes (one per step, see `provisioning.repository`) the same order took
12 + 21 + 8 statements settled by a hint, 12 + 21 settled by the poll.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import asyncpg
import pytest

from esim_common.errors import CheckAgainLater
from esim_common.events import OrderFunded, PurchaseUpdateHint
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from provisioning import repository
from provisioning.domain import Outcome
from tests.fixtures.polling import eventually
from tests.integration import test_provisioning_service as svc
from tests.integration.test_provisioning_hints import count_saves, zendit_status
from tests.integration.test_provisioning_service import COST, OFFER, order_of

pytestmark = [pytest.mark.broker, pytest.mark.db]

start_provisioning = svc.start_provisioning
funded_order = svc.funded_order

STATEMENT_METHODS = ("execute", "executemany", "fetch", "fetchrow", "fetchval")
# Read the order; start the attempt (BEGIN, lock, move, facts, COMMIT); place the purchase under the
# lock (BEGIN, lock, COMMIT); record its status with the attempt's age.
FIRST_POLL = 10
# Read the order; record DONE; settle under the lock (BEGIN, lock, move, facts, outbox, COMMIT); which
# announcements are pending; publish order.provisioned (BEGIN, lock, mark published, COMMIT).
SETTLE = 13
# Read the order; which announcements are pending (none).
SETTLED_ALREADY = 2


# The statements of the step open in this task's context (None: not counted).
_STEP: ContextVar[list[str] | None] = ContextVar("statements_of_the_step", default=None)


@dataclass
class StatementCounter:
    """Counts the statements sent on any asyncpg connection by the code run inside `step` (and the
    tasks it starts), whatever else runs meanwhile."""

    steps: dict[str, list[str]] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        statements: list[str] = []
        token = _STEP.set(statements)
        try:
            yield
        finally:
            _STEP.reset(token)
            self.steps[name] = statements

    def within(self, budgets: dict[str, int]) -> None:
        counts = {name: len(statements) for name, statements in self.steps.items()}
        print("statements per step:", counts)
        assert counts.keys() == budgets.keys()
        over = {name: self.steps[name] for name in budgets if counts[name] > budgets[name]}
        assert not over, f"over budget {budgets}: {over}"


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> StatementCounter:
    counter = StatementCounter()
    for name in STATEMENT_METHODS:
        original = getattr(asyncpg.Connection, name)

        def counted(self, query, *args, __original=original, **kwargs):
            if (step := _STEP.get()) is not None:
                step.append(" ".join(str(query).split())[:60])
            return __original(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, name, counted)
    return counter


async def test_the_counter_counts_the_steps_statements_and_not_those_of_other_tasks(db, statements):
    """A consumer's task (started before the step, like the service's) is not counted."""
    others_done = 0

    async def another_consumer() -> None:
        nonlocal others_done
        while True:
            await db.fetchval("SELECT 1")
            others_done += 1

    other = asyncio.create_task(another_consumer())
    try:
        await eventually(lambda: others_done > 0, within=5, what="the other task runs")
        async with db.acquire() as conn:  # acquired and released (a reset statement) outside the step
            with statements.step("one statement"):
                await conn.fetchval("SELECT 2")
                before = others_done
                await eventually(lambda: others_done > before, within=5, what="the other task ran meanwhile")
    finally:
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)

    assert statements.steps == {"one statement": ["SELECT 2"]}


async def placed_and_waiting(provisioner, funded_order, zendit_emulator, statements):
    """order.funded's first delivery: start the attempt, place the purchase, wait (it stays open)."""
    txn = await funded_order()
    zendit_emulator.control("POST", "purchase_stalls", {"count": 1})
    event = OrderFunded(transaction_id=txn, offer_id=OFFER, zendit_cost=COST)
    with statements.step("first poll: start, place, wait"), pytest.raises(CheckAgainLater):
        await provisioner.on_order_funded(event)
    await eventually(lambda: zendit_status(zendit_emulator, txn) == "IN_PROGRESS", within=10, what="open")
    zendit_emulator.control("POST", f"purchases/{txn}/resolve", {"status": "DONE"})
    await eventually(lambda: zendit_status(zendit_emulator, txn) == "DONE", within=10, what="done")
    return txn, event


async def test_a_happy_path_order_settled_by_a_webhook_hint(
    start_provisioning, funded_order, db, zendit_emulator, statements
):
    service = await start_provisioning()
    provisioner = service.app.state.provisioner
    txn, event = await placed_and_waiting(provisioner, funded_order, zendit_emulator, statements)

    with statements.step("hint: settle and announce"):
        await provisioner.on_purchase_hint(PurchaseUpdateHint(transaction_id=txn, zendit_transaction_id=txn))
    assert (await order_of(db, txn)).status == OrderStatus.PROVISIONED
    with statements.step("the poll comes back: settled already"):
        await provisioner.on_order_funded(event)

    statements.within(
        {
            "first poll: start, place, wait": FIRST_POLL,
            "hint: settle and announce": SETTLE,
            "the poll comes back: settled already": SETTLED_ALREADY,
        }
    )


async def test_a_happy_path_order_settled_by_the_poll(
    start_provisioning, funded_order, db, zendit_emulator, statements
):
    service = await start_provisioning()
    provisioner = service.app.state.provisioner
    txn, event = await placed_and_waiting(provisioner, funded_order, zendit_emulator, statements)

    with statements.step("second poll: settle and announce"):
        await provisioner.on_order_funded(event)
    assert (await order_of(db, txn)).status == OrderStatus.PROVISIONED

    statements.within(
        {"first poll: start, place, wait": FIRST_POLL, "second poll: settle and announce": SETTLE}
    )


# ------------------------------------------------------------------------------ the merged reads still guard
async def test_a_stale_look_at_a_done_purchase_does_no_qr_work_and_changes_nothing(
    start_provisioning, funded_order, db
):
    """_complete no longer reads the order before the QR work: the guarded write of DONE tells it."""
    service = await start_provisioning()
    provisioner = service.app.state.provisioner
    txn = await funded_order()
    stale = await order_of(db, txn)  # as a poll read it, before another worker settled the purchase
    await service.publish_funded(txn)
    settled_by_another = await svc.wait_for_status(db, txn, OrderStatus.PROVISIONED)
    purchase = await provisioner.zendit.get_purchase(txn)
    storage = count_saves(service)

    settled, changed = await provisioner._complete(stale, txn, purchase, Outcome.DONE, source="poll")

    assert (settled, changed) == (settled_by_another, False)
    assert storage.saves == 0
    assert await order_of(db, txn) == settled_by_another


async def test_ending_an_attempt_outside_the_row_locks_transaction_is_refused(funded_order, db):
    """The three ends of an attempt no longer open a transaction of their own: without the caller's,
    the move and its facts would commit apart."""
    txn = await funded_order()
    async with db.acquire() as conn:
        await transition(conn, txn, OrderStatus.PURCHASING)
        with pytest.raises(RuntimeError, match="transaction"):
            await repository.mark_purchase_failed(conn, txn, reason="zendit_failed")
        with pytest.raises(RuntimeError, match="transaction"):
            await repository.send_back_to_funding(conn, txn, reason="zendit_insufficient_funds")
        with pytest.raises(RuntimeError, match="transaction"):
            await repository.mark_provisioned(
                conn, txn, qr_code_url="u", iccid="i", smdp_address="s", activation_code="a"
            )
    assert (await order_of(db, txn)).status == OrderStatus.PURCHASING


async def test_an_order_provisioned_before_its_announcement_had_an_outbox_row_is_announced_once(
    start_provisioning, funded_order, db
):
    """The read of which announcements are pending finds no row at all: one is queued, then published."""
    service = await start_provisioning()
    txn = await funded_order()
    funded = await service.publish_funded(txn)
    await svc.wait_for_status(db, txn, OrderStatus.PROVISIONED)
    assert len(await svc.wait_for_messages(service, "notify.order-provisioned", 1)) == 1
    await db.execute("DELETE FROM outbox WHERE transaction_id = $1", txn)  # as orders were, before the outbox

    await service.publish_funded(txn, event_id=funded.event_id)  # a redelivery
    announced = await svc.wait_for_messages(service, "notify.order-provisioned", 1, within=5.0)

    assert [m["transaction_id"] for m in announced] == [txn]
    published = await db.fetch("SELECT routing_key, published_at FROM outbox WHERE transaction_id = $1", txn)
    assert [(r["routing_key"], r["published_at"] is not None) for r in published] == [
        ("order.provisioned", True)
    ]
