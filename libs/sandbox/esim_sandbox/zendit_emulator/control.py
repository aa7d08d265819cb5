"""Sandbox controls under `/_sandbox/`, apart from the API and without auth (loopback only).

    GET  /_sandbox/state                          wallet, purchases, top-ups (last4 only), rules, faults
    POST /_sandbox/reset                          back to the configuration create_app was given
    POST /_sandbox/wallet                         {"balance": int}  (wallet units; not a ledger row)
    POST /_sandbox/purchase_delay                 {"seconds": float}  (applies to new purchases)
    POST /_sandbox/purchase_failures              {"code", "count"=1, "offerId"?, "message"?}
    POST /_sandbox/purchase_stalls                {"count"=1, "offerId"?}  (stay IN_PROGRESS)
    POST /_sandbox/purchases/{id}/resolve         {"status": "DONE"|"FAILED", "code"?, "message"?}
    POST /_sandbox/purchases/{id}/qrcode          {"image": "real"|"wrong"|"blank"}: what Zendit's QR
                                                  image for that purchase shows (a QR code of its LPA
                                                  string, of another activation code, or no code at
                                                  all); may be set before the purchase is placed
    POST /_sandbox/offers/{offerId}               {"enabled": bool}
    POST /_sandbox/faults                         {"endpoint", "count"=1, "status"=500|null,
                                                   "sleepSeconds"=0, "when"="before"|"after"}
    DELETE /_sandbox/faults                       clear injected faults, purchase rules and QR images
    /_sandbox/webhook...                          Zendit's purchase webhooks: see `webhooks.py`

Endpoint names for faults: get_balance, list_offers, get_offer, create_purchase, get_purchase,
get_qrcode, list_purchases, list_transactions, wallet_topup, or "*" for any.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .activation import QR_IMAGES
from .http import BadRequest, error_response, read_json_object, state_of
from .state import Fault, PurchaseRule

ENDPOINTS = frozenset(
    {
        "get_balance",
        "list_offers",
        "get_offer",
        "create_purchase",
        "get_purchase",
        "get_qrcode",
        "list_purchases",
        "list_transactions",
        "wallet_topup",
        "*",
    }
)


def _int(body: dict[str, Any], name: str, default: int | None = None, low: int = 0) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise BadRequest(f"{name} must be an integer >= {low}", {name: "invalid"})
    return value


def _number(body: dict[str, Any], name: str, default: float | None = None) -> float:
    value = body.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{name} must be a number >= 0", {name: "invalid"})
    return float(value)


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{name} must be a string", {name: "invalid"})
    return value


def _control(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except BadRequest as exc:
            return error_response(400, message=exc.message, fields=exc.fields)

    return wrapper


@_control
async def show_state(request: Request) -> Response:
    return JSONResponse(state_of(request).snapshot())


@_control
async def reset(request: Request) -> Response:
    state_of(request).reset()
    return JSONResponse(state_of(request).snapshot())


@_control
async def set_wallet(request: Request) -> Response:
    body = await read_json_object(request)
    state_of(request).set_balance(_int(body, "balance"))
    return JSONResponse(state_of(request).snapshot()["wallet"])


@_control
async def set_purchase_delay(request: Request) -> Response:
    body = await read_json_object(request)
    state_of(request).purchase_delay_seconds = _number(body, "seconds")
    return JSONResponse({"purchaseDelaySeconds": state_of(request).purchase_delay_seconds})


@_control
async def add_purchase_failures(request: Request) -> Response:
    body = await read_json_object(request)
    code = body.get("code")
    if not isinstance(code, str) or not code:
        raise BadRequest(
            "code is required, e.g. INSUFFICIENT_FUNDS or PRODUCT_UNAVAILABLE", {"code": "required"}
        )
    rule = PurchaseRule(
        kind="fail",
        remaining=_int(body, "count", 1, low=1),
        code=code,
        message=_optional_str(body, "message") or "",
        offer_id=_optional_str(body, "offerId"),
    )
    state_of(request).add_purchase_rule(rule)
    return JSONResponse(vars(rule))


@_control
async def add_purchase_stalls(request: Request) -> Response:
    body = await read_json_object(request)
    rule = PurchaseRule(
        kind="stall", remaining=_int(body, "count", 1, low=1), offer_id=_optional_str(body, "offerId")
    )
    state_of(request).add_purchase_rule(rule)
    return JSONResponse(vars(rule))


@_control
async def resolve_purchase(request: Request) -> Response:
    body = await read_json_object(request)
    status = body.get("status")
    if status not in ("DONE", "FAILED"):
        raise BadRequest("status must be DONE or FAILED", {"status": "invalid"})
    state = state_of(request)
    transaction_id = request.path_params["transaction_id"]
    if transaction_id not in state.purchases:
        return error_response(404, message="Transaction not found")
    record = state.resolve(
        transaction_id,
        status=status,
        code=_optional_str(body, "code") or "",
        message=_optional_str(body, "message") or "",
    )
    return JSONResponse(state.purchase_json(record))


@_control
async def set_qr_image(request: Request) -> Response:
    body = await read_json_object(request)
    image = body.get("image")
    if image not in QR_IMAGES:
        raise BadRequest(f"image must be one of {list(QR_IMAGES)}", {"image": "invalid"})
    transaction_id = request.path_params["transaction_id"]
    state_of(request).set_qr_image(transaction_id, image)
    return JSONResponse({"transactionId": transaction_id, "image": image})


@_control
async def set_offer(request: Request) -> Response:
    body = await read_json_object(request)
    offer = state_of(request).offers.get(request.path_params["offer_id"])
    if offer is None:
        return error_response(404, message="Offer not found")
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise BadRequest("enabled must be a boolean", {"enabled": "invalid"})
    offer["enabled"] = enabled
    return JSONResponse(offer)


@_control
async def add_fault(request: Request) -> Response:
    body = await read_json_object(request)
    name = body.get("endpoint")
    if name not in ENDPOINTS:
        raise BadRequest(f"endpoint must be one of {sorted(ENDPOINTS)}", {"endpoint": "invalid"})
    status = body.get("status", 500)
    if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
        raise BadRequest("status must be an HTTP error status or null", {"status": "invalid"})
    when = body.get("when", "before")
    if when not in ("before", "after"):
        raise BadRequest("when must be before or after", {"when": "invalid"})
    fault = Fault(
        endpoint=str(name),
        remaining=_int(body, "count", 1, low=1),
        status=status,
        sleep_seconds=_number(body, "sleepSeconds", 0.0),
        when=when,
    )
    state_of(request).add_fault(fault)
    return JSONResponse(vars(fault))


@_control
async def clear_faults(request: Request) -> Response:
    state_of(request).clear_injections()
    return JSONResponse({"faults": [], "purchaseRules": []})


ROUTES = [
    Route("/state", show_state, methods=["GET"]),
    Route("/reset", reset, methods=["POST"]),
    Route("/wallet", set_wallet, methods=["POST"]),
    Route("/purchase_delay", set_purchase_delay, methods=["POST"]),
    Route("/purchase_failures", add_purchase_failures, methods=["POST"]),
    Route("/purchase_stalls", add_purchase_stalls, methods=["POST"]),
    Route("/purchases/{transaction_id}/resolve", resolve_purchase, methods=["POST"]),
    Route("/purchases/{transaction_id}/qrcode", set_qr_image, methods=["POST"]),
    Route("/offers/{offer_id}", set_offer, methods=["POST"]),
    Route("/faults", add_fault, methods=["POST"]),
    Route("/faults", clear_faults, methods=["DELETE"]),
]
