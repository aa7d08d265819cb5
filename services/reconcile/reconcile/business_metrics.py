"""The seed's dashboard gauges, computed from Postgres (the source of truth) by a background loop.

    esim_success_rate               delivered / (delivered + failed) * 100 over paid orders
    zendit_topup_failures           wallet_topups declined or failed
    stripe_refunds_issued           refunded orders with a refund id
    average_time_to_issue_esim_ms   mean of emailed_at - paid_at over delivered orders

and, for the alert rules, per unfinished state: `esim_orders_unfinished{status}` and
`esim_oldest_unfinished_order_seconds{status}` (how long the oldest order there has not moved).

Computing them from the tables, not from events seen, makes them correct after a restart, across
replicas, and whatever messages were redelivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from esim_common.metrics import legacy_gauge_values, set_legacy_gauges
from reconcile import ledger_checks, metrics, repository
from reconcile.domain import average_issue_total_ms

log = logging.getLogger("esim.reconcile.metrics")

# Prometheus scrapes every 15 s by default; refreshing as often keeps a scrape at most one period old.
REFRESH_INTERVAL_SECONDS = 15.0


class BusinessMetrics:
    def __init__(
        self, pool: Callable[[], asyncpg.Pool], *, interval_seconds: float = REFRESH_INTERVAL_SECONDS
    ):
        self._pool = pool  # a getter: the pool exists only once the service has started
        self._interval_seconds = interval_seconds

    async def run_once(self) -> int:
        """Recompute and publish the gauges; returns the number of finished orders they cover."""
        figures = await repository.business_figures(self._pool())
        values = legacy_gauge_values(
            delivered=figures.delivered,
            failed=figures.failed,
            topup_failures=figures.topup_failures,
            refunds_issued=figures.refunds_issued,
            total_issue_ms=average_issue_total_ms(figures.total_timed_ms, figures.timed, figures.delivered),
        )
        set_legacy_gauges(values)
        for status, (orders, oldest_seconds) in (await repository.unfinished_orders(self._pool())).items():
            metrics.unfinished_orders.labels(status=status).set(orders)
            metrics.oldest_unfinished_order_seconds.labels(status=status).set(oldest_seconds)
        # Every replica shows the stored open mismatches, not only the one whose sweep found them, so
        # the alert clears everywhere once they are resolved.
        await ledger_checks.refresh_gauge(self._pool())
        return figures.delivered + figures.failed

    async def run_forever(self) -> None:
        """Refresh until cancelled; a failed round (database away) is logged and the next one tries again."""
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("business metrics not refreshed", extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(self._interval_seconds)
