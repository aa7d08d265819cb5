"""Typed async client for the Stripe calls esim-fulfillment makes, over the official SDK (`client.v1.*`).

Exceptions (the only ones that leave this module; translated in `_call`, the single boundary). The two
branches also derive from `esim_common.errors.TransientError` / `PermanentError`, so a consumer routes
a message that failed on Stripe to the right fate without catching anything::

    StripeGatewayError             base: `operation`, `http_status`, `code`, `param`, `request_id`;
    │                              messages never contain a card number or CVC
    ├── StripeTransientError       retrying later may succeed: connection errors and timeouts, 429,
    │                              5xx, 409 (the idempotency key is still in use by a first request)
    └── StripePermanentError       the same request will fail again: invalid or unknown parameters,
        │                          resource_missing, card declined, authentication/permission,
        │                          idempotency key reused with different parameters
        └── StripeSignatureError   a webhook whose signature matches none of our secrets

Every POST carries an idempotency key derived from OUR ids (`checkout:{txn}`, `refund:{txn}`,
`issuing-card:{topup_id}`, ...), so a redelivered message or a restarted worker repeats the same Stripe
request and gets the first result back instead of paying, refunding or issuing twice. The exceptions are
`capture:{txn}:{attempt}` (see `capture_payment_intent`) and a card creation that Stripe answered with an
error, which the caller repeats under `issuing-card:{topup_id}:{attempt}`: Stripe replays a saved 500
for 24 h, so the same key would fail the same way all day.

Money is integer minor units. Currencies are our uppercase ISO codes on both sides of this module;
Stripe gets lowercase. Results are frozen dataclasses, not StripeObjects.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import stripe
from stripe import _util as stripe_util  # the SDK's own console logging switch (see silence_sdk_console_log)

from esim_common.errors import PermanentError, TransientError
from esim_common.metrics import observe_provider_call

if TYPE_CHECKING:
    from stripe.params import RefundCreateParams
    from stripe.params.checkout import SessionCreateParams
    from stripe.params.issuing import CardCreateParams, CardholderCreateParams

log = logging.getLogger("esim.providers.stripe")

T = TypeVar("T")

CaptureMethod = Literal["automatic", "automatic_async", "manual"]
RefundReason = Literal["duplicate", "fraudulent", "requested_by_customer"]
CancellationReason = Literal["abandoned", "duplicate", "fraudulent", "requested_by_customer"]

# The metadata key that names our order on a Checkout Session, its PaymentIntent and our refunds.
TRANSACTION_ID_KEY = "transaction_id"
# Stripe's largest page: the fewest round trips when reading a whole window.
LIST_PAGE_SIZE = 100
# Stripe's webhook timestamp tolerance: older signatures are replays.
WEBHOOK_TOLERANCE_SECONDS = 300
_CARD_LIKE_DIGITS = re.compile(r"\d[\d -]{10,22}\d")


def issuing_card_key(topup_id: str, attempt: int) -> str:
    """The idempotency key of a top-up's card creation; the first attempt keeps the historical form."""
    return f"issuing-card:{topup_id}" if attempt <= 1 else f"issuing-card:{topup_id}:{attempt}"


def silence_sdk_console_log() -> None:
    """STRIPE_LOG=debug (read once, when the SDK is imported) or `stripe.log` makes the SDK print whole
    response bodies — a revealed card's number and CVC — with print(), past our logging and its
    redaction. Switched off for good: our own logs say what happened."""
    stripe.log = None
    stripe_util.STRIPE_LOG = None


class StripeGatewayError(Exception):
    """Base of every error this module raises."""

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        http_status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.http_status = http_status
        self.code = code
        self.param = param
        self.request_id = request_id


class StripeTransientError(StripeGatewayError, TransientError):
    """Try again later (with the same idempotency key)."""


class StripePermanentError(StripeGatewayError, PermanentError):
    """Do not retry: the request itself is wrong or refused."""

    @property
    def reason(self) -> str:  # type: ignore[override]
        """Short code for the order's failure reason, e.g. `stripe_charge_already_refunded`."""
        return f"stripe_{self.code or 'request_refused'}"


