"""PaymentIntents (list, retrieve, capture, cancel), their charges, refunds, and the payments balance.

An authorised (manual-capture) card payment lapses like Stripe's: the charge says until when it can be
captured (`payment_method_details.card.capture_before`, 7 days after authorisation); after that Stripe
cancels the PaymentIntent itself (`cancellation_reason: automatic`, events `charge.expired` and
`payment_intent.canceled`), and capturing it answers `payment_intent_unexpected_state`. The emulator
notices the lapse whenever the intent is looked at. Control route, for tests that cannot wait a week:

- `POST /_sandbox/payment_intents/{id}/expire_authorization`: the authorisation lapses now.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route
from stripe.params import (
    ChargeRetrieveParams,
    PaymentIntentCancelParams,
    PaymentIntentCaptureParams,
    PaymentIntentListParams,
    PaymentIntentRetrieveParams,
    RefundCreateParams,
    RefundListParams,
    RefundRetrieveParams,
)

from . import payment_objects
from .api import Call, api_route
from .coerce import as_currency, merge_metadata, metadata, opt_int, opt_str
from .control import control_route
from .errors import ParamError, StripeApiError, invalid_value, unexpected_state
from .ids import new_id, now
from .lists import paginate
from .render import render
from .state import StripeState
from .webhooks import Webhooks

REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")
CANCELABLE = (
    "requires_payment_method",
    "requires_capture",
    "requires_confirmation",
    "requires_action",
    "processing",
)
# How long a card authorisation can be captured: 7 days for online customer-initiated payments on every
# major brand (Stripe's "place a hold" page).
AUTHORISATION_VALIDITY_SECONDS = 7 * 24 * 60 * 60


def create_paid_intent(
    state: StripeState, *, amount: int, currency: str, intent_data: dict[str, Any], email: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A card payment as Checkout makes it: captured now, or only authorised for `manual` capture."""
    created = now()
    intent_id = new_id("pi_")
    payment_method = new_id("pm_")
    manual = intent_data["capture_method"] == "manual"
    intent = payment_objects.payment_intent(
        intent_id=intent_id,
        created=created,
        amount=amount,
        currency=currency,
        capture_method=intent_data["capture_method"],
        metadata=dict(intent_data["metadata"]),
        description=intent_data["description"],
        receipt_email=intent_data["receipt_email"],
        payment_method=payment_method,
        client_secret=f"{intent_id}_secret_{new_id('', 25)}",
    )
    charge = payment_objects.charge(
        charge_id=new_id("ch_"),
        created=created,
        amount=amount,
        currency=currency,
        captured=not manual,
        balance_transaction=None if manual else new_id("txn_"),
        payment_intent_id=intent_id,
        payment_method=payment_method,
        email=email,
        metadata=dict(intent_data["metadata"]),
        description=intent_data["description"],
    )
    charge["payment_method_details"]["card"]["capture_before"] = (
        created + AUTHORISATION_VALIDITY_SECONDS if manual else None
    )
    intent.update(
        status="requires_capture" if manual else "succeeded",
        amount_capturable=amount if manual else 0,
        amount_received=0 if manual else amount,
        latest_charge=charge["id"],
    )
    state.add(intent)
    state.add(charge)
    if not manual:
        _credit(state, currency, amount)
    return intent, charge


def _credit(state: StripeState, currency: str, amount: int) -> None:
    # Card money lands in `pending` first, as with Stripe (it becomes available days later).
    state.payments_pending[currency] = state.payments_pending.get(currency, 0) + amount


def _debit(state: StripeState, currency: str, amount: int) -> None:
    from_pending = min(amount, state.payments_pending.get(currency, 0))
    state.payments_pending[currency] = state.payments_pending.get(currency, 0) - from_pending
    state.payments_available[currency] = state.payments_available.get(currency, 0) - (amount - from_pending)


def expire_if_lapsed(state: StripeState, webhooks: Webhooks, intent: dict[str, Any]) -> None:
    """Stripe cancels an uncaptured payment whose authorisation lapsed; the emulator does it when it looks."""
    if intent["status"] != "requires_capture" or not intent["latest_charge"]:
        return
    charge = state.get("charge", intent["latest_charge"])
    capture_before = charge["payment_method_details"]["card"].get("capture_before")
    if capture_before is not None and now() >= capture_before:
        _expire_authorisation(webhooks, intent, charge)


