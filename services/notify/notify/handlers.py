"""Notify's consumers: the eSIM email, the failure email and operator alerts, each sent once.

notify.order-provisioned  on_order_provisioned   provisioned → delivered, publishes order.delivered;
                                                 an SMTP relay that is down or refusing us: wait
                                                 (CheckAgainLater, backoff) up to EMAIL_GIVE_UP_SECONDS
                          on_delivery_failed     (failure path) provisioned → needs_attention, with
                                                 order.failed(step=delivery) in the outbox
notify.order-failed       on_order_failed        customer email; operator email for refund/delivery
                          on_failure_email_failed (failure path) logs an operator alert
notify.operator-alert     on_operator_alert      operator email, once per alert_key
                          on_alert_email_failed  (failure path) logs the alert, and the message is
                                                 kept in notify.operator-alert.dlq for a replay
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Protocol

from esim_common import outbox
from esim_common.consumer import consume
from esim_common.errors import CheckAgainLater, FailPermanently, TransientError
from esim_common.events import OperatorAlert, OrderDelivered, OrderFailed, OrderProvisioned
from esim_common.order_repository import Order, get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.service import ServiceContext
from notify import domain, emails
from notify.compose import Draft
from notify.mailer import EmailRejected, EmailTransientError, SmtpRelayError
from notify.metrics import (
    emails_total,
    operator_alert_emails_failed_total,
    operator_alerts_total,
    smtp_relay_errors_total,
    smtp_relay_failing,
    time_to_esim,
)
from notify.sent_emails import SendOutcome, send_once

log = logging.getLogger("esim.notify")


class Mailer(Protocol):
    async def send(self, message: EmailMessage) -> None: ...


class UnknownOrder(LookupError):
    """An event names an order this database does not have: a bug or a misrouted message (DLQ)."""


def delivery_failed_event(transaction_id: str, reason: str = "email_failed") -> OrderFailed:
    """order.failed(step=delivery) of one order; its id is stable so the outbox holds one per order
    (a lookup copy made without the reason publishes the queued version)."""
    return OrderFailed(
        event_id=outbox.stable_event_id(f"order.failed:delivery:{transaction_id}"),
        transaction_id=transaction_id,
        step="delivery",
        reason=reason,
    )


def _observe_time_to_esim(order: Order) -> None:
    """emailed_at - paid_at, with emailed_at taken as now: the transition just stamped it with the
    database's now(), and reading it back would cost a round trip per order."""
    if order.paid_at is not None:
        time_to_esim.observe(max(0.0, (datetime.now(UTC) - order.paid_at).total_seconds()))


