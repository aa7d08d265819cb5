"""`HEAD` + `POST /api/webhooks/zendit`: Zendit says a purchase changed. A hint, never data.

Zendit signs nothing: the only authenticity is the custom header set in its console
(`ZENDIT_WEBHOOK_HEADER: ZENDIT_WEBHOOK_SECRET`), compared here in constant time. Even an
authentic body is not trusted: all we take from it is the purchase's `transactionId`, and the
provisioning service fetches that purchase from Zendit with our own key before acting on it
(`PurchaseUpdateHint`). A body claiming DONE therefore changes nothing while Zendit says otherwise.

HEAD  200, empty, without the secret header: Zendit's console checks the URL with a HEAD before it
      saves the webhook, and whether that check carries the custom header is not documented. The
      answer is the same for everyone, reveals nothing and has no effect.
POST
  401  missing or wrong secret header (checked before the body is read; nothing published), and every
       request while ZENDIT_WEBHOOK_SECRET is empty (an empty header must not match it)
  413  body larger than MAX_BODY_BYTES
  400  not a JSON object with a string `transactionId`
  200  hint published (confirmed by the broker) — or ignored: an id that is not one of ours, or
       names no order, gets the same 200 so the endpoint tells nobody which orders exist
  503  the database or the broker failed: Zendit retries (its retry schedule is unpublished; the
       scheduled poll finishes the order anyway); 500 for anything unexpected (logged)
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from esim_common.events import PurchaseUpdateHint
from esim_common.logging import bind_transaction_id
from esim_common.order_repository import get_order
from webhook import metrics
from webhook.ports import PortsDep
from webhook.responses import signed_body, webhook_errors
from webhook.stripe_webhooks import BodyTooLarge, read_bounded_body
from webhook.unavailable import DEPENDENCY_UNAVAILABLE

log = logging.getLogger("esim.webhook.zendit")

router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])

# A purchase body (offer facts, confirmation, log trail) is a few KiB; 64 KiB bounds what a caller
# can make us buffer.
MAX_BODY_BYTES = 64 * 1024

# Zendit purchase ids are ours: the order's transaction id (`txn_` + 24 hex) for the first attempt,
# `<txn>-r<n>` for a later one (provisioning's `zendit_transaction_id`). Anything else is not ours.
ZENDIT_PURCHASE_ID_RE = re.compile(r"^(txn_[0-9a-f]{24})(?:-r(?:[2-9]|[1-9][0-9]{1,2}))?$")


def order_of_purchase(zendit_transaction_id: str) -> str | None:
    """Our order's transaction id for a Zendit purchase id, or None when the id is not one of ours."""
    match = ZENDIT_PURCHASE_ID_RE.fullmatch(zendit_transaction_id)
    return match.group(1) if match else None


def secret_matches(provided: str | None, expected: str) -> bool:
    """Constant-time comparison (as bytes: `compare_digest` refuses non-ASCII str). An empty configured
    secret matches nothing: it would otherwise let in anyone sending the header empty."""
    if not expected:
        return False
    return provided is not None and hmac.compare_digest(provided.encode(), expected.encode())


class Malformed(Exception):
    pass


def purchase_id_in(body: bytes) -> str:
    """The `transactionId` of a webhook body, and nothing else from it."""
    try:
        document: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Malformed("body is not JSON") from None
    if not isinstance(document, dict):
        raise Malformed("body is not a JSON object")
    purchase_id = document.get("transactionId")
    if not isinstance(purchase_id, str) or not purchase_id:
        raise Malformed("transactionId missing")
    return purchase_id


def _answer(status_code: int, outcome: str, message: str = "") -> Response:
    metrics.zendit_webhooks_total.labels(outcome=outcome).inc()
    if status_code == 200:
        return JSONResponse({"received": True})
    return JSONResponse({"error": message}, status_code=status_code)


@router.head(
    "/zendit",
    response_class=Response,
    responses={200: {"description": "Empty: the URL check of Zendit's console."}},
)
async def zendit_webhook_check() -> Response:
    return Response(status_code=200)


@router.post(
    "/zendit",
    responses=webhook_errors(
        e400="Not a Zendit purchase notification.",
        e401="Missing or wrong secret header (ZENDIT_WEBHOOK_HEADER).",
        e413="Body larger than the limit.",
        e500="Unexpected error; Zendit retries.",
        e503="The database or the broker is unavailable; Zendit retries.",
    ),
    openapi_extra=signed_body(
        "X-Zendit-Webhook-Secret", "A Zendit purchase notification; a hint only (re-fetched by id)."
    ),
)
async def zendit_webhook(request: Request, ports: PortsDep) -> Response:
    settings = ports.ctx.settings
    provided = request.headers.get(settings.zendit_webhook_header)
    expected = settings.zendit_webhook_secret.get_secret_value()
    if not expected:
        # Only the sandbox can start like this (production refuses short secrets): say why all fail.
        log.error("zendit webhook refused: ZENDIT_WEBHOOK_SECRET is empty, so nothing can be authentic")
        return _answer(401, "unauthorized", "unauthorized")
    if not secret_matches(provided, expected):
        log.warning("zendit webhook refused: missing or wrong secret header")
        return _answer(401, "unauthorized", "unauthorized")
    try:
        body = await read_bounded_body(request, MAX_BODY_BYTES)
    except BodyTooLarge:
        return _answer(413, "too_large", f"webhook body larger than {MAX_BODY_BYTES} bytes")
    try:
        zendit_id = purchase_id_in(body)
    except Malformed as exc:
        return _answer(400, "malformed", f"{exc}; expected a Zendit purchase")
    transaction_id = order_of_purchase(zendit_id)
    if transaction_id is None:
        # Another system's purchase on the same Zendit account (or junk): not ours to look at.
        log.info("zendit webhook for a purchase that is not ours ignored")
        return _answer(200, "foreign")
    with bind_transaction_id(transaction_id):
        try:
            if await get_order(ports.ctx.pool, transaction_id) is None:
                log.info("zendit webhook for an unknown order ignored")
                return _answer(200, "unknown_order")
            await ports.ctx.publisher.publish(
                PurchaseUpdateHint(transaction_id=transaction_id, zendit_transaction_id=zendit_id)
            )
        except DEPENDENCY_UNAVAILABLE as exc:
            log.warning(
                "zendit webhook not forwarded, Zendit will retry",
                extra={"zendit_transaction_id": zendit_id, "error": f"{type(exc).__name__}: {exc}"},
            )
            return _answer(503, "unavailable", "temporarily unable to take the notification; retry")
        except Exception:
            log.exception("zendit webhook failed", extra={"zendit_transaction_id": zendit_id})
            return _answer(500, "error", "internal error; retry")
        log.info("zendit purchase hint published", extra={"zendit_transaction_id": zendit_id})
        return _answer(200, "hinted")