class StripeSignatureError(StripePermanentError):
    """A webhook body or signature we cannot trust. The message says why, in words a person sending
    the webhook can act on, and never quotes the header, the body or a secret."""


def signature_failure_reason(sdk_message: str) -> str:
    """The SDK's verification failure, said for whoever configured the sender (who reads our 400)."""
    if sdk_message.startswith("Unable to extract"):
        return "Stripe-Signature header is malformed (expected t=<unix time>,v1=<hex signature>)"
    if sdk_message.startswith("No signatures found with expected scheme"):
        return "Stripe-Signature header carries no v1 signature"
    if sdk_message.startswith("Timestamp outside the tolerance zone"):
        return (
            f"Stripe-Signature timestamp is more than {WEBHOOK_TOLERANCE_SECONDS} s old "
            "(a replayed delivery, or a clock out of sync)"
        )
    return (
        "webhook signature matches none of the configured secrets "
        "(a wrong endpoint secret, or the body was altered)"
    )


@dataclass(frozen=True)
class CheckoutSession:
    id: str
    url: str | None
    status: str | None
    payment_status: str
    payment_intent_id: str | None
    amount_total: int | None
    currency: str | None
    client_reference_id: str | None
    customer_email: str | None
    metadata: dict[str, str]
    expires_at: int


@dataclass(frozen=True)
class PaymentIntent:
    id: str
    status: str
    amount: int
    amount_received: int
    amount_capturable: int
    currency: str
    capture_method: str
    metadata: dict[str, str]
    latest_charge_id: str | None
    # Set when `status` is canceled: ours (`requested_by_customer`, ...) or Stripe's own (`automatic`,
    # `expired`), e.g. an authorisation that lapsed before it was captured.
    cancellation_reason: str | None = None
    # Unix time until which an authorised card payment can be captured (the charge's
    # `payment_method_details.card.capture_before`); only when retrieved `with_charge`, else None.
    capture_before: int | None = None
    created: int | None = None  # unix time

    @property
    def transaction_id(self) -> str | None:
        """Our order's transaction id (`payment_intent_data.metadata`); None on another integration's."""
        return self.metadata.get(TRANSACTION_ID_KEY) or None


@dataclass(frozen=True)
class Refund:
    id: str
    status: str | None
    amount: int
    currency: str
    payment_intent_id: str | None
    reason: str | None
    metadata: dict[str, str]
    created: int | None = None  # unix time; filled by list_refunds


@dataclass(frozen=True)
class BillingAddress:
    line1: str
    city: str
    postal_code: str
    country: str
    state: str | None = None
    line2: str | None = None


@dataclass(frozen=True)
class Cardholder:
    id: str
    name: str
    email: str | None
    status: str
    type: str


@dataclass(frozen=True)
class IssuedCard:
    """What we may store about a card: never the number or CVC."""

    id: str
    cardholder_id: str
    status: str
    currency: str
    last4: str
    exp_month: int
    exp_year: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class IssuingAuthorization:
    """A request to spend on one of our cards; `approved` says whether the network was told yes.
    `amount` as Stripe documents it: the hold while `pending` (an undecided request asks for
    `pending_request.amount` more), 0 once voided, what is left for late captures once expired. After
    a capture the docs say nothing explicit (an API sample shows 0, as the emulator does): read it only
    while `pending`."""

    id: str
    card_id: str
    status: str  # pending | closed | expired | reversed
    approved: bool
    amount: int
    currency: str
    created: int


@dataclass(frozen=True)
class IssuingTransaction:
    """Money that left (capture) or came back to (refund) the Issuing balance through a card. Stripe
    signs it from the cardholder's side: a capture is negative."""

    id: str
    card_id: str
    authorization_id: str | None
    type: str  # capture | refund
    amount: int
    currency: str
    created: int


