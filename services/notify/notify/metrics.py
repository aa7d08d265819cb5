"""Notify's own series (bounded labels: template and outcome only)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# outcome: sent | already_sent | rejected | relay_error | transient_error | skipped
emails_total = Counter(
    "esim_emails_total",
    "Emails by template and what happened to them.",
    ("template", "outcome"),
)
operator_alerts_total = Counter(
    "esim_operator_alerts_total",
    "Operator alerts raised by notify, by the step that needs a person.",
    ("step",),
)
operator_alert_emails_failed_total = Counter(
    "esim_operator_alert_emails_failed_total",
    "operator.alert events whose email could not be sent (retries exhausted or rejected): only the log "
    "line alerted anyone. By alert kind (needs_attention, wallet_short).",
    ("alert",),
)
# The relay refuses everyone (login, certificate, sender, STARTTLS/AUTH): one alert, not one per order.
smtp_relay_failing = Gauge(
    "esim_smtp_relay_failing",
    "1 while the SMTP relay is refusing every email (misconfigured or broken), 0 once it accepts one.",
)
smtp_relay_errors_total = Counter(
    "esim_smtp_relay_errors_total",
    "Emails the SMTP relay refused for a relay-wide reason, by reason code.",
    ("reason",),
)
# Payment to eSIM email, observed once per order by the delivery that moves it to delivered: from
# seconds (all providers instant) to the hour an SMTP outage may take.
time_to_esim = Histogram(
    "esim_time_to_esim_seconds",
    "Seconds from payment (paid_at) to the eSIM email (emailed_at), once per delivered order.",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
