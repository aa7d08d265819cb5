"""How a failure is classified, which decides what happens to the message that caused it.

    Exception
     ├─ TransientError      try again later: timeouts, 5xx, 429, a dependency restarting
     │   └─ RetryLater      raised by handlers to say so explicitly
     └─ PermanentError      will never succeed: declined card, unknown offer, 4xx
         └─ FailPermanently raised by handlers to say so explicitly

Provider clients derive their exception trees from these two roots, so a handler can let a provider
error propagate and the consumer still routes the message correctly (see `esim_common.consumer`):
transient → retry tier, permanent → the service's failure path, anything else → DLQ for a person.
"""

from __future__ import annotations


class TransientError(Exception):
    """The operation may succeed if tried again later."""


class PermanentError(Exception):
    """The operation will not succeed however often it is tried."""

    #: short machine-readable code for events, metrics and the order's failure reason.
    reason: str = "permanent_failure"


class RetryLater(TransientError):
    """Raise from a handler: retry this message through the delay tiers."""


class FailPermanently(PermanentError):
    """Raise from a handler: stop retrying and take the failure path (compensation)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class CheckAgainLater(Exception):
    """Raise from a handler: nothing failed, the work is just not finished (a Zendit purchase still
    IN_PROGRESS). The message comes back after about `delay_seconds` (rounded down to a delay tier)
    without using up a retry attempt; the handler itself enforces any overall deadline."""

    def __init__(self, delay_seconds: float, detail: str = "") -> None:
        super().__init__(detail or f"check again in {delay_seconds}s")
        self.delay_seconds = delay_seconds
