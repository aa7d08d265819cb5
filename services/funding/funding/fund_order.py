"""The use case: make sure the Zendit wallet can pay for one paid order, then announce order.funded.

    paid ─► funding ─┬─ the wallet covers it (after the orders paid before it) ─────► funded ─► order.funded
                     ├─ issuing_card, a top-up on its way covers it: wait (1 s), re-check
                     ├─ issuing_card, short: one top-up for everyone waiting (topups.py), re-check
                     └─ prefunded, short: awaiting_funds, one operator alert per shortage, re-check
                        every AWAITING_FUNDS_RECHECK_SECONDS; refunded after AWAITING_FUNDS_MAX_AGE

Every decision runs under one Postgres advisory lock for the whole wallet (`repository.LOCK_WALLET`):
the orders that reserve money, the orders waiting for it and the top-ups on their way are read, then
Zendit's balance (domain.WalletBook); the order is funded, joins a top-up, or a new top-up is recorded,
all in that transaction, so two orders can never count the same money and a burst of orders starts one
top-up, not one each. The reads come before the balance on purpose: a purchase that moves from
"reserved by us" to "held by Zendit" in between is then counted twice (safe) instead of not at all, and
a top-up seen as succeeded is certainly in the balance read after it (one seen open may be counted
twice: the order then waits a second longer).

What other orders reserve is summed in SQL by the rule of domain.reserves_wallet
(`repository.SELECT_RESERVATIONS`); only the few purchases whose hold we have not seen are loaded, to
ask Zendit about them before money is added.

A decision that funds its order funds with it every other waiting order the free money pays for, in
payment order (domain.batch_to_fund), in both modes: under a backlog, one pass through the lock and one
balance read serve many orders. Each is moved to `funded` with its order.funded in the outbox, in that
transaction, and the deciding delivery publishes them after the commit. Every one of them was moved to
funding by its own order.paid delivery, which is still under way (running, or due back from a delay or
retry tier): it finds the order funded — at its first look, or under the lock — and, without the lock
or a Zendit call, publishes its order.funded only if the batch's publish was lost (the outbox row is
locked while it is published, so never twice). Where that delivery is gone too (dead-lettered, or an
order.paid re-publish that ran out of retries), the announcement relay (relay.py) publishes what stays
unpublished. A failure path that loses the race to a batch refunds nothing and announces the order
instead (handlers.funding_failed). An order that drives a top-up not settled yet (open, or its card
still active) is left out, its cost still set aside: its own delivery settles that top-up first
(settle_interrupted, or the failure path's abandon), so no top-up or card is left without the order
that drives it. So is an order that joined a top-up still open: its delivery waits for it and, should
it stall (its driver's delivery gone), takes it over and settles it before deciding (_take_over_stalled).

order.funded is published after the commit; a redelivery publishes it only if that publish was lost.

Every step is idempotent; a redelivery resumes wherever the previous delivery stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import asyncpg

from esim_common import outbox
from esim_common.crash_points import crash_here
from esim_common.errors import CheckAgainLater, FailPermanently, RetryLater
from esim_common.events import OperatorAlert, OrderFunded, OrderPaid
from esim_common.money import Money, MoneyError
from esim_common.order_repository import Order, get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import IllegalTransition, transition
from esim_common.providers.zendit import ZenditClient, ZenditError
from esim_common.publisher import EventPublisher
from esim_common.settings import FundingMode
from funding import domain
from funding import repository as repo
from funding.domain import OrderCost, Step, TopupStatus, TopupView, WaitingOrder, WalletBook
from funding.metrics import awaiting_funds_orders, operator_alert, wallet_available, wallet_shortfall
from funding.repository import WalletTopup
from funding.topups import TopupPhases

log = logging.getLogger("esim.funding")

S = OrderStatus

# How often an order waiting for a top-up on its way looks again (the shortest retry tier).
TOPUP_WAIT_SECONDS = 1


class OrderMissing(Exception):
    """order.paid for an order that is not in the database: not retryable, not refundable by us."""


class UnexpectedOrderState(Exception):
    """order.paid for an order that was never marked paid: a person must look (DLQ)."""


@dataclass(frozen=True)
class Decision:
    funded: tuple[str, ...] = ()  # orders funded by this decision, in payment order (this one among them)
    already_funded: bool = False  # the order was funded before (by an earlier decision or a batch)
    moved_on: bool = False  # someone else moved the order out of funding meanwhile
    drive: str | None = None  # issuing_card: the top-up this delivery moves forward now
    wait_for: str | None = None  # issuing_card: the top-up on its way this order waits for
    short: Money | None = None  # prefunded: what the operator must add for every waiting order
    awaiting: int | None = None  # prefunded: orders in awaiting_funds after this decision


# The id of the order's latest move to awaiting_funds: the marker of its current wait (shortage episode).
LATEST_WAIT = """
    SELECT max(id) FROM order_transitions WHERE transaction_id = $1 AND to_status = 'awaiting_funds'
