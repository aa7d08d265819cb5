"""Typed async client for the Zendit API v1 (the calls we use; facts in docs/zendit-api.md).

Every httpx exception and every non-2xx answer is translated in ONE place, `ZenditClient._send`:

    ZenditError                       base; .status_code, .error_code, .fields
    ├── ZenditTransientError          5xx, 429, timeouts, connection errors, an unreadable 2xx body
    └── ZenditPermanentError          any other 4xx (INVALID_REQUEST, ...)
        ├── ZenditNotFound            404 (unknown or disabled offer, purchase never landed)
        └── ZenditUnauthorized        401 NOT_AUTHORIZED, 403 FORBIDDEN (IP allow-list)

The two branches also derive from `esim_common.errors.TransientError` / `PermanentError`, which is how
a consumer decides a message's fate. A purchase that Zendit refuses for business reasons
(INSUFFICIENT_FUNDS, ...) is not an HTTP error: it is a `Purchase` with status FAILED and an `error`.
Exception texts never contain the API key.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from esim_common.errors import PermanentError, TransientError
from esim_common.logging import redact
from esim_common.lpa import lpa_string
from esim_common.metrics import observe_provider_call
from esim_common.money import Money, from_zendit

__all__ = [
    "Confirmation",
    "LogItem",
    "Offer",
    "OfferCost",
    "OfferPage",
    "OfferPrice",
    "PriceType",
    "Purchase",
    "PurchaseAccepted",
    "PurchaseError",
    "PurchasePage",
    "Roaming",
    "Transaction",
    "TransactionPage",
    "TransactionStatus",
    "TransactionType",
    "WalletBalance",
    "ZenditClient",
    "ZenditError",
    "ZenditNotFound",
    "ZenditPermanentError",
    "ZenditTransientError",
    "ZenditUnauthorized",
    "lpa_string",
]

# Zendit's list endpoints accept 1..1024 items per page.
MAX_PAGE_SIZE = 1024
# Zendit suggests ~1 request per second while polling; a 10 s default keeps a stuck call bounded.
DEFAULT_TIMEOUT_SECONDS = 10.0
# Our transaction ids are derived from order ids; Zendit documents alphanumerics, `-` and `_` are common.
_TRANSACTION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Path words of the API; any other segment is an id and becomes `{id}` in metric labels.
_PATH_WORDS = frozenset({"balance", "esim", "offers", "purchases", "qrcode", "refund", "transactions"})


def endpoint_template(path: str) -> str:
    """`esim/purchases/txn-1/qrcode` → `/esim/purchases/{id}/qrcode`: a bounded metric label."""
    segments = path.split("?")[0].strip("/").split("/")
    return "/" + "/".join(seg if seg in _PATH_WORDS else "{id}" for seg in segments)


# --------------------------------------------------------------------------------------------- errors
class ZenditError(Exception):
    """Any failure talking to Zendit. `error_code` is Zendit's `errorCode` when it sent one."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_code: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_code = error_code
        self.fields: dict[str, str] = dict(fields or {})


class ZenditTransientError(ZenditError, TransientError):
    """Worth retrying later: 5xx, 429, timeouts, connection errors, an unreadable answer."""


class ZenditPermanentError(ZenditError, PermanentError):
    """Retrying the same request will fail the same way (4xx)."""

    @property
    def reason(self) -> str:  # type: ignore[override]
        """Short code for the order's failure reason, e.g. `zendit_not_found`."""
        return f"zendit_{(self.error_code or 'request_refused').lower()}"


class ZenditNotFound(ZenditPermanentError):
    pass


class ZenditUnauthorized(ZenditPermanentError):
    pass


def _error_class_for(status: int) -> type[ZenditError]:
    if status == 404:
        return ZenditNotFound
    if status in (401, 403):
        return ZenditUnauthorized
    if status == 429 or status >= 500:
        return ZenditTransientError
    if 400 <= status < 500:
        return ZenditPermanentError
    # 1xx/3xx are not answers this API gives; treat them as a broken intermediary.
    return ZenditTransientError


# --------------------------------------------------------------------------------------------- models
class _Model(BaseModel):
    # Zendit adds fields over time: ignore unknown ones rather than break the pipeline.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class TransactionStatus(StrEnum):
    ACCEPTED = "ACCEPTED"
    PENDING = "PENDING"
    AUTHORIZED = "AUTHORIZED"  # the cost is held in the wallet
    IN_PROGRESS = "IN_PROGRESS"
    DONE = "DONE"
    FAILED = "FAILED"

    @property
    def is_final(self) -> bool:
        return self in (TransactionStatus.DONE, TransactionStatus.FAILED)


