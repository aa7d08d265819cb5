"""The funding service's own metrics (bounded labels only) and its operator alerts.

    esim_funding_topups_total{outcome}               succeeded | declined | failed
    esim_funding_operator_alerts_total{reason}       issuing_float_low | wallet_short | capture_failed | ...
    esim_funding_payment_captures_total{outcome}     captured | already_captured | not_required | deferred
                                                     | failed
    esim_zendit_wallet_available_minor_units{currency}
    esim_stripe_issuing_available_minor_units{currency}
    esim_stripe_issuing_float_low{currency}          1: the last top-up found the Issuing float too low
                                                     to pay it; 0: the float covered one since
    esim_funding_awaiting_funds_orders               prefunded: orders waiting for the operator
    esim_funding_wallet_shortfall_minor_units{currency}   prefunded: what all waiting orders still need
    esim_funding_announcements_relayed_total         order.funded the relay published (the usual path
                                                     lost them: relay.py)

Alert reasons: issuing_float_low, wallet_short (once per shortage), topup_outcome_unknown,
topup_declined_after_handover, card_refused, card_may_be_active, capture_failed.

An operator alert is an ERROR log line with a stable `alert` key plus the counter above, which is what
the Prometheus alert rules and log-based alerting match on.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge

log = logging.getLogger("esim.funding.alerts")

topups_total = Counter(
    "esim_funding_topups_total", "Zendit wallet top-ups that reached a final outcome.", ("outcome",)
)
operator_alerts_total = Counter(
    "esim_funding_operator_alerts_total", "Situations the funding service cannot fix alone.", ("reason",)
)
payment_captures_total = Counter(
    "esim_funding_payment_captures_total",
    "order.delivered handled by the capture step (manual capture mode), by outcome.",
    ("outcome",),
)
wallet_available = Gauge(
    "esim_zendit_wallet_available_minor_units",
    "Zendit wallet availableBalance at the last funding decision.",
    ("currency",),
)
issuing_available = Gauge(
    "esim_stripe_issuing_available_minor_units",
    "Stripe Issuing float available at the last top-up.",
    ("currency",),
)
issuing_float_low = Gauge(
    "esim_stripe_issuing_float_low",
    "1 when the last top-up attempt found the Stripe Issuing float too low to pay it (fund Issuing); "
    "0 once a card has been created since.",
    ("currency",),
)


def operator_alert(reason: str, message: str, **facts: object) -> None:
    """Tell the operator (log line + counter). `facts` are amounts and ids, never card data."""
    operator_alerts_total.labels(reason=reason).inc()
    log.error(message, extra={"alert": reason, **facts})


awaiting_funds_orders = Gauge(
    "esim_funding_awaiting_funds_orders",
    "Orders waiting for the operator to fund the Zendit wallet (prefunded mode), at the last decision.",
)
wallet_shortfall = Gauge(
    "esim_funding_wallet_shortfall_minor_units",
    "What the operator must add to the Zendit wallet for every waiting order (prefunded mode).",
    ("currency",),
)
announcements_relayed = Counter(
    "esim_funding_announcements_relayed_total",
    "order.funded events the announcement relay published because nobody had (relay.py): each one is "
    "an announcement the usual path lost.",
)
