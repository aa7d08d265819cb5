"""Drift guard: what the emulator sends must be what the installed stripe SDK and Stripe's samples expect.

Two things would let the emulator drift away from Stripe unnoticed: webhooks the SDK's `construct_event`
would not verify or would parse into untyped objects, and API responses the SDK would not turn into its
typed resources (`stripe.checkout.Session`, `stripe.issuing.Card`, ...) with Stripe's fields and nested
types. Both are checked here over real HTTP against Stripe's own sample objects
(`tests/data/stripe-object-shapes.json`); `tests/unit/test_stripe_object_shapes.py` checks the raw JSON.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import stripe

from tests.fixtures.stripe_emulator import STRIPE_WEBHOOK_SECRET, StripeEmulator, WebhookReceiver
from tests.fixtures.stripe_shapes import reference_shapes, shape_problems

# The SDK class each Stripe object must become (the SDK picks it from the JSON's `object` field).
SDK_CLASSES: dict[str, type[stripe.StripeObject]] = {
    "checkout.session": stripe.checkout.Session,
    "payment_intent": stripe.PaymentIntent,
    "charge": stripe.Charge,
    "refund": stripe.Refund,
    "event": stripe.Event,
    "balance": stripe.Balance,
    "issuing.cardholder": stripe.issuing.Cardholder,
    "issuing.card": stripe.issuing.Card,
    "issuing.authorization": stripe.issuing.Authorization,
    "issuing.transaction": stripe.issuing.Transaction,
}


def typed_problems(obj: stripe.StripeObject, reference: dict[str, Any], path: str = "") -> list[str]:
    """Where the SDK did not build the typed object it declares for a field of Stripe's sample.

    Nested hashes must become the resource's inner classes (`Session.CustomerDetails`), embedded
    objects their own resource class (`issuing.Card.cardholder` → `issuing.Cardholder`).
    """
    inner_classes: dict[str, type] = getattr(type(obj), "_inner_class_types", {})
    problems = []
    for key, reference_value in reference.items():
        if key not in obj:
            problems.append(f"{path}{key}: missing")
            continue
        value = obj[key]
        if value is None or reference_value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if isinstance(reference_value, list):
            reference_value = reference_value[0] if reference_value else {}
        for item in items:
            if not isinstance(item, stripe.StripeObject):
                continue
            object_type = item["object"] if "object" in item else None  # event.data.object: not a str
            if isinstance(object_type, str) and object_type in SDK_CLASSES:
                expected: type | None = SDK_CLASSES[object_type]
                nested_reference = reference_shapes().get(object_type, {})
            else:
                expected = inner_classes.get(key)
                nested_reference = reference_value if isinstance(reference_value, dict) else {}
            if expected is not None and not isinstance(item, expected):
                problems.append(f"{path}{key}: {type(item).__qualname__}, not {expected.__qualname__}")
            elif expected is not None and key != "metadata":
                problems += typed_problems(item, nested_reference, f"{path}{key}.")
    return problems


def drift(resource: str, obj: Any) -> list[str]:
    """Every way `obj`, as the SDK returned it, differs from Stripe's sample of `resource`."""
    expected = SDK_CLASSES[resource]
    if type(obj) is not expected:
        return [f"{resource}: the SDK built {type(obj).__qualname__}, not {expected.__qualname__}"]
    reference = reference_shapes()[resource]
    # The SDK decodes decimal strings (an FX rate) to Decimal: back to JSON types before comparing.
    as_json = json.loads(json.dumps(obj.to_dict(), default=str))
    return [
        f"{resource}: {problem}"
        for problem in shape_problems(reference, as_json) + typed_problems(obj, reference)
    ]


def session_params(transaction_id: str) -> dict[str, Any]:
    return {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {"currency": "usd", "unit_amount": 1500, "product_data": {"name": "eSIM"}},
                "quantity": 1,
            }
        ],
        "success_url": "https://shop.test/ok",
        "client_reference_id": transaction_id,
        "metadata": {"transaction_id": transaction_id},
        "payment_intent_data": {"metadata": {"transaction_id": transaction_id}},
    }


