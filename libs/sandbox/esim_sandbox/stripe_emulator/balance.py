"""`GET /v1/balance` (payments balance plus `issuing.available`) and the Issuing float test helper."""

# No `from __future__ import annotations` here: TypedDict must see NotRequired unquoted to mark
# `expand` optional on Python 3.11.
from typing import Any, NotRequired, TypedDict

from starlette.routing import Route
from stripe.params import BalanceRetrieveParams

from . import payment_objects
from .api import Call, api_route
from .coerce import as_currency, as_int, require


class FundBalanceParams(TypedDict):
    """Hand-written: stripe-python 16.1 has no binding for `/v1/test_helpers/issuing/fund_balance`."""

    amount: int
    currency: str
    expand: NotRequired[list[str]]


def balance_object(call: Call) -> dict[str, Any]:
    state = call.state
    return payment_objects.balance(
        available=state.payments_available,
        pending=state.payments_pending,
        issuing_available=state.issuing_available,
    )


async def retrieve_balance(call: Call) -> dict[str, Any]:
    return balance_object(call)


async def fund_issuing_balance(call: Call) -> dict[str, Any]:
    """Raise the Issuing float at once (a real top-up takes days); answers with the new balance."""
    amount = as_int(require(call.params, "amount"), "amount", minimum=1)
    currency = as_currency(require(call.params, "currency"), "currency")
    call.state.issuing_available[currency] = call.state.issuing_available.get(currency, 0) + amount
    return balance_object(call)


def routes() -> list[Route]:
    return [
        api_route("/v1/balance", retrieve_balance, method="GET", spec=BalanceRetrieveParams),
        api_route(
            "/v1/test_helpers/issuing/fund_balance",
            fund_issuing_balance,
            method="POST",
            spec=FundBalanceParams,
        ),
    ]
