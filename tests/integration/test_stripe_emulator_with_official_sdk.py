"""The official stripe-python SDK and our StripeGateway against the Stripe emulator, over real HTTP."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
import stripe

from esim_common.providers.stripe import (
    BillingAddress,
    StripeGateway,
    StripePermanentError,
    StripeSignatureError,
    StripeTransientError,
)
from esim_sandbox.serve import free_port
from esim_sandbox.stripe_emulator.ids import is_luhn_valid
from tests.fixtures.stripe_emulator import STRIPE_WEBHOOK_SECRET, StripeEmulator, WebhookReceiver

SHOP_ADDRESS = BillingAddress(
    line1="1 Main St", city="San Francisco", state="CA", postal_code="94111", country="US"
)


def txn_id() -> str:
    return f"txn_{uuid.uuid4().hex[:12]}"


def session_params(
    transaction_id: str, *, amount: int = 1500, capture_method: str | None = None
) -> dict[str, Any]:
    intent_data: dict[str, Any] = {"metadata": {"transaction_id": transaction_id, "offer_id": "offer-5gb"}}
    if capture_method:
        intent_data["capture_method"] = capture_method
    return {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": amount,
                    "product_data": {"name": "eSIM 5GB"},
                },
                "quantity": 1,
            }
        ],
        "success_url": "https://shop.test/ok?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://shop.test/cancel",
        "client_reference_id": transaction_id,
        "customer_email": "buyer@example.com",
        "metadata": {"transaction_id": transaction_id},
        "payment_intent_data": intent_data,
    }


async def paid_session(
    client: stripe.StripeClient, emulator: StripeEmulator, **kwargs: Any
) -> dict[str, Any]:
    session = await client.v1.checkout.sessions.create_async(params=session_params(txn_id(), **kwargs))
    return emulator.pay(session.id)


async def shop_cardholder(gateway: StripeGateway) -> str:
    holder = await gateway.ensure_cardholder(
        name="Esim Shop", email="ops@esim-shop.test", billing_address=SHOP_ADDRESS
    )
    return holder.id


async def authorize(client: stripe.StripeClient, card_id: str, amount: int, currency: str = "usd") -> Any:
    return await client.v1.test_helpers.issuing.authorizations.create_async(
        params={
            "card": card_id,
            "amount": amount,
            "currency": currency,
            "merchant_data": {"name": "Zendit", "category": "telecommunication_services"},
        }
    )


# --- Checkout and webhooks -------------------------------------------------------------------------


async def test_a_paid_checkout_sends_signed_session_completed_and_payment_intent_succeeded(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator, stripe_webhooks: WebhookReceiver
) -> None:
    txn = txn_id()
    session = await stripe_client.v1.checkout.sessions.create_async(params=session_params(txn))
    assert session.status == "open" and session.payment_intent is None
    assert session.url == f"{stripe_emulator.url}/_sandbox/checkout/{session.id}"

    paid = stripe_emulator.pay(session.id)

    (completed_hook,) = await stripe_webhooks.wait_for("checkout.session.completed")
    (succeeded_hook,) = await stripe_webhooks.wait_for("payment_intent.succeeded")
    completed = stripe_client.construct_event(
        completed_hook.body, completed_hook.signature, STRIPE_WEBHOOK_SECRET
    )
    succeeded = stripe_client.construct_event(
        succeeded_hook.body, succeeded_hook.signature, STRIPE_WEBHOOK_SECRET
    )
    intent_id = paid["payment_intent"]["id"]
    assert {completed.id, succeeded.id} == set(paid["event_ids"])
    assert completed.data.object.payment_status == "paid" and completed.data.object.client_reference_id == txn
    assert completed.data.object.payment_intent == intent_id
    assert succeeded.data.object.id == intent_id and succeeded.data.object.metadata["transaction_id"] == txn
    assert succeeded.data.object.metadata["offer_id"] == "offer-5gb"
    assert completed.api_version == stripe.api_version and completed.livemode is False

    after = await stripe_client.v1.checkout.sessions.retrieve_async(
        session.id, params={"expand": ["payment_intent"]}
    )
    assert (after.status, after.payment_status) == ("complete", "paid")
    assert after.payment_intent.status == "succeeded" and after.payment_intent.amount_received == 1500


async def test_a_tampered_webhook_body_or_a_wrong_secret_fails_verification(
    stripe_client: stripe.StripeClient,
    stripe_emulator: StripeEmulator,
    stripe_webhooks: WebhookReceiver,
    stripe_gateway: StripeGateway,
) -> None:
    await paid_session(stripe_client, stripe_emulator, amount=2000)
    (hook,) = await stripe_webhooks.wait_for("payment_intent.succeeded")
    tampered = hook.body.replace(b'"amount": 2000', b'"amount": 1')
    assert tampered != hook.body

    with pytest.raises(stripe.SignatureVerificationError):
        stripe_client.construct_event(tampered, hook.signature, STRIPE_WEBHOOK_SECRET)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe_client.construct_event(hook.body, hook.signature, "whsec_someone_else")
    event = stripe_gateway.construct_event(
        hook.body, hook.signature, ["whsec_retired", STRIPE_WEBHOOK_SECRET]
    )
    assert event.type == "payment_intent.succeeded" and event.data_object["amount"] == 2000
    with pytest.raises(StripeSignatureError):
        stripe_gateway.construct_event(tampered, hook.signature, [STRIPE_WEBHOOK_SECRET])


async def test_webhook_delivery_is_retried_until_the_endpoint_answers_2xx(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator, stripe_webhooks: WebhookReceiver
) -> None:
    stripe_webhooks.fail_next = 2
    stripe_emulator.set_webhook(
        stripe_webhooks.url + "/webhooks/stripe", enabled_events=["checkout.session.completed"]
    )
    paid = await paid_session(stripe_client, stripe_emulator)

    hooks = await stripe_webhooks.wait_for("checkout.session.completed", count=3)

    assert len({hook.body for hook in hooks}) == 1  # the same event each time, re-signed
    assert stripe_webhooks.of_type("payment_intent.succeeded") == []  # not an enabled event
    await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=stripe_emulator.url) as http:
        listed = await http.get("/_sandbox/events", params={"type": "checkout.session.completed"})
    (record,) = [r for r in listed.json()["data"] if r["id"] in paid["event_ids"]]
    assert record["delivery"]["status"] == "delivered"
    assert [a["status_code"] for a in record["delivery"]["attempts"]] == [500, 500, 200]


async def test_the_gateway_creates_one_checkout_session_per_transaction(
    stripe_gateway: StripeGateway, stripe_emulator: StripeEmulator
) -> None:
    txn = txn_id()
    arguments = dict(
        transaction_id=txn,
        amount=2500,
        currency="USD",
        product_name="eSIM 10GB",
        success_url="https://shop.test/ok",
        cancel_url="https://shop.test/no",
        customer_email="buyer@example.com",
        metadata={"offer_id": "offer-10gb"},
    )
    first = await stripe_gateway.create_checkout_session(**arguments)
    again = await stripe_gateway.create_checkout_session(**arguments)

    assert again == first
    assert (first.amount_total, first.currency, first.client_reference_id) == (2500, "USD", txn)
    assert first.metadata == {"offer_id": "offer-10gb", "transaction_id": txn}
    assert stripe_emulator.state.objects[first.id]["currency"] == "usd"
    stripe_emulator.pay(first.id)
    paid = await stripe_gateway.retrieve_checkout_session(first.id)
    intent = await stripe_gateway.retrieve_payment_intent(paid.payment_intent_id or "")
    assert intent.metadata == {"offer_id": "offer-10gb", "transaction_id": txn}
    assert (intent.status, intent.amount_received, intent.currency) == ("succeeded", 2500, "USD")


# --- Idempotency and request validation ------------------------------------------------------------


async def test_a_refund_with_the_same_idempotency_key_twice_is_one_refund(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator, stripe_gateway: StripeGateway
) -> None:
    intent_id = (await paid_session(stripe_client, stripe_emulator))["payment_intent"]["id"]
    txn = txn_id()

    first = await stripe_gateway.create_refund(transaction_id=txn, payment_intent_id=intent_id, amount=600)
    second = await stripe_gateway.create_refund(transaction_id=txn, payment_intent_id=intent_id, amount=600)

    assert second.id == first.id and (first.amount, first.currency, first.status) == (600, "USD", "succeeded")
    assert [r["id"] for r in stripe_emulator.state.find("refund", payment_intent=intent_id)] == [first.id]
    charge = await stripe_client.v1.charges.retrieve_async(
        stripe_emulator.state.objects[intent_id]["latest_charge"]
    )
    assert charge.amount_refunded == 600 and charge.refunded is False


async def test_the_same_idempotency_key_with_different_params_is_an_idempotency_error(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator, stripe_gateway: StripeGateway
) -> None:
    intent_id = (await paid_session(stripe_client, stripe_emulator))["payment_intent"]["id"]
    txn = txn_id()
    await stripe_gateway.create_refund(transaction_id=txn, payment_intent_id=intent_id, amount=100)

    with pytest.raises(stripe.IdempotencyError) as caught:
        await stripe_client.v1.refunds.create_async(
            params={
                "payment_intent": intent_id,
                "amount": 200,
                "reason": "requested_by_customer",
                "metadata": {"transaction_id": txn},
            },
            options={"idempotency_key": f"refund:{txn}"},
        )
    assert caught.value.http_status == 400
    with pytest.raises(StripePermanentError) as mapped:
        await stripe_gateway.create_refund(transaction_id=txn, payment_intent_id=intent_id, amount=200)
    assert mapped.value.http_status == 400
    assert len(stripe_emulator.state.find("refund", payment_intent=intent_id)) == 1


async def test_an_unknown_parameter_is_rejected_as_parameter_unknown(
    stripe_client: stripe.StripeClient,
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as top_level:
        await stripe_client.v1.checkout.sessions.create_async(
            params={**session_params(txn_id()), "colour": "red"}
        )
    params = session_params(txn_id())
    params["line_items"][0]["price_data"]["product_dat"] = {"name": "typo"}
    with pytest.raises(stripe.InvalidRequestError) as nested:
        await stripe_client.v1.checkout.sessions.create_async(params=params)

    assert (top_level.value.code, top_level.value.param, top_level.value.http_status) == (
        "parameter_unknown",
        "colour",
        400,
    )
    assert (nested.value.code, nested.value.param) == (
        "parameter_unknown",
        "line_items[0][price_data][product_dat]",
    )


async def test_a_validation_failure_does_not_burn_the_idempotency_key(
    stripe_client: stripe.StripeClient,
) -> None:
    key = f"checkout:{txn_id()}"
    with pytest.raises(stripe.InvalidRequestError):
        await stripe_client.v1.checkout.sessions.create_async(
            params={**session_params("t"), "colour": "red"}, options={"idempotency_key": key}
        )
    session = await stripe_client.v1.checkout.sessions.create_async(
        params=session_params("t"), options={"idempotency_key": key}
    )
    assert session.status == "open"


async def test_a_request_still_running_makes_its_key_answer_409_then_replays_the_result(
    make_stripe_emulator: Any, stripe_webhook_receiver: WebhookReceiver
) -> None:
    # A slow real-time authorisation keeps the first request in flight long enough to race it.
    emulator = make_stripe_emulator(issuing_auth_webhook_url=f"{stripe_webhook_receiver.url}/issuing")
    stripe_webhook_receiver.authorization_delay_seconds = 0.5
    async with StripeGateway(api_key=emulator.api_key, api_base=emulator.url) as gateway:
        card = await gateway.create_single_use_card(
            topup_id="topup-race", cardholder_id=await shop_cardholder(gateway), amount=800, currency="USD"
        )
    headers = {"Authorization": f"Bearer {emulator.api_key}", "Idempotency-Key": "auth:race"}
    body = {"card": card.id, "amount": "800", "currency": "usd"}
    async with httpx.AsyncClient(base_url=emulator.url, headers=headers) as http:
        first = asyncio.create_task(http.post("/v1/test_helpers/issuing/authorizations", data=body))
        await asyncio.sleep(0.2)
        racing = await http.post("/v1/test_helpers/issuing/authorizations", data=body)
        original = await first
        replayed = await http.post("/v1/test_helpers/issuing/authorizations", data=body)

    assert racing.status_code == 409 and racing.headers["Stripe-Should-Retry"] == "true"
    assert racing.json()["error"]["code"] == "idempotency_key_in_use"
    assert original.status_code == 200 and original.json()["approved"] is True
    assert (
        replayed.json()["id"] == original.json()["id"] and replayed.headers["Idempotent-Replayed"] == "true"
    )
    assert len(emulator.state.find("issuing.authorization", card=card.id)) == 1


async def test_a_missing_object_is_resource_missing_and_permanent(
    stripe_client: stripe.StripeClient, stripe_gateway: StripeGateway
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await stripe_client.v1.payment_intents.retrieve_async("pi_doesnotexist")
    assert (caught.value.http_status, caught.value.code) == (404, "resource_missing")
    with pytest.raises(StripePermanentError) as mapped:
        await stripe_gateway.retrieve_payment_intent("pi_doesnotexist")
    assert (mapped.value.code, mapped.value.http_status) == ("resource_missing", 404)


async def test_a_key_that_is_not_a_test_key_is_an_authentication_error(
    stripe_emulator: StripeEmulator, make_stripe_emulator: Any
) -> None:
    http_client = stripe.HTTPXClient()
    live = stripe.StripeClient(
        "sk_live_nope", http_client=http_client, base_addresses={"api": stripe_emulator.url}
    )
    with pytest.raises(stripe.AuthenticationError) as live_key:
        await live.v1.balance.retrieve_async()
    await http_client.close_async()
    assert live_key.value.http_status == 401 and "sk_live_nope" not in str(live_key.value)
    strict = make_stripe_emulator(api_key="sk_test_only_this_one")
    async with StripeGateway(api_key="sk_test_another", api_base=strict.url) as gateway:
        with pytest.raises(StripePermanentError) as caught:
            await gateway.issuing_available_balance("USD")
    assert caught.value.http_status == 401
    async with StripeGateway(api_key="sk_test_only_this_one", api_base=strict.url) as gateway:
        assert await gateway.issuing_available_balance("USD") == 1_000_000


async def test_an_unreachable_stripe_is_a_transient_error() -> None:
    async with StripeGateway(
        api_key="sk_test_x",
        api_base=f"http://127.0.0.1:{free_port()}",
        max_network_retries=0,
        timeout_seconds=2,
    ) as gateway:
        with pytest.raises(StripeTransientError):
            await gateway.retrieve_payment_intent("pi_1")


# --- Refunds and manual capture --------------------------------------------------------------------


async def test_a_refund_beyond_the_captured_amount_is_refused(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    intent_id = (await paid_session(stripe_client, stripe_emulator, amount=1500))["payment_intent"]["id"]
    with pytest.raises(stripe.InvalidRequestError) as too_much:
        await stripe_client.v1.refunds.create_async(params={"payment_intent": intent_id, "amount": 1501})
    full = await stripe_client.v1.refunds.create_async(params={"payment_intent": intent_id})
    with pytest.raises(stripe.InvalidRequestError) as again:
        await stripe_client.v1.refunds.create_async(params={"payment_intent": intent_id, "amount": 1})

    assert (too_much.value.code, too_much.value.param) == ("amount_too_large", "amount")
    assert full.amount == 1500 and again.value.code == "charge_already_refunded"


async def test_manual_capture_holds_the_payment_until_captured(
    stripe_client: stripe.StripeClient,
    stripe_emulator: StripeEmulator,
    stripe_webhooks: WebhookReceiver,
    stripe_gateway: StripeGateway,
) -> None:
    paid = await paid_session(stripe_client, stripe_emulator, amount=3000, capture_method="manual")
    intent_id = paid["payment_intent"]["id"]
    (hook,) = await stripe_webhooks.wait_for("payment_intent.amount_capturable_updated")
    assert hook.event["data"]["object"]["amount_capturable"] == 3000
    assert paid["session"]["status"] == "complete" and paid["session"]["payment_status"] == "unpaid"
    held = await stripe_gateway.retrieve_payment_intent(intent_id)
    assert (held.status, held.amount_capturable, held.amount_received) == ("requires_capture", 3000, 0)
    with pytest.raises(stripe.InvalidRequestError):
        await stripe_client.v1.refunds.create_async(params={"payment_intent": intent_id})

    captured = await stripe_gateway.capture_payment_intent(
        transaction_id=txn_id(), payment_intent_id=intent_id
    )

    assert (captured.status, captured.amount_received, captured.amount_capturable) == ("succeeded", 3000, 0)
    (succeeded,) = await stripe_webhooks.wait_for("payment_intent.succeeded")
    assert succeeded.event["data"]["object"]["id"] == intent_id
    session = await stripe_client.v1.checkout.sessions.retrieve_async(paid["session"]["id"])
    assert session.payment_status == "paid"


async def test_an_uncaptured_payment_is_cancelled_not_refunded(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator, stripe_gateway: StripeGateway
) -> None:
    intent_id = (await paid_session(stripe_client, stripe_emulator, capture_method="manual"))[
        "payment_intent"
    ]["id"]
    txn = txn_id()

    cancelled = await stripe_gateway.cancel_payment_intent(transaction_id=txn, payment_intent_id=intent_id)

    assert (cancelled.status, cancelled.amount_capturable) == ("canceled", 0)
    with pytest.raises(StripePermanentError) as capture_after:
        await stripe_gateway.capture_payment_intent(transaction_id=txn, payment_intent_id=intent_id)
    assert capture_after.value.code == "payment_intent_unexpected_state"
    succeeded_id = (await paid_session(stripe_client, stripe_emulator))["payment_intent"]["id"]
    with pytest.raises(stripe.InvalidRequestError) as cancel_succeeded:
        await stripe_client.v1.payment_intents.cancel_async(succeeded_id)
    assert cancel_succeeded.value.code == "payment_intent_unexpected_state"


# --- Issuing ---------------------------------------------------------------------------------------


async def test_a_single_use_card_approves_its_exact_amount_once_then_declines(
    stripe_client: stripe.StripeClient, stripe_gateway: StripeGateway
) -> None:
    holder_id = await shop_cardholder(stripe_gateway)
    card = await stripe_gateway.create_single_use_card(
        topup_id=f"topup-{uuid.uuid4().hex}", cardholder_id=holder_id, amount=2500, currency="USD"
    )
    details = await stripe_gateway.reveal_card(card.id)
    assert card.status == "active" and card.currency == "USD"
    assert details.number.startswith("4000") and len(details.number) == 16 and is_luhn_valid(details.number)
    assert details.last4 == card.last4 == details.number[-4:] and len(details.cvc) == 3
    assert details.number not in repr(details) and details.cvc not in str(details)

    first = await authorize(stripe_client, card.id, 2500)
    second = await authorize(stripe_client, card.id, 2500)

    assert (first.approved, first.status, first.amount) == (True, "pending", 2500)
    assert (second.approved, second.request_history[-1].reason) == (False, "card_canceled")
    assert (await stripe_gateway.retrieve_card(card.id)).status == "canceled"


async def test_a_card_asked_for_more_than_its_limit_declines_for_spending_controls(
    stripe_client: stripe.StripeClient, stripe_gateway: StripeGateway
) -> None:
    card = await stripe_gateway.create_single_use_card(
        topup_id=f"topup-{uuid.uuid4().hex}",
        cardholder_id=await shop_cardholder(stripe_gateway),
        amount=2500,
        currency="USD",
    )
    over = await authorize(stripe_client, card.id, 2501)
    exact = await authorize(stripe_client, card.id, 2500)
    assert (over.approved, over.amount, over.request_history[-1].reason) == (False, 0, "spending_controls")
    assert exact.approved is True  # a declined attempt is not a payment: the card is still single-use-able


async def test_a_cancelled_card_declines_further_authorisations(
    stripe_client: stripe.StripeClient, stripe_gateway: StripeGateway
) -> None:
    card = await stripe_client.v1.issuing.cards.create_async(
        params={
            "cardholder": await shop_cardholder(stripe_gateway),
            "currency": "usd",
            "type": "virtual",
            "status": "active",
        }
    )
    assert (await authorize(stripe_client, card.id, 100)).approved is True

    cancelled = await stripe_gateway.cancel_card(card.id)
    declined = await authorize(stripe_client, card.id, 100)

    assert cancelled.status == "canceled"
    assert (declined.approved, declined.request_history[-1].reason) == (False, "card_canceled")
    assert (await stripe_gateway.cancel_card(card.id)).status == "canceled"  # idempotent
    with pytest.raises(stripe.InvalidRequestError):
        await stripe_client.v1.issuing.cards.update_async(card.id, params={"status": "active"})


async def test_card_number_and_cvc_come_only_with_expand_and_new_cards_start_inactive(
    stripe_client: stripe.StripeClient, stripe_gateway: StripeGateway
) -> None:
    card = await stripe_client.v1.issuing.cards.create_async(
        params={"cardholder": await shop_cardholder(stripe_gateway), "currency": "usd", "type": "virtual"}
    )
    plain = await stripe_client.v1.issuing.cards.retrieve_async(card.id)
    expanded = await stripe_client.v1.issuing.cards.retrieve_async(
        card.id, params={"expand": ["number", "cvc"]}
    )

    assert "number" not in plain and "cvc" not in plain
    assert expanded.number.endswith(card.last4) and expanded.cvc.isdigit()
    assert card.status == "inactive"
    assert (await authorize(stripe_client, card.id, 100)).request_history[-1].reason == "card_inactive"


async def test_a_foreign_currency_authorisation_is_declined(
    stripe_client: stripe.StripeClient, stripe_gateway: StripeGateway
) -> None:
    card = await stripe_gateway.create_single_use_card(
        topup_id=f"topup-{uuid.uuid4().hex}",
        cardholder_id=await shop_cardholder(stripe_gateway),
        amount=1000,
        currency="USD",
    )
    declined = await authorize(stripe_client, card.id, 1000, currency="eur")
    assert (declined.approved, declined.request_history[-1].reason) == (False, "not_allowed")


async def test_the_card_network_approves_a_valid_card_once_and_declines_bad_details(
    stripe_emulator: StripeEmulator, stripe_gateway: StripeGateway
) -> None:
    card = await stripe_gateway.create_single_use_card(
        topup_id=f"topup-{uuid.uuid4().hex}",
        cardholder_id=await shop_cardholder(stripe_gateway),
        amount=5000,
        currency="USD",
    )
    details = await stripe_gateway.reveal_card(card.id)
    charge = {
        "number": details.number,
        "exp_month": details.exp_month,
        "exp_year": details.exp_year,
        "cvc": details.cvc,
        "amount": 5000,
        "currency": "USD",
        "merchant_name": "Zendit",
        "reference": "topup-ref-1",
    }
    wrong_cvc = "000" if details.cvc != "000" else "111"
    float_before = await stripe_gateway.issuing_available_balance("USD")

    bad_cvc = stripe_emulator.charge_card(**{**charge, "cvc": wrong_cvc})
    bad_expiry = stripe_emulator.charge_card(**{**charge, "exp_year": details.exp_year + 1})
    unknown = stripe_emulator.charge_card(**{**charge, "number": "4000000000000002"})
    approved = stripe_emulator.charge_card(**charge)
    again = stripe_emulator.charge_card(**charge)

    assert (bad_cvc["approved"], bad_cvc["decline_reason"]) == (False, "incorrect_cvc")
    assert (bad_expiry["approved"], bad_expiry["decline_reason"]) == (False, "expired_card")
    assert unknown == {"approved": False, "authorization_id": None, "decline_reason": "incorrect_number"}
    assert approved["approved"] is True and approved["decline_reason"] is None
    assert (again["approved"], again["decline_reason"]) == (False, "card_canceled")
    auth = stripe_emulator.state.objects[approved["authorization_id"]]
    assert auth["status"] == "closed" and auth["network_data"]["transaction_id"] == "topup-ref-1"
    assert [t["amount"] for t in auth["transactions"]] == [-5000]
    assert await stripe_gateway.issuing_available_balance("USD") == float_before - 5000


async def test_the_card_network_declines_a_card_cancelled_before_use(
    stripe_emulator: StripeEmulator, stripe_gateway: StripeGateway
) -> None:
    card = await stripe_gateway.create_single_use_card(
        topup_id=f"topup-{uuid.uuid4().hex}",
        cardholder_id=await shop_cardholder(stripe_gateway),
        amount=700,
        currency="USD",
    )
    details = await stripe_gateway.reveal_card(card.id)
    await stripe_gateway.cancel_card(card.id)
    answer = stripe_emulator.charge_card(
        number=details.number,
        exp_month=details.exp_month,
        exp_year=details.exp_year,
        cvc=details.cvc,
        amount=700,
        currency="usd",
        merchant_name="Zendit",
        reference="topup-ref-2",
    )
    assert (answer["approved"], answer["decline_reason"]) == (False, "card_canceled")
    assert answer["authorization_id"].startswith("iauth_")


async def test_an_issuing_float_below_the_amount_declines_until_funded(make_stripe_emulator: Any) -> None:
    emulator = make_stripe_emulator(issuing_float=1000)
    http_client = stripe.HTTPXClient()
    client = stripe.StripeClient(
        emulator.api_key, http_client=http_client, base_addresses={"api": emulator.url}
    )
    async with StripeGateway(api_key=emulator.api_key, api_base=emulator.url) as gateway:
        card = await gateway.create_single_use_card(
            topup_id="topup-float", cardholder_id=await shop_cardholder(gateway), amount=5000, currency="USD"
        )
        short = await authorize(client, card.id, 5000)
        await client.raw_request_async(
            "post", "/v1/test_helpers/issuing/fund_balance", amount=4000, currency="usd"
        )
        funded = await gateway.issuing_available_balance("USD")
        approved = await authorize(client, card.id, 5000)
        after = await gateway.issuing_available_balance("USD")
    await http_client.close_async()

    assert (short.approved, short.request_history[-1].reason) == (False, "insufficient_funds")
    assert (funded, approved.approved, after) == (5000, True, 0)


async def test_a_real_time_authorisation_endpoint_decides_and_is_signed(
    make_stripe_emulator: Any, stripe_webhook_receiver: WebhookReceiver
) -> None:
    emulator = make_stripe_emulator(issuing_auth_webhook_url=f"{stripe_webhook_receiver.url}/issuing")
    http_client = stripe.HTTPXClient()
    client = stripe.StripeClient(
        emulator.api_key, http_client=http_client, base_addresses={"api": emulator.url}
    )
    async with StripeGateway(api_key=emulator.api_key, api_base=emulator.url) as gateway:
        holder_id = await shop_cardholder(gateway)
        cards = [
            await gateway.create_single_use_card(
                topup_id=f"t{i}", cardholder_id=holder_id, amount=900, currency="USD"
            )
            for i in range(4)
        ]
        approved = await authorize(client, cards[0].id, 900)
        stripe_webhook_receiver.approve_authorizations = False
        refused = await authorize(client, cards[1].id, 900)
        (
            stripe_webhook_receiver.approve_authorizations,
            stripe_webhook_receiver.authorization_delay_seconds,
        ) = True, 2.5
        too_slow = await authorize(client, cards[2].id, 900)
        stripe_webhook_receiver.authorization_delay_seconds = 0.0
        stripe_webhook_receiver.send_stripe_version = False
        unversioned = await authorize(client, cards[3].id, 900)
    await http_client.close_async()

    assert approved.approved is True and approved.request_history[-1].reason == "webhook_approved"
    assert (refused.approved, refused.request_history[-1].reason) == (False, "webhook_declined")
    assert (too_slow.approved, too_slow.request_history[-1].reason) == (False, "webhook_timeout")
    assert (unversioned.approved, unversioned.request_history[-1].reason) == (False, "webhook_error")
    request = stripe_webhook_receiver.received[0]
    event = client.construct_event(request.body, request.signature, STRIPE_WEBHOOK_SECRET)
    assert event.type == "issuing_authorization.request" and event.data.object.pending_request.amount == 900


async def test_refunds_are_listed_by_payment_intent(stripe_emulator: Any) -> None:
    client = stripe.StripeClient(stripe_emulator.api_key, base_addresses={"api": stripe_emulator.url})
    async with StripeGateway(api_key=stripe_emulator.api_key, api_base=stripe_emulator.url) as gateway:
        intents = []
        for txn in ("txn_list_a", "txn_list_b"):
            session = await gateway.create_checkout_session(
                transaction_id=f"{txn}_{uuid.uuid4().hex[:6]}",
                amount=700,
                currency="USD",
                product_name="eSIM",
                success_url="http://shop/ok",
                cancel_url="http://shop/no",
            )
            intents.append(stripe_emulator.pay(session.id)["payment_intent"]["id"])
        refund = await gateway.create_refund(transaction_id="txn_list_a", payment_intent_id=intents[0])
    listed = client.v1.refunds.list({"payment_intent": intents[0]}).data
    assert [r.id for r in listed] == [refund.id]
    assert client.v1.refunds.list({"payment_intent": intents[1]}).data == []