class TransactionType(StrEnum):
    CREDIT = "CREDIT"
    DEBIT = "DEBIT"


class PriceType(StrEnum):
    FIXED = "FIXED"
    RANGE = "RANGE"


class WalletBalance(_Model):
    available_balance: int
    currency: str
    currency_divisor: int

    @property
    def available(self) -> Money:
        return from_zendit(self.available_balance, self.currency, self.currency_divisor)


class OfferCost(_Model):
    """What Zendit charges us; charged amount = fixed + (fee or 0)."""

    currency: str
    currency_divisor: int
    fixed: int | None = None
    fee: int | None = None
    min: int | None = None
    max: int | None = None


class OfferPrice(_Model):
    """Zendit's optional retail price module."""

    currency: str
    currency_divisor: int
    fixed: int | None = None
    suggested_fixed: int | None = None
    min: int | None = None
    max: int | None = None


class Roaming(_Model):
    country: str
    data_speeds: list[str] = []


class Offer(_Model):
    offer_id: str
    enabled: bool = True
    brand: str = ""
    brand_name: str = ""
    country: str = ""  # blank for regional offers
    regions: list[str] = []
    data_gb: float = Field(default=0, alias="dataGB")
    data_unlimited: bool = False
    data_speeds: list[str] = []
    duration_days: int = 0
    sub_types: list[str] = []
    price_type: PriceType = PriceType.FIXED
    product_type: str = "ESIM"
    cost: OfferCost
    price: OfferPrice | None = None
    roaming: list[Roaming] = []
    notes: str = ""
    short_notes: str = ""
    sms_number: int = 0
    sms_unlimited: bool = False
    voice_minutes: int = 0
    voice_unlimited: bool = False

    @property
    def cost_money(self) -> Money:
        """What buying this offer takes from the wallet: fixed + (fee or 0), in ISO minor units."""
        if self.cost.fixed is None:
            raise ValueError(f"offer {self.offer_id} has no fixed cost (priceType {self.price_type})")
        charged = self.cost.fixed + (self.cost.fee or 0)
        return from_zendit(charged, self.cost.currency, self.cost.currency_divisor)

    @property
    def suggested_price_money(self) -> Money | None:
        """Zendit's suggested retail price, if it gives one."""
        if self.price is None:
            return None
        value = self.price.suggested_fixed if self.price.suggested_fixed is not None else self.price.fixed
        if value is None:
            return None
        return from_zendit(value, self.price.currency, self.price.currency_divisor)


class _Page(_Model):
    limit: int
    offset: int
    total: int


class OfferPage(_Page):
    offers: list[Offer] = Field(alias="list")


class PurchaseAccepted(_Model):
    transaction_id: str
    status: TransactionStatus


class Confirmation(_Model):
    iccid: str = ""
    smdp_address: str = ""
    activation_code: str = ""
    external_reference_id: str = ""
    redemption_instructions: str = ""

    @property
    def lpa(self) -> str:
        return lpa_string(self.smdp_address, self.activation_code)


class PurchaseError(_Model):
    code: str = ""
    message: str = ""
    description: str = ""


class LogItem(_Model):
    date_time: datetime | None = None
    status: TransactionStatus
    status_message: str = ""


class Purchase(_Model):
    transaction_id: str
    offer_id: str = ""
    status: TransactionStatus
    cost: int | None = None
    cost_currency: str | None = None
    cost_currency_divisor: int | None = None
    # Listed in zendit-api.md; the current SDKs carry them only on top-up/bill-pay purchases.
    cost_base: int | None = None
    cost_fee: int | None = None
    price: int | None = None
    price_currency: str | None = None
    price_currency_divisor: int | None = None
    confirmation: Confirmation | None = None
    error: PurchaseError | None = None
    log: list[LogItem] = []
    brand: str = ""
    country: str = ""
    regions: list[str] = []
    data_gb: float = Field(default=0, alias="dataGB")
    data_unlimited: bool = False
    duration_days: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def cost_money(self) -> Money | None:
        if self.cost is None or self.cost_currency is None or self.cost_currency_divisor is None:
            return None
        return from_zendit(self.cost, self.cost_currency, self.cost_currency_divisor)

    @property
    def error_code(self) -> str | None:
        return self.error.code if self.error is not None and self.error.code else None


class PurchasePage(_Page):
    purchases: list[Purchase] = Field(alias="list")


