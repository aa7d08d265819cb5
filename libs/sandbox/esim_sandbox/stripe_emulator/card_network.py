"""`POST /_sandbox/card_network/charge`: a merchant charging one of our Issuing cards by its number.

The Zendit emulator's top-up gateway only knows what a customer types into a payment form (number,
expiry, CVC), so this route plays the card network: it finds the card, checks expiry and CVC, runs the
same authorisation as Stripe's test helper and captures an approved one at once.

Contract: JSON `{"number", "exp_month", "exp_year", "cvc", "amount", "currency", "merchant_name",
"reference"}` → 200 `{"approved": bool, "authorization_id": str | null, "decline_reason": str | null}`.
Decline reasons: `incorrect_number` (no such card), `expired_card` (expiry differs or passed),
`incorrect_cvc`, otherwise Stripe's authorisation reasons (`card_canceled`, `card_inactive`,
`spending_controls`, `insufficient_funds`, `not_allowed`, `webhook_declined`, ...).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from .auth_rules import Decision
from .authorizations import authorize, capture
from .control import control_route, field, read_json
from .errors import StripeApiError

_CURRENCY = re.compile(r"^[a-z]{3}$")


async def charge(request: Request) -> dict[str, Any]:
    state, webhooks = request.app.state.stripe, request.app.state.webhooks
    body = await read_json(request)
    number = field(body, "number", str).replace(" ", "")
    exp_month, exp_year = field(body, "exp_month", int), field(body, "exp_year", int)
    cvc = field(body, "cvc", str)
    amount = field(body, "amount", int)
    currency = field(body, "currency", str).lower()
    if amount < 1 or not _CURRENCY.match(currency):
        raise StripeApiError(400, "amount must be a positive integer and currency a 3-letter code.")
    card_id = state.cards_by_number.get(number)
    if card_id is None:
        return _answer(False, None, "incorrect_number")
    card, secret = state.objects[card_id], state.card_secrets[card_id]
    refused, network_reason, verification = None, None, {}
    if (exp_month, exp_year) != (card["exp_month"], card["exp_year"]):
        refused = Decision(False, "verification_failed", "The expiry date does not match the card.")
        network_reason, verification = "expired_card", {"expiry_check": "mismatch"}
    elif not secrets.compare_digest(cvc.encode(), secret.cvc.encode()):
        refused = Decision(False, "verification_failed", "The CVC does not match the card.")
        network_reason, verification = "incorrect_cvc", {"cvc_check": "mismatch"}
    merchant = {
        "name": field(body, "merchant_name", str, required=False),
        "category": field(body, "merchant_category", str, required=False),
        "country": field(body, "merchant_country", str, required=False),
    }
    auth = await authorize(
        state,
        webhooks,
        card_id=card_id,
        amount=amount,
        currency=currency,
        merchant_data=merchant,
        authorization_method="keyed_in",
        verification=verification,
        network_transaction_id=field(body, "reference", str, required=False),
        refused=refused,
    )
    if not auth["approved"]:
        return _answer(False, auth["id"], network_reason or auth["request_history"][-1]["reason"])
    transaction = capture(state, auth, amount=None)
    webhooks.emit("issuing_transaction.created", transaction)
    return _answer(True, auth["id"], None)


def _answer(approved: bool, authorization_id: str | None, decline_reason: str | None) -> dict[str, Any]:
    return {"approved": approved, "authorization_id": authorization_id, "decline_reason": decline_reason}


def routes() -> list[Route]:
    return [control_route("/_sandbox/card_network/charge", charge, method="POST")]
