"""The purchase of one order as resumable phases; every redelivery picks up where the last one stopped.

    start      funded → purchasing, attempt n with Zendit id `<txn>` / `<txn>-r<n>` (one transaction)
    look       GET the purchase; 404 → place it: lock the row, GET again, POST (never POST otherwise)
    wait       not final → record its status, CheckAgainLater (the consumer is free meanwhile);
               past PURCHASE_DEADLINE_SECONDS → needs_attention + operator alert (never refunded)
    deliver    DONE → LPA → QR PNG (read back) → storage → provisioned + facts → order.provisioned
    fund again FAILED INSUFFICIENT_FUNDS → funding → order.paid (the next attempt gets a new id)
    fail       FAILED otherwise → FailPermanently(zendit_<code>) → `on_failure` refunds once

Zendit errors while a purchase may exist are not retried through the consumer's three tiers (14 s
would turn a short Zendit outage into operator work, or worse a refund while Zendit still delivers):
they are waited out like an unfinished purchase, until the same deadline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from esim_common.compensation import fail_and_refund
from esim_common.errors import CheckAgainLater, FailPermanently
from esim_common.events import OrderFunded, OrderPaid, OrderProvisioned
from esim_common.money import Money
from esim_common.order_repository import Order
from esim_common.order_states import OrderStatus
from esim_common.providers.stripe import StripeGateway
from esim_common.providers.zendit import (
    Purchase,
    ZenditClient,
    ZenditNotFound,
    ZenditPermanentError,
    ZenditTransientError,
)
from esim_common.service import ServiceContext
from provisioning import domain, qr, repository
from provisioning.domain import Outcome, Step
from provisioning.metrics import count_outcome, operator_alerts_total, purchase_seconds
from provisioning.storage import QrStorage

log = logging.getLogger("esim.provisioning")

S = OrderStatus
UNREADABLE_REASON = "purchase_status_unreadable"
# Operator-alert reasons are a metric label: anything unexpected is counted as "other".
ALERT_REASONS = frozenset({domain.DEADLINE_REASON, UNREADABLE_REASON, "retries_exhausted"})


class IncompleteConfirmation(Exception):
    """A DONE purchase without the activation data to build a QR code: a person must look (DLQ)."""


@dataclass
class Provisioner:
    ctx: ServiceContext
    zendit: ZenditClient
    stripe: StripeGateway
    storage: QrStorage

    # -- entry points (the consumer's handler and failure hook) ---------------------------------------
    async def on_order_funded(self, event: OrderFunded) -> None:
        order = await repository.must_get(self.ctx.pool, event.transaction_id)
        step = domain.next_step(order.status, order.purchase_attempts)
        if step == Step.START:
            order = await repository.start_attempt(self.ctx.pool, order.transaction_id)
            step = domain.next_step(order.status, order.purchase_attempts)
            if step == Step.CONTINUE:
                log.info(
                    "purchase attempt started", extra={"zendit_transaction_id": order.zendit_transaction_id}
                )
        if step == Step.CONTINUE:
            await self._advance(order)
        elif step == Step.ANNOUNCE:
            await self._announce(order)
        elif step == Step.FUND_AGAIN:
            await self._announce_fund_again(order)
        elif step == Step.FINISH_REFUND:
            raise FailPermanently(order.failure_reason or "purchase_failed", "resuming the refund")
        elif step in (Step.IGNORE, Step.START):
            log.info("order.funded ignored", extra={"status": order.status.value})

    async def on_failure(self, event: OrderFunded, reason: str) -> None:
        """The failure path: refund once when Zendit cannot deliver; otherwise an operator decides."""
        order = await repository.must_get(self.ctx.pool, event.transaction_id)
        if domain.refund_is_safe(reason, order.status):
            await fail_and_refund(
                pool=self.ctx.pool,
                stripe=self.stripe,
                publisher=self.ctx.publisher,
                transaction_id=order.transaction_id,
                failed_state=S.PURCHASE_FAILED,
                step="purchase",
                reason=reason,
            )
        elif order.status == S.PURCHASING:
            count_outcome("needs_attention")
            await self._hold_for_operator(order, reason)
        else:
            log.error("failure after the purchase step, nothing to compensate", extra={"reason": reason})

    # -- phases --------------------------------------------------------------------------------------
    async def _advance(self, order: Order) -> None:
        try:
            purchase = await self._current_purchase(order)
        except ZenditTransientError as exc:
            log.warning("zendit unavailable, looking again later", extra={"error": exc.message[:200]})
            await self._wait(order, None)
            return
        outcome = domain.outcome_of(purchase.status.value, purchase.error_code, order.purchase_attempts)
        if outcome == Outcome.PENDING:
            await self._wait(order, purchase)
        elif outcome == Outcome.DONE:
            await self._deliver(order, purchase)
        elif outcome == Outcome.FUND_AGAIN:
            await self._fund_again(order)
        else:
            await self._fail(order, purchase)

    async def _current_purchase(self, order: Order) -> Purchase:
        zendit_id = self._zendit_id(order)
        found = await self._look_up(zendit_id)
        return found if found is not None else await self._place(order, zendit_id)

    async def _look_up(self, zendit_id: str) -> Purchase | None:
        try:
            return await self.zendit.get_purchase(zendit_id)
        except ZenditNotFound:
            return None
        except ZenditPermanentError as exc:
            # 401/403/400 on a GET: the purchase may exist but we cannot see it. Not refundable.
            raise FailPermanently(UNREADABLE_REASON, exc.message[:200]) from exc

    async def _place(self, order: Order, zendit_id: str) -> Purchase:
        """POST the purchase, at most once per Zendit id: under the order's row lock, after a fresh GET."""
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            locked = await repository.must_get(conn, order.transaction_id, lock=True)
            if locked.status != S.PURCHASING or locked.zendit_transaction_id != zendit_id:
                raise CheckAgainLater(domain.FAST_POLL_SECONDS, "the order moved on meanwhile")
            found = await self._look_up(zendit_id)  # another worker may have placed it while we waited
            if found is not None:
                return found
            try:
                accepted = await self.zendit.purchase(transaction_id=zendit_id, offer_id=order.offer_id)
            except ZenditPermanentError as exc:
                # Refused. If it landed anyway (a duplicate id is refused by some accounts) we follow it;
                # if a GET confirms nothing exists, Zendit will not deliver: refundable.
                found = await self._look_up(zendit_id)
                if found is not None:
                    return found
                raise FailPermanently(exc.reason, exc.message[:200]) from exc
        log.info("zendit purchase placed", extra={"zendit_transaction_id": zendit_id})
        return Purchase(transaction_id=accepted.transaction_id, status=accepted.status)

    async def _wait(self, order: Order, purchase: Purchase | None) -> None:
        if purchase is not None and purchase.status.value != order.zendit_status:
            await repository.record_zendit_status(self.ctx.pool, order.transaction_id, purchase.status.value)
        elapsed = await repository.attempt_elapsed_seconds(self.ctx.pool, order.transaction_id)
        decision = domain.next_check(elapsed, self.ctx.settings.purchase_deadline_seconds)
        if isinstance(decision, domain.DeadlinePassed):
            count_outcome("deadline_exceeded")
            await self._hold_for_operator(order, domain.DEADLINE_REASON)
            return
        status = purchase.status.value if purchase is not None else "unknown (zendit unavailable)"
        raise CheckAgainLater(decision.delay_seconds, f"zendit purchase {status}")

    async def _deliver(self, order: Order, purchase: Purchase) -> None:
        confirmation = purchase.confirmation
        if confirmation is None or not confirmation.activation_code:
            raise IncompleteConfirmation(
                f"zendit purchase {purchase.transaction_id} is DONE without activation data"
            )
        try:
            lpa = confirmation.lpa
        except ValueError as exc:
            raise IncompleteConfirmation(f"zendit purchase {purchase.transaction_id}: {exc}") from exc
        png = qr.lpa_qr_png(lpa)
        url = await self.storage.save(order.transaction_id, png)
        provisioned = await repository.mark_provisioned(
            self.ctx.pool,
            order.transaction_id,
            qr_code_url=url,
            iccid=confirmation.iccid,
            smdp_address=confirmation.smdp_address,
            activation_code=confirmation.activation_code,
        )
        took = await repository.attempt_elapsed_seconds(self.ctx.pool, order.transaction_id)
        purchase_seconds.observe(took)
        count_outcome("done")
        log.info("esim provisioned", extra={"zendit_transaction_id": purchase.transaction_id})
        await self._announce(provisioned)

    async def _fund_again(self, order: Order) -> None:
        back = await repository.send_back_to_funding(
            self.ctx.pool,
            order.transaction_id,
            reason=domain.purchase_failure_reason(domain.INSUFFICIENT_FUNDS),
        )
        count_outcome("fund_again")
        log.warning(
            "zendit wallet was short after all: funding again",
            extra={"zendit_transaction_id": order.zendit_transaction_id, "attempt": order.purchase_attempts},
        )
        await self._announce_fund_again(back)

    async def _fail(self, order: Order, purchase: Purchase) -> None:
        await repository.record_zendit_status(self.ctx.pool, order.transaction_id, purchase.status.value)
        count_outcome("failed")
        raise FailPermanently(domain.purchase_failure_reason(purchase.error_code), "zendit purchase FAILED")

    # -- announcements (re-published on redelivery: a lost publish heals itself) ---------------------
    async def _announce(self, order: Order) -> None:
        if not order.qr_code_url or not order.zendit_transaction_id:
            raise RuntimeError(f"order {order.transaction_id} is {order.status.value} without its QR code")
        await self.ctx.publisher.publish(
            OrderProvisioned(
                transaction_id=order.transaction_id,
                zendit_transaction_id=order.zendit_transaction_id,
                qr_code_url=order.qr_code_url,
            )
        )

    async def _announce_fund_again(self, order: Order) -> None:
        if not order.stripe_payment_intent_id:
            raise RuntimeError(f"order {order.transaction_id} has no PaymentIntent to fund again from")
        await self.ctx.publisher.publish(
            OrderPaid(
                transaction_id=order.transaction_id,
                offer_id=order.offer_id,
                price=Money(order.price, order.currency),
                payment_intent_id=order.stripe_payment_intent_id,
            )
        )

    async def _hold_for_operator(self, order: Order, reason: str) -> None:
        if not await repository.hold_for_operator(self.ctx.pool, order.transaction_id, reason=reason):
            return
        operator_alerts_total.labels(reason=reason if reason in ALERT_REASONS else "other").inc()
        # The operator alert: Zendit may still deliver, so this order is neither refunded nor retried.
        log.error(
            "OPERATOR ALERT: zendit purchase unresolved, order needs attention",
            extra={
                "alert": "purchase_needs_attention",
                "reason": reason,
                "zendit_transaction_id": order.zendit_transaction_id,
            },
        )

    @staticmethod
    def _zendit_id(order: Order) -> str:
        if order.zendit_transaction_id:
            return order.zendit_transaction_id
        # Not reachable through start_attempt (it sets both in one transaction); derive it rather
        # than invent a new one, so a hand-edited row still maps to the same purchase.
        return domain.zendit_transaction_id(order.transaction_id, max(order.purchase_attempts, 1))