@dataclass(frozen=True, repr=False)
class CardDetails:
    """Full card details for the one call that needs them. Never log, persist or publish them."""

    card_id: str
    number: str = field(repr=False)
    cvc: str = field(repr=False)
    exp_month: int
    exp_year: int
    last4: str

    def __repr__(self) -> str:
        expiry = f"{self.exp_month:02d}/{self.exp_year}"
        return f"CardDetails(card_id={self.card_id!r}, last4={self.last4!r}, exp={expiry})"

    __str__ = __repr__


@dataclass(frozen=True)
class WebhookEvent:
    """A verified webhook event; `data_object` is the plain-JSON snapshot Stripe sent."""

    id: str
    type: str
    created: int
    livemode: bool
    api_version: str | None
    data_object: dict[str, Any]
    previous_attributes: dict[str, Any] | None


class StripeGateway:
    """The Stripe operations our services use. Create once per process; `aclose()` on shutdown."""

    def __init__(
        self,
        *,
        api_key: str,
        api_base: str,
        max_network_retries: int = 2,
        timeout_seconds: float = 10,
    ) -> None:
        silence_sdk_console_log()
        self._http = stripe.HTTPXClient(timeout=timeout_seconds)
        self._client = stripe.StripeClient(
            api_key,
            http_client=self._http,
            max_network_retries=max_network_retries,
            base_addresses={"api": api_base},
        )

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]  # untyped in stripe 16.1

    async def __aenter__(self) -> StripeGateway:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- Checkout and payments -------------------------------------------------------------------

    async def create_checkout_session(
        self,
        *,
        transaction_id: str,
        amount: int,
        currency: str,
        product_name: str,
        success_url: str,
        cancel_url: str,
        customer_email: str | None = None,
        metadata: Mapping[str, str] | None = None,
        capture_method: CaptureMethod = "automatic",
        expires_at: int | None = None,
    ) -> CheckoutSession:
        """One line item of `amount`; our transaction id goes in client_reference_id and in the metadata
        of both the session and the PaymentIntent (Stripe does not copy session metadata over)."""
        tagged = {**(metadata or {}), TRANSACTION_ID_KEY: transaction_id}
        params: SessionCreateParams = {
            "mode": "payment",
            "line_items": [
                {
                    "price_data": {
                        "currency": _to_stripe_currency(currency),
                        "unit_amount": _positive(amount, "amount"),
                        "product_data": {"name": product_name},
                    },
                    "quantity": 1,
                }
            ],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "client_reference_id": transaction_id,
            "metadata": tagged,
            "payment_intent_data": {"metadata": tagged, "capture_method": capture_method},
        }
        if customer_email is not None:
            params["customer_email"] = customer_email
        if expires_at is not None:
            params["expires_at"] = expires_at
        session = await self._call(
            "create_checkout_session",
            self._client.v1.checkout.sessions.create_async(
                params=params, options={"idempotency_key": f"checkout:{transaction_id}"}
            ),
        )
        return _checkout_session(session)

    async def retrieve_checkout_session(self, session_id: str) -> CheckoutSession:
        session = await self._call(
            "retrieve_checkout_session", self._client.v1.checkout.sessions.retrieve_async(session_id)
        )
        return _checkout_session(session)

    async def retrieve_payment_intent(
        self, payment_intent_id: str, *, with_charge: bool = False
    ) -> PaymentIntent:
        """`with_charge`: expand the latest charge too, which fills `capture_before` for a card hold."""
        params: stripe.params.PaymentIntentRetrieveParams = (
            {"expand": ["latest_charge"]} if with_charge else {}
        )
        intent = await self._call(
            "retrieve_payment_intent",
            self._client.v1.payment_intents.retrieve_async(payment_intent_id, params=params),
        )
        return _payment_intent(intent)

    async def capture_payment_intent(
        self, *, transaction_id: str, payment_intent_id: str, attempt: int = 1, amount: int | None = None
    ) -> PaymentIntent:
        """Capture an authorised (manual-capture) payment, in full unless `amount` says less.

        The key is `capture:{txn}:{attempt}`, one per attempt of the caller: Stripe saves a key's first
        result, a 500 included, and replays it for 24 h, so a retry under the same key could never
        succeed. What prevents a second capture is Stripe itself, which refuses to capture a PaymentIntent
        that is no longer `requires_capture`; the SDK's own network retries still reuse the attempt's key.
        """
        params: stripe.params.PaymentIntentCaptureParams = {}
        if amount is not None:
            params["amount_to_capture"] = _positive(amount, "amount")
        intent = await self._call(
            "capture_payment_intent",
            self._client.v1.payment_intents.capture_async(
                payment_intent_id,
                params=params,
                options={"idempotency_key": f"capture:{transaction_id}:{_positive(attempt, 'attempt')}"},
            ),
        )
        return _payment_intent(intent)

    async def cancel_payment_intent(
        self,
        *,
        transaction_id: str,
        payment_intent_id: str,
        reason: CancellationReason = "requested_by_customer",
    ) -> PaymentIntent:
        """Release an uncaptured authorisation (no refund, no fee)."""
        intent = await self._call(
            "cancel_payment_intent",
            self._client.v1.payment_intents.cancel_async(
                payment_intent_id,
                params={"cancellation_reason": reason},
                options={"idempotency_key": f"cancel:{transaction_id}"},
            ),
        )
        return _payment_intent(intent)

    async def create_refund(
        self,
        *,
        transaction_id: str,
        payment_intent_id: str,
        amount: int | None = None,
        currency: str | None = None,
        reason: RefundReason = "requested_by_customer",
    ) -> Refund:
        """Refund `amount` (default: everything not yet refunded). One refund per transaction."""
        params: RefundCreateParams = {
            "payment_intent": payment_intent_id,
            "reason": reason,
            "metadata": {TRANSACTION_ID_KEY: transaction_id},
        }
        if amount is not None:
            params["amount"] = _positive(amount, "amount")
        if currency is not None:
            params["currency"] = _to_stripe_currency(currency)
        refund = await self._call(
            "create_refund",
            self._client.v1.refunds.create_async(
                params=params, options={"idempotency_key": f"refund:{transaction_id}"}
            ),
        )
        return Refund(
            id=refund.id,
            status=refund.status,
            amount=refund.amount,
            currency=_from_stripe_currency(refund.currency),
            payment_intent_id=_id_of(refund.payment_intent),
            reason=refund.reason,
            metadata=_metadata(refund.metadata),
        )

    async def list_payment_intents(
        self, *, created_gte: int, page_size: int = LIST_PAGE_SIZE
    ) -> list[PaymentIntent]:
        """Every PaymentIntent created at or after `created_gte` (epoch seconds), newest first, all pages
        (whoever created them: filter on `transaction_id`). Pages follow the cursor, so an intent created
        while we page is before the first one and cannot shift the rest."""
        found: list[PaymentIntent] = []
        starting_after: str | None = None
        while True:
            params: stripe.params.PaymentIntentListParams = {
                "created": {"gte": created_gte},
                "limit": page_size,
            }
            if starting_after is not None:
                params["starting_after"] = starting_after
            page = await self._call(
                "list_payment_intents", self._client.v1.payment_intents.list_async(params=params)
            )
            found.extend(_payment_intent(intent) for intent in page.data)
            if not page.has_more or not page.data:
                return found
            starting_after = page.data[-1].id

    async def list_refunds(self, *, created_gte: int) -> list[Refund]:
        """Every refund created at or after `created_gte` (epoch seconds), newest first, all pages."""
        found: list[Refund] = []
        starting_after: str | None = None
        while True:
            params: dict[str, Any] = {"created": {"gte": created_gte}, "limit": 100}
            if starting_after is not None:
                params["starting_after"] = starting_after
            page = await self._call(
                "list_refunds", self._client.v1.refunds.list_async(params=cast(Any, params))
            )
            found.extend(_refund(refund) for refund in page.data)
            if not page.has_more or not page.data:
                return found
            starting_after = page.data[-1].id

    # --- Issuing ---------------------------------------------------------------------------------

    async def create_cardholder(
        self,
        *,
        name: str,
        email: str,
        billing_address: BillingAddress,
        phone_number: str | None = None,
    ) -> Cardholder:
        """Our own platform cardholder (`type: company`). Name: ≤ 24 letters and spaces."""
        params: CardholderCreateParams = {
            "type": "company",
            "name": name,
            "email": email,
            "status": "active",
            "billing": {"address": _address(billing_address)},
        }
        if phone_number is not None:
            params["phone_number"] = phone_number
        holder = await self._call(
            "create_cardholder",
            self._client.v1.issuing.cardholders.create_async(
                params=params, options={"idempotency_key": f"issuing-cardholder:{name}"}
            ),
        )
        return _cardholder(holder)

    async def ensure_cardholder(
        self,
        *,
        name: str,
        email: str,
        billing_address: BillingAddress,
        phone_number: str | None = None,
    ) -> Cardholder:
        """The active company cardholder with this name and email, created if there is none."""
        found = await self._call(
            "list_cardholders",
            self._client.v1.issuing.cardholders.list_async(
                params={"email": email, "status": "active", "type": "company", "limit": 100}
            ),
        )
        for holder in found.data:
            if holder.name == name:
                return _cardholder(holder)
        return await self.create_cardholder(
            name=name, email=email, billing_address=billing_address, phone_number=phone_number
        )

    async def create_single_use_card(
        self,
        *,
        topup_id: str,
        cardholder_id: str,
        amount: int,
        currency: str,
        allowed_categories: Sequence[str] | None = None,
        allowed_merchant_countries: Sequence[str] | None = None,
        attempt: int = 1,
    ) -> IssuedCard:
        """A virtual card, active now, that can pay `amount` once: per-authorisation and all-time limits
        equal to the amount, and cancelled by Stripe after one payment. `attempt` > 1 after Stripe
        answered an earlier attempt with an error (no card was made then): a key of its own."""
        limit = _positive(amount, "amount")
        controls: dict[str, Any] = {
            "spending_limits": [
                {"amount": limit, "interval": "per_authorization"},
                {"amount": limit, "interval": "all_time"},
            ]
        }
        if allowed_categories:
            controls["allowed_categories"] = list(allowed_categories)
        if allowed_merchant_countries:
            controls["allowed_merchant_countries"] = [
                country.upper() for country in allowed_merchant_countries
            ]
        params: CardCreateParams = {
            "cardholder": cardholder_id,
            "currency": _to_stripe_currency(currency),
            "type": "virtual",
            "status": "active",
            "spending_controls": cast(Any, controls),  # categories are a 300-value Literal in the SDK
            "lifecycle_controls": {"cancel_after": {"payment_count": 1}},
            "metadata": {"topup_id": topup_id},
        }
        card = await self._call(
            "create_single_use_card",
            self._client.v1.issuing.cards.create_async(
                params=params, options={"idempotency_key": issuing_card_key(topup_id, attempt)}
            ),
        )
        return _issued_card(card)

    async def find_topup_cards(self, *, cardholder_id: str, topup_id: str, since: int) -> list[IssuedCard]:
        """The cardholder's cards whose `metadata.topup_id` is `topup_id`, oldest first, created at or
        after `since` (epoch seconds). The truth about a card creation whose answer we never got or
        cannot trust. Stripe lists newest first, so the pages are read only back to `since`."""
        found: list[IssuedCard] = []
        starting_after: str | None = None
        while True:
            params: dict[str, Any] = {"cardholder": cardholder_id, "limit": 100}
            if starting_after is not None:
                params["starting_after"] = starting_after
            page = await self._call(
                "list_cards", self._client.v1.issuing.cards.list_async(params=cast(Any, params))
            )
            for card in page.data:
                if card.created < since:
                    return found[::-1]
                if _metadata(card.metadata).get("topup_id") == topup_id:
                    found.append(_issued_card(card))
            if not page.has_more or not page.data:
                return found[::-1]
            starting_after = page.data[-1].id

    async def reveal_card(self, card_id: str) -> CardDetails:
        """Number and CVC (Stripe returns them only when expanded). Keep them in memory, briefly."""
        card = await self._call(
            "reveal_card",
            self._client.v1.issuing.cards.retrieve_async(card_id, params={"expand": ["number", "cvc"]}),
        )
        # Stripe leaves the keys out (not null) when it will not reveal them: plain attribute access raises.
        number, cvc = getattr(card, "number", None), getattr(card, "cvc", None)
        if not number or not cvc:
            raise StripePermanentError(
                f"stripe reveal_card returned no card details for {card_id}", operation="reveal_card"
            )
        return CardDetails(
            card_id=card.id,
            number=number,
            cvc=cvc,
            exp_month=card.exp_month,
            exp_year=card.exp_year,
            last4=card.last4,
        )

    async def retrieve_card(self, card_id: str) -> IssuedCard:
        card = await self._call("retrieve_card", self._client.v1.issuing.cards.retrieve_async(card_id))
        return _issued_card(card)

    async def cancel_card(self, card_id: str) -> IssuedCard:
        """Cancel for good (idempotent: an already cancelled card is returned as is)."""
        current = await self.retrieve_card(card_id)
        if current.status == "canceled":
            return current
        card = await self._call(
            "cancel_card",
            self._client.v1.issuing.cards.update_async(
                card_id,
                params={"status": "canceled"},
                options={"idempotency_key": f"issuing-card-cancel:{card_id}"},
            ),
        )
        return _issued_card(card)

    async def list_issuing_cards(
        self, *, created_gte: int, cardholder_id: str | None = None
    ) -> list[IssuedCard]:
        """Every Issuing card created at or after `created_gte` (epoch seconds), of one cardholder or
        of the whole account; all pages."""
        params: dict[str, Any] = {"created": {"gte": created_gte}}
        if cardholder_id is not None:
            params["cardholder"] = cardholder_id
        cards = await self._all_pages("list_cards", self._client.v1.issuing.cards.list_async, params)
        return [_issued_card(card) for card in cards]

    async def list_issuing_authorizations(
        self, *, created_gte: int, card_id: str | None = None
    ) -> list[IssuingAuthorization]:
        """Authorisations created at or after `created_gte`, of one card or of every card; all pages."""
        params: dict[str, Any] = {"created": {"gte": created_gte}}
        if card_id is not None:
            params["card"] = card_id
        found = await self._all_pages(
            "list_issuing_authorizations", self._client.v1.issuing.authorizations.list_async, params
        )
        return [
            IssuingAuthorization(
                id=auth.id,
                card_id=_id_of(auth.card) or "",
                status=auth.status,
                approved=auth.approved,
                amount=auth.amount,
                currency=_from_stripe_currency(auth.currency),
                created=auth.created,
            )
            for auth in found
        ]

    async def list_issuing_transactions(
        self, *, created_gte: int, card_id: str | None = None
    ) -> list[IssuingTransaction]:
        """Issuing transactions (captures, refunds) created at or after `created_gte`; all pages."""
        params: dict[str, Any] = {"created": {"gte": created_gte}}
        if card_id is not None:
            params["card"] = card_id
        found = await self._all_pages(
            "list_issuing_transactions", self._client.v1.issuing.transactions.list_async, params
        )
        return [
            IssuingTransaction(
                id=item.id,
                card_id=_id_of(item.card) or "",
                authorization_id=_id_of(item.authorization),
                type=item.type,
                amount=item.amount,
                currency=_from_stripe_currency(item.currency),
                created=item.created,
            )
            for item in found
        ]

    async def _all_pages(self, operation: str, list_page: Any, params: dict[str, Any]) -> list[Any]:
        """Walk a Stripe list with `starting_after` until `has_more` is false (100 per page)."""
        items: list[Any] = []
        starting_after: str | None = None
        while True:
            page_params = {**params, "limit": 100}
            if starting_after is not None:
                page_params["starting_after"] = starting_after
            page = await self._call(operation, list_page(params=cast(Any, page_params)))
            items.extend(page.data)
            if not page.has_more or not page.data:
                return items
            starting_after = page.data[-1].id

    async def issuing_available_balance(self, currency: str) -> int:
        """The Issuing float available to spend in `currency` (0 when Stripe lists none)."""
        wanted = _to_stripe_currency(currency)
        balance = await self._call("retrieve_balance", self._client.v1.balance.retrieve_async())
        issuing = getattr(balance, "issuing", None)  # absent, not null, on accounts without Issuing
        if not issuing:
            return 0
        return sum(entry.amount for entry in issuing.available if entry.currency == wanted)

    # --- Webhooks --------------------------------------------------------------------------------

    def construct_event(self, payload: bytes, sig_header: str, secrets: Sequence[str]) -> WebhookEvent:
        """Verify `payload` (the raw body) against any of `secrets` (several during a rotation)."""
        if not secrets:
            # Said to whoever sent the webhook: no hint that this deployment is misconfigured (settings
            # refuse an empty list outside the sandbox anyway); the operator reads the cause in the log.
            log.error("a webhook cannot be verified: no endpoint secret is configured")
            raise StripeSignatureError("webhook signature not accepted", operation="construct_event")
        try:
            payload.decode("utf-8")  # the SDK decodes before it verifies, and would raise past us
        except UnicodeDecodeError:
            raise StripeSignatureError(
                "webhook body is not UTF-8 text", operation="construct_event"
            ) from None
        reasons: set[str] = set()
        for secret in secrets:
            try:
                stripe.WebhookSignature.verify_header(payload, sig_header, secret, WEBHOOK_TOLERANCE_SECONDS)
                break
            except stripe.SignatureVerificationError as exc:
                reasons.add(signature_failure_reason(str(exc)))
        else:
            raise StripeSignatureError("; ".join(sorted(reasons)), operation="construct_event")
        try:
            body = json.loads(payload)
            event = WebhookEvent(
                id=body["id"],
                type=body["type"],
                created=body["created"],
                livemode=body["livemode"],
                api_version=body.get("api_version"),
                data_object=body["data"]["object"],
                previous_attributes=body["data"].get("previous_attributes"),
            )
        except (ValueError, KeyError, TypeError):
            raise StripeSignatureError(
                "webhook body is not a Stripe event", operation="construct_event"
            ) from None
        # Signed is not well-formed: an id or type that is not a string would fail later, in the
        # database, as a 500 that Stripe retries forever.
        if not (
            isinstance(event.id, str) and isinstance(event.type, str) and isinstance(event.data_object, dict)
        ):
            raise StripeSignatureError("webhook body is not a Stripe event", operation="construct_event")
        return event

    # --- The one boundary where SDK exceptions become ours ---------------------------------------

    async def _call(self, operation: str, request: Awaitable[T]) -> T:
        with observe_provider_call("stripe", operation):
            try:
                return await request
            except stripe.StripeError as exc:
                # `from None`: the SDK exception carries the raw HTTP body, which for some calls holds
                # card data.
                raise translate_error(operation, exc) from None


