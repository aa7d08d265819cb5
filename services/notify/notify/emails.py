"""The emails notify sends, from an order or an alert: the facts in, a `Draft` out.

The facts are checked here, at once (missing activation data fails before anything is claimed); the
rendering, the QR code and the MIME message wait for `Draft.build`, which runs only when sent_emails
says the email has not gone yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from email.message import EmailMessage
from functools import partial
from pathlib import Path

from esim_common.errors import FailPermanently
from esim_common.events import OperatorAlert, OrderFailed
from esim_common.logging import redact
from esim_common.money import Money
from esim_common.order_repository import Order
from esim_common.settings import Settings
from notify import domain
from notify.compose import Draft, InlineImage, build_message, recipient
from notify.qr import qr_png
from notify.rendering import has_phrase, phrase, render


def _or_missing(value: str | None) -> str:
    return value if value else phrase("missing", "value")


def _amount(order: Order) -> str:
    return Money(order.price, order.currency).format()


def plan(order: Order) -> str:
    """The plan line: "1.5 GB · 7 days (ESIM-...)", or the offer id alone when the order does not say."""
    return domain.plan_line(
        order.offer_id,
        data_mb=order.offer_data_mb,
        unlimited=order.offer_data_unlimited,
        duration_days=order.offer_duration_days,
        words=partial(phrase, "plan"),
    )


def esim_delivery_email(order: Order, settings: Settings) -> Draft:
    """The eSIM: QR code inline and attached, manual-entry data, install hints, Apple's link."""
    txn = order.transaction_id
    try:
        activation = domain.activation_data(order.smdp_address, order.activation_code)
    except ValueError as exc:
        # Provisioning records the activation data before it marks an order provisioned.
        raise FailPermanently("activation_data_missing", str(exc)) from exc
    template = domain.TEMPLATE_ESIM_DELIVERY
    message_id = domain.message_id(txn, template, settings.smtp_from)
    qr_cid = message_id.strip("<>").replace(f"{template}.", "qr.", 1)
    values = {
        "name": order.recipient_name,
        "offer_id": order.offer_id,
        "plan": plan(order),
        "transaction_id": txn,
        "iccid": order.iccid or phrase("missing", "iccid"),
        "smdp_address": activation.smdp_address,
        "activation_code": activation.activation_code,
        "lpa": activation.lpa,
        "apple_link": domain.apple_setup_link(activation.lpa),
        "qr_cid": qr_cid,
    }
    to_name = domain.display_name(order.recipient_name)

    async def build() -> EmailMessage:
        png = await qr_png(Path(settings.qr_storage_dir), txn, activation.lpa)
        return build_message(
            render(template, values),
            sender=settings.smtp_from,
            to_address=order.recipient_email,
            to_name=to_name,
            message_id=message_id,
            qr=InlineImage(png=png, cid=qr_cid),
        )

    return Draft(recipient=recipient(order.recipient_email, to_name), build=build)


def order_failed_email(order: Order, event: OrderFailed, settings: Settings) -> Draft:
    """What happened, in plain words, and whether the customer has their money back."""
    template = domain.TEMPLATE_ORDER_FAILED
    outcome = domain.refund_outcome(order.status, order.refund_status)
    values = {
        "name": order.recipient_name,
        "offer_id": order.offer_id,
        "transaction_id": order.transaction_id,
        "what_happened": phrase("what_happened", event.step),
        "refund_status": phrase("refund_status", outcome.value, amount=_amount(order)),
    }
    to_name = domain.display_name(order.recipient_name)
    return _draft(template, values, order.transaction_id, settings, order.recipient_email, to_name)


def operator_alert_email(order: Order, event: OrderFailed, settings: Settings) -> Draft:
    """For the operator (SERVICE_OWNER_EMAIL): which order, what failed, what to do."""
    template = domain.TEMPLATE_OPERATOR_ALERT
    advice_key = event.step if has_phrase("operator_advice", event.step) else "default"
    values = {
        "transaction_id": order.transaction_id,
        "status": order.status.value,
        "step": event.step,
        "reason": event.reason,
        "failure_reason": _or_missing(order.failure_reason),
        "recipient_email": order.recipient_email,
        "amount": _amount(order),
        "payment_intent_id": _or_missing(order.stripe_payment_intent_id),
        "refund_id": _or_missing(order.refund_id),
        "refund_status": _or_missing(order.refund_status),
        "advice": phrase("operator_advice", advice_key),
    }
    return _draft(template, values, order.transaction_id, settings, settings.service_owner_email)


def operator_alert_event_email(event: OperatorAlert, order: Order | None, settings: Settings) -> Draft:
    """The email for an `operator.alert` (SERVICE_OWNER_EMAIL); `order` is the one it names, if known.
    Never activation or card data: only the alert's ids, codes and amounts and the order's ids are shown."""
    template = domain.alert_template(event.alert)
    facts = dict(domain.operator_facts(event.facts))
    values = {
        "transaction_id": event.transaction_id,
        "alert_key": event.alert_key,
        "reason": redact(event.reason),
        "raised_at": event.occurred_at.strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
    }
    if event.alert == "wallet_short":
        values |= _low_balance_values(event, facts, settings)
    else:  # needs_attention, qr_mismatch: about one order
        values |= _order_alert_values(event, order, facts)
    return _draft(template, values, event.alert_key, settings, settings.service_owner_email)


def _draft(
    template: str,
    values: Mapping[str, str],
    key: str,
    settings: Settings,
    to_address: str,
    to_name: str = "",
) -> Draft:
    """An email without images; `key` is its sent_emails key (the order, or the alert)."""

    async def build() -> EmailMessage:
        return build_message(
            render(template, values),
            sender=settings.smtp_from,
            to_address=to_address,
            to_name=to_name,
            message_id=domain.message_id(key, template, settings.smtp_from),
        )

    return Draft(recipient=recipient(to_address, to_name), build=build)


def _low_balance_values(event: OperatorAlert, facts: dict[str, str], settings: Settings) -> dict[str, str]:
    return {
        "amount_to_add": event.amount_to_add.format() if event.amount_to_add else _unknown(),
        "orders_waiting": redact(facts.get("orders_waiting") or _unknown()),
        "wallet_available": redact(facts.get("wallet_available") or _unknown()),
        "recheck": domain.duration_text(settings.awaiting_funds_recheck_seconds),
        "max_age": domain.duration_text(settings.awaiting_funds_max_age),
    }


def _order_alert_values(event: OperatorAlert, order: Order | None, facts: dict[str, str]) -> dict[str, str]:
    zendit_id = facts.pop("zendit_transaction_id", None) or (order.zendit_transaction_id if order else None)
    details = "\n".join(f"{name}: {redact(value)}" for name, value in facts.items())
    advice_key = event.reason if has_phrase("needs_attention_advice", event.reason) else "default"
    zendit_status = facts.get("zendit_status") or (order.zendit_status if order else None)
    if advice_key == "default" and zendit_status == "DONE":
        advice_key = "default_delivered"  # never invite a refund of an eSIM Zendit delivered
    return {
        "status": order.status.value if order else _unknown(),
        "zendit_transaction_id": redact(_or_missing(zendit_id)),
        "recipient_email": order.recipient_email if order else _unknown(),
        "amount": _amount(order) if order else _unknown(),
        "payment_intent_id": _or_missing(order.stripe_payment_intent_id if order else None),
        "details": details or _or_missing(None),
        "advice": phrase("needs_attention_advice", advice_key),
    }


def _unknown() -> str:
    return phrase("missing", "unknown")
