"""Sample data for previewing every email template: one home, used by `python -m notify preview` and by
`GET /preview/{template}`. Nothing here touches the database, the broker or SMTP; the activation data is
made up (it installs nothing) but shaped like a real eSIM's.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

from esim_common.events import OperatorAlert, OrderFailed
from esim_common.money import Money
from esim_common.order_repository import Order
from esim_common.order_states import OrderStatus
from esim_common.settings import Settings
from notify import domain, emails
from notify.compose import Draft

SAMPLE_TRANSACTION_ID = "txn_5a3c9e0d41b7f2a8c6e1d094"
SAMPLE_SMDP_ADDRESS = "smdp.sample-esim.example"
SAMPLE_ACTIVATION_CODE = "K2-4F7G1X-9QW3ZP"
SAMPLE_LPA = f"LPA:1${SAMPLE_SMDP_ADDRESS}${SAMPLE_ACTIVATION_CODE}"
SAMPLE_ICCID = "8944500102198304826"
SAMPLE_ZENDIT_TRANSACTION_ID = f"{SAMPLE_TRANSACTION_ID}-1"
SAMPLE_AMOUNT_TO_ADD = Money(7_245, "USD")
# Where the preview looks for a stored QR PNG: nowhere, so the code is always rendered from SAMPLE_LPA.
_NO_QR_DIRECTORY = "/nonexistent/notify-preview"

_NOW = datetime(2025, 1, 15, 9, 30, tzinfo=UTC)


def sample_order(status: OrderStatus = OrderStatus.PROVISIONED) -> Order:
    """A paid 5 GB / 30 day order as it is when provisioning hands it to notify."""
    return Order(
        id=1,
        transaction_id=SAMPLE_TRANSACTION_ID,
        user_id="user-42",
        offer_id="ESIM-GLOBAL-30D-5GB",
        price=3900,
        currency="USD",
        zendit_cost=2415,
        zendit_cost_currency="USD",
        stripe_payment_intent_id="pi_3Qsample8Xb2kL0a1Z9y",
        stripe_issuing_card_id=None,
        zendit_transaction_id=SAMPLE_ZENDIT_TRANSACTION_ID,
        zendit_status="DONE",
        qr_code_url=f"http://127.0.0.1:8082/qrcodes/{SAMPLE_TRANSACTION_ID}.png",
        status=status,
        recipient_email="ada.lovelace@example.com",
        recipient_name="Ada Lovelace",
        stripe_checkout_session_id="cs_test_sample",
        capture_method="automatic",
        refund_id=None,
        refund_status=None,
        failure_reason=None,
        funding_attempts=1,
        purchase_attempts=1,
        created_at=_NOW - timedelta(minutes=3),
        updated_at=_NOW,
        paid_at=_NOW - timedelta(minutes=2),
        funded_at=_NOW - timedelta(minutes=2),
        purchased_at=_NOW - timedelta(minutes=1),
        qr_stored_at=_NOW,
        emailed_at=None,
        failed_at=None,
        refunded_at=None,
        iccid=SAMPLE_ICCID,
        smdp_address=SAMPLE_SMDP_ADDRESS,
        activation_code=SAMPLE_ACTIVATION_CODE,
        offer_data_mb=5_000,
        offer_data_unlimited=False,
        offer_duration_days=30,
    )


def _refunded_order() -> Order:
    return sample_order(OrderStatus.REFUNDED).model_copy(
        update={
            "refund_id": "re_3Qsample8Xb2kL0a",
            "refund_status": "succeeded",
            "failure_reason": "topup_declined",
        }
    )


def _refund_failed_order() -> Order:
    return sample_order(OrderStatus.NEEDS_ATTENTION).model_copy(
        update={"failure_reason": "refund_failed: card_declined"}
    )


def _needs_attention_order() -> Order:
    return sample_order(OrderStatus.NEEDS_ATTENTION).model_copy(
        update={"zendit_status": "IN_PROGRESS", "failure_reason": "purchase_deadline_exceeded"}
    )


SAMPLE_WALLET_SHORT = OperatorAlert(
    transaction_id=SAMPLE_TRANSACTION_ID,
    alert="wallet_short",
    alert_key=f"wallet_short:{SAMPLE_TRANSACTION_ID}",
    reason="wallet_short",
    amount_to_add=SAMPLE_AMOUNT_TO_ADD,
    facts={"orders_waiting": "3", "wallet_available": Money(0, "USD").format()},
    occurred_at=_NOW,
)
SAMPLE_NEEDS_ATTENTION = OperatorAlert(
    transaction_id=SAMPLE_TRANSACTION_ID,
    alert="needs_attention",
    alert_key=f"needs_attention:{SAMPLE_TRANSACTION_ID}",
    reason="purchase_deadline_exceeded",
    facts={"zendit_transaction_id": SAMPLE_ZENDIT_TRANSACTION_ID, "zendit_status": "IN_PROGRESS"},
    occurred_at=_NOW,
)
SAMPLE_QR_MISMATCH = OperatorAlert(
    transaction_id=SAMPLE_TRANSACTION_ID,
    alert="qr_mismatch",
    alert_key=f"qr_mismatch:{SAMPLE_ZENDIT_TRANSACTION_ID}",
    reason="qr_mismatch_zendit",
    facts={"zendit_transaction_id": SAMPLE_ZENDIT_TRANSACTION_ID, "zendit_status": "DONE"},
    occurred_at=_NOW,
)


def _preview_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"qr_storage_dir": _NO_QR_DIRECTORY})


def _esim_delivery(settings: Settings) -> Draft:
    return emails.esim_delivery_email(sample_order(), settings)


def _order_failed(settings: Settings) -> Draft:
    event = OrderFailed(transaction_id=SAMPLE_TRANSACTION_ID, step="funding", reason="topup_declined")
    return emails.order_failed_email(_refunded_order(), event, settings)


def _operator_alert(settings: Settings) -> Draft:
    event = OrderFailed(
        transaction_id=SAMPLE_TRANSACTION_ID, step="refund", reason="refund_failed: card_declined"
    )
    return emails.operator_alert_email(_refund_failed_order(), event, settings)


def _operator_low_balance(settings: Settings) -> Draft:
    return emails.operator_alert_event_email(SAMPLE_WALLET_SHORT, None, settings)


def _operator_needs_attention(settings: Settings) -> Draft:
    return emails.operator_alert_event_email(SAMPLE_NEEDS_ATTENTION, _needs_attention_order(), settings)


def _operator_qr_mismatch(settings: Settings) -> Draft:
    delivered = sample_order(OrderStatus.DELIVERED).model_copy(update={"emailed_at": _NOW})
    return emails.operator_alert_event_email(SAMPLE_QR_MISMATCH, delivered, settings)


# Each template, what it is for (shown by the preview list), and how to build it from the samples.
SAMPLES: dict[str, tuple[str, Callable[[Settings], Draft]]] = {
    domain.TEMPLATE_ESIM_DELIVERY: ("the customer's eSIM (order.provisioned)", _esim_delivery),
    domain.TEMPLATE_ORDER_FAILED: ("the customer's failure/refund email (order.failed)", _order_failed),
    domain.TEMPLATE_OPERATOR_ALERT: (
        "operator: a refund, eSIM email or capture failed (order.failed)",
        _operator_alert,
    ),
    domain.TEMPLATE_OPERATOR_LOW_BALANCE: (
        "operator: the Zendit wallet is short (operator.alert wallet_short)",
        _operator_low_balance,
    ),
    domain.TEMPLATE_OPERATOR_NEEDS_ATTENTION: (
        "operator: an order needs attention (operator.alert needs_attention)",
        _operator_needs_attention,
    ),
    domain.TEMPLATE_OPERATOR_QR_MISMATCH: (
        "operator: a delivered order's Zendit QR image reads differently (operator.alert qr_mismatch)",
        _operator_qr_mismatch,
    ),
}


class UnknownTemplate(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown template {name!r}; valid templates: {', '.join(SAMPLES)}")


async def sample_email(template: str, settings: Settings) -> EmailMessage:
    """`template` filled with the sample data, as the service would send it (QR code rendered)."""
    if template not in SAMPLES:
        raise UnknownTemplate(template)
    return await SAMPLES[template][1](_preview_settings(settings)).build()
