"""Injected faults: make the next N calls of a `/v1` endpoint fail or answer late, the way Stripe can.

`POST /_sandbox/faults` with `{"path": "/v1/refunds", "method": "POST", "count": 1, "status": 500}` arms
one; `path` is exact or ends in `*` (a prefix). A fault has a `status`, a `delay_seconds`, or both:

- `status` 402 (card_error, `card_declined`), 403, 429 (`rate_limit`), 500/502/503/504 (api_error):
  answered instead of running the endpoint, Stripe-shaped, with an optional `code` / `message`.
  403 and 429 come from gates in front of the endpoint, so, as at Stripe, they are not saved for
  idempotent replay; 402 and 5xx happen while the endpoint runs, so the first result is saved and a
  retry with the same Idempotency-Key gets the same error back.
- `delay_seconds` alone: the endpoint runs (its effect happens at once) but the request stays in flight
  that long before answering — a client timeout that hides a completed effect. While it runs, the same
  Idempotency-Key answers 409 `idempotency_key_in_use`; afterwards it replays the result.

A fault is consumed only by a request that reaches its stage: a replayed idempotent request never runs
the endpoint, so it does not use up a 5xx fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import StripeApiError
from .ids import new_id

# Faults that answer before the endpoint runs; their result is never saved for idempotent replay.
GATE_STATUSES = frozenset({403, 429})
EXECUTION_STATUSES = frozenset({402, 500, 502, 503, 504})
MAX_COUNT = 1000
MAX_DELAY_SECONDS = 600.0
METHODS = ("GET", "POST")

_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    402: ("card_error", "card_declined", "Your card was declined."),
    403: (
        "invalid_request_error",
        None,
        "The provided key does not have the required permissions for this endpoint.",
    ),
    429: (
        "invalid_request_error",
        "rate_limit",
        "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
    ),
}
_SERVER_ERROR = ("api_error", None, "An unknown error occurred (a fault injected into the Stripe emulator).")


@dataclass
class Fault:
    id: str
    path: str
    method: str | None
    remaining: int
    status: int | None
    delay_seconds: float
    code: str | None
    message: str | None

    @property
    def at_gate(self) -> bool:
        return self.status in GATE_STATUSES

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        return path.startswith(self.path[:-1]) if self.path.endswith("*") else path == self.path

    def error(self) -> StripeApiError | None:
        if self.status is None:
            return None
        error_type, code, message = _DEFAULTS.get(self.status, _SERVER_ERROR)
        extra = {"decline_code": "generic_decline"} if self.status == 402 else None
        return StripeApiError(
            self.status,
            self.message or message,
            type=error_type,
            code=self.code or code,
            extra=extra,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "method": self.method,
            "remaining": self.remaining,
            "status": self.status,
            "delay_seconds": self.delay_seconds,
            "code": self.code,
            "message": self.message,
        }


def take(faults: list[Fault], method: str, path: str, *, at_gate: bool) -> Fault | None:
    """The first armed fault for this call at this stage, counted as used (and dropped when spent)."""
    for fault in faults:
        if fault.at_gate == at_gate and fault.matches(method, path):
            fault.remaining -= 1
            if fault.remaining <= 0:
                faults.remove(fault)
            return fault
    return None


def parse(body: dict[str, Any]) -> Fault:
    """A fault from the control route's JSON; a 400 naming the field for anything wrong."""
    unknown = sorted(set(body) - {"path", "method", "count", "status", "delay_seconds", "code", "message"})
    if unknown:
        raise StripeApiError(400, f"Unknown fault field: {unknown[0]}.", param=unknown[0])
    path = body.get("path")
    if not isinstance(path, str) or not path.startswith("/v1/"):
        raise StripeApiError(400, "path must be a /v1/... path, optionally ending in *.", param="path")
    method = body.get("method")
    if method is not None and method not in METHODS:
        raise StripeApiError(400, f"method must be one of {', '.join(METHODS)}.", param="method")
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise StripeApiError(400, f"count must be an integer from 1 to {MAX_COUNT}.", param="count")
    status = body.get("status")
    if status is not None and status not in GATE_STATUSES | EXECUTION_STATUSES:
        allowed = ", ".join(str(s) for s in sorted(GATE_STATUSES | EXECUTION_STATUSES))
        raise StripeApiError(400, f"status must be one of {allowed}.", param="status")
    delay = body.get("delay_seconds", 0)
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY_SECONDS:
        raise StripeApiError(
            400, f"delay_seconds must be from 0 to {MAX_DELAY_SECONDS:g}.", param="delay_seconds"
        )
    if status is None and not delay:
        raise StripeApiError(400, "A fault needs a status, a delay_seconds, or both.", param="status")
    for name in ("code", "message"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise StripeApiError(400, f"{name} must be a string.", param=name)
    return Fault(
        id=new_id("fault_", 12),
        path=path,
        method=method,
        remaining=count,
        status=status,
        delay_seconds=float(delay),
        code=body.get("code"),
        message=body.get("message"),
    )
