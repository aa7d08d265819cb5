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
    esim_funding_announcement_relay_failures_total   order.funded rows the relay could not publish (bad
                                                     payload, refused by the broker); retried next round
    esim_funding_oldest_unpublished_announcement_seconds   age of the oldest unpublished order.funded row
                                                     (0: none), set every relay round
    esim_funding_mode{mode}                          1 for the mode the service runs in, 0 for the other

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
announcement_relay_failures = Counter(
    "esim_funding_announcement_relay_failures_total",
    "order.funded rows the announcement relay could not publish (payload not an OrderFunded, or the "
    "broker refused it); each is skipped for the round and tried again the next.",
)
oldest_unpublished_announcement = Gauge(
    "esim_funding_oldest_unpublished_announcement_seconds",
    "Age of the oldest unpublished order.funded row at the relay's last round (0 when there is none): "
    "well past the relay's delay, announcements are stuck.",
)
funding_mode = Gauge(
    "esim_funding_mode",
    "1 for the funding mode the service runs in (prefunded or issuing_card), 0 for the other.",
    ("mode",),
)
