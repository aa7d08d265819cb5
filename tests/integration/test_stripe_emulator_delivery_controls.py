"""Webhook delivery controls (`/_sandbox/webhook_delivery`, `/_sandbox/events/{id}/redeliver`) against a
real HTTP receiver: duplicates, order, delay, hold and release, retry-until-2xx, timeouts, resend.

Each test has its own emulator, so its settings cannot leak into another test.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import stripe

from tests.fixtures.stripe_emulator import STRIPE_WEBHOOK_SECRET, StripeEmulator, WebhookReceiver

MakeEmulator = Callable[..., StripeEmulator]
COMPLETED, SUCCEEDED = "checkout.session.completed", "payment_intent.succeeded"
# Timing tolerance: the emulator and the receiver share two busy cores with other test runs.
SLACK_SECONDS = 0.25


@pytest.fixture
def emulator(make_stripe_emulator: MakeEmulator, stripe_webhook_receiver: WebhookReceiver) -> StripeEmulator:
    """A fresh emulator delivering every event to the receiver."""
    fresh = make_stripe_emulator()
    fresh.set_webhook(f"{stripe_webhook_receiver.url}/webhooks/stripe", STRIPE_WEBHOOK_SECRET)
    return fresh


async def pay(emulator: StripeEmulator) -> dict[str, Any]:
    """A paid card Checkout: `payment_intent.succeeded` then `checkout.session.completed` are created."""
    async with emulator.sdk() as client:
        session = await client.v1.checkout.sessions.create_async(
            params={
                "mode": "payment",
                "line_items": [
                    {
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": 900,
                            "product_data": {"name": "eSIM"},
                        },
                        "quantity": 1,
                    }
                ],
                "success_url": "https://shop.test/ok",
                "client_reference_id": f"txn_{uuid.uuid4().hex[:8]}",
            }
        )
    return emulator.pay(session.id)


async def received_at_least(receiver: WebhookReceiver, count: int, within_seconds: float = 5.0) -> None:
    deadline = time.monotonic() + within_seconds
    while len(receiver.received) < count:
        assert time.monotonic() < deadline, f"{len(receiver.received)} of {count} webhooks arrived"
        await asyncio.sleep(0.02)


def delivery_of(emulator: StripeEmulator, event_id: str) -> dict[str, Any]:
    listed = httpx.get(f"{emulator.url}/_sandbox/events").json()["data"]
    (record,) = [record for record in listed if record["id"] == event_id]
    return dict(record["delivery"])


async def test_duplicates_arrive_n_plus_one_times_each_with_its_own_valid_signature(
    emulator: StripeEmulator, stripe_webhook_receiver: WebhookReceiver
) -> None:
    emulator.set_webhook(f"{stripe_webhook_receiver.url}/webhooks/stripe", enabled_events=[COMPLETED])
    emulator.set_delivery(duplicates=2)

    paid = await pay(emulator)
    hooks = await stripe_webhook_receiver.wait_for(COMPLETED, count=3)
    await asyncio.sleep(0.3)

    client = stripe.StripeClient("sk_test_unused")
    events = [client.construct_event(h.body, h.signature, STRIPE_WEBHOOK_SECRET) for h in hooks]
    assert len(stripe_webhook_receiver.of_type(COMPLETED)) == 3
    assert {event.id for event in events} == {paid["event_ids"][1]}
    assert len({hook.body for hook in hooks}) == 1 and len({hook.signature for hook in hooks}) == 3
    delivery = delivery_of(emulator, events[0].id)
    assert delivery["status"] == "delivered"
    assert sorted(a["delivery"] for a in delivery["attempts"]) == [0, 1, 2]


@pytest.mark.parametrize(
    ("order", "expected"), [("reversed", [COMPLETED, SUCCEEDED]), ("created", [SUCCEEDED, COMPLETED])]
)
async def test_the_events_of_one_payment_arrive_in_the_chosen_order(
    emulator: StripeEmulator, stripe_webhook_receiver: WebhookReceiver, order: str, expected: list[str]
) -> None:
    emulator.set_delivery(order=order)

    for payment in range(3):  # the order is certain, not a lucky race
        paid = await pay(emulator)
        await received_at_least(stripe_webhook_receiver, 2 * (payment + 1))
        arrived = [hook.event for hook in stripe_webhook_receiver.received[-2:]]
        assert [event["type"] for event in arrived] == expected
        assert {event["id"] for event in arrived} == set(paid["event_ids"])


async def test_a_delay_holds_back_the_first_attempt(
    emulator: StripeEmulator, stripe_webhook_receiver: WebhookReceiver
) -> None:
    emulator.set_delivery(delay_seconds=0.6)
    started = time.monotonic()

    await pay(emulator)
    (hook,) = await stripe_webhook_receiver.wait_for(COMPLETED)

    assert hook.at - started >= 0.6


async def test_a_failing_endpoint_is_retried_on_the_schedule_until_it_answers_2xx(
    emulator: StripeEmulator, stripe_webhook_receiver: WebhookReceiver
) -> None:
    emulator.set_webhook(f"{stripe_webhook_receiver.url}/webhooks/stripe", enabled_events=[COMPLETED])
    emulator.set_delivery(retry_schedule_seconds=[0.4, 0.7, 1.0, 1.2])
    stripe_webhook_receiver.fail_next = 2

    paid = await pay(emulator)
    hooks = await stripe_webhook_receiver.wait_for(COMPLETED, count=3, within_seconds=5)
    await asyncio.sleep(1.2)  # a fourth attempt would come 1.0 s after the third

    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(hooks)]
    assert len(stripe_webhook_receiver.of_type(COMPLETED)) == 3
    assert 0.4 <= gaps[0] < 0.4 + SLACK_SECONDS and 0.7 <= gaps[1] < 0.7 + SLACK_SECONDS
    assert hooks[0].signature != hooks[2].signature  # each attempt signed when sent, > 1 s apart
    delivery = delivery_of(emulator, paid["event_ids"][1])
    assert delivery["status"] == "delivered"
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]


async def test_an_endpoint_that_never_recovers_fails_once_the_schedule_is_exhausted(
    emulator: StripeEmulator, stripe_webhook_receiver: WebhookReceiver
) -> None:
    emulator.set_webhook(f"{stripe_webhook_receiver.url}/webhooks/stripe", enabled_events=[COMPLETED])
    emulator.set_delivery(retry_schedule_seconds=[0.05, 0.05])
    stripe_webhook_receiver.fail_next = 100

    paid = await pay(emulator)
    await stripe_webhook_receiver.wait_for(COMPLETED, count=3)
    await asyncio.sleep(0.3)

    delivery = delivery_of(emulator, paid["event_ids"][1])
    assert delivery["status"] == "failed"
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 500]
    async with emulator.sdk() as client:
        assert (await client.v1.events.retrieve_async(paid["event_ids"][1])).pending_webhooks == 1


async def test_an_attempt_that_times_out_is_retried(
    emulator: StripeEmulator, stripe_webhook_receiver: WebhookReceiver
) -> None:
    emulator.set_webhook(f"{stripe_webhook_receiver.url}/webhooks/stripe", enabled_events=[COMPLETED])
    emulator.set_delivery(timeout_seconds=0.3, retry_schedule_seconds=[0.1])
    stripe_webhook_receiver.hang_next, stripe_webhook_receiver.hang_seconds = 1, 1.0

    paid = await pay(emulator)
    await stripe_webhook_receiver.wait_for(COMPLETED, count=2)
    await asyncio.sleep(0.2)

    delivery = delivery_of(emulator, paid["event_ids"][1])
    assert [(a["status_code"], a["error"]) for a in delivery["attempts"]] == [(None, "timeout"), (200, None)]
    assert delivery["status"] == "delivered"


async def test_held_events_wait_until_released_in_the_order_asked(
    emulator: StripeEmulator, stripe_webhook_receiver: WebhookReceiver
) -> None:
    emulator.set_delivery(hold=True)
    first, second = await pay(emulator), await pay(emulator)
    await asyncio.sleep(0.3)
    held = httpx.get(f"{emulator.url}/_sandbox/webhook_delivery").json()["held_event_ids"]
    statuses = {delivery_of(emulator, event_id)["status"] for event_id in held}
    arrived_while_held = len(stripe_webhook_receiver.received)

    chosen = [second["event_ids"][1], first["event_ids"][0]]
    released = emulator.release(chosen)
    await received_at_least(stripe_webhook_receiver, 2)
    in_chosen_order = [hook.event["id"] for hook in stripe_webhook_receiver.received]
    rest = emulator.release()
    await received_at_least(stripe_webhook_receiver, 4)
    await asyncio.sleep(0.2)

    assert arrived_while_held == 0 and statuses == {"held"}
    assert sorted(held) == sorted(first["event_ids"] + second["event_ids"])
    assert released == chosen and in_chosen_order == chosen
    assert sorted(rest) == sorted([first["event_ids"][1], second["event_ids"][0]])
    assert len(stripe_webhook_receiver.received) == 4
    with pytest.raises(httpx.HTTPStatusError):
        emulator.release([first["event_ids"][0]])  # no longer held


async def test_turning_hold_off_sends_new_events_and_leaves_held_ones_held(
    emulator: StripeEmulator, stripe_webhook_receiver: WebhookReceiver
) -> None:
    emulator.set_delivery(hold=True)
    held = await pay(emulator)
    emulator.set_delivery(hold=False)
    sent = await pay(emulator)
    await received_at_least(stripe_webhook_receiver, 2)
    await asyncio.sleep(0.3)

    assert {hook.event["id"] for hook in stripe_webhook_receiver.received} == set(sent["event_ids"])
    still_held = httpx.get(f"{emulator.url}/_sandbox/webhook_delivery").json()["held_event_ids"]
    assert sorted(still_held) == sorted(held["event_ids"])


async def test_a_redelivery_sends_the_same_event_again_signed_now(
    emulator: StripeEmulator, stripe_webhook_receiver: WebhookReceiver
) -> None:
    paid = await pay(emulator)
    (original,) = await stripe_webhook_receiver.wait_for(COMPLETED)
    await asyncio.sleep(1.0)  # signature timestamps have one-second resolution

    attempt = emulator.redeliver(paid["event_ids"][1])
    copies = await stripe_webhook_receiver.wait_for(COMPLETED, count=2)

    assert (attempt["status_code"], attempt["delivery"]) == (200, 1)
    assert copies[1].body == original.body and copies[1].signature != original.signature
    event = stripe.Webhook.construct_event(copies[1].body, copies[1].signature, STRIPE_WEBHOOK_SECRET)
    assert event.id == paid["event_ids"][1]
    missing = httpx.post(f"{emulator.url}/_sandbox/events/evt_nope/redeliver")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "resource_missing"


@pytest.mark.parametrize(
    ("settings", "param"),
    [
        ({"duplicates": -1}, "duplicates"),
        ({"duplicates": True}, "duplicates"),
        ({"order": "random"}, "order"),
        ({"delay_seconds": "soon"}, "delay_seconds"),
        ({"retry_schedule_seconds": [0.1, -1]}, "retry_schedule_seconds"),
        ({"retry_schedule_seconds": 0.1}, "retry_schedule_seconds"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"hold": "yes"}, "hold"),
        ({"reorder": True}, "reorder"),
    ],
)
def test_bad_delivery_settings_are_refused_and_change_nothing(
    stripe_emulator: StripeEmulator, settings: dict[str, Any], param: str
) -> None:
    before = httpx.get(f"{stripe_emulator.url}/_sandbox/webhook_delivery").json()
    response = httpx.post(
        f"{stripe_emulator.url}/_sandbox/webhook_delivery", json={"duplicates": 3, **settings}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert httpx.get(f"{stripe_emulator.url}/_sandbox/webhook_delivery").json() == before


def test_delivery_settings_change_only_the_fields_given_and_reset_to_the_defaults(
    make_stripe_emulator: MakeEmulator,
) -> None:
    emulator = make_stripe_emulator()
    defaults = httpx.get(f"{emulator.url}/_sandbox/webhook_delivery").json()
    emulator.set_delivery(duplicates=1)
    changed = emulator.set_delivery(retry_schedule_seconds=[1, 2])
    emulator.reset_delivery()

    assert defaults == {
        "duplicates": 0,
        "order": "concurrent",
        "delay_seconds": 0.0,
        "retry_schedule_seconds": [0.2, 0.5, 1.0, 2.0],
        "timeout_seconds": 5.0,
        "hold": False,
        "held_event_ids": [],
    }
    assert (changed["duplicates"], changed["retry_schedule_seconds"]) == (1, [1.0, 2.0])
    assert httpx.get(f"{emulator.url}/_sandbox/webhook_delivery").json() == defaults