def _expire_authorisation(webhooks: Webhooks, intent: dict[str, Any], charge: dict[str, Any]) -> None:
    intent.update(status="canceled", canceled_at=now(), amount_capturable=0, cancellation_reason="automatic")
    # The hold is released: Stripe shows the uncaptured charge as fully refunded.
    charge.update(refunded=True, amount_refunded=charge["amount"])
    webhooks.emit("charge.expired", charge)
    webhooks.emit("payment_intent.canceled", intent)


def _intent(call: Call) -> dict[str, Any]:
    intent = call.state.get("payment_intent", call.path["intent"])
    expire_if_lapsed(call.state, call.webhooks, intent)
    return intent


async def retrieve_intent(call: Call) -> dict[str, Any]:
    return call.render(_intent(call))


async def list_intents(call: Call) -> dict[str, Any]:
    """`GET /v1/payment_intents`: newest first, filtered by `customer` / `customer_account` and `created`,
    cursor-paginated. Listing looks at every intent, so a lapsed authorisation shows as canceled here too."""
    filters = {key: call.params[key] for key in ("customer", "customer_account") if call.params.get(key)}
    intents = call.state.find("payment_intent", **filters)
    for intent in intents:
        expire_if_lapsed(call.state, call.webhooks, intent)
    return paginate(call, intents, "/v1/payment_intents")


async def capture_intent(call: Call) -> dict[str, Any]:
    intent = _intent(call)
    if intent["status"] != "requires_capture":
        raise unexpected_state(
            f"This PaymentIntent could not be captured because it has a status of {intent['status']}. "
            "Only a PaymentIntent with one of the following statuses may be captured: requires_capture."
        )
    amount = opt_int(call.params, "amount_to_capture", minimum=1) or intent["amount_capturable"]
    if amount > intent["amount_capturable"]:
        raise StripeApiError(
            400,
            f"amount_to_capture ({amount}) is greater than the amount capturable "
            f"({intent['amount_capturable']}).",
            code="amount_too_large",
            param="amount_to_capture",
        )
    intent.update(
        status="succeeded",
        amount_received=amount,
        amount_capturable=0,
        metadata=merge_metadata(intent["metadata"], call.params.get("metadata")),
    )
    charge = call.state.get("charge", intent["latest_charge"])
    # Capturing less than authorised releases the rest, which Stripe reports as refunded on the charge.
    charge.update(
        captured=True,
        amount_captured=amount,
        amount_refunded=intent["amount"] - amount,
        balance_transaction=new_id("txn_"),
    )
    _credit(call.state, intent["currency"], amount)
    for session in call.state.find("checkout.session", payment_intent=intent["id"]):
        session["payment_status"] = "paid"
    call.emit("charge.captured", charge)
    call.emit("payment_intent.succeeded", intent)
    return call.render(intent)


async def cancel_intent(call: Call) -> dict[str, Any]:
    intent = _intent(call)
    if intent["status"] not in CANCELABLE:
        raise unexpected_state(
            f"You cannot cancel this PaymentIntent because it has a status of {intent['status']}. Only a "
            f"PaymentIntent with one of the following statuses may be canceled: {', '.join(CANCELABLE)}."
        )
    intent.update(
        status="canceled",
        canceled_at=now(),
        amount_capturable=0,
        cancellation_reason=opt_str(call.params, "cancellation_reason"),
    )
    if intent["latest_charge"]:
        # Cancelling an uncaptured payment releases the authorisation: Stripe shows it as a full refund.
        charge = call.state.get("charge", intent["latest_charge"])
        charge.update(refunded=True, amount_refunded=charge["amount"])
    call.emit("payment_intent.canceled", intent)
    return call.render(intent)


