"""Reconcile's own series (bounded labels only; the seed's gauges are in `business_metrics`)."""

from __future__ import annotations

from prometheus_client import Counter

# event: order.delivered | order.failed | order.refunded; step: the failed step, or "none".
# Counted per message handled, so a redelivery counts twice; the gauges (from Postgres) are exact.
order_outcome_events_total = Counter(
    "esim_order_outcome_events_total",
    "Outcome events seen by reconcile.",
    ("event", "step"),
)
unknown_order_events_total = Counter(
    "esim_unknown_order_events_total",
    "Outcome events naming an order this database does not have.",
    ("event",),
)
