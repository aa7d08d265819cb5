"""The pipeline benchmark's rules and arithmetic, without I/O (tests/unit/test_bench_pipeline.py).

- when a captured mail arrived and which order it is for;
- how many copies of something are "duplicates";
- the provider-bound time of one order: the time the providers' latencies alone impose on it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

# smtp_capture names each message `<UTC %Y%m%dT%H%M%S%fZ>-<n>.eml`, stamped as DATA completes: the
# arrival time on this machine's wall clock (the same clock as time.time() in the load generator).
_MAIL_NAME = re.compile(r"^(\d{8}T\d{12})Z-\d+\.eml$")
# notify's Message-ID: `<{template}.{transaction id}@{domain}>` (domain.message_id).
_MESSAGE_ID = re.compile(r"^<([a-z_]+)\.([A-Za-z0-9_-]+)@[^>]+>$")


def mail_arrival(file_name: str) -> float | None:
    """Epoch seconds at which smtp_capture stored the message, from its file name (None: not one)."""
    found = _MAIL_NAME.match(file_name)
    if found is None:
        return None
    stamp = datetime.strptime(found.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
    return stamp.timestamp()


def parse_message_id(message_id: str | None) -> tuple[str, str] | None:
    """(template, transaction id) of one of notify's Message-IDs, else None."""
    found = _MESSAGE_ID.match((message_id or "").strip())
    return (found.group(1), found.group(2)) if found else None


def extra_copies(counts: Iterable[int]) -> int:
    """Copies beyond the first, summed: 1, 1, 3 → 2."""
    return sum(max(0, count - 1) for count in counts)


def zendit_purchases_per_order(purchase_ids: Iterable[str]) -> Counter[str]:
    """Zendit purchases by our order: attempt 1 is `<txn>`, later attempts `<txn>-r<n>`
    (provisioning.domain.zendit_transaction_id)."""
    return Counter(purchase_id.split("-r", 1)[0] for purchase_id in purchase_ids)


def per_second(times: Iterable[float], start: float, end: float) -> float:
    """How many of `times` fall in [start, end), per second of that window."""
    if end <= start:
        return math.nan
    return sum(1 for t in times if start <= t < end) / (end - start)


# ------------------------------------------------------------------------- provider-bound time
#
# The time one order needs through the providers' latencies alone, with unlimited parallelism and
# our own work taking no time: the sequential provider calls on its critical path, each at the
# provider's latency, plus the time Zendit takes to finish a purchase.
#
#     T_bound = D_zendit + n_stripe * L_stripe + n_zendit * L_zendit
#
# Counted from the code (webhook → funding → provisioning → notify), automatic capture:
#
#   webhook       verifies the signature locally, records the payment, publishes order.paid:
#                 no provider call (the Stripe event carries what it needs).
#   funding       one Zendit GET /balance under the wallet lock (the offer's cost was recorded at
#                 checkout, so no GET /offers). With a top-up (wallet short): Stripe GET /v1/balance
#                 (Issuing float), POST /v1/issuing/cards, GET /v1/issuing/cards/{id} (number and CVC),
#                 the gateway's POST /v1/wallet/topup at Zendit (which charges the card through Stripe's
#                 card network and our real-time authorisation endpoint), POST /v1/issuing/cards/{id}
#                 (cancel), then Zendit GET /balance again.
#   provisioning  Zendit GET /esim/purchases/{id} (404), again under the order's row lock (404),
#                 POST /esim/purchases; Zendit finishes it after D_zendit and says so by webhook
#                 (the emulator's ticker: within 0.1 s, not counted); one GET to read the DONE.
#   notify        SMTP only.
#
# Capture (manual mode only) follows the email, so it is off the critical path. The platform
# cardholder is looked up once per funding process, so it is not counted per order.

CRITICAL_PATH_CALLS: Mapping[str, Mapping[str, int]] = {
    # wallet mode → provider → sequential calls on one order's critical path
    "covered": {"stripe": 0, "zendit": 4 + 1},
    "topup": {"stripe": 4, "zendit": 4 + 1 + 2},
}


@dataclass(frozen=True)
class ProviderBound:
    zendit_done_seconds: float
    stripe_calls: int
    stripe_latency: float
    zendit_calls: int
    zendit_latency: float

    @classmethod
    def for_wallet(
        cls, wallet: str, *, zendit_done_seconds: float, stripe_latency: float, zendit_latency: float = 0.0
    ) -> ProviderBound:
        calls = CRITICAL_PATH_CALLS[wallet]
        return cls(zendit_done_seconds, calls["stripe"], stripe_latency, calls["zendit"], zendit_latency)

    @property
    def seconds(self) -> float:
        return (
            self.zendit_done_seconds
            + self.stripe_calls * self.stripe_latency
            + self.zendit_calls * self.zendit_latency
        )

    def formula(self) -> str:
        return (
            f"{self.zendit_done_seconds:g} s (Zendit DONE) + {self.stripe_calls} × {self.stripe_latency:g} s "
            f"(Stripe) + {self.zendit_calls} × {self.zendit_latency:g} s (Zendit API) = {self.seconds:.3g} s"
        )


@dataclass(frozen=True)
class Spans:
    """One order's time in each step, seconds (None when a timestamp is missing)."""

    webhook: float | None  # scheduled send of its first event → paid_at
    funding: float | None  # paid_at → funded_at
    purchase_start: float | None  # funded_at → purchased_at (the Zendit purchase placed)
    purchase: float | None  # purchased_at → qr_stored_at (Zendit DONE, QR rendered and stored)
    notify: float | None  # qr_stored_at → emailed_at
    to_mail: float | None  # scheduled send → the mail stored by the SMTP capture


STEP_NAMES: Mapping[str, str] = {
    "webhook": "webhook (sent → paid)",
    "funding": "funding (paid → funded)",
    "purchase_start": "provisioning start (funded → purchase placed)",
    "purchase": "purchase (placed → QR stored)",
    "notify": "notify (QR stored → emailed)",
    "to_mail": "time to eSIM (sent → mail received)",
}


def spans(scheduled: float, stamps: Mapping[str, float | None], mail_at: float | None) -> Spans:
    """`stamps`: epoch seconds of paid_at, funded_at, purchased_at, qr_stored_at, emailed_at."""

    def between(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    return Spans(
        webhook=between(scheduled, stamps.get("paid_at")),
        funding=between(stamps.get("paid_at"), stamps.get("funded_at")),
        purchase_start=between(stamps.get("funded_at"), stamps.get("purchased_at")),
        purchase=between(stamps.get("purchased_at"), stamps.get("qr_stored_at")),
        notify=between(stamps.get("qr_stored_at"), stamps.get("emailed_at")),
        to_mail=between(scheduled, mail_at),
    )