_TRANSIENT: tuple[type[stripe.StripeError], ...] = (stripe.APIConnectionError, stripe.RateLimitError)
_PERMANENT: tuple[type[stripe.StripeError], ...] = (
    stripe.CardError,
    stripe.InvalidRequestError,
    stripe.AuthenticationError,
    stripe.PermissionError,
    stripe.IdempotencyError,
    stripe.SignatureVerificationError,
)


def is_transient(exc: stripe.StripeError) -> bool:
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, _PERMANENT):
        return False
    # APIError and anything newer: decide by status. 409 is Stripe's "idempotency key in use" lock; no
    # status means no (valid) answer at all.
    status = exc.http_status
    return status is None or status in (409, 429) or status >= 500


def translate_error(operation: str, exc: stripe.StripeError) -> StripeGatewayError:
    kind = StripeTransientError if is_transient(exc) else StripePermanentError
    param = getattr(exc, "param", None)
    details = [f"http={exc.http_status}" if exc.http_status else "", f"code={exc.code}" if exc.code else ""]
    details.append(f"param={param}" if param else "")
    summary = " ".join(part for part in details if part)
    message = _CARD_LIKE_DIGITS.sub("[redacted]", exc.user_message or "")
    return kind(
        f"stripe {operation} failed: {type(exc).__name__} {summary}: {message}".replace("  ", " "),
        operation=operation,
        http_status=exc.http_status,
        code=exc.code,
        param=param,
        request_id=exc.request_id,
    )


