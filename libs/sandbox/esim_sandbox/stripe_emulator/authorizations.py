"""Issuing authorisations: decide, hold the float, capture into transactions.

Used by the Stripe test-helper routes and by the card network control route, so both paths enforce the
same rules. An approved authorisation holds its amount out of the Issuing balance; capturing turns (part
of) the hold into an `issuing.transaction` and releases the rest.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Route
from stripe.params.issuing import (
    AuthorizationListParams,
    AuthorizationRetrieveParams,
    TransactionListParams,
    TransactionRetrieveParams,
)
from stripe.params.test_helpers.issuing import AuthorizationCaptureParams, AuthorizationCreateParams

from . import auth_rules, issuing_objects
from .api import Call, api_route
from .auth_rules import Decision, Spend
from .coerce import as_bool, as_currency, as_int, opt_int, opt_str, require
from .errors import StripeApiError, invalid_value
from .ids import new_id, now
from .lists import paginate
from .render import render
from .state import StripeState
from .webhooks import Webhooks


async def authorize(
    state: StripeState,
    webhooks: Webhooks,
    *,
    card_id: str,
    amount: int,
    currency: str | None,
    merchant_data: dict[str, Any] | None = None,
    authorization_method: str = "online",
    verification: dict[str, Any] | None = None,
    network_transaction_id: str | None = None,
    refused: Decision | None = None,
) -> dict[str, Any]:
    """Create an authorisation and decide it; `refused` forces a decline (failed CVC/expiry checks)."""
    async with state.authorization_lock:
        card = state.get("issuing.card", card_id, param="card")
        cardholder = state.get("issuing.cardholder", card["cardholder"])
        currency = currency or card["currency"]
        auth = state.add(
            issuing_objects.authorization(
                authorization_id=new_id("iauth_"),
                created=now(),
                card_id=card_id,
                cardholder_id=cardholder["id"],
                amount=amount,
                currency=currency,
                merchant=issuing_objects.merchant_data(merchant_data),
                authorization_method=authorization_method,
                verification=verification or {},
                network_transaction_id=network_transaction_id,
                metadata={},
            )
        )
        decision = refused or auth_rules.decide(
            card=card,
            cardholder=cardholder,
            amount=amount,
            currency=currency,
            merchant=auth["merchant_data"],
            spends=_spends(state, card_id),
            issuing_available=state.issuing_available.get(currency, 0),
            at=auth["created"],
        )
        if decision.approved and state.issuing_auth_webhook_url:
            approved, reason = await webhooks.ask_realtime(
                state.issuing_auth_webhook_url, render(state, auth)
            )
            decision = Decision(approved, reason)
        _settle(state, card, auth, amount, decision)
    webhooks.emit("issuing_authorization.created", auth)
    return auth


def _spends(state: StripeState, card_id: str) -> list[Spend]:
    return [
        Spend(
            amount=state.private_of(auth["id"])["spent"],
            created=auth["created"],
            category=auth["merchant_data"]["category"],
        )
        for auth in state.find("issuing.authorization", card=card_id, approved=True)
    ]


def _settle(
    state: StripeState, card: dict[str, Any], auth: dict[str, Any], amount: int, decision: Decision
) -> None:
    auth["request_history"].append(
        issuing_objects.request_history_entry(
            amount=amount,
            currency=auth["currency"],
            approved=decision.approved,
            reason=decision.reason,
            reason_message=decision.message,
            at=auth["created"],
        )
    )
    auth["pending_request"] = None
    if not decision.approved:
        auth.update(approved=False, status="closed")
        return
    auth.update(approved=True, amount=amount, merchant_amount=amount, status="pending")
    state.issuing_available[auth["currency"]] = state.issuing_available.get(auth["currency"], 0) - amount
    state.private_of(auth["id"]).update(held=amount, spent=amount)
    _count_payment(state, card, amount)


def _count_payment(state: StripeState, card: dict[str, Any], amount: int) -> None:
    # `cancel_after.payment_count` counts non-zero approved payments; reaching it cancels the card.
    if amount == 0:
        return
    bookkeeping = state.private_of(card["id"])
    bookkeeping["payments"] = bookkeeping.get("payments", 0) + 1
    lifecycle = card.get("lifecycle_controls") or {}
    limit = (lifecycle.get("cancel_after") or {}).get("payment_count")
    if limit is not None and bookkeeping["payments"] >= limit:
        card["status"] = "canceled"


def capture(
    state: StripeState, auth: dict[str, Any], *, amount: int | None, close: bool = True
) -> dict[str, Any]:
    """Capture (part of) a pending approved authorisation; returns the `issuing.transaction`."""
    if auth["status"] != "pending" or not auth["approved"]:
        raise StripeApiError(
            400,
            f"This authorization has a status of {auth['status']}; only a pending "
            "approved authorization can be captured.",
            param="authorization",
        )
    bookkeeping = state.private_of(auth["id"])
    amount = auth["amount"] if amount is None else amount
    if amount > bookkeeping["held"]:
        raise invalid_value(
            "capture_amount",
            f"capture_amount ({amount}) exceeds the authorized amount ({bookkeeping['held']}).",
        )
    transaction = state.add(
        issuing_objects.transaction(
            transaction_id=new_id("ipi_"),
            created=now(),
            authorization=auth,
            amount=amount,
            balance_transaction=new_id("txn_"),
        )
    )
    auth["transactions"].append(dict(transaction))
    bookkeeping["held"] -= amount
    if close:
        # The uncaptured rest of the hold goes back to the Issuing balance.
        state.issuing_available[auth["currency"]] += bookkeeping["held"]
        bookkeeping["spent"] -= bookkeeping["held"]
        bookkeeping["held"] = 0
        auth["status"] = "closed"
    # UNVERIFIED: what Stripe's `amount` reads after a capture. Its docs give 0 once voided and the
    # remainder once expired; the API reference's capture sample shows 0. We report what is still held.
    auth["amount"] = bookkeeping["held"]
    return transaction


async def create_test_authorization(call: Call) -> dict[str, Any]:
    params = call.params
    verification = (
        params.get("verification_data") if isinstance(params.get("verification_data"), dict) else {}
    )
    auth = await authorize(
        call.state,
        call.webhooks,
        card_id=require(params, "card"),
        amount=as_int(require(params, "amount"), "amount", minimum=0),
        currency=as_currency(params["currency"], "currency") if params.get("currency") else None,
        merchant_data=params.get("merchant_data") if isinstance(params.get("merchant_data"), dict) else None,
        authorization_method=opt_str(params, "authorization_method") or "online",
        verification=verification,
    )
    return call.render(auth)


async def capture_test_authorization(call: Call) -> dict[str, Any]:
    auth = call.state.get("issuing.authorization", call.path["authorization"])
    close = (
        as_bool(call.params["close_authorization"], "close_authorization")
        if "close_authorization" in call.params
        else True
    )
    transaction = capture(
        call.state, auth, amount=opt_int(call.params, "capture_amount", minimum=1), close=close
    )
    call.emit("issuing_transaction.created", transaction)
    call.emit("issuing_authorization.updated", auth)
    return call.render(auth)


async def retrieve_authorization(call: Call) -> dict[str, Any]:
    return call.render(call.state.get("issuing.authorization", call.path["authorization"]))


async def retrieve_transaction(call: Call) -> dict[str, Any]:
    return call.render(call.state.get("issuing.transaction", call.path["transaction"]))


async def list_authorizations(call: Call) -> dict[str, Any]:
    """Newest first; `card`, `cardholder`, `status` and `created` narrow it, as at Stripe."""
    filters = {k: call.params[k] for k in ("card", "cardholder", "status") if call.params.get(k)}
    found = call.state.find("issuing.authorization", **filters)
    return paginate(call, found, "/v1/issuing/authorizations")


async def list_transactions(call: Call) -> dict[str, Any]:
    """Newest first; `card`, `cardholder`, `type` (capture | refund) and `created` narrow it."""
    filters = {k: call.params[k] for k in ("card", "cardholder", "type") if call.params.get(k)}
    found = call.state.find("issuing.transaction", **filters)
    return paginate(call, found, "/v1/issuing/transactions")


def routes() -> list[Route]:
    return [
        api_route(
            "/v1/test_helpers/issuing/authorizations",
            create_test_authorization,
            method="POST",
            spec=AuthorizationCreateParams,
        ),
        api_route(
            "/v1/test_helpers/issuing/authorizations/{authorization}/capture",
            capture_test_authorization,
            method="POST",
            spec=AuthorizationCaptureParams,
        ),
        api_route(
            "/v1/issuing/authorizations", list_authorizations, method="GET", spec=AuthorizationListParams
        ),
        api_route("/v1/issuing/transactions", list_transactions, method="GET", spec=TransactionListParams),
        api_route(
            "/v1/issuing/authorizations/{authorization}",
            retrieve_authorization,
            method="GET",
            spec=AuthorizationRetrieveParams,
        ),
        api_route(
            "/v1/issuing/transactions/{transaction}",
            retrieve_transaction,
            method="GET",
            spec=TransactionRetrieveParams,
        ),
    ]
