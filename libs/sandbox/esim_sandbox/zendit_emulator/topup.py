"""Our top-up gateway contract, implemented by the emulator at `POST /v1/wallet/topup`.

Real Zendit has no such call (docs/zendit-api.md); this is the contract from architecture.md, "Wallet
funding": charge the card through the Stripe emulator's card network, credit the wallet, answer
`{topupId, status, amount, currency}`. Idempotent by `reference`: the first final outcome (success or
decline) is replayed; the same reference with another amount or currency is a 409. Only the card's
last four digits are kept, and nothing here logs the card.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from esim_common.money import UnknownCurrency, minor_unit_exponent

from . import card_network
from .http import BadRequest, endpoint, error_response, read_json_object, state_of
from .state import TopupRecord, ZenditState, new_topup_id

_REFERENCE_RE = re.compile(r"^[A-Za-z0-9:_.-]{1,200}$")
_CARD_NUMBER_RE = re.compile(r"^\d{12,19}$")
_CVC_RE = re.compile(r"^\d{3,4}$")


def _validated(body: dict[str, Any], state: ZenditState) -> tuple[int, str, dict[str, Any], str]:
    fields: dict[str, str] = {}
    amount, currency, card, reference = (
        body.get("amount"),
        body.get("currency"),
        body.get("card"),
        body.get("reference"),
    )
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        fields["amount"] = "required, positive integer in minor units"
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
        fields["currency"] = "required, ISO 4217 code"
    else:
        try:
            minor_unit_exponent(currency.upper())
        except UnknownCurrency:
            fields["currency"] = "unknown currency"
        if currency.upper() != state.wallet_currency:
            fields["currency"] = f"the wallet is in {state.wallet_currency}"
    if not isinstance(reference, str) or not _REFERENCE_RE.match(reference):
        fields["reference"] = "required, 1-200 characters of [A-Za-z0-9:_.-]"
    if not isinstance(card, dict):
        fields["card"] = "required object {number, exp_month, exp_year, cvc}"
    else:
        # Field names only: the values must never be echoed back.
        if not isinstance(card.get("number"), str) or not _CARD_NUMBER_RE.match(card["number"]):
            fields["card.number"] = "12-19 digits"
        if not isinstance(card.get("cvc"), str) or not _CVC_RE.match(card["cvc"]):
            fields["card.cvc"] = "3-4 digits"
        for name, low, high in (("exp_month", 1, 12), ("exp_year", 2000, 2100)):
            value = card.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                fields[f"card.{name}"] = f"integer {low}..{high}"
    if fields:
        raise BadRequest("Invalid top-up request", fields)
    assert isinstance(amount, int) and isinstance(currency, str) and isinstance(card, dict)
    assert isinstance(reference, str)
    return amount, currency.upper(), card, reference


def _result(record: TopupRecord) -> Response:
    if record.status == "SUCCEEDED":
        return JSONResponse(
            {
                "topupId": record.topup_id,
                "status": record.status,
                "amount": record.amount,
                "currency": record.currency,
            }
        )
    return error_response(402, "CARD_DECLINED", record.decline_reason or "declined")


@endpoint("wallet_topup", key="topup_api_key")
async def wallet_topup(request: Request) -> Response:
    state = state_of(request)
    amount, currency, card, reference = _validated(await read_json_object(request), state)
    # Per-reference lock in the server's event loop: concurrent retries of one top-up charge once.
    locks: dict[str, asyncio.Lock] = request.app.state.topup_locks
    async with locks.setdefault(reference, asyncio.Lock()):
        previous = state.topups.get(reference)
        if previous is not None:
            if (previous.amount, previous.currency) != (amount, currency):
                return error_response(
                    409,
                    "IDEMPOTENCY_CONFLICT",
                    f"reference {reference} was used for another amount or currency",
                )
            return _result(previous)
        try:
            outcome = await card_network.charge(
                state_stripe_url(request), card=card, amount=amount, currency=currency, reference=reference
            )
        except card_network.CardNetworkUnavailable as exc:
            # Nothing recorded: a retry with the same reference charges for real.
            return error_response(503, "SYSTEM_UNAVAILABLE", str(exc))
        record = TopupRecord(
            topup_id=new_topup_id(),
            reference=reference,
            amount=amount,
            currency=currency,
            status="SUCCEEDED" if outcome.approved else "DECLINED",
            card_last4=card["number"][-4:],
            created_at=state.now(),
            decline_reason=None if outcome.approved else (outcome.decline_reason or "declined"),
            authorization_id=outcome.authorization_id,
        )
        if outcome.approved:
            state.credit_topup(record)
        else:
            state.record_declined_topup(record)
        return _result(record)


def state_stripe_url(request: Request) -> str | None:
    url: str | None = request.app.state.stripe_url
    return url


ROUTES = [Route("/wallet/topup", wallet_topup, methods=["POST"])]