def _to_stripe_currency(currency: str) -> str:
    if len(currency) != 3 or not currency.isalpha():
        raise ValueError(f"not an ISO 4217 currency code: {currency!r}")
    return currency.lower()


def _from_stripe_currency(currency: str) -> str:
    return currency.upper()


def _positive(amount: int, name: str) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"{name} must be a positive integer of minor units, got {amount!r}")
    return amount


def _id_of(value: str | stripe.StripeObject | None) -> str | None:
    """An expandable field's id, whether Stripe sent the id or the expanded object."""
    if value is None or isinstance(value, str):
        return value
    return cast(str, value["id"])


def _metadata(value: stripe.StripeObject | None) -> dict[str, str]:
    return {} if value is None else {str(key): str(item) for key, item in value.to_dict().items()}


def _address(address: BillingAddress) -> Any:
    fields = {
        "line1": address.line1,
        "city": address.city,
        "postal_code": address.postal_code,
        "country": address.country.upper(),
        "state": address.state,
        "line2": address.line2,
    }
    return {key: value for key, value in fields.items() if value is not None}


def _checkout_session(session: stripe.checkout.Session) -> CheckoutSession:
    return CheckoutSession(
        id=session.id,
        url=session.url,
        status=session.status,
        payment_status=session.payment_status,
        payment_intent_id=_id_of(session.payment_intent),
        amount_total=session.amount_total,
        currency=_from_stripe_currency(session.currency) if session.currency else None,
        client_reference_id=session.client_reference_id,
        customer_email=session.customer_email,
        metadata=_metadata(session.metadata),
        expires_at=session.expires_at,
    )


