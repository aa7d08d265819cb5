"""A cap on Stripe deliveries in flight: past it, answer 503 at once instead of queueing.

Why: past its capacity an HTTP service that accepts everything gets slower for everyone — each
delivery waits longer for a pool connection and a broker confirm, Stripe's client times out, and the
work done for it is wasted (the benchmark measured throughput falling to half under 2.5x overload, and
memory growing). A quick 503 costs almost nothing; Stripe retries it with backoff, and the delivery
lands once the burst has passed. The cap counts deliveries being processed in this process; asyncio
runs one coroutine at a time, so a plain counter is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class Overloaded(Exception):
    pass


@dataclass
class InFlightLimit:
    limit: int
    in_flight: int = 0

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("the in-flight limit must be at least 1")

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the block; Overloaded when all are taken."""
        if self.in_flight >= self.limit:
            raise Overloaded
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