async def every_kind_of_object(client: stripe.StripeClient, emulator: StripeEmulator) -> dict[str, Any]:
    """One of each object our services touch, each fetched through the SDK's typed `_async` methods."""
    created = await client.v1.checkout.sessions.create_async(params=session_params(f"txn_{uuid.uuid4().hex}"))
    paid = emulator.pay(created.id)
    intent_id = paid["payment_intent"]["id"]
    refund = await client.v1.refunds.create_async(params={"payment_intent": intent_id, "amount": 500})
    holder = await client.v1.issuing.cardholders.create_async(
        params={
            "type": "company",
            "name": "Esim Shop",
            "billing": {
                "address": {"line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"}
            },
        }
    )
    card = await client.v1.issuing.cards.create_async(
        params={"cardholder": holder.id, "currency": "usd", "type": "virtual", "status": "active"}
    )
    auth = await client.v1.test_helpers.issuing.authorizations.create_async(
        params={"card": card.id, "amount": 700}
    )
    captured = await client.v1.test_helpers.issuing.authorizations.capture_async(auth.id)
    events = await client.v1.events.list_async(params={"type": "checkout.session.completed", "limit": 1})
    return {
        "checkout.session": await client.v1.checkout.sessions.retrieve_async(created.id),
        "payment_intent": await client.v1.payment_intents.retrieve_async(intent_id),
        "charge": await client.v1.charges.retrieve_async(paid["payment_intent"]["latest_charge"]),
        "refund": await client.v1.refunds.retrieve_async(refund.id),
        "event": await client.v1.events.retrieve_async(events.data[0].id),
        "balance": await client.v1.balance.retrieve_async(),
        "issuing.cardholder": await client.v1.issuing.cardholders.retrieve_async(holder.id),
        "issuing.card": await client.v1.issuing.cards.retrieve_async(card.id),
        "issuing.authorization": await client.v1.issuing.authorizations.retrieve_async(auth.id),
        "issuing.transaction": await client.v1.issuing.transactions.retrieve_async(
            captured.transactions[0].id
        ),
    }


async def test_sdk_responses_are_typed_resources_with_every_field_of_stripes_samples(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    objects = await every_kind_of_object(stripe_client, stripe_emulator)

    assert sorted(objects) == sorted(SDK_CLASSES)
    assert {resource: drift(resource, obj) for resource, obj in objects.items()} == {
        resource: [] for resource in objects
    }
    # Spot checks that the typed objects carry the emulator's values, not just the right names.
    session, card = objects["checkout.session"], objects["issuing.card"]
    assert isinstance(session.customer_details, stripe.checkout.Session.CustomerDetails)
    assert session.payment_status == "paid" and session.payment_intent == objects["payment_intent"].id
    assert isinstance(card.cardholder, stripe.issuing.Cardholder) and card.cardholder.name == "Esim Shop"
    assert isinstance(objects["event"].data.object, stripe.checkout.Session)


async def test_delivered_webhooks_verify_with_the_sdk_and_parse_into_typed_objects(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator, stripe_webhooks: WebhookReceiver
) -> None:
    await every_kind_of_object(stripe_client, stripe_emulator)
    await stripe_webhooks.wait_for("issuing_transaction.created")
    await stripe_webhooks.wait_for("refund.created")
    await stripe_webhooks.wait_for("checkout.session.completed")

    problems: dict[str, list[str]] = {}
    for hook in stripe_webhooks.received:
        legacy = stripe.Webhook.construct_event(hook.body, hook.signature, STRIPE_WEBHOOK_SECRET)
        event = stripe_client.construct_event(hook.body, hook.signature, STRIPE_WEBHOOK_SECRET)
        data_object = event.data.object
        object_type = data_object["object"]
        assert legacy.id == event.id and legacy.to_dict() == event.to_dict()
        assert event.api_version == stripe.api_version and event.livemode is False
        problems[event.type] = drift("event", event) + (
            drift(object_type, data_object) if object_type in SDK_CLASSES else [f"unknown {object_type}"]
        )

    assert {
        "checkout.session.completed",
        "payment_intent.succeeded",
        "refund.created",
        "charge.refunded",
        "issuing_cardholder.created",
        "issuing_card.created",
        "issuing_authorization.created",
        "issuing_transaction.created",
        "issuing_authorization.updated",
    } <= set(problems)
    assert problems == {event_type: [] for event_type in problems}


def test_the_typed_check_itself_notices_an_untyped_or_missing_nested_field() -> None:
    reference = reference_shapes()["checkout.session"]
    good = stripe.checkout.Session.construct_from(reference, "sk_test_x")
    untyped = stripe.StripeObject.construct_from(reference, "sk_test_x")
    without_details = stripe.checkout.Session.construct_from(
        {**reference, "customer_details": {"email": "a@b.test"}}, "sk_test_x"
    )

    assert drift("checkout.session", good) == []
    assert drift("checkout.session", untyped) == ["checkout.session: the SDK built StripeObject, not Session"]
    assert "checkout.session: customer_details.address: missing" in drift("checkout.session", without_details)
