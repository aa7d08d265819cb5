"""The edge's own Prometheus series (the shared ones live in `esim_common.metrics`). Bounded labels only.

esim_checkout_sessions_total{outcome}   created | offer_unavailable | currency_mismatch |
                                        pricing_refused | provider_error | unavailable
esim_stripe_webhooks_total{outcome}     the stripe_events outcome (order_paid, already_paid,
                                        amount_mismatch, ignored_type, ...) or bad_signature |
                                        too_large | unavailable
"""

from __future__ import annotations

from prometheus_client import Counter

checkout_sessions_total = Counter(
    "esim_checkout_sessions_total", "Checkout session requests by outcome.", ("outcome",)
)
stripe_webhooks_total = Counter(
    "esim_stripe_webhooks_total", "Stripe webhook deliveries by outcome.", ("outcome",)
)