def _payment_intent(intent: stripe.PaymentIntent) -> PaymentIntent:
    return PaymentIntent(
        id=intent.id,
        status=intent.status,
        amount=intent.amount,
        amount_received=intent.amount_received,
        amount_capturable=intent.amount_capturable,
        currency=_from_stripe_currency(intent.currency),
        capture_method=intent.capture_method,
        metadata=_metadata(intent.metadata),
        latest_charge_id=_id_of(intent.latest_charge),
        cancellation_reason=getattr(intent, "cancellation_reason", None),
        capture_before=_capture_before(intent.latest_charge),
        created=intent.created,
    )


def _capture_before(charge: str | stripe.Charge | None) -> int | None:
    """The hold's end on an expanded card charge; None for an id, or a charge that is not a card hold."""
    if charge is None or isinstance(charge, str):
        return None
    # Keys Stripe leaves out are absent, not null: plain attribute access would raise.
    card = getattr(getattr(charge, "payment_method_details", None), "card", None)
    value = getattr(card, "capture_before", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cardholder(holder: stripe.issuing.Cardholder) -> Cardholder:
    return Cardholder(
        id=holder.id, name=holder.name, email=holder.email, status=holder.status, type=holder.type
    )


def _issued_card(card: stripe.issuing.Card) -> IssuedCard:
    return IssuedCard(
        id=card.id,
        cardholder_id=card.cardholder.id,
        status=card.status,
        currency=_from_stripe_currency(card.currency),
        last4=card.last4,
        exp_month=card.exp_month,
        exp_year=card.exp_year,
        metadata=_metadata(card.metadata),
    )


def _refund(refund: stripe.Refund) -> Refund:
    return Refund(
        id=refund.id,
        status=refund.status,
        amount=refund.amount,
        currency=_from_stripe_currency(refund.currency),
        payment_intent_id=_id_of(refund.payment_intent),
        reason=refund.reason,
        metadata=_metadata(refund.metadata),
        created=refund.created,
    )
