"""How events go out: the delivery settings tests control, and the pure rules that apply them.

Stripe promises at-least-once, unordered delivery and retries a failing endpoint with exponential backoff
(live mode: for up to three days). The defaults below send every event once, concurrently, and retry a
non-2xx or timed-out attempt on a short schedule; `POST /_sandbox/webhook_delivery` changes them:

- `duplicates`: each event is delivered this many extra times, concurrently with the original. Every
  copy is signed on its own; copy k carries a timestamp k seconds earlier so that no two copies share
  a `Stripe-Signature` (Stripe's repeats are signed when sent, so theirs differ too).
- `order`: the events one action creates together (a Checkout payment's `payment_intent.succeeded` and
  `checkout.session.completed`) go out `concurrent` (default), `created` (one after another, oldest
  first) or `reversed` (one after another, newest first). "One after another" means the next event's
  first attempt starts once the previous one's first attempt was answered.
- `delay_seconds`: wait before the first attempt.
- `retry_schedule_seconds`: the pauses before each retry; attempts = 1 + len(schedule), until a 2xx.
- `timeout_seconds`: how long an attempt waits for an answer before it counts as failed.
- `hold`: record events but send nothing until `POST /_sandbox/webhook_delivery/release`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, TypeVar

from .errors import StripeApiError

# Pauses between delivery attempts: live Stripe backs off exponentially for days; tests wait a few seconds
# at most, so five attempts over ~3.7 s show retry behaviour without slowing a failing test much.
RETRY_DELAYS_SECONDS = (0.2, 0.5, 1.0, 2.0)
DELIVERY_TIMEOUT_SECONDS = 5.0
# Bounds that keep a typo in a test from wedging the emulator (a 10-hour delay, a million copies).
MAX_DUPLICATES = 20
MAX_WAIT_SECONDS = 600.0
MAX_RETRIES = 50

Order = Literal["concurrent", "created", "reversed"]
ORDERS: tuple[Order, ...] = ("concurrent", "created", "reversed")


@dataclass(frozen=True)
class DeliverySettings:
    duplicates: int = 0
    order: Order = "concurrent"
    delay_seconds: float = 0.0
    retry_schedule_seconds: tuple[float, ...] = RETRY_DELAYS_SECONDS
    timeout_seconds: float = DELIVERY_TIMEOUT_SECONDS
    hold: bool = False

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["retry_schedule_seconds"] = list(self.retry_schedule_seconds)
        return body


def updated(current: DeliverySettings, body: dict[str, Any]) -> DeliverySettings:
    """`current` with the fields `body` gives; a 400 naming the field for anything invalid or unknown."""
    unknown = sorted(set(body) - set(DeliverySettings.__dataclass_fields__))
    if unknown:
        raise StripeApiError(400, f"Unknown delivery setting: {unknown[0]}.", param=unknown[0])
    changes: dict[str, Any] = {}
    if "duplicates" in body:
        changes["duplicates"] = _int(body, "duplicates", 0, MAX_DUPLICATES)
    if "order" in body:
        if body["order"] not in ORDERS:
            raise StripeApiError(400, f"order must be one of {', '.join(ORDERS)}.", param="order")
        changes["order"] = body["order"]
    if "delay_seconds" in body:
        changes["delay_seconds"] = _seconds(body["delay_seconds"], "delay_seconds")
    if "retry_schedule_seconds" in body:
        schedule = body["retry_schedule_seconds"]
        if not isinstance(schedule, list) or len(schedule) > MAX_RETRIES:
            raise StripeApiError(
                400,
                f"retry_schedule_seconds must be a list of at most {MAX_RETRIES} pauses.",
                param="retry_schedule_seconds",
            )
        changes["retry_schedule_seconds"] = tuple(
            _seconds(pause, "retry_schedule_seconds") for pause in schedule
        )
    if "timeout_seconds" in body:
        timeout = _seconds(body["timeout_seconds"], "timeout_seconds")
        if timeout == 0:
            raise StripeApiError(400, "timeout_seconds must be positive.", param="timeout_seconds")
        changes["timeout_seconds"] = timeout
    if "hold" in body:
        if not isinstance(body["hold"], bool):
            raise StripeApiError(400, "hold must be true or false.", param="hold")
        changes["hold"] = body["hold"]
    return replace(current, **changes)


T = TypeVar("T")


def delivery_order(events: list[T], order: Order) -> list[T]:
    """The events of one action in the order they go out (`concurrent` keeps creation order)."""
    return events[::-1] if order == "reversed" else list(events)


def copy_timestamps(signed_at: int, copies: int) -> list[int]:
    """Signature timestamps for the original and its duplicates: all distinct, none in the future."""
    return [signed_at - copy for copy in range(copies)]


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int:
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise StripeApiError(400, f"{name} must be an integer from {low} to {high}.", param=name)
    return value


def _seconds(value: Any, name: str) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_WAIT_SECONDS
    ):
        raise StripeApiError(400, f"{name} must be seconds from 0 to {MAX_WAIT_SECONDS:g}.", param=name)
    return float(value)
