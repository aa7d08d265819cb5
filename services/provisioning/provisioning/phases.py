"""The purchase of one order as resumable phases; every redelivery picks up where the last one stopped.

    start      funded → purchasing, attempt n with Zendit id `<txn>` / `<txn>-r<n>` (one transaction)
    look       GET the purchase; 404 → place it: lock the row, GET again, POST (never POST otherwise).
               Only the delivery that has just started the attempt skips the first GET (nothing can
               be there yet but what the GET under the lock sees)
    wait       not final → record its status, CheckAgainLater (the consumer is free meanwhile);
               past PURCHASE_DEADLINE_SECONDS → needs_attention + operator alert (never refunded)
    complete   a final purchase settles the order under its row lock, once (`_complete`):
      deliver    DONE → zendit_status DONE recorded → LPA (none: needs_attention) → QR PNG read back
                 as the LPA (ours; else Zendit's, read back too; else needs_attention) → storage,
                 all before the lock → under it: provisioned + facts → order.provisioned (queued in
                 the outbox with the state change; published once, whoever delivers next). With
                 ZENDIT_QR_CROSS_CHECK, Zendit's image is read too; if it reads otherwise, ours is
                 still delivered and an operator.alert (qr_mismatch) is queued with it
      fund again FAILED INSUFFICIENT_FUNDS → funding → order.paid (the next attempt gets a new id)
      fail       FAILED otherwise → purchase_failed → FailPermanently(zendit_<code>) → `on_failure`
                 refunds once (so does a POST Zendit refused when a GET then finds nothing: `_place`)

Only the state `purchase_failed` (entered under the row lock) makes an order refundable, never the
reason a failure carries (`domain.refund_is_safe`).

Transient errors while a purchase may exist are not retried through the consumer's three tiers (14 s
would turn a short outage into operator work, or worse a refund while Zendit still delivers): they are
waited out like an unfinished purchase, until the same deadline. That holds for Zendit while polling,
and for a DONE purchase whose QR code cannot be stored (QrStorageError) or whose Zendit image, needed
as the fallback, cannot be fetched just now; past the deadline an operator gets the order.

needs_attention is entered with its `operator.alert` queued in the same transaction (outbox) and
published after the commit; a redelivery that finds the order there publishes it if it is still
pending, and so does the failure path when the retries ran out on that very publish. (A periodic
outbox relay in the reconcile service is planned for what even that cannot publish.)

Zendit webhooks (`on_purchase_hint`) only make us look sooner. A hint names a purchase; if the order
still waits for exactly that purchase, we GET it with our own key (nothing from the webhook's body is
used) and, when it is final, settle it through the same `_complete` as the poll. The order's
`order.funded` message — the scheduled poll — keeps owning it: a hint never places a purchase, never
waits, and never refunds or re-funds (after a hint settled a failure, the poll's next look follows
the new state: `order.paid` for INSUFFICIENT_FUNDS, the failure path's refund otherwise). The only
thing a hint completes by itself is a delivery, the one step the customer is waiting for; a hint for an
order already provisioned re-publishes its `order.provisioned` if that is still in the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncpg

from esim_common import outbox
from esim_common.compensation import fail_and_refund
from esim_common.errors import CheckAgainLater, FailPermanently
from esim_common.events import (
    OperatorAlert,
    OrderFunded,
    OrderPaid,
    OrderProvisioned,
    PurchaseUpdateHint,
)
from esim_common.money import Money
from esim_common.order_repository import Order, get_order
from esim_common.order_states import OrderStatus
from esim_common.providers.stripe import StripeGateway
from esim_common.providers.zendit import (
    Purchase,
    ZenditClient,
    ZenditError,
    ZenditNotFound,
    ZenditPermanentError,
    ZenditTransientError,
)
from esim_common.service import ServiceContext
from provisioning import domain, qr, repository
from provisioning.domain import Outcome, QrCheck, QrSource, Step
from provisioning.metrics import (
    HintOutcome,
    PurchaseOutcome,
    count_outcome,
    operator_alerts_total,
    purchase_hints_total,
    purchase_seconds,
    qr_codes_total,
    zendit_qr_checks_total,
)
from provisioning.storage import QrStorage, QrStorageError

log = logging.getLogger("esim.provisioning")

S = OrderStatus
UNREADABLE_REASON = "purchase_status_unreadable"
# Operator-alert reasons are a metric label: anything unexpected is counted as "other".
ALERT_REASONS = frozenset(
    {
        domain.DEADLINE_REASON,
        domain.QR_DEADLINE_REASON,
        UNREADABLE_REASON,
        "retries_exhausted",
        domain.QR_UNVERIFIED_REASON,
        domain.CONFIRMATION_INCOMPLETE_REASON,
        domain.QR_MISMATCH_REASON,
    }
)
# A DONE purchase whose QR code cannot be made and stored just now: waited out like an open purchase.
QR_NOT_STORED_YET = (QrStorageError, ZenditTransientError)
_OUTCOME_LABELS: dict[Outcome, PurchaseOutcome] = {
    Outcome.DONE: "done",
    Outcome.FUND_AGAIN: "fund_again",
    Outcome.FAILED: "failed",
}


@dataclass(frozen=True)
class QrCode:
    """The PNG the customer gets (read back as the LPA string), whose rendering it is, and whether
    ZENDIT_QR_CROSS_CHECK found Zendit's own image reading as another string."""

    png: bytes = field(repr=False)
    source: QrSource
    zendit_disagrees: bool = False


