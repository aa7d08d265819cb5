"""`POST /api/create-checkout-session`: price the offer on the server, create the order, open Checkout.

Order of work, and why:

1. Read the offer from Zendit, live (404 when it is unknown or disabled), and the wallet currency: the
   offer must be for sale, cost what the wallet pays in, and earn our margin (`webhook.quotes`, the
   same rule the cached catalogue of `GET /api/offers` applies) before anything is written. The live
   read, not the catalogue cache, is what a customer is charged by: Zendit is authoritative for the
   price and the enabled state, and the cache can be minutes old. Only the offer's 404 means "unknown
   offer": a 404 from the balance means a misconfigured Zendit base URL or account (502, logged as an
   error).
2. Insert the order `pending_payment` (committed at once).
3. Create the Checkout Session (idempotency key `checkout:{txn}`), then record its id on the order.

If step 3 fails the order row is deleted again (guarded: only while it is `pending_payment` with no
session id), and the shop gets a 502/503. We do not hold a database transaction open across the
Stripe call instead: a slow or failing Stripe (10 s timeout, network retries) would then pin one pool
connection per waiting shopper and starve the webhook of connections exactly when Stripe recovers and
delivers its backlog. The price of the short commit is a window in which a crash leaves a
`pending_payment` row without a session: nobody can pay it (its session URL was never handed out), so
it is inert, and reconciliation can sweep such rows by age.

With an `Idempotency-Key` header (rules: `webhook.idempotency`) the key is claimed in Postgres before
step 1, and step 3 records the session on the order and stores the answer on the claim in ONE
transaction, so a key is either answered or its order has no session. A retry replays the stored
answer without calling Zendit or Stripe (Stripe could replay the session too, but only within its own
24 h key window, and only for identical parameters, which a changed Zendit price would break); past
24 h the session has expired, so the key is claimed anew as if unused (`KEY_RETENTION_SECONDS`). Any
failure discards the order, exactly as without a key, and releases the claim: a failure never burns a
key. A concurrent duplicate gets 409 with Retry-After instead of waiting for the first to finish:
waiting would hold the request (and, with a lock, a pool connection) for as long as Stripe is slow,
would need polling across replicas anyway, and 409 is what Stripe itself answers; the shop's retry
then gets the replay. A process that dies mid-attempt releases nothing: its claim is taken over once
older than KEY_LEASE_SECONDS, and a live attempt gives up after ATTEMPT_DEADLINE_SECONDS, well inside
its lease, so a running attempt is never taken over.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Header, HTTPException, Response, status

from esim_common.errors import TransientError
from esim_common.logging import bind_transaction_id
from esim_common.order_repository import create_order, record
from esim_common.providers.stripe import StripeGatewayError
from esim_common.providers.zendit import Offer, ZenditError, ZenditNotFound
from webhook import idempotency_repository as keys
from webhook import metrics, repository
from webhook.domain import TRANSACTION_ID_PREFIX
from webhook.idempotency import (
    HEADER,
    KEY_RULE,
    InvalidIdempotencyKey,
    Verdict,
    check_key,
    request_fingerprint,
)
from webhook.ports import Ports, PortsDep
from webhook.quotes import NotForSale, Quote, Refusal, quote
from webhook.responses import api_errors
from webhook.schemas import CheckoutCreated, CheckoutRequest
from webhook.unavailable import DEPENDENCY_UNAVAILABLE

log = logging.getLogger("esim.webhook.checkout")

router = APIRouter(prefix="/api", tags=["checkout"])

SUCCESS_PATH = "/checkout/success"
CANCEL_PATH = "/checkout/cancel"
# Part of every request fingerprint, so a key can never match a request made to another endpoint.
FINGERPRINT_ENDPOINT = "POST /api/create-checkout-session"
# A healthy attempt takes well under this: Zendit's 10 s timeout, then Stripe's 10 s timeout times
# 1 + STRIPE_MAX_NETWORK_RETRIES (2) with backoff. Past it, the shop is better served by a 503 it can
# retry than by a request that may still be running when its claim is taken over.
ATTEMPT_DEADLINE_SECONDS = 60.0
# Twice the deadline: only a claim whose process died can be this old, and the shopper's retry
# succeeds within two minutes of the crash.
KEY_LEASE_SECONDS = 2 * ATTEMPT_DEADLINE_SECONDS
# A duplicate that arrives while the first request runs: the first usually finishes within a second.
IN_PROGRESS_RETRY_AFTER_SECONDS = 1
PROVIDER_MISCONFIGURED = "the eSIM provider is misconfigured or unavailable; try again later"

# Stores the answer on the key's claim, in the transaction that records the session on the order.
Finish = Callable[[asyncpg.Connection, CheckoutCreated], Awaitable[None]]


class CheckoutRefused(Exception):
    """The checkout cannot be made; `status_code`, `detail` and `headers` are what the shop is told."""

    def __init__(
        self, status_code: int, detail: str, outcome: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.outcome = outcome
        self.headers = headers


def new_transaction_id() -> str:
    return f"{TRANSACTION_ID_PREFIX}{secrets.token_hex(12)}"


# esim_purchases.offer_data_mb and offer_duration_days are Postgres `integer` columns.
_MAX_INTEGER_COLUMN = 2**31 - 1


def offer_facts(offer: Offer) -> dict[str, int | bool | None]:
    """The plan as the eSIM email describes it (migration 0006), as `create_order` keywords.

    Data in whole megabytes: Zendit's `dataGB` is a JSON number (0.5, 1.5, 2.01), and 2.01 * 1000 is
    2009.9999999999998 in floats, so it is scaled as the decimal it was written as. 0 (unlimited offers
    send it) or anything unusable is stored as unknown (NULL), not as "0 MB"."""

    def whole(value: float | Decimal) -> int | None:
        if not math.isfinite(value):
            return None
        number = round(value)
        return number if 0 < number <= _MAX_INTEGER_COLUMN else None

    return {
        "offer_data_mb": whole(Decimal(str(offer.data_gb)) * 1000),
        "offer_data_unlimited": offer.data_unlimited,
        "offer_duration_days": whole(offer.duration_days),
    }


def product_name(offer: Offer) -> str:
    details = offer.short_notes or (f"{offer.data_gb:g} GB, {offer.duration_days} days")
    return f"eSIM {offer.offer_id} ({details})"


async def _quoted_offer(ports: Ports, offer_id: str) -> Quote:
    """The offer read live from Zendit and priced, or CheckoutRefused."""
    try:
        offer = await ports.zendit.get_offer(offer_id)
    except ZenditNotFound:
        raise CheckoutRefused(
            404, f"offer {offer_id!r} is unknown or not for sale", Refusal.OFFER_UNAVAILABLE.value
        ) from None
    except ZenditError as exc:
        raise _zendit_unavailable(exc) from None
    try:
        wallet_currency = await ports.wallet.get()
    except ZenditNotFound as exc:
        # Our own account's balance cannot be missing: a 404 here means ZENDIT_API_BASE (or the key's
        # account) is wrong, which every checkout will hit until an operator fixes it.
        log.error(
            "zendit has no wallet balance for our account: check ZENDIT_API_BASE and ZENDIT_API_KEY",
            extra={"error": str(exc)},
        )
        raise CheckoutRefused(502, PROVIDER_MISCONFIGURED, "provider_error") from None
    except ZenditError as exc:
        raise _zendit_unavailable(exc) from None
    try:
        return quote(offer, wallet_currency, ports.pricing)
    except NotForSale as exc:
        # The shop is told `public`, never `internal`: the reason may quote our Zendit cost.
        log.warning(
            "checkout refused: offer not for sale",
            extra={"offer_id": offer_id, "reason": exc.refusal.value, "error": exc.internal},
        )
        code = 404 if exc.refusal is Refusal.OFFER_UNAVAILABLE else 422
        raise CheckoutRefused(code, exc.public, exc.refusal.value) from None


def _zendit_unavailable(exc: ZenditError) -> CheckoutRefused:
    log.warning("zendit unavailable for checkout", extra={"error": str(exc)})
    code = 503 if isinstance(exc, TransientError) else 502
    return CheckoutRefused(code, "the eSIM catalogue is unavailable; try again", "provider_error")


async def create_checkout(
    ports: Ports, request: CheckoutRequest, *, transaction_id: str | None = None, finish: Finish | None = None
) -> CheckoutCreated:
    offer_quote = await _quoted_offer(ports, request.offer_id)
    offer, price = offer_quote.offer, offer_quote.price
    txn = transaction_id or new_transaction_id()
    with bind_transaction_id(txn):
        settings = ports.ctx.settings
        async with ports.ctx.pool.acquire() as conn:
            await create_order(
                conn,
                transaction_id=txn,
                offer_id=offer.offer_id,
                price=price,
                zendit_cost=offer_quote.cost,
                recipient_email=request.recipient_email,
                recipient_name=request.full_name,
                user_id=request.user_id,
                capture_method=settings.capture_mode.value,
                **offer_facts(offer),
            )
        created = await _open_session(ports, txn, offer_quote, request.recipient_email, finish)
        log.info("checkout session created", extra={"offer_id": offer.offer_id, "price": str(price)})
    return created


async def _open_session(
    ports: Ports, txn: str, offer_quote: Quote, email: str, finish: Finish | None
) -> CheckoutCreated:
    """Create the Checkout Session and record it; on any failure remove the order again."""
    base = ports.ctx.settings.shop_base_url.rstrip("/")
    offer, price = offer_quote.offer, offer_quote.price
    try:
        session = await ports.stripe.create_checkout_session(
            transaction_id=txn,
            amount=price.amount,
            currency=price.currency,
            product_name=product_name(offer),
            # Stripe fills {CHECKOUT_SESSION_ID}; the shop passes it to GET /api/orders/{txn}.
            success_url=f"{base}{SUCCESS_PATH}?transaction_id={txn}&session_id={{CHECKOUT_SESSION_ID}}",
            cancel_url=f"{base}{CANCEL_PATH}?transaction_id={txn}",
            customer_email=email,
            metadata={"offer_id": offer.offer_id, "recipient_email": email},
            capture_method=ports.ctx.settings.capture_mode.value,
        )
        if not session.url:
            raise StripeGatewayError("checkout session has no url", operation="create_checkout_session")
        created = CheckoutCreated(
            session_id=session.id,
            url=session.url,
            transaction_id=txn,
            amount=price.amount,
            currency=price.currency,
        )
        async with ports.ctx.pool.acquire() as conn, conn.transaction():
            await record(conn, txn, stripe_checkout_session_id=session.id)
            if finish is not None:
                await finish(conn, created)
    except Exception as exc:
        await _discard(ports, txn)
        if isinstance(exc, StripeGatewayError):
            log.warning("stripe refused the checkout session", extra={"error": str(exc)})
            code = 503 if isinstance(exc, TransientError) else 502
            detail = "the payment provider is unavailable; try again"
            raise CheckoutRefused(code, detail, "provider_error") from None
        raise
    return created


async def _discard(ports: Ports, txn: str) -> None:
    try:
        await repository.discard_unpayable_order(ports.ctx.pool, txn)
    except Exception:
        # The row stays pending_payment with no session: unpayable, swept by reconciliation.
        log.exception("could not discard the order of a failed checkout")


# ------------------------------------------------------------------------------- Idempotency-Key


def _in_progress() -> CheckoutRefused:
    return CheckoutRefused(
        409,
        f"a request with this {HEADER} is still in progress; retry",
        "idempotency_key_in_progress",
        headers={"Retry-After": str(IN_PROGRESS_RETRY_AFTER_SECONDS)},
    )


async def create_checkout_once(
    ports: Ports, request: CheckoutRequest, key: str
) -> tuple[CheckoutCreated, bool]:
    """`create_checkout` at most once per key: (the answer, whether it is a replay)."""
    fingerprint = request_fingerprint(FINGERPRINT_ENDPOINT, request.model_dump(mode="json"))
    pool = ports.ctx.pool
    claim = await keys.claim(pool, key, fingerprint, new_transaction_id(), KEY_LEASE_SECONDS)
    if isinstance(claim, keys.Answered):
        answer = claim.answer
        replay = CheckoutCreated(
            session_id=answer.session_id,
            url=answer.url,
            transaction_id=answer.transaction_id,
            amount=answer.amount,
            currency=answer.currency,
        )
        return replay, True
    if isinstance(claim, keys.Refused):
        if claim.verdict is Verdict.MISMATCH:
            detail = (
                f"this {HEADER} was already used with a different request; use a new key for a new checkout"
            )
            raise CheckoutRefused(422, detail, "idempotency_key_reused")
        raise _in_progress()
    txn = claim.transaction_id
    if claim.replaced_transaction_id is not None:
        log.warning(
            "idempotency key taken over from an attempt that did not finish",
            extra={"replaced_transaction_id": claim.replaced_transaction_id, "transaction_id": txn},
        )
        await _discard(ports, claim.replaced_transaction_id)

    async def finish(conn: asyncpg.Connection, created: CheckoutCreated) -> None:
        answer = keys.Answer(
            transaction_id=created.transaction_id,
            session_id=created.session_id,
            url=created.url,
            amount=created.amount,
            currency=created.currency,
        )
        await keys.complete(conn, key, answer)

    try:
        async with asyncio.timeout(ATTEMPT_DEADLINE_SECONDS):
            return await create_checkout(ports, request, transaction_id=txn, finish=finish), False
    except Exception as exc:
        await _discard(ports, txn)  # usually done already; guarded, so repeating it is harmless
        await _release(ports, key, txn)
        if isinstance(exc, keys.ClaimLost):
            raise _in_progress() from None
        raise


async def _release(ports: Ports, key: str, txn: str) -> None:
    try:
        await keys.release(ports.ctx.pool, key, txn)
    except Exception:
        # The claim stays until its lease expires; then a retry takes it over.
        log.exception("could not release the idempotency key of a failed checkout")


# ------------------------------------------------------------------------------------------ route


@router.post(
    "/create-checkout-session",
    status_code=status.HTTP_200_OK,
    responses=api_errors(
        e400="Malformed Idempotency-Key.",
        e404="Unknown offer, or not for sale.",
        e409="A request with this Idempotency-Key is still in progress.",
        e422="Invalid body, an offer that cannot be sold at a valid price, or a reused Idempotency-Key.",
        e502="Zendit refused our request (misconfiguration).",
        e503="Zendit, Stripe or the database is unavailable; try again.",
    ),
)
async def create_checkout_session(
    body: CheckoutRequest,
    ports: PortsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=HEADER,
            description=f"Optional. The same key and body give the same answer, once. {KEY_RULE}.",
        ),
    ] = None,
) -> CheckoutCreated:
    try:
        if idempotency_key is None:
            created, replayed = await create_checkout(ports, body), False
        else:
            created, replayed = await create_checkout_once(ports, body, check_key(idempotency_key))
    except InvalidIdempotencyKey as exc:
        metrics.checkout_sessions_total.labels(outcome="bad_idempotency_key").inc()
        raise HTTPException(status_code=400, detail=str(exc)) from None
    except CheckoutRefused as exc:
        metrics.checkout_sessions_total.labels(outcome=exc.outcome).inc()
        raise HTTPException(status_code=exc.status_code, detail=exc.detail, headers=exc.headers) from None
    except DEPENDENCY_UNAVAILABLE as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.warning("checkout failed: a dependency is unavailable", extra={"error": error})
        metrics.checkout_sessions_total.labels(outcome="unavailable").inc()
        raise HTTPException(status_code=503, detail="temporarily unavailable; try again") from None
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"  # as Stripe marks its own replays
    metrics.checkout_sessions_total.labels(outcome="replayed" if replayed else "created").inc()
    return created
