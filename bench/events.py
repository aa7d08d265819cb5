"""The benchmark's orders and the Stripe events that pay them, derived from (run id, index) alone.

The orchestrator creates order `i` and the load generator (another process) builds the event paying it
from the same two numbers, so nothing large crosses the process boundary. The event bodies are built
with the Stripe emulator's own object builders (every field Stripe sends) and pretty-printed like
Stripe, so the service parses and verifies bodies of a realistic size (~2 KiB).
"""

from __future__ import annotations

import json
from typing import Any

import stripe

from esim_sandbox.stripe_emulator import payment_objects

CURRENCY = "USD"
OFFER_ID = "bench-offer-US-1GB"
PAYMENT_INTENT_SUCCEEDED = "payment_intent.succeeded"
CHECKOUT_SESSION_COMPLETED = "checkout.session.completed"
EVENT_TYPES = (PAYMENT_INTENT_SUCCEEDED, CHECKOUT_SESSION_COMPLETED)


def transaction_id(run_id: str, index: int) -> str:
    """`txn_` + 24 hex, the shape checkout gives transaction ids (8 hex of run id, 16 of index)."""
    return f"txn_{run_id}{index:016x}"


def price(index: int) -> int:
    """Known, varied prices in minor units (USD 5.00 to 14.75): the service compares them to the event."""
    return 500 + (index % 40) * 25


def zendit_cost(index: int) -> int:
    return price(index) * 3 // 4


def payment_intent_id(run_id: str, index: int) -> str:
    return f"pi_bench{run_id}{index:016x}"


def event_id(run_id: str, index: int) -> str:
    return f"evt_bench{run_id}{index:016x}"


def event_body(run_id: str, index: int, event_type: str, created: int) -> bytes:
    """The raw body Stripe would POST for the event paying order `index`."""
    txn = transaction_id(run_id, index)
    amount = price(index)
    currency = CURRENCY.lower()
    metadata = {"transaction_id": txn}
    intent_id = payment_intent_id(run_id, index)
    data_object: dict[str, Any]
    if event_type == PAYMENT_INTENT_SUCCEEDED:
        data_object = payment_objects.payment_intent(
            intent_id=intent_id,
            created=created,
            amount=amount,
            currency=currency,
            capture_method="automatic_async",
            metadata=metadata,
            description="eSIM bench order",
            receipt_email="customer@example.com",
            payment_method=f"pm_bench{run_id}{index:016x}",
            client_secret=f"{intent_id}_secret_bench",
        )
        data_object.update(status="succeeded", amount_received=amount, latest_charge=f"ch_bench{index:016x}")
    elif event_type == CHECKOUT_SESSION_COMPLETED:
        session_id = f"cs_test_bench{run_id}{index:016x}"
        data_object = payment_objects.checkout_session(
            session_id=session_id,
            created=created,
            expires_at=created + 86_400,
            url=f"https://checkout.stripe.com/c/pay/{session_id}",
            amount_total=amount,
            currency=currency,
            success_url="http://127.0.0.1:8080/checkout/success?session_id={CHECKOUT_SESSION_ID}",
            cancel_url="http://127.0.0.1:8080/checkout/cancel",
            client_reference_id=txn,
            customer_email="customer@example.com",
            metadata=metadata,
            locale=None,
        )
        data_object.update(
            status="complete",
            payment_status="paid",
            payment_intent=intent_id,
            customer_details=payment_objects.customer_details("customer@example.com"),
            url=None,
        )
    else:
        raise ValueError(f"unsupported event type {event_type!r}; use one of {EVENT_TYPES}")
    event = payment_objects.event(
        event_id=event_id(run_id, index),
        created=created,
        event_type=event_type,
        data_object=data_object,
        api_version=stripe.api_version,
        pending_webhooks=1,
        request_id=None,
        idempotency_key=None,
    )
    return json.dumps(event, indent=2).encode()
