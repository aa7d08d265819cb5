"""The edge's own Prometheus series (the shared ones live in `esim_common.metrics`). Bounded labels only.

esim_checkout_sessions_total{outcome}   created | replayed (Idempotency-Key) | offer_unavailable |
                                        currency_mismatch | pricing_refused | provider_error |
                                        unavailable | bad_idempotency_key | idempotency_key_reused |
                                        idempotency_key_in_progress
esim_catalogue_offers{kind}             the cached catalogue: listed (by Zendit) | sellable (in the shop)
esim_catalogue_age_seconds              since its last successful load (since start-up if none yet)
esim_catalogue_refreshes_total{outcome} ok | failed (the last good copy stays in service)
esim_stripe_webhooks_total{outcome}     the stripe_events outcome (order_paid, already_paid,
                                        amount_mismatch, ignored_type, ...) or bad_signature |
                                        too_large | unavailable | shed (over WEBHOOK_MAX_IN_FLIGHT)
esim_issuing_authorizations_total{decision,reason}
                                        real-time Issuing authorisations: approved | declined (reason:
                                        `issuing_rules.Reason`) | refused (4xx: bad_signature,
                                        too_large, wrong_event_type)
esim_issuing_authorization_seconds      time to decide one, against Stripe's ~2 s limit
esim_zendit_webhooks_total{outcome}     hinted | unknown_order | foreign | unauthorized | malformed |
                                        too_large | unavailable | error
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

checkout_sessions_total = Counter(
    "esim_checkout_sessions_total", "Checkout session requests by outcome.", ("outcome",)
)
stripe_webhooks_total = Counter(
    "esim_stripe_webhooks_total", "Stripe webhook deliveries by outcome.", ("outcome",)
)
catalogue_offers = Gauge(
    "esim_catalogue_offers", "Offers in the cached catalogue behind GET /api/offers.", ("kind",)
)
catalogue_age_seconds = Gauge(
    "esim_catalogue_age_seconds", "Seconds since the offer catalogue was last loaded from Zendit."
)
catalogue_refreshes_total = Counter(
    "esim_catalogue_refreshes_total", "Offer catalogue loads from Zendit by outcome.", ("outcome",)
)
zendit_webhooks_total = Counter(
    "esim_zendit_webhooks_total", "Zendit webhook deliveries (purchase hints) by outcome.", ("outcome",)
)
issuing_authorizations_total = Counter(
    "esim_issuing_authorizations_total",
    "Real-time Issuing authorisation requests by decision and reason.",
    ("decision", "reason"),
)
issuing_authorization_seconds = Histogram(
    "esim_issuing_authorization_seconds",
    "Time to answer a real-time Issuing authorisation request (Stripe waits about 2 s).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0),
)
