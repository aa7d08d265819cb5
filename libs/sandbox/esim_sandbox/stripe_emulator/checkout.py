"""Checkout Sessions (mode `payment` with `price_data` line items) and what paying one does."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route
from stripe.params.checkout import (
    SessionCreateParams,
    SessionExpireParams,
    SessionListParams,
    SessionRetrieveParams,
)

from . import payment_objects, payments
from .api import Call, api_route
from .coerce import as_currency, as_int, metadata, opt_int, opt_str, require
from .errors import StripeApiError, invalid_value, missing_param, no_such
from .ids import CHECKOUT_SESSION_ID_LENGTH, new_id, now
from .lists import paginate
from .render import render
from .state import StripeState
from .webhooks import Webhooks

# Stripe's bounds for `expires_at`: between 30 minutes and 24 hours after creation (also the default).
MIN_EXPIRY_SECONDS = 30 * 60
MAX_EXPIRY_SECONDS = 24 * 60 * 60
# Smallest amount Stripe lets a Checkout Session charge, by currency (minor units).
MINIMUM_CHARGE = {"usd": 50, "eur": 50, "gbp": 30}
CAPTURE_METHODS = ("automatic", "automatic_async", "manual")
# What a PaymentIntent created by Checkout reports when payment_intent_data does not say (API ≥ 2024-04).
DEFAULT_CAPTURE_METHOD = "automatic_async"


async def create_session(call: Call) -> dict[str, Any]:
    params = call.params
    mode = opt_str(params, "mode") or "payment"
    if mode != "payment":
        raise invalid_value("mode", "The Stripe emulator supports Checkout Sessions in mode=payment only.")
    amount, currency = _line_items_total(params.get("line_items"))
    created = now()
    expires_at = _expires_at(params, created)
    intent_data = _intent_data(params.get("payment_intent_data") or {})
    session_id = new_id("cs_test_", CHECKOUT_SESSION_ID_LENGTH)
    client_reference_id = opt_str(params, "client_reference_id")
    if client_reference_id is not None and len(client_reference_id) > 200:
        raise invalid_value("client_reference_id", "client_reference_id must be at most 200 characters.")
    session = payment_objects.checkout_session(
        session_id=session_id,
        created=created,
        expires_at=expires_at,
        url=f"{call.base_url}/_sandbox/checkout/{session_id}",
        amount_total=amount,
        currency=currency,
        success_url=_url(params, "success_url"),
        cancel_url=_url(params, "cancel_url"),
        client_reference_id=client_reference_id,
        customer_email=opt_str(params, "customer_email"),
        metadata=metadata(params.get("metadata")),
        locale=opt_str(params, "locale"),
    )
    call.state.add(session)
    call.state.private_of(session_id)["payment_intent_data"] = intent_data
    return call.render(session)


def _line_items_total(line_items: Any) -> tuple[int, str]:
    if not line_items:
        raise missing_param("line_items")
    if not isinstance(line_items, list):
        raise invalid_value("line_items", "Invalid array: line_items must be a list.")
    total, currencies = 0, set()
    for index, item in enumerate(line_items):
        prefix = f"line_items[{index}]"
        if not isinstance(item, dict):
            raise invalid_value(prefix, f"Invalid hash: {prefix}")
        if "price" in item:
            raise no_such("price", str(item["price"]), param=f"{prefix}[price]")
        price_data = item.get("price_data")
        if not isinstance(price_data, dict):
            raise missing_param(f"{prefix}[price_data]")
        currencies.add(
            as_currency(
                require(price_data, "currency", prefix=f"{prefix}[price_data]"),
                f"{prefix}[price_data][currency]",
            )
        )
        unit_amount = as_int(
            require(price_data, "unit_amount", prefix=f"{prefix}[price_data]"),
            f"{prefix}[price_data][unit_amount]",
            minimum=0,
        )
        if "product" not in price_data and not (price_data.get("product_data") or {}).get("name"):
            raise missing_param(f"{prefix}[price_data][product_data][name]")
        quantity = as_int(require(item, "quantity", prefix=prefix), f"{prefix}[quantity]", minimum=1)
        total += unit_amount * quantity
    if len(currencies) > 1:
        raise invalid_value("line_items", "All line items must use the same currency.")
    (currency,) = currencies
    if total < MINIMUM_CHARGE.get(currency, 1):
        raise invalid_value(
            "line_items",
            f"The Checkout Session's total amount due must add up to at least "
            f"{MINIMUM_CHARGE.get(currency, 1)} {currency} (minor units).",
        )
    return total, currency


def _expires_at(params: dict[str, Any], created: int) -> int:
    expires_at = opt_int(params, "expires_at")
    if expires_at is None:
        return created + MAX_EXPIRY_SECONDS
    if not created + MIN_EXPIRY_SECONDS <= expires_at <= created + MAX_EXPIRY_SECONDS:
        raise invalid_value(
            "expires_at",
            "The `expires_at` timestamp must be between 30 minutes and 24 hours "
            "from Checkout Session creation.",
        )
    return expires_at


def _intent_data(data: dict[str, Any]) -> dict[str, Any]:
    capture_method = opt_str(data, "capture_method", param="payment_intent_data[capture_method]")
    if capture_method is not None and capture_method not in CAPTURE_METHODS:
        raise invalid_value(
            "payment_intent_data[capture_method]",
            f"Invalid payment_intent_data[capture_method]: must be one of {', '.join(CAPTURE_METHODS)}",
        )
    return {
        "capture_method": capture_method or DEFAULT_CAPTURE_METHOD,
        "metadata": metadata(data.get("metadata"), "payment_intent_data[metadata]"),
        "description": opt_str(data, "description", param="payment_intent_data[description]"),
        "receipt_email": opt_str(data, "receipt_email", param="payment_intent_data[receipt_email]"),
    }


def _url(params: dict[str, Any], key: str) -> str | None:
    url = opt_str(params, key)
    if url is not None and not url.startswith(("http://", "https://")):
        raise invalid_value(key, f"Not a valid URL: {key}")
    return url


async def retrieve_session(call: Call) -> dict[str, Any]:
    session = call.state.get("checkout.session", call.path["session"])
    expire_if_due(call.state, call.webhooks, session)
    return call.render(session)


async def list_sessions(call: Call) -> dict[str, Any]:
    filters = {key: call.params[key] for key in ("payment_intent", "status") if call.params.get(key)}
    return paginate(call, call.state.find("checkout.session", **filters), "/v1/checkout/sessions")


async def expire_session(call: Call) -> dict[str, Any]:
    session = call.state.get("checkout.session", call.path["session"])
    if session["status"] != "open":
        raise StripeApiError(
            400,
            f"This Checkout Session is {session['status']}; only an open Checkout Session can be expired.",
        )
    _expire(call.webhooks, session)
    return call.render(session)


def expire_if_due(state: StripeState, webhooks: Webhooks, session: dict[str, Any]) -> None:
    # Stripe expires sessions on a timer; the emulator notices when someone looks.
    if session["status"] == "open" and now() >= session["expires_at"]:
        _expire(webhooks, session)


def _expire(webhooks: Webhooks, session: dict[str, Any]) -> None:
    session["status"] = "expired"
    session["url"] = None
    webhooks.emit("checkout.session.expired", session)


def pay(
    state: StripeState, webhooks: Webhooks, session: dict[str, Any], *, email: str | None
) -> dict[str, Any]:
    """The customer pays with a card: PaymentIntent + charge, session complete, events sent.

    With `capture_method=manual` the card is only authorised: the PaymentIntent waits in
    `requires_capture` and the session completes with `payment_status: "unpaid"` (funds not yet yours).
    """
    expire_if_due(state, webhooks, session)
    if session["status"] != "open":
        raise StripeApiError(
            400, f"This Checkout Session is {session['status']} and can no longer be paid.", param="session"
        )
    intent_data = state.private_of(session["id"])["payment_intent_data"]
    email = email or session["customer_email"] or "customer@example.com"
    intent, _charge = payments.create_paid_intent(
        state,
        amount=session["amount_total"],
        currency=session["currency"],
        intent_data=intent_data,
        email=email,
    )
    manual = intent["status"] == "requires_capture"
    session.update(
        status="complete",
        payment_status="unpaid" if manual else "paid",
        payment_intent=intent["id"],
        customer_details=payment_objects.customer_details(email),
        url=None,
    )
    intent_event = "payment_intent.amount_capturable_updated" if manual else "payment_intent.succeeded"
    events = [webhooks.emit(intent_event, intent), webhooks.emit("checkout.session.completed", session)]
    return {
        "session": render(state, session),
        "payment_intent": render(state, intent),
        "event_ids": [event["id"] for event in events],
    }


def routes() -> list[Route]:
    return [
        api_route("/v1/checkout/sessions", create_session, method="POST", spec=SessionCreateParams),
        api_route("/v1/checkout/sessions", list_sessions, method="GET", spec=SessionListParams),
        api_route(
            "/v1/checkout/sessions/{session}", retrieve_session, method="GET", spec=SessionRetrieveParams
        ),
        api_route(
            "/v1/checkout/sessions/{session}/expire", expire_session, method="POST", spec=SessionExpireParams
        ),
    ]
