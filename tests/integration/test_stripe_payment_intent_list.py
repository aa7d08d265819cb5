"""`GET /v1/payment_intents` in the Stripe emulator, through the official SDK and our StripeGateway:
newest first, the `created` filter, cursor pages both ways, Stripe's refusal of a filter it does not
have, and every page read by `list_payment_intents` (what scheduled reconciliation relies on)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import stripe

from esim_common.providers.stripe import CaptureMethod, StripeGateway
from tests.fixtures.stripe_emulator import StripeEmulator

Fresh = tuple[StripeEmulator, StripeGateway]


async def paid_intents(
    gateway: StripeGateway, emulator: StripeEmulator, count: int, *, capture: CaptureMethod = "automatic"
) -> list[str]:
    """`count` paid Checkouts, oldest first: their PaymentIntent ids."""
    intents = []
    for _ in range(count):
        session = await gateway.create_checkout_session(
            transaction_id=f"txn-{uuid.uuid4().hex[:12]}",
            amount=700,
            currency="USD",
            product_name="eSIM",
            success_url="http://shop.test/ok",
            cancel_url="http://shop.test/no",
            capture_method=capture,
        )
        intents.append((await asyncio.to_thread(emulator.pay, session.id))["payment_intent"]["id"])
    return intents


@pytest.fixture
async def fresh(
    make_stripe_emulator: Callable[..., StripeEmulator],
) -> AsyncIterator[tuple[StripeEmulator, StripeGateway]]:
    """An emulator of this test's own, so its list holds only what the test made."""
    emulator = make_stripe_emulator()
    async with StripeGateway(api_key=emulator.api_key, api_base=emulator.url) as gateway:
        yield emulator, gateway


async def test_the_gateway_reads_every_page_newest_first_with_our_transaction_ids(fresh: Fresh) -> None:
    emulator, gateway = fresh
    made = await paid_intents(gateway, emulator, 5)
    held = await paid_intents(gateway, emulator, 1, capture="manual")

    listed = await gateway.list_payment_intents(created_gte=0, page_size=2)

    assert [i.id for i in listed] == (made + held)[::-1]
    first = listed[-1]
    stored = emulator.state.get("payment_intent", first.id)
    assert (first.created, first.transaction_id) == (stored["created"], stored["metadata"]["transaction_id"])
    assert (first.status, first.amount_received, first.currency) == ("succeeded", 700, "USD")
    assert (listed[0].status, listed[0].amount_capturable) == ("requires_capture", 700)


async def test_the_created_filter_bounds_the_list_as_at_stripe(fresh: Fresh) -> None:
    emulator, gateway = fresh
    [made] = await paid_intents(gateway, emulator, 1)
    created = emulator.state.get("payment_intent", made)["created"]

    assert [i.id for i in await gateway.list_payment_intents(created_gte=created)] == [made]
    assert await gateway.list_payment_intents(created_gte=created + 1) == []


async def test_cursor_pages_go_both_ways_and_an_unknown_filter_is_refused(fresh: Fresh) -> None:
    emulator, gateway = fresh
    a, b, c = await paid_intents(gateway, emulator, 3)
    async with emulator.sdk() as client:
        after = await client.v1.payment_intents.list_async(params={"limit": 1, "starting_after": c})
        before = await client.v1.payment_intents.list_async(params={"ending_before": a})
        none_of_theirs = await client.v1.payment_intents.list_async(params={"customer": "cus_other"})
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await client.v1.payment_intents.list_async(params={"status": "succeeded"})  # type: ignore[arg-type]

    assert ([i.id for i in after.data], after.has_more) == ([b], True)
    assert ([i.id for i in before.data], before.has_more) == ([c, b], False)
    assert none_of_theirs.data == []  # Checkout guest payments have no customer
    assert (refused.value.code, refused.value.param) == ("parameter_unknown", "status")


async def test_a_lapsed_authorisation_is_listed_as_canceled(fresh: Fresh) -> None:
    """Listing looks at the intent, as retrieving does: a hold past its 7 days shows as Stripe left it."""
    emulator, gateway = fresh
    [held] = await paid_intents(gateway, emulator, 1, capture="manual")
    charge = emulator.state.get("charge", emulator.state.get("payment_intent", held)["latest_charge"])
    charge["payment_method_details"]["card"]["capture_before"] -= 8 * 24 * 60 * 60  # a week and a day ago

    [listed] = await gateway.list_payment_intents(created_gte=0)

    assert (listed.status, listed.cancellation_reason) == ("canceled", "automatic")
