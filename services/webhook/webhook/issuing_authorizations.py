"""`POST /api/webhooks/stripe/issuing-authorization`: Stripe Issuing's real-time authorisation endpoint.

Stripe calls it synchronously for every authorisation on our Issuing cards (configured in the Issuing
settings, not as an ordinary webhook endpoint) and waits about 2 s for the answer; without a usable answer
it applies the account's default. The decision comes from local state only — one indexed query on
Postgres, no provider call — and the rules in `issuing_rules`: approve only the top-up gateway's charge of
a handed-over single-use card, for exactly its top-up's amount and currency.

200  `{"approved": true|false, "metadata": {"esim_decision": <reason>}}` with the `Stripe-Version` header
     Stripe requires. A database that does not answer within LOOKUP_BUDGET_SECONDS, or fails, is a
     decline: we answer in time whatever happens, and an unknown charge is never approved.
413  body larger than MAX_BODY_BYTES
400  no Stripe-Signature header, a signature matching none of STRIPE_ISSUING_WEBHOOK_SECRETS (this
     endpoint's own signing secrets; STRIPE_WEBHOOK_SECRETS when unset), a body that is not a Stripe
     event, or an event of another type than `issuing_authorization.request`. The last one is refused
     rather than acknowledged because it means a misconfigured endpoint: a 2xx would tell Stripe that,
     say, a checkout.session.completed was handled when nothing handled it, while a 400 keeps Stripe
     retrying it and shows the failure on the dashboard.

Nothing is written to the database: the decision is counted (`esim_issuing_authorizations_total`) and
logged (info for an approval, warning for a decline), with the card id but never card data.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg
import stripe
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from esim_common.providers.stripe import StripeSignatureError
from webhook import metrics
from webhook.issuing_rules import (
    AuthorizationRequest,
    CardOnRecord,
    Reason,
    Verdict,
    decide,
    read_authorization_request,
)
from webhook.ports import PortsDep
from webhook.responses import signed_body, webhook_errors
from webhook.stripe_webhooks import MAX_BODY_BYTES, BodyTooLarge, read_bounded_body
from webhook.unavailable import DEPENDENCY_UNAVAILABLE

log = logging.getLogger("esim.webhook.issuing")

router = APIRouter(prefix="/api/webhooks/stripe", tags=["webhooks"])

REQUEST_EVENT = "issuing_authorization.request"
# Stripe waits ~2 s. Everything before the answer (body, signature, query) must fit in this budget, which
# leaves half a second for the network and Stripe's own bookkeeping.
LOOKUP_BUDGET_SECONDS = 1.5
# What Stripe requires on the answer; the version the SDK pins, which the rest of our calls speak too.
STRIPE_VERSION = stripe.api_version

# One indexed query: issuing_cards by primary key, its top-up by primary key. Reads committed rows only,
# and takes no row lock, so it never waits behind the funding service's open transaction.
SELECT_CARD = """
    SELECT c.active, c.topup_id, t.status AS topup_status, t.amount AS topup_amount,
           t.currency AS topup_currency
      FROM issuing_cards c JOIN wallet_topups t ON t.id = c.topup_id
     WHERE c.card_id = $1
