"""Reconcile's own series (bounded labels only; the seed's gauges are in `business_metrics`)."""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Gauge

from esim_common.events import FailedStep, OrderDelivered, OrderFailed, OrderRefunded

# event: order.delivered | order.failed | order.refunded; step: the failed step, or "none".
# Counted per message handled, so a redelivery counts twice; the gauges (from Postgres) are exact.
order_outcome_events_total = Counter(
    "esim_order_outcome_events_total",
    "Outcome events seen by reconcile.",
    ("event", "step"),
)
# Each series from start-up at 0: one born at its first event, already at 1, hides that event from
# increase() (no earlier sample), so the first failure after a restart would miss "Failures by step".
for _event, _steps in (
    (OrderDelivered.routing_key, ("none",)),
    (OrderRefunded.routing_key, ("none",)),
    (OrderFailed.routing_key, get_args(FailedStep)),
):
    for _step in _steps:
        order_outcome_events_total.labels(event=_event, step=_step)
# queue: a DLQ of the topology (bounded: copies naming anything else are refused, not counted). Counted
# once per dead letter recorded in `dead_letter_events`, so redeliveries of the copy do not count again.
dead_letters_total = Counter(
    "esim_dead_letters_total",
    "Messages a consumer copied to a dead-letter queue, as recorded by reconcile (not those the broker "
    "dead-lettered by itself: see esim_dlq_depth).",
    ("queue",),
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

# The scheduled sweep (reconcile.sweep). status: redriven | moved_on (changed before its lock) | refused
# (its facts do not allow a re-drive: an operator's) | failed (not published, or an error).
reconcile_redrives_total = Counter(
    "esim_reconcile_redrives_total",
    "Stuck orders the scheduled sweep re-drove, by what became of the re-drive.",
    ("status",),
)
# outcome: ok | degraded (a re-drive or a check failed) | failed (the run raised) | skipped (another
# replica held the re-drive lock and the checks were not due).
reconcile_runs_total = Counter(
    "esim_reconcile_runs_total",
    "Scheduled reconciliation runs, by outcome.",
    ("outcome",),
)
reconcile_check_failures_total = Counter(
    "esim_reconcile_check_failures_total",
    "Reconciliation checks that raised, by check (a fixed set of functions).",
    ("check",),
)
reconcile_last_success = Gauge(
    "esim_reconcile_last_success_timestamp_seconds",
    "Unix time of this replica's last reconciliation run that did its re-drives or checks with nothing "
    "failing (0 until then).",
)
# For ReconcileNotRunning: the alert compares the age of the last success with the interval in force,
# and counts from the sweep's start while a replica has had no success yet (the gauge above is 0).
reconcile_interval = Gauge(
    "esim_reconcile_interval_seconds",
    "RECONCILE_INTERVAL: seconds between two runs of the scheduled sweep.",
)
reconcile_sweep_started = Gauge(
    "esim_reconcile_sweep_started_timestamp_seconds",
    "Unix time this replica's scheduled sweep started.",
)

# Scheduled reconciliation (ledger_checks): open mismatches per kind, set from Postgres after each run
# (every kind of reconcile.mismatches.MISMATCH_KINDS, 0 included); and sources a run could not read
# (zendit_purchases, zendit_ledger, stripe_refunds, stripe_payment_intents, or an extra check's source:
# bounded).
reconcile_mismatches = Gauge(
    "esim_reconcile_mismatches",
    "Open reconciliation mismatches between our records and Stripe or Zendit, per kind.",
    ("kind",),
)
# Issuing cards our books name that this Stripe account does not have (another account or mode): the
# Issuing checks skip them instead of failing (reconcile.issuing_check).
reconcile_cards_unknown_to_stripe_total = Counter(
    "esim_reconcile_cards_unknown_to_stripe_total",
    "Issuing cards in our books that Stripe answered 404 for, per reconciliation run that met them.",
)
reconcile_source_errors_total = Counter(
    "esim_reconcile_source_errors_total",
    "Reconciliation runs that could not read a source (its mismatch kinds were not checked).",
    ("source",),
)
# An order we have as paid whose PaymentIntent took no money (ledger_checks.report_conflicts), counted by
# every run that sees it. stripe_status: canceled | requires_payment_method (bounded).
reconcile_payment_state_conflicts_total = Counter(
    "esim_reconcile_payment_state_conflicts_total",
    "Orders paid in our records whose Stripe PaymentIntent took no money, per reconciliation run.",
    ("stripe_status",),
)