class Transaction(_Model):
    """A wallet ledger row. Money moved only when status is DONE."""

    transaction_id: str
    type: TransactionType
    product_type: str  # ESIM, TOPUP, VOUCHER, WALLET_RECHARGE, REFUND (older: RECHARGE_WITH_CREDIT_CARD)
    status: TransactionStatus
    amount: int
    currency: str
    # The SDKs' dto.Transaction has no divisor; amounts are in the wallet's divisor (see WalletBalance).
    currency_divisor: int | None = None
    error: PurchaseError | None = None
    log: list[LogItem] = []
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def money(self, divisor: int | None = None) -> Money:
        """The amount as Money; pass the wallet's divisor when Zendit did not state one on the row."""
        chosen = self.currency_divisor if self.currency_divisor is not None else divisor
        if chosen is None:
            raise ValueError("transaction has no currencyDivisor; pass the wallet's divisor")
        return from_zendit(self.amount, self.currency, chosen)


class TransactionPage(_Page):
    transactions: list[Transaction] = Field(alias="list")


class _QRCode(_Model):
    image_base64: str


_M = TypeVar("_M", bound=BaseModel)


# --------------------------------------------------------------------------------------------- client
def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be 1..{MAX_PAGE_SIZE}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def _path_segment(value: str) -> str:
    if not value:
        raise ValueError("empty path segment")
    return quote(value, safe="")


def _params(**values: object) -> dict[str, str]:
    """Query parameters, skipping the unset ones (Zendit treats an empty filter as a filter)."""
    return {key: str(value) for key, value in values.items() if value is not None}


