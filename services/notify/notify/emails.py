"""The three emails notify sends, built from an order: the facts in, a MIME message out."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

from esim_common.errors import FailPermanently
from esim_common.events import OrderFailed
from esim_common.money import Money
from esim_common.order_repository import Order
from esim_common.settings import Settings
from notify import domain
from notify.compose import InlineImage, build_message
from notify.qr import qr_png
from notify.rendering import has_phrase, phrase, render


def _or_missing(value: str | None) -> str:
    return value if value else phrase("missing", "value")


def _amount(order: Order) -> str:
    return Money(order.price, order.currency).format()


async def esim_delivery_email(order: Order, settings: Settings) -> EmailMessage:
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
        "transaction_id": txn,
        "iccid": order.iccid or phrase("missing", "iccid"),
        "smdp_address": activation.smdp_address,
        "activation_code": activation.activation_code,
        "lpa": activation.lpa,
        "apple_link": domain.apple_setup_link(activation.lpa),
        "qr_cid": qr_cid,
    }
    png = await qr_png(Path(settings.qr_storage_dir), txn, activation.lpa)
    return build_message(
        render(template, values),
        sender=settings.smtp_from,
        to_address=order.recipient_email,
        to_name=domain.display_name(order.recipient_name),
        message_id=message_id,
        qr=InlineImage(png=png, cid=qr_cid),
    )


def order_failed_email(order: Order, event: OrderFailed, settings: Settings) -> EmailMessage:
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
    return build_message(
        render(template, values),
        sender=settings.smtp_from,
        to_address=order.recipient_email,
        to_name=domain.display_name(order.recipient_name),
        message_id=domain.message_id(order.transaction_id, template, settings.smtp_from),
    )


def operator_alert_email(order: Order, event: OrderFailed, settings: Settings) -> EmailMessage:
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
    return build_message(
        render(template, values),
        sender=settings.smtp_from,
        to_address=settings.service_owner_email,
        message_id=domain.message_id(order.transaction_id, template, settings.smtp_from),
    )
