"""What notify decides, without I/O: which emails an event calls for, and the facts that go in them.

order.provisioned ─► esim_delivery (customer, once) ─► provisioned → delivered ─► order.delivered
order.failed      ─► order_failed (customer, once; not for step=delivery: that address refused us)
                  └► operator_alert (SERVICE_OWNER_EMAIL, once) when step is refund, delivery or capture
operator.alert    ─► operator_low_balance (wallet_short), operator_needs_attention or operator_qr_mismatch
                     (SERVICE_OWNER_EMAIL, once per alert_key)
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from enum import StrEnum
from urllib.parse import quote

from esim_common.events import AlertKind, FailedStep
from esim_common.lpa import LPA_PREFIX, lpa_string
from esim_common.order_states import OrderStatus

# One row per (order, template) in `sent_emails`: these names are that key, never rename them. For
# operator alerts the row's `transaction_id` is the alert's `alert_key` (one email per alert).
TEMPLATE_ESIM_DELIVERY = "esim_delivery"
TEMPLATE_ORDER_FAILED = "order_failed"
TEMPLATE_OPERATOR_ALERT = "operator_alert"
TEMPLATE_OPERATOR_LOW_BALANCE = "operator_low_balance"
TEMPLATE_OPERATOR_NEEDS_ATTENTION = "operator_needs_attention"
TEMPLATE_OPERATOR_QR_MISMATCH = "operator_qr_mismatch"
TEMPLATES = (
    TEMPLATE_ESIM_DELIVERY,
    TEMPLATE_ORDER_FAILED,
    TEMPLATE_OPERATOR_ALERT,
    TEMPLATE_OPERATOR_LOW_BALANCE,
    TEMPLATE_OPERATOR_NEEDS_ATTENTION,
    TEMPLATE_OPERATOR_QR_MISMATCH,
)
ALERT_TEMPLATES: Mapping[AlertKind, str] = {
    "wallet_short": TEMPLATE_OPERATOR_LOW_BALANCE,
    "needs_attention": TEMPLATE_OPERATOR_NEEDS_ATTENTION,
    "qr_mismatch": TEMPLATE_OPERATOR_QR_MISMATCH,
}
# Alerts about one order, whose email shows that order's facts (status, customer, payment).
ORDER_ALERTS: frozenset[AlertKind] = frozenset({"needs_attention", "qr_mismatch"})

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


# An eSIM email the relay did not take (down, deferring, misconfigured) is tried again after 1 s while
# it is fresh, 3 s for the first minute, then every 10 s (the longest delay tier) until
# EMAIL_GIVE_UP_SECONDS: an SMTP outage of minutes must not put every order in front of an operator.
EMAIL_FAST_RETRY_WINDOW_SECONDS = 10.0
EMAIL_MEDIUM_RETRY_WINDOW_SECONDS = 60.0


def email_retry_delay(waited_seconds: float, give_up_seconds: float) -> float | None:
    """Seconds until the next try of an email first due `waited_seconds` ago; None: give up now."""
    if waited_seconds >= give_up_seconds:
        return None
    if waited_seconds < EMAIL_FAST_RETRY_WINDOW_SECONDS:
        return 1.0
    if waited_seconds < EMAIL_MEDIUM_RETRY_WINDOW_SECONDS:
        return 3.0
    return 10.0


def delivery_failure_reason(reason: str) -> str:
    """The order's failure reason when the eSIM could not be emailed: SMTP outcomes (and retries used up)
    say the email failed; anything else (activation data missing, say) is recorded as it is."""
    if reason.startswith(("email_", "smtp_")) or reason == "retries_exhausted":
        return f"email_failed: {reason}"[:200]
    return reason[:200]


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


# ------------------------------------------------------------------------------------ the plan line

# A `[plan]` sentence of phrases.toml by key, its placeholders filled (`partial(rendering.phrase, "plan")`).
PlanWords = Callable[..., str]

# Zendit counts data in decimal units: dataGB 1.5 is 1500 MB (migration 0006).
MB_PER_GB = 1000


def decimal_gb(data_mb: int) -> str:
    """1000 → "1", 1500 → "1.5", 1250 → "1.25": whole megabytes as gigabytes, in integer arithmetic."""
    whole, rest = divmod(data_mb, MB_PER_GB)
    return f"{whole}.{rest:03d}".rstrip("0") if rest else str(whole)


def plan_line(
    offer_id: str,
    *,
    data_mb: int | None,
    unlimited: bool | None,
    duration_days: int | None,
    words: PlanWords,
) -> str:
    """What the plan gives, e.g. "1.5 GB · 7 days (ESIM-US-7D-1GB)"; only the offer id when the order
    does not say (orders from before migration 0006, or an offer that gave neither)."""
    parts = []
    if unlimited:
        parts.append(words("unlimited"))
    elif data_mb is not None and data_mb > 0:
        if data_mb >= MB_PER_GB:
            parts.append(words("data_gb", amount=decimal_gb(data_mb)))
        else:
            parts.append(words("data_mb", amount=str(data_mb)))
    if duration_days is not None and duration_days > 0:
        parts.append(words("one_day") if duration_days == 1 else words("days", count=str(duration_days)))
    if not parts:
        return offer_id
    return words("allowance", allowance=words("separator").join(parts), offer_id=offer_id)


# ------------------------------------------------------------------------------------ operator alerts


def alert_template(alert: AlertKind) -> str:
    return ALERT_TEMPLATES[alert]


def duration_text(seconds: int) -> str:
    """A setting in seconds as an operator reads it: 21600 → "6 h", 90 → "90 s", 5400 → "90 min"."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


# Alert facts are ids, codes and amounts by contract; a fact named like activation or card data is
# dropped anyway, because an operator's mailbox is no place for what installs an eSIM or pays.
_FORBIDDEN_FACT_WORDS = frozenset(
    {"activation", "lpa", "smdp", "qr", "card", "pan", "cvc", "cvv", "secret", "password", "token", "key"}
)


def _name_words(name: str) -> set[str]:
    """ "cardLast4" → {"card", "last", "4"}; "api_key" → {"api", "key"}."""
    return set(re.findall(r"[a-z]+|[0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()))


def operator_facts(facts: Mapping[str, str]) -> list[tuple[str, str]]:
    """The facts an operator email may show, sorted by name."""
    return sorted(
        (name, value) for name, value in facts.items() if not _name_words(name) & _FORBIDDEN_FACT_WORDS
    )
