"""Provisioning's own series (bounded labels only; provider calls and messages are counted in common)."""

from __future__ import annotations

from typing import Literal, get_args

from prometheus_client import Counter, Histogram

PurchaseOutcome = Literal["done", "fund_again", "failed", "deadline_exceeded", "needs_attention"]
# completed: the hint settled the purchase; already_settled: the poll (or another hint) was first;
# pending: Zendit says it is not final (whatever the webhook claimed); not_found: no such purchase yet;
# ignored: the order no longer waits for that purchase; failed: the hint could not be acted on.
HintOutcome = Literal["completed", "already_settled", "pending", "not_found", "ignored", "failed"]

purchase_outcomes_total = Counter(
    "esim_zendit_purchase_outcomes_total",
    "Zendit purchase attempts by how they ended for the order.",
    ("outcome",),
)
# Each outcome from start-up at 0: one born at its first attempt, already at 1, hides that attempt from
# increase() (no earlier sample), so the first purchase after a restart would miss the dashboard.
for _outcome in get_args(PurchaseOutcome):
    purchase_outcomes_total.labels(outcome=_outcome)

# From the attempt's start to the moment we saw it DONE: Zendit's ~15 s typical, hours in an outage.
purchase_seconds = Histogram(
    "esim_zendit_purchase_seconds",
    "Time from placing a Zendit purchase to seeing it DONE.",
    buckets=(1, 2, 5, 10, 15, 30, 60, 300, 1800, 3600, 21600, 86400),
)

operator_alerts_total = Counter(
    "esim_provisioning_operator_alerts_total",
    "Operator alerts raised by provisioning: orders handed to an operator (needs_attention), and "
    "qr_mismatch_zendit (Zendit's QR image disagrees with the delivered one), by reason.",
    ("reason",),
)

# Whose rendering of the LPA string was stored for the customer: ours, or Zendit's as the fallback.
qr_codes_total = Counter(
    "esim_provisioning_qr_codes_total",
    "QR codes stored for delivery, by whose rendering it is (zendit: ours could not be verified).",
    ("source",),
)

# check: fallback (ours could not be verified) or cross_check (ZENDIT_QR_CROSS_CHECK);
# outcome: match, mismatch, unreadable, unavailable (domain.QrCheck).
zendit_qr_checks_total = Counter(
    "esim_zendit_qr_checks_total",
    "Zendit's QR images read back and compared with the purchase's LPA string.",
    ("check", "outcome"),
)


purchase_hints_total = Counter(
    "esim_zendit_purchase_hints_total",
    "Zendit webhook hints (re-checks of a purchase before its scheduled poll), by what they led to.",
    ("outcome",),
)


def count_outcome(outcome: PurchaseOutcome) -> None:
    purchase_outcomes_total.labels(outcome=outcome).inc()