class ZenditClient:
    """Async Zendit client. Use `async with ZenditClient(...) as zendit:` or call `aclose()`."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("Zendit API key is empty")
        self._api_key = api_key
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"ZenditClient(base_url={str(self._http.base_url)!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the one boundary where httpx and HTTP statuses become ZenditError ---------------------------
    def _redact(self, text: str) -> str:
        return redact(text, secrets=(self._api_key,))

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
        accept: str | None = None,
    ) -> httpx.Response:
        what = f"Zendit {method} /{path.split('?')[0]}"
        headers = {"Accept": accept} if accept else None
        with observe_provider_call("zendit", f"{method} {endpoint_template(path)}"):
            return await self._request(what, method, path, params=params, json=json, headers=headers)

    async def _request(
        self,
        what: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        json: Mapping[str, Any] | None,
        headers: dict[str, str] | None,
    ) -> httpx.Response:
        try:
            response = await self._http.request(method, path, params=params, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            raise ZenditTransientError(f"{what} timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            detail = self._redact(str(exc)) or type(exc).__name__
            raise ZenditTransientError(f"{what} failed: {detail}") from exc
        except httpx.HTTPError as exc:
            raise ZenditError(f"{what} failed: {type(exc).__name__}") from exc
        if response.is_success:
            return response
        error_code, message, fields = _error_body(response)
        error_class = _error_class_for(response.status_code)
        text = f"{what} answered {response.status_code}"
        if error_code:
            text += f" {error_code}"
        if message:
            text += f": {message}"
        raise error_class(
            self._redact(text), status_code=response.status_code, error_code=error_code, fields=fields
        )

    async def _get_model(self, model: type[_M], method: str, path: str, **kwargs: Any) -> _M:
        response = await self._send(method, path, **kwargs)
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            # A 2xx we cannot read (a proxy's HTML page, a changed schema): the call may have had its
            # effect, so callers must treat it like a timeout and look before retrying.
            raise ZenditTransientError(
                f"Zendit {method} /{path} answered {response.status_code} with an unreadable body "
                f"({exc.error_count()} validation errors)",
                status_code=response.status_code,
                error_code="INVALID_RESPONSE",
            ) from None

    # -- wallet ------------------------------------------------------------------------------------
    async def get_balance(self) -> WalletBalance:
        return await self._get_model(WalletBalance, "GET", "balance")

    async def list_transactions(
        self,
        *,
        limit: int,
        offset: int,
        created_at: str | None = None,
        product_type: str | None = None,
        status: TransactionStatus | str | None = None,
        type: TransactionType | str | None = None,
    ) -> TransactionPage:
        """The wallet ledger. `created_at` uses Zendit's filter syntax, e.g. `gte2024-01-01T00:00:00Z`."""
        _check_page(limit, offset)
        params = _params(
            _limit=limit,
            _offset=offset,
            createdAt=created_at,
            productType=product_type,
            status=status,
            type=type,
        )
        return await self._get_model(TransactionPage, "GET", "transactions", params=params)

    # -- catalogue ---------------------------------------------------------------------------------
    async def list_offers(
        self,
        *,
        limit: int,
        offset: int,
        country: str | None = None,
        regions: str | None = None,
        brand: str | None = None,
        sub_type: str | None = None,
    ) -> OfferPage:
        _check_page(limit, offset)
        params = _params(
            _limit=limit, _offset=offset, country=country, regions=regions, brand=brand, subType=sub_type
        )
        return await self._get_model(OfferPage, "GET", "esim/offers", params=params)

    async def iter_offers(
        self,
        *,
        page_size: int = 256,
        country: str | None = None,
        regions: str | None = None,
        brand: str | None = None,
        sub_type: str | None = None,
    ) -> AsyncIterator[Offer]:
        """Every offer matching the filters, page by page."""
        offset = 0
        while True:
            page = await self.list_offers(
                limit=page_size,
                offset=offset,
                country=country,
                regions=regions,
                brand=brand,
                sub_type=sub_type,
            )
            for offer in page.offers:
                yield offer
            offset += len(page.offers)
            if not page.offers or offset >= page.total:
                return

    async def get_offer(self, offer_id: str) -> Offer:
        """One offer; ZenditNotFound when it is unknown or disabled."""
        return await self._get_model(Offer, "GET", f"esim/offers/{_path_segment(offer_id)}")

    # -- purchases ---------------------------------------------------------------------------------
    async def purchase(
        self, *, transaction_id: str, offer_id: str, iccid: str | None = None
    ) -> PurchaseAccepted:
        """Start an asynchronous purchase; poll `get_purchase` until the status is final.

        On ZenditTransientError the POST may or may not have landed: `get_purchase` first, and re-POST
        the same id only after a ZenditNotFound.
        """
        if not _TRANSACTION_ID_RE.match(transaction_id):
            raise ValueError(f"transaction id {transaction_id!r} must be 1-128 of [A-Za-z0-9_-]")
        body: dict[str, Any] = {"transactionId": transaction_id, "offerId": offer_id}
        if iccid is not None:
            body["iccid"] = iccid
        return await self._get_model(PurchaseAccepted, "POST", "esim/purchases", json=body)

    async def get_purchase(self, transaction_id: str) -> Purchase:
        return await self._get_model(Purchase, "GET", f"esim/purchases/{_path_segment(transaction_id)}")

    async def list_purchases(
        self,
        *,
        limit: int,
        offset: int,
        created_at: str | None = None,
        status: TransactionStatus | str | None = None,
    ) -> PurchasePage:
        _check_page(limit, offset)
        params = _params(_limit=limit, _offset=offset, createdAt=created_at, status=status)
        return await self._get_model(PurchasePage, "GET", "esim/purchases", params=params)

    async def get_qrcode(self, transaction_id: str) -> bytes:
        """Zendit's rendering of the purchase's QR code, as PNG bytes.

        The API answers a PNG by default and `{imageBase64}` to `Accept: application/json` (the
        official SDKs ask for either); we ask for the PNG and also take the JSON shape, in case a
        gateway in between prefers it. Call it once the purchase is DONE: what Zendit answers before
        is undocumented (the emulator: 400, a permanent error). An answer that is not a PNG is a
        ZenditTransientError (INVALID_RESPONSE), like any unreadable 2xx.
        """
        path = f"esim/purchases/{_path_segment(transaction_id)}/qrcode"
        response = await self._send("GET", path, accept="image/png")
        content = response.content
        if response.headers.get("content-type", "").startswith("application/json"):
            try:
                content = base64.b64decode(_QRCode.model_validate_json(content).image_base64, validate=True)
            except (ValidationError, ValueError):
                content = b""
        if not content.startswith(_PNG_SIGNATURE):
            raise ZenditTransientError(
                f"Zendit GET /{path} did not answer a PNG ({response.headers.get('content-type')})",
                status_code=response.status_code,
                error_code="INVALID_RESPONSE",
            )
        return content

    async def get_qrcode_png(self, transaction_id: str) -> bytes:
        """The same as `get_qrcode` (its earlier name)."""
        return await self.get_qrcode(transaction_id)

    async def get_qrcode_base64(self, transaction_id: str) -> str:
        """The QR PNG as base64, from the JSON variant of the qrcode endpoint."""
        path = f"esim/purchases/{_path_segment(transaction_id)}/qrcode"
        qr = await self._get_model(_QRCode, "GET", path, accept="application/json")
        return qr.image_base64


def _error_body(response: httpx.Response) -> tuple[str | None, str, dict[str, str]]:
    """`{errorCode, message, fields}` from an error answer, tolerating bodies that are not JSON."""
    try:
        body = response.json()
    except ValueError:
        return None, "", {}
    if not isinstance(body, dict):
        return None, "", {}
    code = body.get("errorCode")
    message = body.get("message")
    fields = body.get("fields")
    return (
        str(code) if code else None,
        str(message)[:300] if message else "",
        {str(k): str(v) for k, v in fields.items()} if isinstance(fields, dict) else {},
    )