"""


def shortage_alert(
    transaction_id: str,
    episode: int,
    amount_to_add: Money | None = None,
    facts: dict[str, str] | None = None,
) -> OperatorAlert:
    """The wallet_short alert of the shortage whose wait `transaction_id` began; `episode` is the id of
    that order's order_transitions row into awaiting_funds, so the same order beginning a later shortage
    (funded, sent back by INSUFFICIENT_FUNDS, short again) raises a new alert. Its event id depends on the
    key only, so a redelivery finds the queued one (`outbox.publish_pending` publishes the queued version:
    the amount and facts of a lookup copy made without them do not matter)."""
    alert_key = f"wallet_short:{transaction_id}:{episode}"
    return OperatorAlert(
        event_id=outbox.stable_event_id(alert_key),
        transaction_id=transaction_id,
        alert="wallet_short",
        alert_key=alert_key,
        reason="wallet_short",
        amount_to_add=amount_to_add,
        facts=facts or {},
    )


class FundOrder:
    def __init__(
        self,
        *,
        pool: Callable[[], asyncpg.Pool],
        publisher: EventPublisher,
        zendit: ZenditClient,
        topups: TopupPhases,
        mode: FundingMode,
        min_topup: int,
        max_topup: int,
        awaiting_funds_recheck_seconds: int = 10,
        awaiting_funds_max_age: timedelta = timedelta(hours=6),
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._zendit = zendit
        self._topups = topups
        self._mode = mode
        self._min_topup = min_topup
        self._max_topup = max_topup
        self._recheck_seconds = awaiting_funds_recheck_seconds
        self._max_age = awaiting_funds_max_age

    async def __call__(self, event: OrderPaid) -> None:
        txn = event.transaction_id
        order = await self._enter_funding(await self._order(txn))
        step = domain.next_step(order.status, ever_funded=order.funded_at is not None)
        if step == Step.ANNOUNCE:  # funded already (maybe by another order's batch): no lock, no Zendit
            return await self.announce(txn)
        if step == Step.NOTHING:
            log.info("order is past funding; nothing to do", extra={"status": order.status.value})
            return None
        if step == Step.RESUME_FAILURE:
            # An earlier delivery failed the order but did not finish the refund: the failure path does.
            raise FailPermanently(order.failure_reason or "topup_failed", "resuming the refund")
        if step == Step.UNEXPECTED:
            raise UnexpectedOrderState(f"order.paid for an order that is {order.status.value}")

        cost = order.zendit_cost_money or await self._record_cost(order)
        if self._mode == FundingMode.PREFUNDED:
            return await self._fund_prefunded(txn, cost)
        covering = await repo.covering_topups(self._pool(), txn)
        if await self._take_over_stalled(txn, covering):
            covering = await repo.covering_topups(self._pool(), txn)  # it drives them now
        if await self._topups.settle_interrupted(txn, covering):
            covering = await repo.covering_topups(self._pool(), txn)  # it moved some of them on
        self._wait_while_topup_on_its_way(txn, covering)
        # Each pass funds the order, waits, or drives one top-up; next_topup_id bounds the top-ups.
        for _ in range(domain.MAX_TOPUPS_PER_ORDER + 1):
            decision = await self._decide(txn, cost, can_top_up=True)
            if decision.moved_on:
                return None
            if decision.funded:
                return await self._announce_batch(decision.funded)
            if decision.already_funded:
                return await self.announce(txn)
            if decision.drive is None:
                raise CheckAgainLater(TOPUP_WAIT_SECONDS, f"waiting for top-up {decision.wait_for}")
            await self._topups.finish(decision.drive, txn)
        raise RetryLater("the wallet is still short after this order's top-ups")

    async def give_up(self, transaction_id: str, reason: str) -> None:
        """Before the refund: no top-up this order started may stay open, no card of it active."""
        await self._topups.abandon(transaction_id, reason)
        if self._mode == FundingMode.PREFUNDED:  # one waiting order fewer (refunded after its max age)
            awaiting = await repo.count_awaiting_funds(self._pool(), besides=transaction_id)
            awaiting_funds_orders.set(awaiting)
            if awaiting == 0:
                wallet_shortfall.clear()

    async def _take_over_stalled(self, transaction_id: str, covering: list[WalletTopup]) -> bool:
        """Take over the open top-ups this order joined whose driver has gone quiet (its delivery died or
        went to the DLQ: domain.may_take_over), so that settle_interrupted finishes them before the
        order decides. Whatever the wallet holds by then: a top-up left open, maybe with an active card,
        would be left to nobody. Batches leave such an order to its own delivery for this reason
        (domain.busy_with_topups). True when it took any over."""
        taken = False
        for topup in covering:
            if topup.status.is_open and domain.may_take_over(
                topup.id, transaction_id, idle_seconds=topup.idle_seconds, driven_by=topup.driven_by
            ):
                if await repo.take_over_stalled_topup(
                    self._pool(), topup.id, transaction_id, domain.TOPUP_STALE_SECONDS
                ):
                    log.warning("taking over a stalled top-up", extra={"topup_id": topup.id})
                    taken = True
        return taken

    @staticmethod
    def _wait_while_topup_on_its_way(transaction_id: str, covering: list[WalletTopup]) -> None:
        """An order that joined a top-up someone else drives checks, without the wallet lock or a Zendit
        call, whether it is still on its way: a burst of waiting orders costs one cheap query each."""
        if covering and covering[-1].status.is_open:
            latest = covering[-1]
            if not domain.may_drive(
                latest.id, transaction_id, idle_seconds=latest.idle_seconds, driven_by=latest.driven_by
            ):
                raise CheckAgainLater(TOPUP_WAIT_SECONDS, f"waiting for top-up {latest.id}")

    # ------------------------------------------------------------------------------------ steps

    async def _order(self, transaction_id: str) -> Order:
        order = await get_order(self._pool(), transaction_id)
        if order is None:
            raise OrderMissing(f"order {transaction_id} does not exist")
        return order

    async def _enter_funding(self, order: Order) -> Order:
        """paid → funding; returns the order as it is now (another delivery may have moved it on).

        awaiting_funds belongs to prefunded mode; an order left there when the mode changed to
        issuing_card goes back to funding and gets a top-up."""
        if order.status == S.PAID or (
            order.status == S.AWAITING_FUNDS and self._mode == FundingMode.ISSUING_CARD
        ):
            # Only from the status just read: a plain transition(FUNDING) would also move an order that a
            # batch funded and provisioning moved to purchasing meanwhile back to funding (a second purchase).
            try:
                async with self._pool().acquire() as conn:
                    moved = await transition(
                        conn,
                        order.transaction_id,
                        S.FUNDING,
                        reason="order.paid received",
                        expected_from=order.status,
                    )
                if moved.changed:
                    return order.model_copy(update={"status": S.FUNDING})  # what funding reads is unchanged
            except IllegalTransition:
                pass  # it moved on meanwhile
            return await self._order(order.transaction_id)  # look where it is now
        return order

    async def _record_cost(self, order: Order) -> Money:
        offer = await self._zendit.get_offer(order.offer_id)
        try:
            cost = offer.cost_money
        except (ValueError, MoneyError) as exc:  # a RANGE offer, or a cost finer than a cent
            raise FailPermanently("offer_cost_unusable", str(exc)) from None
        await repo.record_cost_if_missing(self._pool(), order.transaction_id, cost)
        return (await self._order(order.transaction_id)).zendit_cost_money or cost

    async def _decide(self, transaction_id: str, cost: Money, *, can_top_up: bool) -> Decision:
        """Under the wallet lock: fund the order (with every waiting order the money pays for), or say
        what it waits for (see the module docstring)."""
        async with self._pool().acquire() as conn, conn.transaction():
            await conn.execute(repo.LOCK_WALLET)
            order = await get_order(conn, transaction_id, lock=True)
            assert order is not None  # loaded a moment ago; orders are never deleted
            if order.status == S.FUNDED:  # funded by another order's batch: no balance needed
                return Decision(already_funded=True)
            if order.status not in (S.FUNDING, S.AWAITING_FUNDS):
                log.info("order left funding meanwhile", extra={"status": order.status.value})
                return Decision(moved_on=True)
            if not can_top_up:
                await repo.mark_funds_checked(conn, transaction_id)
            reservations = await repo.reservations(conn, exclude=transaction_id)
            waiting = await repo.waiting_orders(conn)
            # Prefunded mode drives no top-up: one left open by an earlier issuing_card run is not coming.
            on_the_way = await repo.open_topups(conn) if can_top_up else []
            balance = (await self._zendit.get_balance()).available
            wallet_available.labels(currency=balance.currency).set(balance.amount)
            if balance.currency != cost.currency:
                raise FailPermanently(
                    "currency_mismatch", f"the wallet is in {balance.currency}, the cost in {cost.currency}"
                )
            on_the_way = [t for t in on_the_way if t.currency == balance.currency]
            book = WalletBook(
                available=balance,
                reserved=reservations.reserved(balance.currency),
                incoming=sum(
                    (t.money for t in on_the_way),
                    Money.zero(balance.currency),
                ),
                waiting=tuple(
                    WaitingOrder(w.transaction_id, w.cost)
                    for w in waiting
                    if w.cost.currency == balance.currency
                ),
            )
            decision = self._decision(book, transaction_id, cost, can_top_up)
            if isinstance(decision, domain.NewTopup | domain.Short) and reservations.unsure:
                # Before money is added (or the operator asked for it): purchases placed since we last
                # looked may be held by Zendit already, i.e. counted twice. Ask, and decide again.
                # The balance is read again after the statuses, as at the top: a purchase held in between
                # is then counted twice (safe), never not at all.
                answered = await self._with_fresh_purchase_status(reservations.unsure)
                balance = (await self._zendit.get_balance()).available
                wallet_available.labels(currency=balance.currency).set(balance.amount)
                reserved = domain.reserved_with_fresh_status(book.reserved, reservations.unsure, answered)
                book = replace(book, available=balance, reserved=reserved)
                decision = self._decision(book, transaction_id, cost, can_top_up)
            log.info(
                "funding decision",
                extra={
                    "decision": type(decision).__name__,
                    "available": balance.amount,
                    "reserved": book.reserved.amount,
                    "incoming": book.incoming.amount,
                    "ahead": book.ahead_of(transaction_id).amount,
                    "cost": cost.amount,
                },
            )
            if isinstance(decision, domain.Fund):
                funded = await self._fund_batch(conn, book, transaction_id, waiting)
                return Decision(funded=funded, awaiting=await self._awaiting(conn, can_top_up))
            if isinstance(decision, domain.WaitForTopup):
                latest = on_the_way[-1]
                if not await repo.join_topup(conn, latest.id, transaction_id):
                    return Decision(wait_for=latest.id)  # it ended a moment ago: decide again shortly
                drive = domain.may_drive(
                    latest.id, transaction_id, idle_seconds=latest.idle_seconds, driven_by=latest.driven_by
                )
                if drive and not domain.drives(latest.id, transaction_id, latest.driven_by):
                    await repo.take_over_topup(conn, latest.id, transaction_id)
                    log.warning("taking over a stalled top-up", extra={"topup_id": latest.id})
                return Decision(wait_for=latest.id, drive=latest.id if drive else None)
            if isinstance(decision, domain.Short):
                self._refuse_if_waited_too_long(order)  # only when the money is not there now
                began = await repo.count_awaiting_funds(conn) == 0
                if order.status == S.FUNDING:
                    await transition(conn, transaction_id, S.AWAITING_FUNDS, reason="wallet short")
                else:
                    began = False  # it was waiting already: the shortage did not begin now
                awaiting = await repo.count_awaiting_funds(conn)
                if began:  # one alert per shortage; its email through the outbox, in this transaction
                    short = decision.amount_to_add
                    await self._alert_shortage(conn, transaction_id, short, book.available, awaiting)
                return Decision(short=decision.amount_to_add, awaiting=awaiting)
            covering = await repo.covering_topups(conn, transaction_id)
            return Decision(drive=await self._start_topup(conn, transaction_id, covering, decision.amount))

    async def _fund_batch(
        self, conn: asyncpg.Connection, book: WalletBook, transaction_id: str, waiting: list[repo.Waiting]
    ) -> tuple[str, ...]:
        """Fund this order and every other waiting order the money pays for (domain.batch_to_fund), in
        payment order, each → funded with its order.funded in the outbox (this transaction).

        Safe for the others: each was moved to funding by its own order.paid delivery, which is still
        under way (running, or due back from a delay or retry tier) and announces it if the publish
        after this commit is lost (Step.ANNOUNCE, or `already_funded` when it is queued for the lock);
        the announcement relay (relay.py) publishes it when that delivery is gone too. An order that
        drives a top-up not settled yet, or joined one still open, is left to fund itself
        (domain.busy_with_topups)."""
        fundable = domain.fundable_in_payment_order(book)
        others = [t for t in fundable if t != transaction_id]
        unsettled = await repo.unsettled_topups_of(conn, others)  # no query when there are no others
        busy = domain.busy_with_topups(others, unsettled)
        batch = domain.batch_to_fund(book, transaction_id, busy)
        funded = [t for t in batch if await self._move_to_funded(conn, t)]
        by_id = {w.transaction_id: w for w in waiting}
        topups = await repo.latest_succeeded_topups(conn, funded)
        await repo.add_announcements(
            conn,
            [
                OrderFunded(
                    transaction_id=t,
                    offer_id=by_id[t].offer_id,
                    zendit_cost=by_id[t].cost,
                    topup_id=topups.get(t),
                )
                for t in funded
            ],
        )
        if busy:
            log.info("orders busy with a top-up fund themselves", extra={"count": len(busy)})
        return tuple(funded)

    @staticmethod
    async def _move_to_funded(conn: asyncpg.Connection, transaction_id: str) -> bool:
        """→ funded; False when the order left funding meanwhile (its failure path took it without the
        wallet lock). Its cost then stays unspent in this decision: safe, the next one counts it again."""
        try:
            moved = await transition(conn, transaction_id, S.FUNDED, reason="the wallet covers it")
        except IllegalTransition as exc:
            left_for = exc.current.value if exc.current else None
            log.info("not funded: it left funding meanwhile", extra={"status": left_for})
            return False
        return bool(moved.changed)

    def _decision(
        self, book: WalletBook, transaction_id: str, cost: Money, can_top_up: bool
    ) -> domain.FundingDecision:
        try:
            return domain.decide_funding(
                book,
                transaction_id,
                cost,
                can_top_up=can_top_up,
                min_topup=self._min_topup,
                max_topup=self._max_topup,
            )
        except domain.TopupAboveMaximum as exc:
            raise FailPermanently("topup_above_maximum", str(exc)) from None

    async def _with_fresh_purchase_status(self, others: list[OrderCost]) -> list[OrderCost]:
        """`others` with Zendit's current status for the purchases whose hold we have not seen; an
        answer we cannot get leaves the order reserved (counting it twice is the safe mistake)."""

        async def fresh(order: OrderCost) -> OrderCost:
            if not domain.status_unsure(order):
                return order
            assert order.zendit_transaction_id is not None  # status_unsure says so
            try:
                purchase = await self._zendit.get_purchase(order.zendit_transaction_id)
            except (ZenditError, TimeoutError) as exc:
                log.info("purchase status unknown; its cost stays reserved", extra={"error": str(exc)[:200]})
                return order
            return replace(order, zendit_status=purchase.status)

        return list(await asyncio.gather(*(fresh(order) for order in others)))

    async def _start_topup(
        self, conn: asyncpg.Connection, transaction_id: str, covering: list[WalletTopup], amount: Money
    ) -> str:
        """Record a new top-up (pending) in the caller's locked transaction, unless the ones meant for
        this order say it should fail or stop (domain.after_short)."""
        verdict = domain.after_short([TopupView(t.id, t.status, t.failure_reason) for t in covering])
        if isinstance(verdict, domain.TopupFailed):
            raise FailPermanently(verdict.reason)
        if isinstance(verdict, domain.TopupsExhausted):
            raise RetryLater(f"the wallet is still short after {verdict.count} successful top-ups")
        topup_id = domain.next_topup_id(transaction_id, [t.id for t in covering])
        if topup_id is None:
            raise RetryLater("this order has started every top-up it may")
        await repo.start_topup(conn, topup_id=topup_id, amount=amount, transaction_id=transaction_id)
        log.info("wallet top-up planned", extra={"topup_id": topup_id, "amount": amount.amount})
        return topup_id

    @staticmethod
    async def _awaiting(conn: asyncpg.Connection, can_top_up: bool) -> int | None:
        return None if can_top_up else await repo.count_awaiting_funds(conn)

    def _refuse_if_waited_too_long(self, order: Order) -> None:
        paid_at = order.paid_at or order.created_at
        if datetime.now(UTC) - paid_at >= self._max_age:
            raise FailPermanently(
                "awaiting_funds_expired",
                f"waited {self._max_age} for the Zendit wallet to be funded (AWAITING_FUNDS_MAX_AGE)",
            )

    async def _fund_prefunded(self, transaction_id: str, cost: Money) -> None:
        # The alert this order queued when its wait began a shortage: published after that commit, and
        # by any later delivery of the order if that publish was lost (a no-op once it is published).
        await self._publish_shortage_alert(transaction_id)
        await self._behind_a_waiting_order(transaction_id)
        decision = await self._decide(transaction_id, cost, can_top_up=False)
        await self._publish_shortage_alert(transaction_id)
        if decision.moved_on:
            return None
        if decision.awaiting is not None:
            awaiting_funds_orders.set(decision.awaiting)
        if decision.funded or decision.already_funded:
            if decision.awaiting == 0:
                wallet_shortfall.labels(currency=cost.currency).set(0)
            if decision.funded:
                return await self._announce_batch(decision.funded)
            return await self.announce(transaction_id)
        if decision.short is not None:
            wallet_shortfall.labels(currency=decision.short.currency).set(decision.short.amount)
        raise CheckAgainLater(self._recheck_seconds, "waiting for the operator to fund the wallet")

    async def _publish_shortage_alert(self, transaction_id: str) -> None:
        """Publish the alert of the order's current wait if it queued one and it is not published yet."""
        episode = await self._pool().fetchval(LATEST_WAIT, transaction_id)
        if episode is not None:
            await outbox.publish_pending(
                self._pool(), self._publisher, shortage_alert(transaction_id, episode)
            )

    async def _behind_a_waiting_order(self, transaction_id: str) -> None:
        """prefunded: while the first order in line keeps looking at the balance (its look funds every
        waiting order the money pays for, in payment order), the orders behind it need not; they look
        themselves again as soon as it stops (its message lost, say)."""
        order = await self._order(transaction_id)
        if order.status != S.AWAITING_FUNDS:
            return
        first = await repo.first_in_line(self._pool())
        if first is None or first.transaction_id == transaction_id or first.checked_seconds_ago is None:
            return
        if first.checked_seconds_ago < 2 * self._recheck_seconds:
            self._refuse_if_waited_too_long(order)
            raise CheckAgainLater(self._recheck_seconds, "an order paid earlier is first in line")

    async def _alert_shortage(
        self, conn: asyncpg.Connection, txn: str, amount_to_add: Money, available: Money, waiting: int
    ) -> None:
        """Log line + counter now; the operator's email (notify) through the outbox, so that a rollback
        takes it back and a crash after the commit cannot lose it."""
        operator_alert(
            "wallet_short",
            f"the Zendit wallet is short: add at least {amount_to_add} in the Zendit console",
            amount_to_add=amount_to_add.amount,
            currency=amount_to_add.currency,
        )
        facts = {"orders_waiting": str(waiting), "wallet_available": available.format()}
        episode = await conn.fetchval(LATEST_WAIT, txn)  # the move to awaiting_funds just made
        alert = shortage_alert(txn, episode, amount_to_add, facts)
        if not await outbox.add(conn, alert):
            # Cannot happen for a new wait (a new transition id); if it does, the operator's email is
            # the one queued earlier for this key, not this shortage's: say so.
            log.warning(
                "wallet_short alert already queued; not queued again", extra={"alert_key": alert.alert_key}
            )

    async def announce(self, transaction_id: str) -> None:
        """Publish the order's order.funded that nobody has published yet (the outbox row stays locked
        until the broker confirms, so two deliveries cannot both publish it)."""
        if await repo.all_announced(self._pool(), transaction_id):
            # The usual case for an order funded in another order's batch: that delivery published it.
            crash_here("funding.before_ack")
            return
        async with self._pool().acquire() as conn, conn.transaction():
            pending = await repo.unpublished_announcements(conn, transaction_id)
            if not pending and not await repo.has_announcement(conn, transaction_id):
                # Funded without an outbox row (before the outbox was used for it, or by hand).
                pending = [await self._funded_event(conn, transaction_id)]
                await repo.add_announcement(conn, pending[0])
            for event in pending:
                await self._publisher.publish(event)
                await repo.mark_announced(conn, event.event_id)
                log.info("order funded", extra={"topup_id": event.topup_id})
        crash_here("funding.before_ack")  # announced; the message is not acknowledged yet

    async def _announce_batch(self, funded: tuple[str, ...]) -> None:
        """After the commit that funded them: publish the batch's order.funded events, in one
        transaction holding their rows until each is confirmed. A row another delivery holds is skipped
        (that delivery is publishing it); one not published here is published by its order's own
        delivery. The ones confirmed before a failed publish are stamped, so they do not go out twice."""
        failed: Exception | None = None
        async with self._pool().acquire() as conn, conn.transaction():
            published = []
            for event in await repo.unpublished_announcements_of(conn, funded):
                try:
                    await self._publisher.publish(event)
                except Exception as exc:  # raised below, once the ones confirmed are stamped
                    failed = exc
                    break
                published.append(event.event_id)
                log.info(
                    "order funded",
                    extra={"funded_transaction_id": event.transaction_id, "topup_id": event.topup_id},
                )
            await repo.mark_all_announced(conn, published)
        if failed is not None:
            raise failed
        crash_here("funding.before_ack")  # announced; the message is not acknowledged yet

    async def _funded_event(self, conn: asyncpg.Connection, transaction_id: str) -> OrderFunded:
        order = await get_order(conn, transaction_id)
        if order is None or order.zendit_cost_money is None:  # cannot happen: a cost comes first
            raise UnexpectedOrderState("a funded order without a Zendit cost")
        succeeded = [
            t.id
            for t in await repo.covering_topups(conn, transaction_id)
            if t.status == TopupStatus.SUCCEEDED
        ]
        return OrderFunded(
            transaction_id=transaction_id,
            offer_id=order.offer_id,
            zendit_cost=order.zendit_cost_money,
            topup_id=succeeded[-1] if succeeded else None,
        )
