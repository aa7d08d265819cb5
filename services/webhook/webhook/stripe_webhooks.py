"""`POST /api/webhooks/stripe`: verify, record, apply, publish, and only then answer 2xx.

413  body larger than MAX_BODY_BYTES (nothing read beyond the limit, nothing recorded)
400  no Stripe-Signature header, a signature matching none of STRIPE_WEBHOOK_SECRETS, or a body
     that is not a Stripe event (nothing recorded)
503  the database or the broker failed: Stripe retries, and the retry finishes the work
500  anything unexpected (logged with its traceback): Stripe retries as well
200  recorded and applied; event types we do not act on are recorded and acknowledged too
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from esim_common.providers.stripe import StripeSignatureError
from webhook import metrics
from webhook.payments import process_event
from webhook.ports import PortsDep
from webhook.unavailable import DEPENDENCY_UNAVAILABLE

log = logging.getLogger("esim.webhook.stripe")

router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])

# Stripe's largest event payloads are a few KiB; 64 KiB leaves room and bounds what an unauthenticated
# caller can make us buffer before the signature is checked.
MAX_BODY_BYTES = 64 * 1024


class BodyTooLarge(Exception):
    pass


async def read_bounded_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing to buffer more than `limit` bytes whatever Content-Length claims."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(status_code: int, outcome: str, message: str) -> JSONResponse:
    metrics.stripe_webhooks_total.labels(outcome=outcome).inc()
    body = {"received": True} if status_code == 200 else {"error": message}
    return JSONResponse(body, status_code=status_code)


@router.post("/stripe")
async def stripe_webhook(request: Request, ports: PortsDep) -> JSONResponse:
    try:
        payload = await read_bounded_body(request, MAX_BODY_BYTES)
    except BodyTooLarge:
        return _answer(413, "too_large", f"webhook body larger than {MAX_BODY_BYTES} bytes")
    signature = request.headers.get("stripe-signature")
    if not signature:
        return _answer(400, "bad_signature", "missing Stripe-Signature header")
    try:
        event = ports.stripe.construct_event(payload, signature, ports.webhook_secrets)
    except StripeSignatureError as exc:
        log.warning("stripe webhook refused", extra={"error": str(exc)})
        return _answer(400, "bad_signature", "invalid signature or payload")
    try:
        outcome = await process_event(ports.ctx.pool, ports.ctx.publisher, event)
    except DEPENDENCY_UNAVAILABLE as exc:
        log.warning(
            "stripe webhook not processed, Stripe will retry",
            extra={"event_id": event.id, "event_type": event.type, "error": f"{type(exc).__name__}: {exc}"},
        )
        return _answer(503, "unavailable", "temporarily unable to record or announce the event; retry")
    except Exception:
        log.exception("stripe webhook failed", extra={"event_id": event.id, "event_type": event.type})
        return _answer(500, "error", "internal error; retry")
    return _answer(200, outcome, "")
