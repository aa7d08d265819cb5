"""Card authorisations lapse in the Stripe emulator as in Stripe, seen through the official SDK.

An uncaptured (manual-capture) payment can be captured until the charge's
`payment_method_details.card.capture_before` (7 days); then Stripe cancels the PaymentIntent itself and
a capture is refused with `payment_intent_unexpected_state`.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import stripe

from esim_sandbox.stripe_emulator.ids import now
from esim_sandbox.stripe_emulator.payments import AUTHORISATION_VALIDITY_SECONDS
from tests.fixtures.stripe_emulator import StripeEmulator


async def authorised_payment(
    client: stripe.StripeClient, emulator: StripeEmulator, *, capture_method: str = "manual"
) -> tuple[str, str]:
    """(PaymentIntent id, charge id) of a Checkout paid with `capture_method`."""
    txn = f"txn_{uuid.uuid4().hex[:12]}"
    session = await client.v1.checkout.sessions.create_async(
        params={
            "mode": "payment",
            "line_items": [
                {
                    "price_data": {"currency": "usd", "unit_amount": 3900, "product_data": {"name": "eSIM"}},
                    "quantity": 1,
                }
            ],
            "success_url": "https://shop.test/ok",
            "cancel_url": "https://shop.test/cancel",
            "client_reference_id": txn,
            "payment_intent_data": {"capture_method": capture_method, "metadata": {"transaction_id": txn}},
        }
    )
    intent = emulator.pay(session.id)["payment_intent"]
    return intent["id"], intent["latest_charge"]


def events_about(emulator: StripeEmulator, event_type: str, object_id: str) -> list[dict[str, Any]]:
    return [
        record.event
        for record in emulator.events(event_type)
        if record.event["data"]["object"]["id"] == object_id
    ]


async def test_an_authorisation_says_it_can_be_captured_for_seven_days(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    intent_id, charge_id = await authorised_payment(stripe_client, stripe_emulator)
    charge = await stripe_client.v1.charges.retrieve_async(charge_id)
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)

    assert charge.captured is False
    assert (
        charge.payment_method_details.card.capture_before == intent.created + AUTHORISATION_VALIDITY_SECONDS
    )
    assert AUTHORISATION_VALIDITY_SECONDS == 7 * 24 * 3600
    _, automatic_charge = await authorised_payment(stripe_client, stripe_emulator, capture_method="automatic")
    captured_charge = await stripe_client.v1.charges.retrieve_async(automatic_charge)
    assert captured_charge.payment_method_details.card.capture_before is None


async def test_an_expired_authorisation_cancels_the_intent_and_refuses_the_capture(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    intent_id, charge_id = await authorised_payment(stripe_client, stripe_emulator)

    expired = stripe_emulator.expire_authorization(intent_id)

    assert (expired["status"], expired["cancellation_reason"]) == ("canceled", "automatic")
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert (intent.status, intent.cancellation_reason, intent.amount_capturable) == (
        "canceled",
        "automatic",
        0,
    )
    assert intent.canceled_at is not None
    charge = await stripe_client.v1.charges.retrieve_async(charge_id)
    assert (charge.captured, charge.refunded, charge.amount_refunded) == (False, True, 3900)
    with pytest.raises(stripe.InvalidRequestError) as refused:
        await stripe_client.v1.payment_intents.capture_async(
            intent_id, options={"idempotency_key": f"capture:{intent_id}"}
        )
    assert (refused.value.http_status, refused.value.code) == (400, "payment_intent_unexpected_state")
    assert "status of canceled" in str(refused.value.user_message)
    assert len(events_about(stripe_emulator, "charge.expired", charge_id)) == 1
    assert len(events_about(stripe_emulator, "payment_intent.canceled", intent_id)) == 1
    assert stripe_emulator.state.find("refund", payment_intent=intent_id) == []


async def test_an_authorisation_lapses_by_itself_once_capture_before_has_passed(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    intent_id, charge_id = await authorised_payment(stripe_client, stripe_emulator)
    # A week passes: the emulator's clock is the wall clock, so move the deadline instead.
    stored_charge = stripe_emulator.state.get("charge", charge_id)
    stored_charge["payment_method_details"]["card"]["capture_before"] = now() - 1

    with pytest.raises(stripe.InvalidRequestError) as refused:
        await stripe_client.v1.payment_intents.capture_async(intent_id)

    assert refused.value.code == "payment_intent_unexpected_state"
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert (intent.status, intent.cancellation_reason) == ("canceled", "automatic")
    assert len(events_about(stripe_emulator, "payment_intent.canceled", intent_id)) == 1  # expired once


async def test_a_captured_payment_is_captured_once_and_its_key_replays_the_first_capture(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    intent_id, _ = await authorised_payment(stripe_client, stripe_emulator)
    key = {"idempotency_key": f"capture:{intent_id}"}

    first = await stripe_client.v1.payment_intents.capture_async(intent_id, options=key)
    replayed = await stripe_client.v1.payment_intents.capture_async(intent_id, options=key)
    with pytest.raises(stripe.InvalidRequestError) as again:
        await stripe_client.v1.payment_intents.capture_async(intent_id, options={"idempotency_key": "other"})

    assert (first.status, first.amount_received) == ("succeeded", 3900)
    assert replayed.last_response.headers.get("Idempotent-Replayed") == "true"
    assert (replayed.status, replayed.amount_received) == ("succeeded", 3900)
    assert again.value.code == "payment_intent_unexpected_state" and "status of succeeded" in str(
        again.value.user_message
    )
    assert len(events_about(stripe_emulator, "payment_intent.succeeded", intent_id)) == 1


async def test_only_an_authorised_uncaptured_intent_can_be_made_to_expire(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    intent_id, _ = await authorised_payment(stripe_client, stripe_emulator, capture_method="automatic")

    response = httpx.post(f"{stripe_emulator.url}/_sandbox/payment_intents/{intent_id}/expire_authorization")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "payment_intent_unexpected_state"
    intent = await stripe_client.v1.payment_intents.retrieve_async(intent_id)
    assert intent.status == "succeeded"
