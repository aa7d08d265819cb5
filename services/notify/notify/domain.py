"""What notify decides, without I/O: which emails an event calls for, and the facts that go in them.

order.provisioned ─► esim_delivery (customer, once) ─► provisioned → delivered ─► order.delivered
order.failed      ─► order_failed (customer, once; not for step=delivery: that address refused us)
                  └► operator_alert (SERVICE_OWNER_EMAIL, once) when step is refund, delivery or capture
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from email.utils import parseaddr
from enum import StrEnum
from urllib.parse import quote

from esim_common.events import FailedStep
from esim_common.lpa import LPA_PREFIX, lpa_string
from esim_common.order_states import OrderStatus

# One row per (order, template) in `sent_emails`: these names are that key, never rename them.
TEMPLATE_ESIM_DELIVERY = "esim_delivery"
TEMPLATE_ORDER_FAILED = "order_failed"
TEMPLATE_OPERATOR_ALERT = "operator_alert"

# Apple's universal link: opened on an iPhone (iOS 17.4+) it installs the eSIM without a camera.
APPLE_SETUP_URL = "https://esimsetup.apple.com/esim_qrcode_provisioning"

# A transaction id that is safe as a file name and inside a Message-ID as it is.
_PLAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DeliveryDecision(StrEnum):
    SEND = "send"  # provisioned: email it (or find it already emailed), then mark delivered
    ANNOUNCE = "announce"  # already delivered (a redelivery): only re-publish order.delivered
    SKIP = "skip"  # any other state: not ours to deliver (needs_attention waits for an operator)


def delivery_decision(status: OrderStatus) -> DeliveryDecision:
    if status is OrderStatus.PROVISIONED:
        return DeliveryDecision.SEND
    if status is OrderStatus.DELIVERED:
        return DeliveryDecision.ANNOUNCE
    return DeliveryDecision.SKIP


class RefundOutcome(StrEnum):
    """What the failure email tells the customer about their money (keys of `[refund_status]`)."""

    REFUNDED = "refunded"
    RELEASED = "released"  # manual capture: the authorisation was cancelled, nothing was ever charged
    INVESTIGATING = "investigating"
    NOT_CHARGED = "not_charged"
    PENDING = "pending"


# `refund_status` of an order whose uncaptured payment was released instead of refunded
# (esim_common.compensation.RELEASED).
RELEASED_REFUND_STATUS = "canceled"


def refund_outcome(status: OrderStatus, refund_status: str | None = None) -> RefundOutcome:
    if status is OrderStatus.REFUNDED:
        # A released hold is no refund: telling the customer "refunded ... 5-10 business days" would be false.
        if refund_status == RELEASED_REFUND_STATUS:
            return RefundOutcome.RELEASED
        return RefundOutcome.REFUNDED
    if status is OrderStatus.NEEDS_ATTENTION:
        return RefundOutcome.INVESTIGATING
    if status in (OrderStatus.PENDING_PAYMENT, OrderStatus.PAYMENT_FAILED):
        return RefundOutcome.NOT_CHARGED
    # Compensation announces a failure only once the refund is final, so this is a race at most.
    return RefundOutcome.PENDING


def customer_is_told(step: FailedStep) -> bool:
    """A delivery failure means the customer's address refused our email: another one would bounce. A
    capture failure happens after the customer got their eSIM: nothing failed for them."""
    return step not in ("delivery", "capture")


def operator_is_alerted(step: FailedStep) -> bool:
    """Failures that no automation resolves: the refund itself, the eSIM email, or the capture of a
    delivered order's payment (manual capture mode)."""
    return step in ("refund", "delivery", "capture")


@dataclass(frozen=True)
class ActivationData:
    """What the customer types when they cannot scan: the SM-DP+ address and the matching id."""

    smdp_address: str
    activation_code: str
    lpa: str


def activation_data(smdp_address: str | None, activation_code: str | None) -> ActivationData:
    """Raises ValueError when there is nothing to install (`lpa_string` decides what is valid).

    Some suppliers put the whole `LPA:1$<smdp>$<code>` string in the activation code; the manual-entry
    fields are then taken from it, because an iPhone asks for the two parts separately.
    """
    lpa = lpa_string(smdp_address or "", activation_code or "")
    if (activation_code or "").strip().startswith(LPA_PREFIX):
        parts = lpa.split("$")
        if len(parts) >= 3 and parts[1] and parts[2]:
            return ActivationData(smdp_address=parts[1], activation_code=parts[2], lpa=lpa)
    return ActivationData(
        smdp_address=(smdp_address or "").strip(), activation_code=(activation_code or "").strip(), lpa=lpa
    )


def apple_setup_link(lpa: str) -> str:
    # ':' and '$' are legal in a query; anything else unusual is percent-encoded.
    return f"{APPLE_SETUP_URL}?carddata={quote(lpa, safe=':$')}"


def sender_domain(sender: str) -> str:
    _, at, domain = parseaddr(sender)[1].rpartition("@")
    return domain if at and re.fullmatch(r"[A-Za-z0-9.-]+", domain) else "localhost"


def message_id(transaction_id: str, template: str, sender: str) -> str:
    """The same Message-ID for every attempt at one email, so that a resend after a crash (at-least-once)
    is recognisable as the same message by mail clients that deduplicate on it."""
    if _PLAIN_ID.match(transaction_id):
        local = transaction_id
    else:
        local = hashlib.sha256(transaction_id.encode()).hexdigest()[:32]
    return f"<{template}.{local}@{sender_domain(sender)}>"


def plain_file_name(transaction_id: str) -> str | None:
    """`<transaction id>.png` when the id cannot escape the QR directory, else None."""
    return f"{transaction_id}.png" if _PLAIN_ID.match(transaction_id) else None


def display_name(name: str) -> str:
    """The recipient's name for a header: control characters (line breaks included) removed."""
    cleaned = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    return " ".join(cleaned.split())[:100]
