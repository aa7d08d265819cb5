"""A stateful, in-memory Stripe emulator speaking Stripe's wire format, for the official SDK in tests.

Implements the endpoints esim-fulfillment calls (Checkout Sessions, PaymentIntents, refunds, Issuing
cardholders/cards/authorisations, balance, events) with Stripe's idempotency rules and error shapes
(`api`), plus `/_sandbox/` control routes that play the customer, the card network and the dashboard,
and let tests shape webhook delivery (`delivery`) and inject API faults (`faults`). Routes: `sandbox`.
See `app.create_app`.
"""

from .app import create_app
from .state import CardSecret, EventRecord, StripeState
from .webhooks import sign

__all__ = ["CardSecret", "EventRecord", "StripeState", "create_app", "sign"]
