"""Client for our top-up gateway contract (architecture.md, "Wallet funding").

`POST {ZENDIT_TOPUP_URL}` with bearer auth and JSON `{amount, currency, card: {number, exp_month, exp_year,
cvc}, reference}` answers 200 `{topupId, status, amount, currency}`. The gateway treats `reference`
idempotently, so a transient failure is retried with the same reference.

    TopupGatewayError                 base; raised as such when the answer contradicts the request
    ├── TopupGatewayUnavailable       transient: 5xx, 429, timeouts, connection errors, unreadable answer
    └── TopupDeclined                 permanent: any other 4xx; `.reason` is the gateway's errorCode

Card data never leaves `topup()` except in the request body: no exception text, repr or log line holds
the number or CVC (gateway messages are scrubbed of digit runs before they are kept).

The transient/permanent branches derive from `esim_common.errors`; the bare base class (the gateway
credited something other than what we asked) is neither, so a consumer dead-letters it for a person.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import Any, Protocol, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from esim_common.errors import PermanentError, TransientError
from esim_common.metrics import observe_provider_call

__all__ = [
    "CardDetails",
    "TopupDeclined",
    "TopupGatewayClient",
    "TopupGatewayError",
    "TopupGatewayUnavailable",
    "TopupResult",
]

# A top-up charges a card and credits a wallet: slower than a read, but it must not hang a consumer.
DEFAULT_TIMEOUT_SECONDS = 20.0
# Reason codes are short machine strings; anything else is replaced so free text cannot carry card data.
_REASON_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Any run of 3+ digits in a gateway message could be a PAN, a CVC or an expiry: mask it.
_DIGITS_RE = re.compile(r"\d{3,}")


class CardDetails(Protocol):
    """What the gateway needs from a card (e.g. Stripe Issuing's expanded card)."""

    @property
    def number(self) -> str: ...

    @property
    def exp_month(self) -> int: ...

    @property
    def exp_year(self) -> int: ...

    @property
    def cvc(self) -> str: ...


class TopupGatewayError(Exception):
    """A top-up failed; when raised as this base class the outcome is unknown and needs a human."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class TopupGatewayUnavailable(TopupGatewayError, TransientError):
    """Transient: retry later with the same reference."""


class TopupDeclined(TopupGatewayError, PermanentError):
    """Permanent: the gateway refused this top-up (card declined, conflict, bad request, auth)."""

    def __init__(self, message: str, *, reason: str, status_code: int | None = None) -> None:
        super().__init__(message, status_code=status_code)
        self.reason = reason


SUCCEEDED = "SUCCEEDED"


class TopupResult(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    topup_id: str = Field(alias="topupId")
    status: str
    amount: int
    currency: str


def _scrub(text: str) -> str:
    return _DIGITS_RE.sub("***", text)[:200]


def _decline_details(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return f"HTTP_{response.status_code}", ""
    code = str(body.get("errorCode") or "")
    reason = code if _REASON_RE.match(code) else f"HTTP_{response.status_code}"
    return reason, _scrub(str(body.get("message") or ""))


class TopupGatewayClient:
    def __init__(
        self,
        *,
        url: str,
        api_key: str,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("top-up gateway API key is empty")
        self._url = url
        self._http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"TopupGatewayClient(url={self._url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def topup(self, *, amount: int, currency: str, card: CardDetails, reference: str) -> TopupResult:
        """Charge `card` for `amount` minor units of `currency` and credit the wallet, once per reference."""
        with observe_provider_call("topup_gateway", "POST /wallet/topup"):
            return await self._topup(amount=amount, currency=currency, card=card, reference=reference)

    async def _topup(self, *, amount: int, currency: str, card: CardDetails, reference: str) -> TopupResult:
        if amount <= 0:
            raise ValueError(f"top-up amount must be positive, got {amount}")
        if not reference:
            raise ValueError("top-up reference is empty")
        body: dict[str, Any] = {
            "amount": amount,
            "currency": currency.upper(),
            "card": {
                "number": card.number,
                "exp_month": card.exp_month,
                "exp_year": card.exp_year,
                "cvc": card.cvc,
            },
            "reference": reference,
        }
        try:
            response = await self._http.post(self._url, json=body)
        except httpx.TimeoutException:
            # `from None`: the chained httpx error holds the request, and the request holds the card.
            raise TopupGatewayUnavailable(f"top-up {reference} timed out") from None
        except httpx.TransportError as exc:
            raise TopupGatewayUnavailable(f"top-up {reference} failed: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise TopupGatewayError(f"top-up {reference} failed: {type(exc).__name__}") from None
        finally:
            body.clear()
        status = response.status_code
        unavailable = f"top-up {reference}: gateway answered {status}"
        if status == 429 or status >= 500:
            raise TopupGatewayUnavailable(unavailable, status_code=status)
        if 400 <= status < 500:
            reason, message = _decline_details(response)
            text = f"top-up {reference} declined ({status} {reason})" + (f": {message}" if message else "")
            raise TopupDeclined(text, reason=reason, status_code=status)
        if not response.is_success:
            raise TopupGatewayUnavailable(unavailable, status_code=status)
        try:
            result = TopupResult.model_validate_json(response.content)
        except ValidationError:
            raise TopupGatewayUnavailable(
                f"top-up {reference}: unreadable gateway answer", status_code=status
            ) from None
        if result.status != SUCCEEDED:
            # Accepted but not (yet) credited: asking again with the same reference is safe and tells.
            raise TopupGatewayUnavailable(
                f"top-up {reference}: gateway status is {result.status!r}, not {SUCCEEDED}",
                status_code=status,
            )
        if result.amount != amount or result.currency.upper() != currency.upper():
            # The gateway says it credited something else than asked: money moved wrongly, a human decides.
            raise TopupGatewayError(
                f"top-up {reference}: gateway credited {result.amount} {result.currency}, "
                f"asked {amount} {currency.upper()}",
                status_code=status,
            )
        return result