@dataclass
class Provisioner:
    ctx: ServiceContext
    zendit: ZenditClient
    stripe: StripeGateway
    storage: QrStorage
    # When a Zendit webhook hint last reached this process (time.monotonic()): `domain.hints_arrive`.
    last_hint_at: float | None = field(default=None, init=False)

    # -- entry points (the consumers' handlers and failure hooks) ------------------------------------
    async def on_order_funded(self, event: OrderFunded) -> None:
        # One connection for the read and, for a funded order, the attempt it starts; released before
        # anything calls Zendit.
        just_started = False
        async with self.ctx.pool.acquire() as conn:
            order = await repository.must_get(conn, event.transaction_id)
            if domain.next_step(order.status, order.purchase_attempts) == Step.START:
                order, just_started = await self._start_attempt(conn, order)
        await self._follow(order, just_started=just_started)

    async def on_failure(self, event: OrderFunded, reason: str) -> None:
        """The failure path: refund once when the order says Zendit will not deliver (purchase_failed);
        otherwise an operator decides, and what is still queued for them or the customer goes out.

        Raising here (the broker still refusing a publish) sends the message to the DLQ with the error
        in its header. A periodic outbox relay (planned in the reconcile service) will publish what is
        left unpublished even then.
        """
        order = await repository.must_get(self.ctx.pool, event.transaction_id)
        if domain.refund_is_safe(order.status):
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
        elif order.status == S.NEEDS_ATTENTION:
            # Held already; the retries may have run out on publishing its alert (Step.ALERT).
            alert = repository.needs_attention_alert(order, order.failure_reason or reason)
            published = await self._publish_alert(alert)
            log.error(
                "failure path: the order is with an operator already, nothing to refund",
                extra={"reason": reason, "alert_key": alert.alert_key, "alert_published_now": published},
            )
        elif order.status in (S.PROVISIONED, S.DELIVERED):
            # Delivered: nothing to refund. The retries may have run out on announcing it (or on its
            # cross-check alert): both go out now, or the raise sends the message to the DLQ.
            await self._announce(order)
            log.error(
                "failure path after the eSIM was provisioned: nothing to refund, announcements published",
                extra={"reason": reason, "status": order.status.value},
            )
        else:
            log.error(
                "failure path: nothing for provisioning to compensate in this state",
                extra={"reason": reason, "status": order.status.value},
            )

    async def on_purchase_hint(self, hint: PurchaseUpdateHint) -> None:
        """Zendit's webhook says a purchase changed: look at it now instead of at the next poll."""
        self.last_hint_at = time.monotonic()
        zendit_id = hint.zendit_transaction_id
        order = await get_order(self.ctx.pool, hint.transaction_id)
        if order is not None and order.status == S.PROVISIONED:
            # Settled already, but its order.provisioned may be stuck in the outbox (the publish after
            # the commit failed): announcing is a no-op once published, so the hint heals it for free.
            await self._announce(order)
            self._count_hint("already_settled", "hinted purchase was settled already", zendit_id)
            return
        if order is None or not domain.awaits_purchase(order.status, self._zendit_id(order), zendit_id):
            # Delivered, failed, another attempt by now, or not ours: nothing to look at.
            status = order.status.value if order is not None else "unknown"
            self._count_hint("ignored", "purchase hint ignored", zendit_id, status=status)
            return
        purchase = await self._look_up(zendit_id)  # our own key; 401/403 → the hint's failure hook
        if purchase is None:
            # Not (yet) visible: placing it is the poll's job, under its lock.
            self._count_hint("not_found", "hinted purchase not found at zendit", zendit_id)
            return
        outcome = domain.outcome_of(purchase.status.value, purchase.error_code, order.purchase_attempts)
        if outcome == Outcome.PENDING:
            self._count_hint(
                "pending",
                "hinted purchase not final, the poll goes on",
                zendit_id,
                status=purchase.status.value,
            )
            return
        settled, changed = await self._complete(order, zendit_id, purchase, outcome, source="hint")
        if not changed:
            self._count_hint("already_settled", "hinted purchase was settled already", zendit_id)
            return
        self._count_hint("completed", "hinted purchase settled", zendit_id, settled_as=outcome.value)
        if settled.status == S.PROVISIONED:
            await self._announce(settled)

    async def on_hint_failure(self, hint: PurchaseUpdateHint, reason: str) -> None:
        """A hint we could not act on is dropped, never compensated: the scheduled poll still owns the
        order and reaches the same purchase by itself (a refund here could pay back an eSIM that
        Zendit is about to deliver)."""
        self._count_hint("failed", "purchase hint dropped", hint.zendit_transaction_id, reason=reason)

    # -- phases --------------------------------------------------------------------------------------
    async def _follow(self, order: Order, *, just_started: bool = False) -> None:
        """Do what the order's state asks of an `order.funded` delivery (see `domain.next_step`);
        `just_started`: this delivery has just started the attempt (`_current_purchase`)."""
        step = domain.next_step(order.status, order.purchase_attempts)
        if step == Step.START:
            async with self.ctx.pool.acquire() as conn:
                order, just_started = await self._start_attempt(conn, order)
            step = domain.next_step(order.status, order.purchase_attempts)
        if step == Step.CONTINUE:
            await self._advance(order, just_started=just_started)
        elif step == Step.ANNOUNCE:
            await self._announce(order)
        elif step == Step.FUND_AGAIN:
            await self._announce_fund_again(order)
        elif step == Step.FINISH_REFUND:
            raise FailPermanently(order.failure_reason or "purchase_failed", "resuming the refund")
        elif step == Step.ALERT:
            await self._publish_alert(repository.needs_attention_alert(order, order.failure_reason or ""))
        elif step in (Step.IGNORE, Step.START):
            log.info("order.funded ignored", extra={"status": order.status.value})

    async def _start_attempt(self, conn: asyncpg.Connection, order: Order) -> tuple[Order, bool]:
        """The order after `repository.start_attempt`, and whether this call started its attempt."""
        started, by_us = await repository.start_attempt(conn, order.transaction_id)
        if by_us:
            log.info(
                "purchase attempt started", extra={"zendit_transaction_id": started.zendit_transaction_id}
            )
        return started, by_us

    async def _advance(self, order: Order, *, just_started: bool = False) -> None:
        zendit_id = self._zendit_id(order)
        try:
            purchase = await self._current_purchase(order, just_started=just_started)
        except ZenditTransientError as exc:
            log.warning("zendit unavailable, looking again later", extra={"error": exc.message[:200]})
            await self._wait(order, None)
            return
        outcome = domain.outcome_of(purchase.status.value, purchase.error_code, order.purchase_attempts)
        if outcome == Outcome.PENDING:
            await self._wait(order, purchase)
            return
        try:
            settled, changed = await self._complete(order, zendit_id, purchase, outcome, source="poll")
        except QR_NOT_STORED_YET as exc:
            # Zendit delivered, but storage (or Zendit's image, needed as the fallback) is down just
            # now: looked at again with the poll's backoff, not the retry tiers, until the deadline.
            log.warning(
                "the QR code could not be stored yet, trying again later", extra={"error": _short(exc)}
            )
            await self._wait(order, purchase, deadline_reason=domain.QR_DEADLINE_REASON)
            return
        if not changed:
            log.info("purchase settled by another worker", extra={"status": settled.status.value})
        if settled.status == S.PURCHASING:  # a later attempt began meanwhile: that one is looked at next
            raise CheckAgainLater(domain.FAST_POLL_SECONDS, "the order moved to another attempt")
        # Whoever settled it, the poll carries on from the new state: announce, fund again, or refund.
        await self._follow(settled)

    async def _current_purchase(self, order: Order, *, just_started: bool) -> Purchase:
        """The attempt's purchase at Zendit, placed first if Zendit has none (`_place`).

        Looked up without the row lock first, so that a slow Zendit (a brownout: GETs that take the
        whole HTTP timeout) holds neither the row nor a pooled connection. Only the delivery that has
        just started the attempt goes straight to `_place`, whose GET under the lock is then the one
        look: nothing but a racing duplicate can have placed it yet, and that GET sees it. A missing
        zendit_status is not enough to skip the look: a poll after a Zendit error records none.
        """
        zendit_id = self._zendit_id(order)
        if just_started:
            return await self._place(order, zendit_id)
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
        refused: ZenditPermanentError | None = None
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            locked = await repository.must_get(conn, order.transaction_id, lock=True)
            if locked.status != S.PURCHASING or self._zendit_id(locked) != zendit_id:
                raise CheckAgainLater(domain.FAST_POLL_SECONDS, "the order moved on meanwhile")
            found = await self._look_up(zendit_id)  # another worker may have placed it while we waited
            if found is not None:
                return found
            try:
                accepted = await self.zendit.purchase(transaction_id=zendit_id, offer_id=order.offer_id)
            except ZenditPermanentError as exc:
                # Refused. If it landed anyway (a duplicate id is refused by some accounts) we follow it;
                # if a GET confirms nothing exists, Zendit will not deliver: purchase_failed, committed
                # with the lock still held, is what makes the failure path refund it.
                found = await self._look_up(zendit_id)
                if found is not None:
                    return found
                if locked.zendit_status is not None:
                    # We have seen this purchase at Zendit before: a 404 now is Zendit's error, not proof
                    # that nothing will be delivered. An operator looks; never a refund.
                    raise FailPermanently(
                        UNREADABLE_REASON, "a purchase seen before is now refused and not found"
                    ) from exc
                await repository.mark_purchase_refused(conn, order.transaction_id, reason=exc.reason)
                refused = exc
        if refused is not None:
            count_outcome("failed")
            raise FailPermanently(refused.reason, refused.message[:200]) from refused
        log.info("zendit purchase placed", extra={"zendit_transaction_id": zendit_id})
        return Purchase(transaction_id=accepted.transaction_id, status=accepted.status)

    async def _wait(
        self, order: Order, purchase: Purchase | None, *, deadline_reason: str = domain.DEADLINE_REASON
    ) -> None:
        if purchase is not None and purchase.status.value != order.zendit_status:
            elapsed = await repository.record_zendit_status_and_elapsed(
                self.ctx.pool, order.transaction_id, self._zendit_id(order), purchase.status.value
            )
        else:
            elapsed = await repository.attempt_elapsed_seconds(self.ctx.pool, order.transaction_id)
        decision = domain.next_check(
            elapsed, self.ctx.settings.purchase_deadline_seconds, hints_arrive=self._hints_arrive()
        )
        if isinstance(decision, domain.DeadlinePassed):
            count_outcome("deadline_exceeded")
            await self._hold_for_operator(order, deadline_reason)
            return
        status = purchase.status.value if purchase is not None else "unknown (zendit unavailable)"
        raise CheckAgainLater(decision.delay_seconds, f"zendit purchase {status}")

    async def _complete(
        self, order: Order, zendit_id: str, purchase: Purchase, outcome: Outcome, *, source: str
    ) -> tuple[Order, bool]:
        """Settle the order with its final purchase `zendit_id`: the one place an attempt ends.

        The scheduled poll and a webhook hint can see the same DONE at the same moment. The decision
        is taken under the order's row lock and only while the order still waits for this purchase,
        so exactly one of them moves the order; the other gets `(order as it is now, False)` and
        changes nothing.

        A DONE purchase's QR code is made, checked and stored before the lock is taken: Zendit's image
        (the fallback, the cross-check) and the upload (Supabase) are HTTP calls that must not hold
        the row (and a pooled connection) while they wait. Racers may both do that work: each stores
        the same verified image under the same name, so the loser's store is harmless; only the
        winner of the lock records its URL. Storage errors raise (QrStorageError: the poll waits
        them out); nothing has changed then but the recorded Zendit status. A look that is stale
        already (the guarded write of DONE changes nothing) does no QR work at all (`_record_done`).
        """
        qr_code, url = None, ""
        if outcome == Outcome.DONE:
            moved_on = await self._record_done(order.transaction_id, zendit_id)
            if moved_on is not None:  # settled meanwhile, or another attempt: no QR work for a stale look
                return moved_on, False
            qr_code = await self._qr_code(purchase)
            url = await self.storage.save(order.transaction_id, qr_code.png)
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            locked, elapsed = await repository.lock_for_settling(conn, order.transaction_id)
            if not domain.awaits_purchase(locked.status, self._zendit_id(locked), zendit_id):
                return locked, False
            if qr_code is not None:
                settled = await self._deliver(conn, locked, purchase, qr_code, url)
            elif outcome == Outcome.FUND_AGAIN:
                short = domain.purchase_failure_reason(domain.INSUFFICIENT_FUNDS)
                settled = await repository.send_back_to_funding(conn, locked.transaction_id, reason=short)
            else:
                settled = await repository.mark_purchase_failed(
                    conn, locked.transaction_id, reason=domain.purchase_failure_reason(purchase.error_code)
                )
        count_outcome(_OUTCOME_LABELS[outcome])
        details = {"zendit_transaction_id": zendit_id, "source": source, "attempt": locked.purchase_attempts}
        if qr_code is not None:
            qr_codes_total.labels(source=qr_code.source.value).inc()
            purchase_seconds.observe(elapsed)
            log.info("esim provisioned", extra={**details, "qr_source": qr_code.source.value})
            if qr_code.zendit_disagrees:  # its operator.alert is in the outbox: announced with the order
                operator_alerts_total.labels(reason=domain.QR_MISMATCH_REASON).inc()
                log.error(
                    "OPERATOR ALERT: zendit's QR code reads differently from the one delivered",
                    extra={"alert": domain.QR_MISMATCH_REASON, "zendit_transaction_id": zendit_id},
                )
        elif outcome == Outcome.FUND_AGAIN:
            log.warning("zendit wallet was short after all: funding again", extra=details)
        else:
            log.warning("zendit purchase FAILED", extra={**details, "reason": settled.failure_reason})
        return settled, True

    async def _record_done(self, transaction_id: str, zendit_id: str) -> Order | None:
        """Record DONE as the attempt's Zendit status (an order that goes to an operator from here on
        is reported as DONE); the order as it is now if it no longer waits for that purchase.

        The write is guarded like `domain.awaits_purchase`, so when it lands the order still waits and
        need not be read; only when it changed nothing is the order read and asked (a row without a
        recorded Zendit id still waits for the derived one)."""
        if await repository.record_zendit_status(self.ctx.pool, transaction_id, zendit_id, domain.DONE):
            return None
        current = await repository.must_get(self.ctx.pool, transaction_id)
        return (
            None if domain.awaits_purchase(current.status, self._zendit_id(current), zendit_id) else current
        )

    async def _deliver(
        self, conn: asyncpg.Connection, order: Order, purchase: Purchase, qr_code: QrCode, url: str
    ) -> Order:
        """Mark the order provisioned with its stored QR code's URL (the caller holds the lock)."""
        confirmation = purchase.confirmation
        assert confirmation is not None  # `_qr_code` refused a DONE purchase without one
        provisioned = await repository.mark_provisioned(
            conn,
            order.transaction_id,
            qr_code_url=url,
            iccid=confirmation.iccid,
            smdp_address=confirmation.smdp_address,
            activation_code=confirmation.activation_code,
        )
        # Queued in the same transaction as the state change: it cannot be lost, only delayed.
        await outbox.add(conn, self._provisioned_event(provisioned))
        if qr_code.zendit_disagrees:
            await outbox.add(conn, repository.qr_mismatch_alert(provisioned))
        return provisioned

    # -- the QR code: ours read back; Zendit's as the fallback and, optionally, as a cross-check ------
    async def _qr_code(self, purchase: Purchase) -> QrCode:
        """The QR code of a DONE purchase, proven to read as its LPA string (`domain.qr_to_deliver`).

        Ours when it reads back (and, with ZENDIT_QR_CROSS_CHECK, whether Zendit's image disagrees);
        otherwise Zendit's image, only if it reads as exactly the same string. Neither →
        FailPermanently(qr_unverified); no activation data → FailPermanently(confirmation_incomplete):
        the failure path hands the order (still purchasing) to an operator and never refunds it
        (Zendit delivered). A transient error fetching Zendit's image as the fallback is raised (the
        poll waits it out, `QR_NOT_STORED_YET`).
        """
        lpa = self._lpa_of(purchase)
        ours = await self._our_verified_qr(lpa)
        if ours is not None:
            cross_check = self.ctx.settings.zendit_qr_cross_check
            disagrees = cross_check and await self._zendit_disagrees(purchase.transaction_id, lpa)
            return QrCode(png=ours, source=QrSource.OURS, zendit_disagrees=disagrees)
        zendit_png, check = await self._zendit_fallback(purchase, lpa)
        if domain.qr_to_deliver(ours_verified=False, zendit=check) == QrSource.ZENDIT and zendit_png:
            log.warning("our QR code could not be verified: delivering Zendit's, which reads as the LPA")
            return QrCode(png=zendit_png, source=QrSource.ZENDIT)
        raise FailPermanently(
            domain.QR_UNVERIFIED_REASON,
            f"no QR code reads as the LPA string of zendit purchase {purchase.transaction_id} "
            f"(ours: not verified; zendit's: {check.value if check else 'not checked, no decoder'})",
        )

    async def _zendit_fallback(self, purchase: Purchase, lpa: str) -> tuple[bytes | None, QrCheck | None]:
        """Zendit's image of the purchase and how it reads; (None, None) when nothing can be decoded."""
        if not qr.can_decode():
            return None, None
        png: bytes | None
        try:
            image = await self.zendit.get_qrcode(purchase.transaction_id)  # transient: raised, waited out
        except ZenditPermanentError as exc:
            # Zendit has no image for us: as good as one that does not read (an operator, no refund).
            log.error("zendit's QR code unavailable", extra={"error": exc.message[:200]})
            png, check = None, QrCheck.UNAVAILABLE
        else:
            png, check = image, domain.qr_check(await asyncio.to_thread(qr.codes_in, image), lpa)
        zendit_qr_checks_total.labels(check="fallback", outcome=check.value).inc()
        return png, check

    @staticmethod
    def _lpa_of(purchase: Purchase) -> str:
        """The LPA string of a DONE purchase; without activation data, only a person can get it from
        Zendit: FailPermanently holds the order for an operator (it is still purchasing: no refund)."""
        confirmation = purchase.confirmation
        problem = "no activation data"
        if confirmation is not None and confirmation.activation_code:
            try:
                return confirmation.lpa
            except ValueError as exc:  # lpa_string's messages name the field, never its value
                problem = f"unusable activation data ({exc})"
        raise FailPermanently(
            domain.CONFIRMATION_INCOMPLETE_REASON,
            f"zendit purchase {purchase.transaction_id} is DONE with {problem}",
        )

    @staticmethod
    async def _our_verified_qr(lpa: str) -> bytes | None:
        """Our rendering, read back as exactly `lpa`; None when that cannot be shown. Rendered and
        decoded in a worker thread: a few ms of CPU that would stall every other handler's I/O."""
        try:
            return await asyncio.to_thread(qr.lpa_qr_png, lpa)
        except qr.QrDecoderMissing:
            log.error("zxing-cpp is not installed: no QR code can be read back before delivery")
            return None
        except qr.QrVerificationFailed as exc:
            log.error("our QR code does not read back as the LPA string", extra={"error": str(exc)})
            return None

    async def _zendit_disagrees(self, zendit_id: str, lpa: str) -> bool:
        """ZENDIT_QR_CROSS_CHECK: does Zendit's own image of the purchase read as another string?

        It never holds up the delivery: ours read back as the LPA string built from the confirmation,
        the source of truth, so ours goes out either way and a disagreement is an operator's to judge
        (`domain.cross_check_alerts`). An image Zendit cannot give us now is only counted.
        """
        try:
            async with asyncio.timeout(domain.CROSS_CHECK_TIMEOUT_SECONDS):
                png = await self.zendit.get_qrcode(zendit_id)
        except (ZenditError, TimeoutError) as exc:
            log.warning("zendit's QR code unavailable to cross-check", extra={"error": _short(exc)})
            check = QrCheck.UNAVAILABLE
        else:
            check = domain.qr_check(await asyncio.to_thread(qr.codes_in, png), lpa)
        zendit_qr_checks_total.labels(check="cross_check", outcome=check.value).inc()
        return domain.cross_check_alerts(check)

    # -- announcements: order.provisioned once (outbox); order.paid again on a redelivery (idempotent) -
    @staticmethod
    def _provisioned_event(order: Order) -> OrderProvisioned:
        if not order.qr_code_url or not order.zendit_transaction_id:
            raise RuntimeError(f"order {order.transaction_id} is {order.status.value} without its QR code")
        return OrderProvisioned(
            event_id=repository.order_provisioned_event_id(order.transaction_id),
            transaction_id=order.transaction_id,
            zendit_transaction_id=order.zendit_transaction_id,
            qr_code_url=domain.shareable_qr_url(order.qr_code_url),
        )

    async def _announce(self, order: Order) -> None:
        """Publish the order's order.provisioned unless it was published (and confirmed) before, and
        the cross-check's alert queued with the delivery, if any.

        One unlocked read tells which of the two still need publishing: usually neither (a redelivery,
        a late poll) or only order.provisioned; `outbox.publish_pending` takes those under their lock."""
        event = self._provisioned_event(order)
        alert = repository.qr_mismatch_alert(order)
        published = await repository.outbox_published(self.ctx.pool, [event.event_id, alert.event_id])
        if event.event_id not in published:
            # Orders provisioned before the outbox was used for this event have no row yet.
            async with self.ctx.pool.acquire() as conn:
                await outbox.add(conn, event)
        if published.get(event.event_id) or not await outbox.publish_pending(
            self.ctx.pool, self.ctx.publisher, event
        ):
            log.info("order.provisioned was announced already")
        if published.get(alert.event_id) is False:  # queued and not published yet (no row: no alert)
            await self._publish_alert(alert)

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
        moved, alert = await repository.hold_for_operator(self.ctx.pool, order.transaction_id, reason=reason)
        if moved:
            operator_alerts_total.labels(reason=reason if reason in ALERT_REASONS else "other").inc()
            # Zendit may still deliver (or did, without a QR code we can vouch for): this order is
            # neither refunded nor retried; the operator.alert below tells a person.
            log.error(
                "OPERATOR ALERT: zendit purchase unresolved, order needs attention",
                extra={
                    "alert": "purchase_needs_attention",
                    "reason": reason,
                    "zendit_transaction_id": order.zendit_transaction_id,
                },
            )
        if alert is not None:
            await self._publish_alert(alert)

    async def _publish_alert(self, alert: OperatorAlert) -> bool:
        """Publish the queued operator.alert unless it was published before (no row: not ours, no-op);
        True when this call published it. A failed publish raises (a transient error): the
        redelivery's Step.ALERT publishes it, or the failure path once the retries have run out."""
        published = await outbox.publish_pending(self.ctx.pool, self.ctx.publisher, alert)
        if published:
            log.info("operator alert published", extra={"alert_key": alert.alert_key})
        return published

    @staticmethod
    def _count_hint(outcome: HintOutcome, message: str, zendit_id: str, **details: object) -> None:
        purchase_hints_total.labels(outcome=outcome).inc()
        log_line = log.warning if outcome == "failed" else log.info
        log_line(message, extra={"zendit_transaction_id": zendit_id, "hint_outcome": outcome, **details})

    def _hints_arrive(self) -> bool:
        since = None if self.last_hint_at is None else time.monotonic() - self.last_hint_at
        return domain.hints_arrive(since)

    @staticmethod
    def _zendit_id(order: Order) -> str:
        return domain.current_zendit_id(
            order.transaction_id, order.zendit_transaction_id, order.purchase_attempts
        )


def _short(exc: BaseException) -> str:
    """An error for a log line: its message (provider errors carry no secrets), cut short."""
    text = exc.message if isinstance(exc, ZenditError) else str(exc)
    return (text or type(exc).__name__)[:200]
