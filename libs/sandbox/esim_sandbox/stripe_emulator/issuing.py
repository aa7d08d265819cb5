"""Issuing cardholders and cards. Authorisations against them live in `authorizations.py`."""

from __future__ import annotations

import datetime
import re
from typing import Any

from starlette.routing import Route
from stripe.params.issuing import (
    CardCreateParams,
    CardholderCreateParams,
    CardholderListParams,
    CardholderRetrieveParams,
    CardListParams,
    CardRetrieveParams,
    CardUpdateParams,
)

from . import issuing_objects
from .api import Call, api_route
from .coerce import as_currency, as_int, as_str_list, merge_metadata, metadata, opt_int, opt_str, require
from .errors import StripeApiError, invalid_value, missing_param
from .ids import new_card_number, new_cvc, new_id, now
from .lists import paginate
from .state import CardSecret

# Stripe prints the cardholder name on cards: at most 24 characters, letters (and spaces) only.
CARDHOLDER_NAME = re.compile(r"^[A-Za-z][A-Za-z ]{0,23}$")
CARDHOLDER_TYPES = ("individual", "company")
CARDHOLDER_STATUSES = ("active", "inactive", "blocked")
SPENDING_INTERVALS = ("per_authorization", "daily", "weekly", "monthly", "yearly", "all_time")
# Virtual cards the emulator issues are valid for three years, like Stripe's default.
CARD_VALIDITY_YEARS = 3


async def create_cardholder(call: Call) -> dict[str, Any]:
    params = call.params
    name = require(params, "name")
    if not isinstance(name, str) or not CARDHOLDER_NAME.match(name):
        raise invalid_value(
            "name", "The cardholder name must be at most 24 characters, letters and spaces only."
        )
    holder_type = require(params, "type")
    if holder_type not in CARDHOLDER_TYPES:
        raise invalid_value("type", f"Invalid type: must be one of {', '.join(CARDHOLDER_TYPES)}")
    billing = params.get("billing")
    if not isinstance(billing, dict) or not isinstance(billing.get("address"), dict):
        raise missing_param("billing")
    status = opt_str(params, "status") or "active"
    if status not in CARDHOLDER_STATUSES:
        raise invalid_value("status", f"Invalid status: must be one of {', '.join(CARDHOLDER_STATUSES)}")
    address = billing["address"]
    holder = issuing_objects.cardholder(
        cardholder_id=new_id("ich_"),
        created=now(),
        name=name,
        holder_type=holder_type,
        email=opt_str(params, "email"),
        phone_number=opt_str(params, "phone_number"),
        billing_address={**address, "country": str(address["country"]).upper()},
        status=status,
        metadata=metadata(params.get("metadata")),
        controls=_spending_controls(params.get("spending_controls"), "spending_controls"),
        preferred_locales=as_str_list(params.get("preferred_locales"), "preferred_locales"),
    )
    call.state.add(holder)
    call.emit("issuing_cardholder.created", holder)
    return call.render(holder)


async def retrieve_cardholder(call: Call) -> dict[str, Any]:
    return call.render(call.state.get("issuing.cardholder", call.path["cardholder"]))


async def list_cardholders(call: Call) -> dict[str, Any]:
    filters = {k: call.params[k] for k in ("email", "status", "type", "phone_number") if call.params.get(k)}
    return paginate(call, call.state.find("issuing.cardholder", **filters), "/v1/issuing/cardholders")


async def create_card(call: Call) -> dict[str, Any]:
    params = call.params
    cardholder_id = require(params, "cardholder")
    call.state.get("issuing.cardholder", cardholder_id, param="cardholder")
    if require(params, "type") != "virtual":
        raise invalid_value("type", "The Stripe emulator issues virtual cards only.")
    status = opt_str(params, "status") or "inactive"  # Stripe's default: a new card cannot spend yet
    if status not in ("active", "inactive"):
        raise invalid_value("status", "Invalid status: must be one of active, inactive")
    created = now()
    expiry = datetime.date.fromtimestamp(created)
    chosen = call.state.next_card_secret  # armed through /_sandbox/issuing/next_card: used once
    number = chosen.number if chosen is not None else _unused_number(call)
    card = issuing_objects.card(
        card_id=new_id("ic_"),
        created=created,
        cardholder_id=cardholder_id,
        currency=as_currency(require(params, "currency"), "currency"),
        card_type="virtual",
        status=status,
        last4=number[-4:],
        exp_month=opt_int(params, "exp_month", minimum=1) or expiry.month,
        exp_year=opt_int(params, "exp_year") or expiry.year + CARD_VALIDITY_YEARS,
        controls=_spending_controls(params.get("spending_controls"), "spending_controls"),
        payment_count=_payment_count(params.get("lifecycle_controls")),
        metadata=metadata(params.get("metadata")),
    )
    call.state.add(card)
    call.state.next_card_secret = None
    call.state.card_secrets[card["id"]] = chosen or CardSecret(number=number, cvc=new_cvc())
    call.state.cards_by_number[number] = card["id"]
    call.emit("issuing_card.created", card)
    return call.render(card)


