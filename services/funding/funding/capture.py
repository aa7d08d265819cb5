"""Manual capture mode (CAPTURE_MODE=manual): take the authorised money once the customer has their eSIM.

    order.delivered ─┬─ automatic-capture order ───────────────────────────► ack (captured at checkout)
                     ├─ already captured ──────────────────────────────────► ack (a redelivery)
                     └─ manual: attempt n (capture_attempts), retrieve the PaymentIntent with its charge
                          requires_capture ─► capture in full, key `capture:{txn}:{n}` ─► captured
                          succeeded ──────────────────────────────────────────────────► captured
                          canceled, ... ─► FailPermanently ─► on_capture_failed
                          processing, or Stripe unreachable / 5xx / 429:
                              before the deadline ─► CheckAgainLater (1 s doubling, attempts unchanged)
                              after it ────────────► RetryLater: the 1/3/10 s tiers, then on_capture_failed
                                                     (retries_exhausted) and funding.order-delivered.dlq

    The deadline is the hold's end (the charge's `capture_before`, else authorisation + 7 days) minus
    CAPTURE_SAFETY_MARGIN (1 day): an outage of hours or days is waited out, and the operator still has a
    day to capture by hand when Stripe stays unreachable.

    on_capture_failed (Stripe refused for good, or the deadline passed):
        capture_status=failed + reason, operator alert (ERROR log + counter) once per distinct failure,
        order.failed(step=capture) on every run, which notify turns into one email to the operator. Never a
        refund or a cancellation here: the eSIM was delivered, so the money is owed; chasing it is a
        person's decision.

Why one idempotency key per attempt: Stripe saves a key's first result, a 500 included, and replays it for
24 h, so after one 500 a fixed `capture:{txn}` could not succeed for a day. A fresh key cannot capture
twice either: each attempt first retrieves the PaymentIntent and captures only a `requires_capture` one,
and Stripe refuses to capture one that is not (a concurrent or earlier capture answers
`payment_intent_unexpected_state`, after which we look again and find it `succeeded`). The counter lives
on the order because CheckAgainLater does not advance the message's attempt header.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NoReturn

import asyncpg

from esim_common.errors import CheckAgainLater, FailPermanently, RetryLater
from esim_common.events import OrderDelivered, OrderFailed
from esim_common.order_repository import Order, get_order
from esim_common.providers.stripe import (
    PaymentIntent,
    StripeGateway,
    StripePermanentError,
    StripeTransientError,
)
from esim_common.publisher import EventPublisher
from funding import repository as repo
from funding.domain import (
    CaptureFailureRecord,
    CaptureStep,
    IntentCapture,
    capture_deadline,
    capture_refusal_reason,
    capture_retry_delay,
    capture_step,
    intent_capture,
)
from funding.metrics import operator_alert, payment_captures_total

log = logging.getLogger("esim.funding.capture")


class OrderNotFound(LookupError):
    """order.delivered for an order this database does not have: a bug or a misrouted message (DLQ)."""


class OrderNotDelivered(Exception):
    """order.delivered for an order that is not delivered: a person must look (DLQ), nothing is captured."""


class CaptureNotYet(Exception):
    """Stripe could not capture now (unreachable, 5xx, 429, or the payment still processing)."""

    def __init__(self, detail: str, *, capture_before: int | None) -> None:
        super().__init__(detail)
        self.capture_before = capture_before  # when the hold ends, if Stripe told us


class CapturePayment:
    def __init__(
        self,
        *,
        pool: Callable[[], asyncpg.Pool],
        stripe: StripeGateway,
        publisher: EventPublisher,
    ) -> None:
        self._pool = pool
        self._stripe = stripe
        self._publisher = publisher

    async def on_order_delivered(self, event: OrderDelivered) -> None:
        """Manual capture mode: capture the delivered order's authorised payment, once."""
        order = await self._order(event.transaction_id)
        step = capture_step(
            capture_method=order.capture_method, status=order.status, capture_status=order.capture_status
        )
        if step is CaptureStep.NOT_REQUIRED:
            payment_captures_total.labels(outcome="not_required").inc()
            return
        if step is CaptureStep.DONE:
            payment_captures_total.labels(outcome="already_captured").inc()
            log.info("payment already captured")
            return
        if step is CaptureStep.NOT_DELIVERED:
            raise OrderNotDelivered(f"order {order.transaction_id} is {order.status.value}, not delivered")
        if not order.stripe_payment_intent_id:
            raise FailPermanently("no_payment_intent", "the order has no PaymentIntent to capture")

        attempt = await repo.count_capture_attempt(self._pool(), order.transaction_id)
        try:
            intent = await self._capture(order, order.stripe_payment_intent_id, attempt)
        except CaptureNotYet as not_yet:
            self._check_again_or_give_up(order, attempt, not_yet)
        newly = await repo.mark_captured(self._pool(), order.transaction_id)
        payment_captures_total.labels(outcome="captured" if newly else "already_captured").inc()
        log.info(
            "payment captured" if newly else "payment already captured",
            extra={
                "payment_intent_id": intent.id,
                "amount": intent.amount_received,
                "currency": intent.currency,
                "capture_attempt": attempt,
            },
        )

    async def on_capture_failed(self, event: OrderDelivered, reason: str) -> None:
        """The payment cannot be captured: record it, alert the operator once, announce order.failed.

        This hook runs again when its announcement failed (the message comes back through a retry tier):
        the failure is then recorded already, so only order.failed is published again."""
        txn = event.transaction_id
        recorded = await repo.record_capture_failure(self._pool(), txn, reason)
        if recorded is CaptureFailureRecord.CAPTURED:
            log.info(
                "capture failure not recorded: the payment was captured meanwhile", extra={"reason": reason}
            )
            return
        if recorded is CaptureFailureRecord.NOT_MANUAL:
            # e.g. the database failed through every tier while an automatic order's message was handled.
            log.warning("no capture to fail: the order was captured at checkout", extra={"reason": reason})
            return
        if recorded is CaptureFailureRecord.NEW:
            payment_captures_total.labels(outcome="failed").inc()
            order = await self._order(txn)
            operator_alert(
                "capture_failed",
                "OPERATOR ALERT: the payment of a delivered order could not be captured",
                capture_failure_reason=reason,
                payment_intent_id=order.stripe_payment_intent_id,
                amount=order.price,
                currency=order.currency,
            )
        else:
            log.info(
                "capture failure already recorded and alerted; announcing it again", extra={"reason": reason}
            )
        # notify emails the operator (once per order); reconcile logs and counts it.
        await self._publisher.publish(
            OrderFailed(transaction_id=txn, step="capture", reason=f"capture_failed: {reason}"[:200])
        )

    def _check_again_or_give_up(self, order: Order, attempt: int, not_yet: CaptureNotYet) -> NoReturn:
        """Always raises: CheckAgainLater before the deadline, RetryLater (the last tiers) after it."""
        capture_before = (
            datetime.fromtimestamp(not_yet.capture_before, UTC)
            if not_yet.capture_before is not None
            else None
        )
        deadline = capture_deadline(
            capture_before=capture_before, authorised_at=order.paid_at or order.created_at
        )
        delay = capture_retry_delay(attempt, now=datetime.now(UTC), deadline=deadline)
        facts = {"capture_attempt": attempt, "deadline": deadline.isoformat(), "error": str(not_yet)[:200]}
        if delay is None:
            log.error("capture deadline passed: giving up after the retry tiers", extra=facts)
            raise RetryLater(f"capture deadline {deadline.isoformat()} passed: {not_yet}") from not_yet
        payment_captures_total.labels(outcome="deferred").inc()
        log.warning("payment not capturable now, trying again later", extra={**facts, "delay_s": delay})
        raise CheckAgainLater(delay, f"capture attempt {attempt}: {not_yet}") from not_yet

    async def _capture(self, order: Order, payment_intent_id: str, attempt: int) -> PaymentIntent:
        """The captured PaymentIntent. Raises FailPermanently when Stripe will never capture it, and
        CaptureNotYet when it cannot now."""
        intent = await self._retrieve(payment_intent_id, capture_before=None)
        decision = intent_capture(intent.status)
        if decision is IntentCapture.ALREADY_CAPTURED:
            return intent
        if decision is IntentCapture.WAIT:
            raise CaptureNotYet(
                f"PaymentIntent {intent.id} is {intent.status}", capture_before=intent.capture_before
            )
        if decision is IntentCapture.REFUSED:
            raise FailPermanently(capture_refusal_reason(intent.status, intent.cancellation_reason))
        try:
            # In full: the webhook only let the order through when the authorised amount equalled its price.
            return await self._stripe.capture_payment_intent(
                transaction_id=order.transaction_id, payment_intent_id=intent.id, attempt=attempt
            )
        except StripeTransientError as exc:
            raise CaptureNotYet(str(exc), capture_before=intent.capture_before) from exc
        except StripePermanentError as refused:
            # The intent may have moved since we looked: captured by hand or by a concurrent delivery, or
            # its authorisation lapsed.
            now = await self._retrieve(intent.id, capture_before=intent.capture_before)
            if intent_capture(now.status) is IntentCapture.ALREADY_CAPTURED:
                return now
            if intent_capture(now.status) is IntentCapture.REFUSED:
                raise FailPermanently(
                    capture_refusal_reason(now.status, now.cancellation_reason), str(refused)
                ) from None
            raise

    async def _retrieve(self, payment_intent_id: str, *, capture_before: int | None) -> PaymentIntent:
        try:
            return await self._stripe.retrieve_payment_intent(payment_intent_id, with_charge=True)
        except StripeTransientError as exc:
            raise CaptureNotYet(str(exc), capture_before=capture_before) from exc

    async def _order(self, transaction_id: str) -> Order:
        order = await get_order(self._pool(), transaction_id)
        if order is None:
            raise OrderNotFound(f"order {transaction_id} does not exist")
        return order