async def create_refund(call: Call) -> dict[str, Any]:
    charge, intent = _refund_target(call)
    if intent["status"] != "succeeded":
        raise unexpected_state(
            f"This PaymentIntent has a status of {intent['status']}; only a succeeded PaymentIntent can be "
            "refunded. To release an uncaptured payment, cancel the PaymentIntent instead."
        )
    remaining = charge["amount"] - charge["amount_refunded"]
    if remaining <= 0:
        raise StripeApiError(
            400, f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded"
        )
    amount = opt_int(call.params, "amount", minimum=1) or remaining
    if amount > remaining:
        raise StripeApiError(
            400,
            f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining}).",
            code="amount_too_large",
            param="amount",
        )
    currency = call.params.get("currency")
    if currency and as_currency(currency, "currency") != charge["currency"]:
        raise invalid_value(
            "currency", f"The refund currency must match the charge currency ({charge['currency']})."
        )
    reason = opt_str(call.params, "reason")
    if reason is not None and reason not in REFUND_REASONS:
        raise invalid_value("reason", f"Invalid reason: must be one of {', '.join(REFUND_REASONS)}")
    refund = payment_objects.refund(
        refund_id=new_id("re_"),
        created=now(),
        amount=amount,
        currency=charge["currency"],
        charge_id=charge["id"],
        payment_intent_id=intent["id"],
        payment_method=charge["payment_method"],
        reason=reason,
        metadata=metadata(call.params.get("metadata")),
        balance_transaction=new_id("txn_"),
    )
    call.state.add(refund)
    charge["amount_refunded"] += amount
    charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
    charge["refunds"]["data"].insert(0, dict(refund))
    _debit(call.state, charge["currency"], amount)
    call.emit("refund.created", refund)
    call.emit("charge.refunded", charge)
    return call.render(refund)


def _refund_target(call: Call) -> tuple[dict[str, Any], dict[str, Any]]:
    intent_id = opt_str(call.params, "payment_intent")
    charge_id = opt_str(call.params, "charge")
    if intent_id is None and charge_id is None:
        raise ParamError(
            "One of the following params should be provided for this request: payment_intent or charge.",
            code="parameter_missing",
            param="payment_intent",
        )
    if intent_id is not None:
        intent = call.state.get("payment_intent", intent_id, param="payment_intent")
        charge = call.state.get("charge", intent["latest_charge"]) if intent["latest_charge"] else None
        if charge is None or (charge_id is not None and charge_id != charge["id"]):
            raise invalid_value("charge", "The charge does not belong to this PaymentIntent.")
        return charge, intent
    assert charge_id is not None
    charge = call.state.get("charge", charge_id, param="charge")
    return charge, call.state.get("payment_intent", charge["payment_intent"])


async def retrieve_refund(call: Call) -> dict[str, Any]:
    return call.render(call.state.get("refund", call.path["refund"]))


async def list_refunds(call: Call) -> dict[str, Any]:
    filters = {key: call.params[key] for key in ("payment_intent", "charge") if call.params.get(key)}
    return paginate(call, call.state.find("refund", **filters), "/v1/refunds")


async def retrieve_charge(call: Call) -> dict[str, Any]:
    return call.render(call.state.get("charge", call.path["charge"]))


async def expire_authorization(request: Request) -> dict[str, Any]:
    """Control route: the intent's authorisation lapses now, as if its 7 days had passed."""
    state: StripeState = request.app.state.stripe
    intent = state.get("payment_intent", request.path_params["intent"])
    if intent["status"] != "requires_capture":
        raise unexpected_state(
            f"Only an authorised, uncaptured PaymentIntent can expire; this one is {intent['status']}."
        )
    charge = state.get("charge", intent["latest_charge"])
    charge["payment_method_details"]["card"]["capture_before"] = now()
    expire_if_lapsed(state, request.app.state.webhooks, intent)
    return render(state, intent)


def routes() -> list[Route]:
    return [
        control_route(
            "/_sandbox/payment_intents/{intent}/expire_authorization", expire_authorization, method="POST"
        ),
        api_route("/v1/payment_intents", list_intents, method="GET", spec=PaymentIntentListParams),
        api_route(
            "/v1/payment_intents/{intent}", retrieve_intent, method="GET", spec=PaymentIntentRetrieveParams
        ),
        api_route(
            "/v1/payment_intents/{intent}/capture",
            capture_intent,
            method="POST",
            spec=PaymentIntentCaptureParams,
        ),
        api_route(
            "/v1/payment_intents/{intent}/cancel",
            cancel_intent,
            method="POST",
            spec=PaymentIntentCancelParams,
        ),
        api_route("/v1/charges/{charge}", retrieve_charge, method="GET", spec=ChargeRetrieveParams),
        api_route("/v1/refunds", create_refund, method="POST", spec=RefundCreateParams),
        api_route("/v1/refunds", list_refunds, method="GET", spec=RefundListParams),
        api_route("/v1/refunds/{refund}", retrieve_refund, method="GET", spec=RefundRetrieveParams),
    ]
