"""`POST /api/create-checkout-session`: price the offer on the server, create the order, open Checkout.

Order of work, and why:

1. Read the offer from Zendit (404 when it is unknown or disabled) and the wallet currency (the
   offer's cost must be in it, or the order could never be bought): before anything is written.
2. Insert the order `pending_payment` (committed at once).
3. Create the Checkout Session (idempotency key `checkout:{txn}`), then record its id on the order.

If step 3 fails the order row is deleted again (guarded: only while it is `pending_payment` with no
session id), and the shop gets a 502/503. We do not hold a database transaction open across the
Stripe call instead: a slow or failing Stripe (10 s timeout, network retries) would then pin one pool
connection per waiting shopper and starve the webhook of connections exactly when Stripe recovers and
delivers its backlog. The price of the short commit is a window in which a crash leaves a
`pending_payment` row without a session: nobody can pay it (its session URL was never handed out), so
it is inert, and reconciliation can sweep such rows by age.
"""

from __future__ import annotations

import logging
import secrets

from fastapi import APIRouter, HTTPException, status

from esim_common.errors import TransientError
from esim_common.logging import bind_transaction_id
from esim_common.money import Money, MoneyError
from esim_common.order_repository import create_order, record
from esim_common.providers.stripe import CheckoutSession, StripeGatewayError
from esim_common.providers.zendit import Offer, PriceType, ZenditError, ZenditNotFound
from webhook import metrics, repository
from webhook.domain import TRANSACTION_ID_PREFIX, PricingRefused, selling_price
from webhook.ports import Ports, PortsDep
from webhook.schemas import CheckoutCreated, CheckoutRequest
from webhook.unavailable import DEPENDENCY_UNAVAILABLE

log = logging.getLogger("esim.webhook.checkout")

router = APIRouter(prefix="/api", tags=["checkout"])

SUCCESS_PATH = "/checkout/success"
CANCEL_PATH = "/checkout/cancel"


class CheckoutRefused(Exception):
    """The checkout cannot be made; `status_code` and `detail` are what the shop is told."""

    def __init__(self, status_code: int, detail: str, outcome: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.outcome = outcome


def new_transaction_id() -> str:
    return f"{TRANSACTION_ID_PREFIX}{secrets.token_hex(12)}"


def product_name(offer: Offer) -> str:
    details = offer.short_notes or (f"{offer.data_gb:g} GB, {offer.duration_days} days")
    return f"eSIM {offer.offer_id} ({details})"


async def _sellable_offer(ports: Ports, offer_id: str) -> tuple[Offer, Money]:
    """The offer and its cost, or CheckoutRefused."""
    try:
        offer = await ports.zendit.get_offer(offer_id)
        wallet_currency = await ports.wallet.get()
    except ZenditNotFound:
        raise CheckoutRefused(
            404, f"offer {offer_id!r} is unknown or not for sale", "offer_unavailable"
        ) from None
    except ZenditError as exc:
        log.warning("zendit unavailable for checkout", extra={"error": str(exc)})
        code = 503 if isinstance(exc, TransientError) else 502
        detail = "the eSIM catalogue is unavailable; try again"
        raise CheckoutRefused(code, detail, "provider_error") from None
    if not offer.enabled or offer.price_type is not PriceType.FIXED or offer.cost.fixed is None:
        raise CheckoutRefused(404, f"offer {offer_id!r} is unknown or not for sale", "offer_unavailable")
    try:
        cost = offer.cost_money
    except MoneyError as exc:
        log.error("offer cost unusable", extra={"offer_id": offer_id, "error": str(exc)})
        raise CheckoutRefused(422, f"offer {offer_id!r} cannot be priced", "pricing_refused") from None
    if cost.currency != wallet_currency:
        raise CheckoutRefused(
            422,
            f"offer {offer_id!r} costs {cost.currency} but the wallet pays in {wallet_currency}",
            "currency_mismatch",
        )
    return offer, cost


def _suggested(offer: Offer) -> Money | None:
    try:
        return offer.suggested_price_money
    except MoneyError:
        return None  # a suggested price we cannot express exactly: fall back to cost + markup


async def create_checkout(ports: Ports, request: CheckoutRequest) -> CheckoutCreated:
    offer, cost = await _sellable_offer(ports, request.offer_id)
    try:
        price = selling_price(cost, _suggested(offer), ports.pricing)
    except PricingRefused as exc:
        log.warning("checkout refused by pricing", extra={"offer_id": offer.offer_id, "error": str(exc)})
        # The shop is told that, not why: the reason quotes our Zendit cost, which is not public.
        detail = f"offer {offer.offer_id!r} cannot be sold at a price that covers its cost and margin"
        raise CheckoutRefused(422, detail, "pricing_refused") from None
    txn = new_transaction_id()
    with bind_transaction_id(txn):
        settings = ports.ctx.settings
        async with ports.ctx.pool.acquire() as conn:
            await create_order(
                conn,
                transaction_id=txn,
                offer_id=offer.offer_id,
                price=price,
                zendit_cost=cost,
                recipient_email=request.recipient_email,
                recipient_name=request.full_name,
                user_id=request.user_id,
                capture_method=settings.capture_mode.value,
            )
        session = await _open_session(ports, txn, offer, price, request.recipient_email)
        log.info("checkout session created", extra={"offer_id": offer.offer_id, "price": str(price)})
    return CheckoutCreated(
        session_id=session.id,
        url=session.url or "",
        transaction_id=txn,
        amount=price.amount,
        currency=price.currency,
    )


async def _open_session(ports: Ports, txn: str, offer: Offer, price: Money, email: str) -> CheckoutSession:
    """Create the Checkout Session and record it; on any failure remove the order again."""
    base = ports.ctx.settings.shop_base_url.rstrip("/")
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
        await record(ports.ctx.pool, txn, stripe_checkout_session_id=session.id)
    except Exception as exc:
        await _discard(ports, txn)
        if isinstance(exc, StripeGatewayError):
            log.warning("stripe refused the checkout session", extra={"error": str(exc)})
            code = 503 if isinstance(exc, TransientError) else 502
            detail = "the payment provider is unavailable; try again"
            raise CheckoutRefused(code, detail, "provider_error") from None
        raise
    return session


async def _discard(ports: Ports, txn: str) -> None:
    try:
        await repository.discard_unpayable_order(ports.ctx.pool, txn)
    except Exception:
        # The row stays pending_payment with no session: unpayable, swept by reconciliation.
        log.exception("could not discard the order of a failed checkout")


@router.post("/create-checkout-session", status_code=status.HTTP_200_OK)
async def create_checkout_session(body: CheckoutRequest, ports: PortsDep) -> CheckoutCreated:
    try:
        created = await create_checkout(ports, body)
    except CheckoutRefused as exc:
        metrics.checkout_sessions_total.labels(outcome=exc.outcome).inc()
        raise HTTPException(status_code=exc.status_code, detail=exc.detail) from None
    except DEPENDENCY_UNAVAILABLE as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.warning("checkout failed: a dependency is unavailable", extra={"error": error})
        metrics.checkout_sessions_total.labels(outcome="unavailable").inc()
        raise HTTPException(status_code=503, detail="temporarily unavailable; try again") from None
    metrics.checkout_sessions_total.labels(outcome="created").inc()
    return created