"""


class LookupFailed(Exception):
    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason


# Lookups under way (asyncio keeps only weak references to tasks). A lookup runs as its own task because
# `asyncio.wait_for` on the query is not enough: on timeout it waits for asyncpg's cancellation, which
# asks the server over a new connection and, against a hung database, outlasts Stripe's 2 s (the
# integration test with a stalled proxy shows it). We stop waiting, answer, and let the task finish here.
_in_flight: set[asyncio.Task[CardOnRecord | None]] = set()


async def _fetch_card(pool: Callable[[], asyncpg.Pool], card_id: str) -> CardOnRecord | None:
    row = await pool().fetchrow(SELECT_CARD, card_id)
    if row is None:
        return None
    return CardOnRecord(
        active=row["active"],
        topup_id=row["topup_id"],
        topup_status=row["topup_status"],
        topup_amount=row["topup_amount"],
        topup_currency=row["topup_currency"].strip(),  # char(3)
    )


async def lookup_card(
    pool: Callable[[], asyncpg.Pool], card_id: str, *, within_seconds: float
) -> CardOnRecord | None:
    """Our record of `card_id` (None: not ours), or LookupFailed within `within_seconds`, always."""
    task = asyncio.ensure_future(_fetch_card(pool, card_id))
    _in_flight.add(task)
    task.add_done_callback(_forget)
    done, _ = await asyncio.wait({task}, timeout=max(within_seconds, 0.0))
    if not done:
        task.cancel()
        log.warning("issuing authorization lookup timed out", extra={"card_id": card_id})
        raise LookupFailed(Reason.LOOKUP_TIMEOUT)
    try:
        return task.result()
    except DEPENDENCY_UNAVAILABLE as exc:
        log.warning(
            "issuing authorization lookup failed",
            extra={"card_id": card_id, "error": f"{type(exc).__name__}: {exc}"},
        )
    except Exception:
        log.exception("issuing authorization lookup failed unexpectedly", extra={"card_id": card_id})
    raise LookupFailed(Reason.LOOKUP_FAILED)


def _forget(task: asyncio.Task[CardOnRecord | None]) -> None:
    _in_flight.discard(task)
    if not task.cancelled():
        task.exception()  # mark it retrieved: a late failure of an abandoned lookup is expected


@router.post(
    "/issuing-authorization",
    responses=webhook_errors(
        e400="Missing or invalid Stripe-Signature, or not an issuing_authorization.request event.",
        e413="Body larger than the limit.",
    ),
    openapi_extra=signed_body("Stripe-Signature", "A Stripe issuing_authorization.request event."),
)
async def issuing_authorization(request: Request, ports: PortsDep) -> JSONResponse:
    started = time.monotonic()
    try:
        payload = await read_bounded_body(request, MAX_BODY_BYTES)
    except BodyTooLarge:
        return _refuse(413, "too_large", f"body larger than {MAX_BODY_BYTES} bytes")
    signature = request.headers.get("stripe-signature")
    if not signature:
        return _refuse(400, "bad_signature", "missing Stripe-Signature header")
    try:
        event = ports.stripe.construct_event(payload, signature, ports.issuing_webhook_secrets)
    except StripeSignatureError as exc:
        log.warning("issuing authorization refused", extra={"error": str(exc)})
        return _refuse(400, "bad_signature", "invalid signature or payload")
    if event.type != REQUEST_EVENT:
        log.warning(
            "issuing authorization endpoint got another event type: check the endpoint configuration",
            extra={"event_id": event.id, "event_type": event.type},
        )
        return _refuse(400, "wrong_event_type", f"this endpoint only answers {REQUEST_EVENT}")

    asked = read_authorization_request(event.data_object)
    card: CardOnRecord | None = None
    if asked is None:
        verdict = Verdict(False, Reason.MALFORMED_REQUEST)
    else:
        remaining = LOOKUP_BUDGET_SECONDS - (time.monotonic() - started)
        try:
            card = await lookup_card(lambda: ports.ctx.pool, asked.card_id, within_seconds=remaining)
            verdict = decide(asked, card)
        except LookupFailed as failed:
            verdict = Verdict(False, failed.reason)
    _record(event.id, asked, card, verdict, time.monotonic() - started)
    return JSONResponse(
        {"approved": verdict.approved, "metadata": {"esim_decision": verdict.reason.value}},
        headers={"Stripe-Version": STRIPE_VERSION},
    )


def _record(
    event_id: str,
    asked: AuthorizationRequest | None,
    card: CardOnRecord | None,
    verdict: Verdict,
    seconds: float,
) -> None:
    decision = "approved" if verdict.approved else "declined"
    metrics.issuing_authorizations_total.labels(decision=decision, reason=verdict.reason.value).inc()
    metrics.issuing_authorization_seconds.observe(seconds)
    details: dict[str, object] = {"event_id": event_id, "decision": decision, "reason": verdict.reason.value}
    if asked is not None:
        details |= {
            "authorization_id": asked.authorization_id,
            "card_id": asked.card_id,
            "amount": asked.amount,
            "currency": asked.currency,
            "merchant_name": asked.merchant_name,
        }
    if card is not None:
        details |= {"topup_id": card.topup_id, "topup_status": card.topup_status}
    details["elapsed_ms"] = round(seconds * 1000, 1)
    if verdict.approved:
        log.info("issuing authorization approved", extra=details)
    else:
        log.warning("issuing authorization declined", extra=details)


def _refuse(status_code: int, reason: str, message: str) -> JSONResponse:
    metrics.issuing_authorizations_total.labels(decision="refused", reason=reason).inc()
    return JSONResponse({"error": message}, status_code=status_code)
