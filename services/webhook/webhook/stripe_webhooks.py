"""`POST /api/webhooks/stripe`: verify, record, apply, publish, and only then answer 2xx.

413  body larger than MAX_BODY_BYTES (nothing read beyond the limit, nothing recorded)
408  body not received within BODY_READ_TIMEOUT_SECONDS
400  no Stripe-Signature header, a signature matching none of STRIPE_WEBHOOK_SECRETS, or a body
     that is not a Stripe event (nothing recorded)
503  the database or the broker failed, or WEBHOOK_MAX_IN_FLIGHT verified deliveries are already being
     processed (answered at once, nothing recorded): Stripe retries, and the retry finishes the work
500  anything unexpected (logged with its traceback): Stripe retries as well
200  recorded and applied; event types we do not act on are recorded and acknowledged too

Every answer is logged here, with the event id and outcome when there is one; uvicorn's access line for
this route is dropped while the app runs (it said less, and cost as much CPU as the rest of the logging
for a delivery: see bench/).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from esim_common.providers.stripe import StripeSignatureError
from webhook import metrics
from webhook.load_shedding import Overloaded
from webhook.payments import process_event
from webhook.ports import PortsDep
from webhook.responses import signed_body, webhook_errors
from webhook.unavailable import DEPENDENCY_UNAVAILABLE

log = logging.getLogger("esim.webhook.stripe")

PATH = "/api/webhooks/stripe"
ACCESS_LOGGER = "uvicorn.access"


class SkipDeliveryAccessLines(logging.Filter):
    """Drops uvicorn's access-log record of a POST to this route (its args: client, method, path, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and args[1] == "POST":
            return str(args[2]).partition("?")[0] != PATH
        return True


_skip_delivery_access_lines = SkipDeliveryAccessLines()


@asynccontextmanager
async def _quiet_access_log(app: FastAPI) -> AsyncIterator[None]:
    access = logging.getLogger(ACCESS_LOGGER)
    access.addFilter(_skip_delivery_access_lines)
    try:
        yield
    finally:
        access.removeFilter(_skip_delivery_access_lines)


router = APIRouter(prefix="/api/webhooks", tags=["webhooks"], lifespan=_quiet_access_log)

# Stripe's largest event payloads are a few KiB; 64 KiB leaves room and bounds what an unauthenticated
# caller can make us buffer before the signature is checked.
MAX_BODY_BYTES = 64 * 1024
# Stripe sends its few KiB at once; anything slower than this is not Stripe.
BODY_READ_TIMEOUT_SECONDS = 10


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


def _answer(status_code: int, outcome: str, message: str, *, close: bool = False) -> JSONResponse:
    metrics.stripe_webhooks_total.labels(outcome=outcome).inc()
    body = {"received": True} if status_code == 200 else {"error": message}
    return JSONResponse(body, status_code=status_code, headers={"Connection": "close"} if close else None)


@router.post(
    "/stripe",
    responses=webhook_errors(
        e400="Missing or invalid Stripe-Signature, or not a Stripe event.",
        e408="The body did not arrive in time.",
        e413="Body larger than the limit.",
        e500="Unexpected error; Stripe retries.",
        e503="The database or the broker is unavailable, or too many deliveries in flight; Stripe retries.",
    ),
    openapi_extra=signed_body("Stripe-Signature", "A Stripe event, verified against its signature."),
)
async def stripe_webhook(request: Request, ports: PortsDep) -> JSONResponse:
    # Refusals before the whole body is read close the connection: whatever the client still sends is
    # not read, and the socket is not kept alive for it.
    signature = request.headers.get("stripe-signature")
    if not signature:
        log.warning("stripe webhook refused", extra={"error": "missing Stripe-Signature header"})
        return _answer(400, "bad_signature", "missing Stripe-Signature header", close=True)
    try:
        # Bounded in time as well as size: a client trickling its body must not hold a connection and
        # its buffer for as long as it likes.
        async with asyncio.timeout(BODY_READ_TIMEOUT_SECONDS):
            payload = await read_bounded_body(request, MAX_BODY_BYTES)
    except BodyTooLarge:
        log.warning("stripe webhook refused: body too large", extra={"limit_bytes": MAX_BODY_BYTES})
        return _answer(413, "too_large", f"webhook body larger than {MAX_BODY_BYTES} bytes", close=True)
    except TimeoutError:
        log.warning(
            "stripe webhook refused: body too slow", extra={"limit_seconds": BODY_READ_TIMEOUT_SECONDS}
        )
        message = f"webhook body not received within {BODY_READ_TIMEOUT_SECONDS} s"
        return _answer(408, "too_slow", message, close=True)
    try:
        event = ports.stripe.construct_event(payload, signature, ports.webhook_secrets)
    except StripeSignatureError as exc:
        log.warning("stripe webhook refused", extra={"error": str(exc)})
        # The reason quotes nothing the caller sent and no secret: safe to say, and it saves the
        # operator who mis-configured an endpoint a trip to our logs.
        return _answer(400, "bad_signature", f"invalid signature or payload: {exc}")
    # Only verified deliveries compete for the in-flight slots, so nobody without the secret can
    # crowd Stripe out; the cap protects the pool and the broker, which only process_event uses.
    try:
        with ports.deliveries.slot():
            outcome = await process_event(ports.ctx.pool, ports.ctx.publisher, event)
    except Overloaded:
        _shed_log.note()
        response = _answer(503, "shed", "too many deliveries in flight; retry")
        response.headers["Retry-After"] = "1"
        return response
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


class _ShedLog:
    """One warning per interval with the count, not a line per shed delivery (they come in floods)."""

    def __init__(self, interval_seconds: float = 10.0) -> None:
        self.interval = interval_seconds
        self.count = 0
        self.last = 0.0

    def note(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            log.warning(
                "stripe deliveries shed: too many in flight (Stripe retries them)",
                extra={
                    "shed_since_last_line": self.count,
                    "limit_setting": "WEBHOOK_MAX_IN_FLIGHT",
                    "counter": "esim_stripe_webhooks_total{outcome=shed}",
                },
            )
            self.count, self.last = 0, now


_shed_log = _ShedLog()
