"""Every object the emulator returns has every field of Stripe's own sample object, with the same types.

The reference is `tests/data/stripe-object-shapes.json` (see `tests/fixtures/stripe_shapes.py`). The
emulator runs in-process here; `tests/integration/test_stripe_emulator_drift.py` checks the same objects
as the official SDK sees them over HTTP.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from esim_sandbox.stripe_emulator import create_app
from tests.fixtures import stripe_shapes
from tests.fixtures.stripe_shapes import shape_problems

AUTH = {"Authorization": "Bearer sk_test_shapes"}


@pytest.fixture(scope="module")
def reference_shapes() -> dict[str, Any]:
    return stripe_shapes.reference_shapes()


@pytest.fixture(scope="module")
async def emulated_objects() -> dict[str, Any]:
    """One of each object, made the way our services make them."""
    app = create_app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stripe.test", headers=AUTH
    ) as http:

        async def post(path: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
            response = await http.post(path, data=data or {})
            assert response.status_code == 200, response.text
            return response.json()

        session = await post(
            "/v1/checkout/sessions",
            {
                "line_items[0][price_data][currency]": "usd",
                "line_items[0][price_data][unit_amount]": "1500",
                "line_items[0][price_data][product_data][name]": "eSIM",
                "line_items[0][quantity]": "1",
                "mode": "payment",
                "success_url": "https://shop.test/ok",
            },
        )
        paid = await post(f"/_sandbox/checkout/sessions/{session['id']}/pay")
        intent = paid["payment_intent"]
        charge = (await http.get(f"/v1/charges/{intent['latest_charge']}")).json()
        refund = await post("/v1/refunds", {"payment_intent": intent["id"], "amount": "500"})
        holder = await post(
            "/v1/issuing/cardholders",
            {
                "type": "company",
                "name": "Esim Shop",
                "billing[address][line1]": "1 Main St",
                "billing[address][city]": "Berlin",
                "billing[address][postal_code]": "10115",
                "billing[address][country]": "DE",
            },
        )
        card = await post(
            "/v1/issuing/cards",
            {
                "cardholder": holder["id"],
                "currency": "usd",
                "type": "virtual",
                "status": "active",
                "lifecycle_controls[cancel_after][payment_count]": "1",
                "spending_controls[spending_limits][0][amount]": "2000",
                "spending_controls[spending_limits][0][interval]": "all_time",
            },
        )
        auth = await post("/v1/test_helpers/issuing/authorizations", {"card": card["id"], "amount": "2000"})
        captured = await post(f"/v1/test_helpers/issuing/authorizations/{auth['id']}/capture")
        transaction = (await http.get(f"/v1/issuing/transactions/{captured['transactions'][0]['id']}")).json()
        balance = (await http.get("/v1/balance")).json()
        event = (await http.get("/v1/events", params={"type": "checkout.session.completed"})).json()["data"][
            0
        ]
    return {
        "checkout.session": paid["session"],
        "payment_intent": intent,
        "charge": charge,
        "refund": refund,
        "event": event,
        "balance": balance,
        "issuing.cardholder": holder,
        "issuing.card": card,
        "issuing.authorization": auth,
        "issuing.transaction": transaction,
    }


@pytest.mark.parametrize(
    "resource",
    [
        "checkout.session",
        "payment_intent",
        "charge",
        "refund",
        "event",
        "balance",
        "issuing.cardholder",
        "issuing.card",
        "issuing.authorization",
        "issuing.transaction",
    ],
)
def test_the_emulated_object_has_every_field_of_stripes_sample(
    resource: str, reference_shapes: dict[str, Any], emulated_objects: dict[str, Any]
) -> None:
    actual = emulated_objects[resource]
    assert actual["object"] == resource
    assert shape_problems(reference_shapes[resource], actual) == []


def test_the_shape_check_itself_notices_a_missing_nested_field() -> None:
    reference = {"a": {"b": 1, "c": [{"d": "x"}]}, "e": None}
    assert shape_problems(reference, {"a": {"b": 2, "c": [{"d": "y"}]}, "e": 5}) == []
    assert shape_problems(reference, {"a": {"c": [{}]}, "e": None}) == ["a.b: missing", "a.c.d: missing"]
    assert shape_problems(reference, {"a": {"b": "2", "c": []}}) == ["a.b: str instead of int", "e: missing"]


def test_expanded_card_number_is_the_only_way_to_see_it(emulated_objects: dict[str, Any]) -> None:
    card = emulated_objects["issuing.card"]
    assert "number" not in card and "cvc" not in card
    assert isinstance(card["cardholder"], dict) and card["cardholder"]["object"] == "issuing.cardholder"


async def test_listed_payment_intents_have_stripes_shape_in_a_list_envelope(
    reference_shapes: dict[str, Any],
) -> None:
    app = create_app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stripe.test", headers=AUTH
    ) as http:
        session = (
            await http.post(
                "/v1/checkout/sessions",
                data={
                    "line_items[0][price_data][currency]": "usd",
                    "line_items[0][price_data][unit_amount]": "1500",
                    "line_items[0][price_data][product_data][name]": "eSIM",
                    "line_items[0][quantity]": "1",
                    "mode": "payment",
                    "success_url": "https://shop.test/ok",
                },
            )
        ).json()
        paid = (await http.post(f"/_sandbox/checkout/sessions/{session['id']}/pay")).json()
        listed = (await http.get("/v1/payment_intents")).json()
    assert {key: listed[key] for key in ("object", "has_more", "url")} == {
        "object": "list",
        "has_more": False,
        "url": "/v1/payment_intents",
    }
    assert listed["data"] == [paid["payment_intent"]]
    assert shape_problems(reference_shapes["payment_intent"], listed["data"][0]) == []