def _unused_number(call: Call) -> str:
    while (number := new_card_number()) in call.state.cards_by_number:
        continue
    return number


def _payment_count(lifecycle: Any) -> int | None:
    if not isinstance(lifecycle, dict):
        return None
    cancel_after = lifecycle.get("cancel_after") or {}
    return as_int(
        require(cancel_after, "payment_count", prefix="lifecycle_controls[cancel_after]"),
        "lifecycle_controls[cancel_after][payment_count]",
        minimum=1,
    )


def _spending_controls(value: Any, prefix: str) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    limits = []
    for index, limit in enumerate(value.get("spending_limits") or []):
        param = f"{prefix}[spending_limits][{index}]"
        interval = require(limit, "interval", prefix=param)
        if interval not in SPENDING_INTERVALS:
            raise invalid_value(
                f"{param}[interval]", f"Invalid interval: must be one of {', '.join(SPENDING_INTERVALS)}"
            )
        limits.append(
            {
                "amount": as_int(require(limit, "amount", prefix=param), f"{param}[amount]", minimum=0),
                "interval": interval,
                "categories": as_str_list(limit.get("categories"), f"{param}[categories]") or None,
            }
        )
    controls: dict[str, Any] = {"spending_limits": limits}
    for key in (
        "allowed_categories",
        "blocked_categories",
        "allowed_card_presences",
        "blocked_card_presences",
    ):
        controls[key] = as_str_list(value.get(key), f"{prefix}[{key}]") or None
    for key in ("allowed_merchant_countries", "blocked_merchant_countries"):
        controls[key] = [c.upper() for c in as_str_list(value.get(key), f"{prefix}[{key}]")] or None
    if value.get("spending_limits_currency"):
        controls["spending_limits_currency"] = as_currency(
            value["spending_limits_currency"], f"{prefix}[spending_limits_currency]"
        )
    return controls


async def retrieve_card(call: Call) -> dict[str, Any]:
    return call.render(call.state.get("issuing.card", call.path["card"]))


async def update_card(call: Call) -> dict[str, Any]:
    card = call.state.get("issuing.card", call.path["card"])
    status = opt_str(call.params, "status")
    if status is not None and status not in ("active", "inactive", "canceled"):
        raise invalid_value("status", "Invalid status: must be one of active, inactive, canceled")
    if card["status"] == "canceled" and status not in (None, "canceled"):
        raise StripeApiError(
            400, "This card has been canceled; a canceled card cannot be reactivated.", param="status"
        )
    previous = {key: card[key] for key in ("status", "metadata", "cancellation_reason", "spending_controls")}
    if status is not None and status != card["status"]:
        card["status"] = status
        if status == "canceled":
            card["cancellation_reason"] = opt_str(call.params, "cancellation_reason")
    card["metadata"] = merge_metadata(card["metadata"], call.params.get("metadata"))
    if "spending_controls" in call.params:
        card["spending_controls"] = issuing_objects.spending_controls(
            _spending_controls(call.params["spending_controls"], "spending_controls")
        )
    changed = {key: value for key, value in previous.items() if card[key] != value}
    if changed:
        call.emit("issuing_card.updated", card, previous_attributes=changed)
    return call.render(card)


async def list_cards(call: Call) -> dict[str, Any]:
    filters = {k: call.params[k] for k in ("cardholder", "status", "type", "last4") if call.params.get(k)}
    for key in ("exp_month", "exp_year"):
        if call.params.get(key):
            filters[key] = as_int(call.params[key], key)
    return paginate(call, call.state.find("issuing.card", **filters), "/v1/issuing/cards")


def routes() -> list[Route]:
    return [
        api_route("/v1/issuing/cardholders", create_cardholder, method="POST", spec=CardholderCreateParams),
        api_route("/v1/issuing/cardholders", list_cardholders, method="GET", spec=CardholderListParams),
        api_route(
            "/v1/issuing/cardholders/{cardholder}",
            retrieve_cardholder,
            method="GET",
            spec=CardholderRetrieveParams,
        ),
        api_route("/v1/issuing/cards", create_card, method="POST", spec=CardCreateParams),
        api_route("/v1/issuing/cards", list_cards, method="GET", spec=CardListParams),
        api_route("/v1/issuing/cards/{card}", retrieve_card, method="GET", spec=CardRetrieveParams),
        api_route("/v1/issuing/cards/{card}", update_card, method="POST", spec=CardUpdateParams),
    ]
