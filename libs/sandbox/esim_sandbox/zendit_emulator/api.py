"""The emulated Zendit API v1 routes (docs/zendit-api.md, "Endpoints we use")."""

from __future__ import annotations

import base64
import re
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .activation import qr_png
from .http import BadRequest, endpoint, error_response, page_body, page_params, read_json_object, state_of

_TRANSACTION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Zendit's date filter: an optional comparison prefix and an RFC 3339 time, e.g. `gte2024-03-29T00:00:00Z`.
_DATE_FILTER_RE = re.compile(r"^(gte|gt|lte|lt|eq)?(\d{4}-\d{2}-\d{2}.*)$")
_COMPARE = {
    "gte": lambda a, b: a >= b,
    "gt": lambda a, b: a > b,
    "lte": lambda a, b: a <= b,
    "lt": lambda a, b: a < b,
    "eq": lambda a, b: a == b,
}


def _matches_date(value: str, spec: str | None) -> bool:
    if not spec:
        return True
    match = _DATE_FILTER_RE.match(spec)
    if match is None:
        raise BadRequest("Invalid createdAt filter", {"createdAt": "expected e.g. gte2024-01-01T00:00:00Z"})
    operator, moment = match.group(1) or "gte", match.group(2)
    try:
        threshold = datetime.fromisoformat(moment.replace("Z", "+00:00"))
        actual = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest("Invalid createdAt filter", {"createdAt": "not an RFC 3339 time"}) from None
    return bool(_COMPARE[operator](actual, threshold))


def _same(a: str, b: str | None) -> bool:
    return b is None or a.casefold() == b.casefold()


@endpoint("get_balance")
async def get_balance(request: Request) -> Response:
    state = state_of(request)
    return JSONResponse(
        {
            "availableBalance": state.available,
            "currency": state.wallet_currency,
            "currencyDivisor": state.wallet_divisor,
        }
    )


@endpoint("list_offers")
async def list_offers(request: Request) -> Response:
    limit, offset = page_params(request)
    query = request.query_params
    offers = [
        offer
        for offer in state_of(request).offers.values()
        if _same(offer["country"], query.get("country"))
        and _same(offer["brand"], query.get("brand"))
        and (query.get("regions") is None or any(_same(r, query["regions"]) for r in offer["regions"]))
        and (query.get("subType") is None or any(_same(s, query["subType"]) for s in offer["subTypes"]))
    ]
    return JSONResponse(page_body(offers, limit, offset))


@endpoint("get_offer")
async def get_offer(request: Request) -> Response:
    offer = state_of(request).offers.get(request.path_params["offer_id"])
    if offer is None or not offer["enabled"]:
        return error_response(404, message="Offer not found")
    return JSONResponse(offer)


@endpoint("create_purchase")
async def create_purchase(request: Request) -> Response:
    state = state_of(request)
    body = await read_json_object(request)
    transaction_id, offer_id, iccid = body.get("transactionId"), body.get("offerId"), body.get("iccid")
    fields = {}
    if not isinstance(transaction_id, str) or not _TRANSACTION_ID_RE.match(transaction_id):
        fields["transactionId"] = "required, 1-128 characters of [A-Za-z0-9_-]"
    if not isinstance(offer_id, str) or not offer_id:
        fields["offerId"] = "required"
    if iccid is not None and (not isinstance(iccid, str) or not iccid.isdigit()):
        fields["iccid"] = "must be the digits of an existing eSIM"
    if fields:
        raise BadRequest("Invalid purchase request", fields)
    assert isinstance(transaction_id, str) and isinstance(offer_id, str)
    if transaction_id in state.purchases:
        # Reuse of an id is undocumented; refusing it keeps one id = one purchase, which is what the
        # "GET before re-POST" rule in zendit-api.md relies on.
        raise BadRequest("Transaction already exists", {"transactionId": "already used"})
    offer = state.offers.get(offer_id)
    if offer is None or not offer["enabled"]:
        return error_response(404, message="Offer not found")
    record = state.create_purchase(transaction_id, offer, iccid)
    return JSONResponse({"transactionId": record.transaction_id, "status": record.status})


@endpoint("get_purchase")
async def get_purchase(request: Request) -> Response:
    state = state_of(request)
    record = state.purchases.get(request.path_params["transaction_id"])
    if record is None:
        return error_response(404, message="Transaction not found")
    return JSONResponse(state.purchase_json(record))


@endpoint("get_qrcode")
async def get_qrcode(request: Request) -> Response:
    state = state_of(request)
    record = state.purchases.get(request.path_params["transaction_id"])
    if record is None:
        return error_response(404, message="Transaction not found")
    if record.status != "DONE" or record.confirmation is None:
        raise BadRequest(f"Transaction is {record.status}, the QR code exists once it is DONE")
    png = qr_png(record.confirmation, state.qr_images.get(record.transaction_id, "real"))
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"imageBase64": base64.b64encode(png).decode("ascii")})
    return Response(png, media_type="image/png")


@endpoint("list_purchases")
async def list_purchases(request: Request) -> Response:
    state = state_of(request)
    limit, offset = page_params(request)
    query = request.query_params
    records = sorted(state.purchases.values(), key=lambda r: r.seq, reverse=True)
    items: list[dict[str, Any]] = [
        state.purchase_json(record) for record in records if _same(record.status, query.get("status"))
    ]
    items = [item for item in items if _matches_date(item["createdAt"], query.get("createdAt"))]
    return JSONResponse(page_body(items, limit, offset))


@endpoint("list_transactions")
async def list_transactions(request: Request) -> Response:
    limit, offset = page_params(request)
    query = request.query_params
    rows = [
        row
        for row in state_of(request).ledger()
        if _same(row["productType"], query.get("productType"))
        and _same(row["status"], query.get("status"))
        and _same(row["type"], query.get("type"))
        and _matches_date(row["createdAt"], query.get("createdAt"))
    ]
    return JSONResponse(page_body(rows, limit, offset))


ROUTES = [
    Route("/balance", get_balance, methods=["GET"]),
    Route("/esim/offers", list_offers, methods=["GET"]),
    Route("/esim/offers/{offer_id}", get_offer, methods=["GET"]),
    Route("/esim/purchases", create_purchase, methods=["POST"]),
    Route("/esim/purchases", list_purchases, methods=["GET"]),
    Route("/esim/purchases/{transaction_id}", get_purchase, methods=["GET"]),
    Route("/esim/purchases/{transaction_id}/qrcode", get_qrcode, methods=["GET"]),
    Route("/transactions", list_transactions, methods=["GET"]),
]