class Notifier:
    def __init__(self, ctx: ServiceContext, mailer: Mailer) -> None:
        self._ctx = ctx
        self._mailer = mailer
        self._relay_failing = False  # this process has raised the smtp_relay_failing alert

    async def on_order_provisioned(self, event: OrderProvisioned) -> None:
        """Email the customer their eSIM once, then mark the order delivered and announce it."""
        txn = event.transaction_id
        order = await self._order(txn)
        decision = domain.delivery_decision(order.status)
        if decision is domain.DeliveryDecision.SKIP:
            log.warning("not delivering: the order is not provisioned", extra={"status": order.status.value})
            emails_total.labels(template=domain.TEMPLATE_ESIM_DELIVERY, outcome="skipped").inc()
            if order.status is OrderStatus.NEEDS_ATTENTION:
                # The failure path queued order.failed with the move; publish it if that publish was lost.
                await outbox.publish_pending(self._ctx.pool, self._ctx.publisher, delivery_failed_event(txn))
            return
        if decision is domain.DeliveryDecision.SEND:
            draft = emails.esim_delivery_email(order, self._ctx.settings)
            try:
                await self._send_once(draft, txn, domain.TEMPLATE_ESIM_DELIVERY)
            except EmailTransientError as exc:
                self._wait_for_smtp(order, exc)
            async with self._ctx.pool.acquire() as conn:
                moved = await transition(conn, txn, OrderStatus.DELIVERED, reason="eSIM emailed")
            if moved.changed:  # only the delivery that moved it: a redelivery finds it delivered
                _observe_time_to_esim(order)
        await self._ctx.publisher.publish(OrderDelivered(transaction_id=txn))

    def _wait_for_smtp(self, order: Order, exc: EmailTransientError) -> None:
        """Always raises: CheckAgainLater (backoff) until EMAIL_GIVE_UP_SECONDS after the QR was stored,
        then FailPermanently (the failure path: needs_attention and an operator alert)."""
        due_since = order.qr_stored_at or order.updated_at
        waited = (datetime.now(UTC) - due_since).total_seconds()
        delay = domain.email_retry_delay(waited, self._ctx.settings.email_give_up_seconds)
        if delay is None:
            log.error("giving up on the eSIM email", extra={"reason": exc.reason, "waited_s": round(waited)})
            raise FailPermanently(exc.reason, str(exc)) from exc
        log.warning(
            "eSIM email not accepted; trying again later", extra={"reason": exc.reason, "delay_s": delay}
        )
        raise CheckAgainLater(delay, f"eSIM email waiting for the SMTP relay: {exc.reason}") from exc

    async def on_delivery_failed(self, event: OrderProvisioned, reason: str) -> None:
        """The eSIM email failed for good: the order waits for an operator, who is alerted. The move to
        needs_attention and its order.failed commit together (outbox); the publish follows."""
        txn = event.transaction_id
        log.error(
            "OPERATOR ALERT: the eSIM email could not be delivered",
            extra={"alert": "operator", "step": "delivery", "reason": reason},
        )
        operator_alerts_total.labels(step="delivery").inc()
        order = await self._order(txn)
        if order.status not in (OrderStatus.PROVISIONED, OrderStatus.NEEDS_ATTENTION):
            log.warning("delivery failure not recorded: order moved on", extra={"status": order.status.value})
            return
        failure = domain.delivery_failure_reason(reason)
        if order.status is OrderStatus.PROVISIONED:
            async with self._ctx.pool.acquire() as conn, conn.transaction():
                await transition(conn, txn, OrderStatus.NEEDS_ATTENTION, failure_reason=failure)
                await outbox.add(conn, delivery_failed_event(txn, failure))
        await outbox.publish_pending(self._ctx.pool, self._ctx.publisher, delivery_failed_event(txn))

    async def on_order_failed(self, event: OrderFailed) -> None:
        """Tell the customer once what happened and whether they were refunded; email the operator
        once when only a person can resolve it (the refund failed, or the eSIM email did)."""
        order = await self._order(event.transaction_id)
        settings = self._ctx.settings
        failures: list[Exception] = []
        # Each email is attempted whatever happened to the other (a refused customer address must not
        # keep the operator uninformed); the first error then decides the message's fate.
        if domain.customer_is_told(event.step):
            draft = emails.order_failed_email(order, event, settings)
            try:
                await self._send_once(draft, order.transaction_id, domain.TEMPLATE_ORDER_FAILED)
            except Exception as exc:
                failures.append(exc)
        if domain.operator_is_alerted(event.step):
            draft = emails.operator_alert_email(order, event, settings)
            try:
                await self._send_once(draft, order.transaction_id, domain.TEMPLATE_OPERATOR_ALERT)
            except Exception as exc:
                failures.append(exc)
        for exc in failures:
            log.warning("a failed-order email was not sent", extra={"error": str(exc)[:200]})
        # A transient failure wins: the retry sends what is missing (sent ones are not sent twice), where
        # a permanent one first would end the message with the other email never tried again.
        transient = [exc for exc in failures if isinstance(exc, TransientError)]
        if failures:
            raise (transient or failures)[0]

    async def on_failure_email_failed(self, event: OrderFailed, reason: str) -> None:
        """Nobody could be emailed about a failed order: the log line is the alert of last resort."""
        log.error(
            "OPERATOR ALERT: could not email about a failed order",
            extra={"alert": "operator", "step": event.step, "event_reason": event.reason, "reason": reason},
        )
        operator_alerts_total.labels(step=event.step).inc()

    async def on_operator_alert(self, event: OperatorAlert) -> None:
        """Email SERVICE_OWNER_EMAIL once per alert_key (its row in sent_emails: transaction_id = the key)."""
        order = None
        if event.alert in domain.ORDER_ALERTS:  # the order's facts (status, Zendit id, payment) are shown
            order = await get_order(self._ctx.pool, event.transaction_id)
        draft = emails.operator_alert_event_email(event, order, self._ctx.settings)
        await self._send_once(draft, event.alert_key, domain.alert_template(event.alert))

    async def on_alert_email_failed(self, event: OperatorAlert, reason: str) -> None:
        """The operator could not be emailed: this log line and counter are the alert of last resort."""
        log.error(
            "OPERATOR ALERT: could not email an operator alert",
            extra={
                "alert": event.alert,
                "alert_key": event.alert_key,
                "event_reason": event.reason,
                "amount_to_add": event.amount_to_add.format() if event.amount_to_add else None,
                "reason": reason,
            },
        )
        operator_alert_emails_failed_total.labels(alert=event.alert).inc()

    async def _order(self, transaction_id: str) -> Order:
        order = await get_order(self._ctx.pool, transaction_id)
        if order is None:
            raise UnknownOrder(f"order {transaction_id} does not exist")
        return order

    async def _send_once(self, draft: Draft, transaction_id: str, template: str) -> None:
        try:
            outcome = await send_once(
                self._ctx.pool, self._mailer.send, draft, transaction_id=transaction_id, template=template
            )
        except EmailRejected:
            emails_total.labels(template=template, outcome="rejected").inc()
            raise
        except SmtpRelayError as exc:
            emails_total.labels(template=template, outcome="relay_error").inc()
            self._relay_failed(exc)
            raise
        except EmailTransientError:
            emails_total.labels(template=template, outcome="transient_error").inc()
            raise
        emails_total.labels(template=template, outcome=outcome.value).inc()
        log.info("email " + outcome.value.replace("_", " "), extra={"template": template})
        if outcome is SendOutcome.SENT:
            smtp_relay_failing.set(0)
            if self._relay_failing:
                self._relay_failing = False
                log.info("the SMTP relay accepts email again", extra={"alert": "smtp_relay_recovered"})

    def _relay_failed(self, exc: SmtpRelayError) -> None:
        """One alert (log line + gauge) while the relay refuses everyone, not one per email: an alert
        email would go through the same broken relay."""
        smtp_relay_errors_total.labels(reason=exc.reason).inc()
        smtp_relay_failing.set(1)
        if not self._relay_failing:
            self._relay_failing = True
            log.error(
                "OPERATOR ALERT: the SMTP relay refuses every email (check SMTP_* settings and the relay); "
                "emails wait until it is fixed",
                extra={"alert": "smtp_relay_failing", "reason": exc.reason},
            )


def register(ctx: ServiceContext, mailer: Mailer) -> Notifier:
    notifier = Notifier(ctx, mailer)
    consume(
        ctx.broker,
        ctx.topology,
        "notify.order-provisioned",
        OrderProvisioned,
        notifier.on_order_provisioned,
        on_failure=notifier.on_delivery_failed,
    )
    consume(
        ctx.broker,
        ctx.topology,
        "notify.order-failed",
        OrderFailed,
        notifier.on_order_failed,
        on_failure=notifier.on_failure_email_failed,
        dead_letter_after_failure=True,  # an unsent failure email stays visible and replayable
    )
    consume(
        ctx.broker,
        ctx.topology,
        "notify.operator-alert",
        OperatorAlert,
        notifier.on_operator_alert,
        on_failure=notifier.on_alert_email_failed,
        dead_letter_after_failure=True,  # DLQ depth shows the lost alert; a replay sends it
    )
    return notifier
