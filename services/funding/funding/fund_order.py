"""The use case: make sure the Zendit wallet can pay for one paid order, then announce order.funded.

    paid ─► funding ─┬─ wallet covers the cost ──────────────────────────────► funded ─► order.funded
                     ├─ short, issuing_card: top up (topups.py), re-check ───► funded ─► order.funded
                     └─ short, prefunded: awaiting_funds, operator alert, check again in 10 s

"Covers" is decided under one Postgres advisory lock for the whole wallet (`repository.LOCK_WALLET`):
other orders' reservations and this order's top-ups are read, then Zendit's balance; the order is moved
to `funded`, or the top-up to drive is chosen (and a new one recorded), in the same transaction, so two
orders can never both count the same money. Both reads come before the balance on purpose: a purchase
that moves from "reserved by us" to "held by Zendit" in between is then counted twice (safe) instead of
not at all, and a top-up seen as succeeded is certainly in the balance read after it.

Every step is idempotent; a redelivery resumes wherever the previous delivery stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from esim_common.crash_points import crash_here
from esim_common.errors import CheckAgainLater, FailPermanently, RetryLater
from esim_common.events import OrderFunded, OrderPaid
from esim_common.money import Money, MoneyError
from esim_common.order_repository import Order, get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import IllegalTransition, transition
from esim_common.providers.zendit import ZenditClient
from esim_common.publisher import EventPublisher
from esim_common.settings import FundingMode
from funding import domain
from funding import repository as repo
from funding.domain import Step, TopupStatus, WalletPosition
from funding.metrics import operator_alert, wallet_available
from funding.repository import WalletTopup
from funding.topups import TopupPhases

log = logging.getLogger("esim.funding")

S = OrderStatus

# How often a prefunded order waiting for the operator looks at the balance again (a retry tier).
PREFUNDED_RECHECK_SECONDS = 10


class OrderMissing(Exception):
    """order.paid for an order that is not in the database: not retryable, not refundable by us."""


class UnexpectedOrderState(Exception):
    """order.paid for an order that was never marked paid: a person must look (DLQ)."""


@dataclass(frozen=True)
class Decision:
    funded: bool  # the order is funded now (by this decision or an earlier one)
    shortfall: Money | None = None  # set when the wallet is short
    topup_id: str | None = None  # short, issuing_card mode: the top-up to drive
    moved_on: bool = False  # someone else moved the order out of funding meanwhile


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
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._zendit = zendit
        self._topups = topups
        self._mode = mode
        self._min_topup = min_topup
        self._max_topup = max_topup

    async def __call__(self, event: OrderPaid) -> None:
        txn = event.transaction_id
        order = await self._enter_funding(await self._order(txn))
        step = domain.next_step(order.status, ever_funded=order.funded_at is not None)
        if step == Step.ANNOUNCE:
            return await self._announce(order)
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
        await self._topups.settle_interrupted(txn)
        # Each pass funds the order or drives one top-up; plan_topup bounds the number of top-ups.
        for _ in range(domain.MAX_TOPUPS_PER_ORDER + 1):
            decision = await self._decide(txn, cost, top_up=True)
            if decision.moved_on:
                return None
            if decision.funded:
                return await self._announce(await self._order(txn))
            assert decision.topup_id is not None
            await self._topups.finish(decision.topup_id, txn)
        raise RetryLater("the wallet is still short after this order's top-ups")

    async def give_up(self, transaction_id: str, reason: str) -> None:
        """Before the refund: no top-up of this order may stay open, no card of it active."""
        await self._topups.abandon(transaction_id, reason)

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
            try:
                async with self._pool().acquire() as conn:
                    await transition(conn, order.transaction_id, S.FUNDING, reason="order.paid received")
            except IllegalTransition:
                pass  # a concurrent delivery got further; the guard looks at where the order is now
            return await self._order(order.transaction_id)
        return order

    async def _record_cost(self, order: Order) -> Money:
        offer = await self._zendit.get_offer(order.offer_id)
        try:
            cost = offer.cost_money
        except (ValueError, MoneyError) as exc:  # a RANGE offer, or a cost finer than a cent
            raise FailPermanently("offer_cost_unusable", str(exc)) from None
        await repo.record_cost_if_missing(self._pool(), order.transaction_id, cost)
        return (await self._order(order.transaction_id)).zendit_cost_money or cost

    async def _decide(self, transaction_id: str, cost: Money, *, top_up: bool) -> Decision:
        """Under the wallet lock: fund the order if the wallet covers it; else say how much is missing
        and (`top_up`) which top-up is to cover it."""
        async with self._pool().acquire() as conn, conn.transaction():
            await conn.execute(repo.LOCK_WALLET)
            order = await get_order(conn, transaction_id, lock=True)
            assert order is not None  # loaded a moment ago; orders are never deleted
            if order.status == S.FUNDED:
                return Decision(funded=True)
            if order.status not in (S.FUNDING, S.AWAITING_FUNDS):
                log.info("order left funding meanwhile", extra={"status": order.status.value})
                return Decision(funded=False, moved_on=True)
            others = await repo.reserving_orders(conn, exclude=transaction_id)
            mine = await repo.get_topups(conn, domain.topup_ids(transaction_id))
            balance = (await self._zendit.get_balance()).available
            wallet_available.labels(currency=balance.currency).set(balance.amount)
            if balance.currency != cost.currency:
                raise FailPermanently(
                    "currency_mismatch", f"the wallet is in {balance.currency}, the cost in {cost.currency}"
                )
            position = WalletPosition(
                available=balance, reserved=domain.reserved_amount(others, balance.currency)
            )
            if position.covers(cost):
                await transition(conn, transaction_id, S.FUNDED, reason=f"wallet free {position.free}")
                return Decision(funded=True)
            shortfall = position.shortfall(cost)
            log.info(
                "wallet short for this order",
                extra={
                    "available": balance.amount,
                    "reserved": position.reserved.amount,
                    "cost": cost.amount,
                },
            )
            if not top_up:
                return Decision(funded=False, shortfall=shortfall)
            topup_id = await self._plan_topup(conn, transaction_id, mine, shortfall)
        return Decision(funded=False, shortfall=shortfall, topup_id=topup_id)

    async def _plan_topup(
        self, conn: asyncpg.Connection, transaction_id: str, mine: list[WalletTopup], shortfall: Money
    ) -> str:
        """The top-up to drive; a new one is recorded (pending) in the caller's locked transaction."""
        plan = domain.plan_topup(transaction_id, [(t.id, t.status, t.failure_reason) for t in mine])
        if isinstance(plan, domain.TopupFailed):
            raise FailPermanently(plan.reason)
        if isinstance(plan, domain.TopupsExhausted):
            raise RetryLater(f"the wallet is still short after {plan.count} successful top-ups")
        if isinstance(plan, domain.ResumeTopup):
            return plan.topup_id
        try:
            amount = domain.topup_amount(shortfall, min_topup=self._min_topup, max_topup=self._max_topup)
        except domain.TopupAboveMaximum as exc:
            raise FailPermanently("topup_above_maximum", str(exc)) from None
        await repo.start_topup(conn, topup_id=plan.topup_id, amount=amount, transaction_id=transaction_id)
        log.info("wallet top-up planned", extra={"topup_id": plan.topup_id, "amount": amount.amount})
        return plan.topup_id

    async def _fund_prefunded(self, transaction_id: str, cost: Money) -> None:
        decision = await self._decide(transaction_id, cost, top_up=False)
        if decision.moved_on:
            return None
        if decision.funded:
            return await self._announce(await self._order(transaction_id))
        assert decision.shortfall is not None
        try:
            async with self._pool().acquire() as conn:
                moved = await transition(conn, transaction_id, S.AWAITING_FUNDS, reason="wallet short")
        except IllegalTransition:
            return None  # a concurrent delivery funded it meanwhile and announced it
        if moved.changed:  # one alert per order, not one per re-check
            operator_alert(
                "wallet_short",
                f"the Zendit wallet is short: add at least {decision.shortfall} in the Zendit console",
                amount_to_add=decision.shortfall.amount,
                currency=decision.shortfall.currency,
            )
        raise CheckAgainLater(PREFUNDED_RECHECK_SECONDS, "waiting for the operator to fund the wallet")

    async def _announce(self, order: Order) -> None:
        cost = order.zendit_cost_money
        if cost is None:  # cannot happen: the cost is recorded before an order is funded
            raise UnexpectedOrderState("a funded order without a Zendit cost")
        succeeded = [
            t.id
            for t in await repo.get_topups(self._pool(), domain.topup_ids(order.transaction_id))
            if t.status == TopupStatus.SUCCEEDED
        ]
        await self._publisher.publish(
            OrderFunded(
                transaction_id=order.transaction_id,
                offer_id=order.offer_id,
                zendit_cost=cost,
                topup_id=succeeded[-1] if succeeded else None,
            )
        )
        log.info("order funded", extra={"topup_id": succeeded[-1] if succeeded else None})
        crash_here("funding.before_ack")  # announced; the message is not acknowledged yet
