"""Reconcile's own series (bounded labels only; the seed's gauges are in `business_metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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

# From Postgres every refresh (business_metrics), so correct across restarts and replicas. status: one of
# reconcile.domain.UNFINISHED_STATES (bounded).
unfinished_orders = Gauge(
    "esim_orders_unfinished",
    "Orders in a state they do not stay in for good (in flight, or waiting for a refund or a person).",
    ("status",),
)
oldest_unfinished_order_seconds = Gauge(
    "esim_oldest_unfinished_order_seconds",
    "Seconds since the oldest order in this state last changed (0 when none is in it).",
    ("status",),
)
