"""Stripe's idempotency rules and error shapes, as the official SDK sees them from the emulator.

Each rule of Stripe's idempotency (API v1) has a test: first result replayed (a 500 included), the same
key with other parameters or on another endpoint refused, a key in use answering 409, keys scoped per
API key, validation and gate errors not saved, results forgotten after the TTL. Then every error the
emulator can answer is checked for Stripe's body and the SDK exception it must raise.
Faults come from `POST /_sandbox/faults`, each test on its own emulator.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import stripe

from tests.fixtures.stripe_emulator import StripeEmulator

MakeEmulator = Callable[..., StripeEmulator]


def session_params(**overrides: Any) -> dict[str, Any]:
    return {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {"currency": "usd", "unit_amount": 1500, "product_data": {"name": "eSIM"}},
                "quantity": 1,
            }
        ],
        "success_url": "https://shop.test/ok",
        **overrides,
    }


async def paid_intent(client: stripe.StripeClient, emulator: StripeEmulator) -> str:
    session = await client.v1.checkout.sessions.create_async(params=session_params())
    return str(emulator.pay(session.id)["payment_intent"]["id"])


def key() -> str:
    return f"refund:txn_{uuid.uuid4().hex[:12]}"


# --- Idempotency -----------------------------------------------------------------------------------


async def test_a_500_is_saved_and_replayed_for_its_key_while_a_new_key_runs_again(
    make_stripe_emulator: MakeEmulator,
) -> None:
    emulator = make_stripe_emulator()
    async with emulator.sdk() as client:
        intent_id = await paid_intent(client, emulator)
        emulator.inject_fault("/v1/refunds", method="POST", status=500)
        first_key = key()
        params = {"payment_intent": intent_id, "amount": 300}
        with pytest.raises(stripe.APIError) as first:
            await client.v1.refunds.create_async(params=params, options={"idempotency_key": first_key})
        with pytest.raises(stripe.APIError) as replayed:
            await client.v1.refunds.create_async(params=params, options={"idempotency_key": first_key})
        refund = await client.v1.refunds.create_async(params=params, options={"idempotency_key": key()})

    assert (first.value.http_status, replayed.value.http_status) == (500, 500)
    assert replayed.value.headers["idempotent-replayed"] == "true"
    assert replayed.value.json_body == first.value.json_body
    assert first.value.json_body["error"]["type"] == "api_error"
    assert [r["id"] for r in emulator.state.find("refund", payment_intent=intent_id)] == [refund.id]
    assert emulator.state.faults == []  # the replay did not run the endpoint, so used no fault


async def test_a_rate_limited_request_is_not_saved_so_its_key_can_be_retried(
    make_stripe_emulator: MakeEmulator,
) -> None:
    emulator = make_stripe_emulator()
    async with emulator.sdk() as client:
        intent_id = await paid_intent(client, emulator)
        emulator.inject_fault("/v1/refunds", method="POST", status=429)
        refund_key, params = key(), {"payment_intent": intent_id}
        with pytest.raises(stripe.RateLimitError) as limited:
            await client.v1.refunds.create_async(params=params, options={"idempotency_key": refund_key})
        refund = await client.v1.refunds.create_async(params=params, options={"idempotency_key": refund_key})
        again = await client.v1.refunds.create_async(params=params, options={"idempotency_key": refund_key})

    assert limited.value.error is not None
    assert (limited.value.http_status, limited.value.error.code) == (429, "rate_limit")
    assert again.id == refund.id and again.last_response is not None
    assert again.last_response.headers["idempotent-replayed"] == "true"
    assert len(emulator.state.find("refund", payment_intent=intent_id)) == 1


async def test_the_same_key_on_another_endpoint_is_an_idempotency_error(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    intent_id = await paid_intent(stripe_client, stripe_emulator)
    shared_key = key()
    await stripe_client.v1.refunds.create_async(
        params={"payment_intent": intent_id, "amount": 100}, options={"idempotency_key": shared_key}
    )
    with pytest.raises(stripe.IdempotencyError) as caught:
        await stripe_client.v1.checkout.sessions.create_async(
            params=session_params(), options={"idempotency_key": shared_key}
        )
    assert caught.value.http_status == 400 and "same endpoint" in str(caught.value)
    assert caught.value.json_body["error"]["type"] == "idempotency_error"


async def test_keys_are_scoped_to_the_api_key(make_stripe_emulator: MakeEmulator) -> None:
    emulator = make_stripe_emulator()  # accepts any sk_test_ key, as two Stripe accounts would
    shared_key = f"checkout:{uuid.uuid4().hex}"
    async with emulator.sdk("sk_test_account_a") as a, emulator.sdk("sk_test_account_b") as b:
        first = await a.v1.checkout.sessions.create_async(
            params=session_params(client_reference_id="a"), options={"idempotency_key": shared_key}
        )
        second = await b.v1.checkout.sessions.create_async(
            params=session_params(client_reference_id="b"), options={"idempotency_key": shared_key}
        )
        replay = await a.v1.checkout.sessions.create_async(
            params=session_params(client_reference_id="a"), options={"idempotency_key": shared_key}
        )
    assert first.id != second.id and replay.id == first.id
    assert (first.client_reference_id, second.client_reference_id) == ("a", "b")


async def test_a_saved_result_is_forgotten_after_the_ttl(make_stripe_emulator: MakeEmulator) -> None:
    emulator = make_stripe_emulator(idempotency_ttl_seconds=0.5)  # Stripe: 24 h
    reused = f"checkout:{uuid.uuid4().hex}"
    async with emulator.sdk() as client:
        first = await client.v1.checkout.sessions.create_async(
            params=session_params(client_reference_id="first"), options={"idempotency_key": reused}
        )
        with pytest.raises(stripe.IdempotencyError):
            await client.v1.checkout.sessions.create_async(
                params=session_params(client_reference_id="later"), options={"idempotency_key": reused}
            )
        await asyncio.sleep(0.7)
        later = await client.v1.checkout.sessions.create_async(
            params=session_params(client_reference_id="later"), options={"idempotency_key": reused}
        )
    assert later.id != first.id and later.client_reference_id == "later"
    assert len(emulator.state.idempotency) == 1  # the expired record was pruned, not kept forever


async def test_a_request_still_running_does_not_keep_later_expired_results_from_being_forgotten(
    make_stripe_emulator: MakeEmulator,
) -> None:
    emulator = make_stripe_emulator(idempotency_ttl_seconds=0.5)
    hung_key, later_keys = key(), [key(), key()]
    async with emulator.sdk() as client, emulator.sdk(timeout=0.2, max_network_retries=0) as impatient:
        intent_id = await paid_intent(client, emulator)
        emulator.inject_fault("/v1/refunds", method="POST", delay_seconds=2.0)  # answers late
        with pytest.raises(stripe.APIConnectionError):
            await impatient.v1.refunds.create_async(
                params={"payment_intent": intent_id, "amount": 100}, options={"idempotency_key": hung_key}
            )
        for later in later_keys:
            await client.v1.refunds.create_async(
                params={"payment_intent": intent_id, "amount": 100}, options={"idempotency_key": later}
            )
        await asyncio.sleep(0.7)  # every key is past the TTL; the first request is still running
        await client.v1.refunds.create_async(
            params={"payment_intent": intent_id, "amount": 100}, options={"idempotency_key": key()}
        )
        kept = {scope[1]: record.status for scope, record in emulator.state.idempotency.items()}
        await asyncio.sleep(1.0)  # let the hung request finish before the emulator stops

    assert kept[hung_key] is None  # still in use: never forgotten while running
    assert not set(later_keys) & set(kept)
    assert len(kept) == 2


async def test_a_slow_request_keeps_its_key_in_use_then_replays_the_effect_a_timeout_hid(
    make_stripe_emulator: MakeEmulator,
) -> None:
    emulator = make_stripe_emulator()
    async with emulator.sdk() as client, emulator.sdk(timeout=0.4) as impatient:
        intent_id = await paid_intent(client, emulator)
        emulator.inject_fault("/v1/refunds", method="POST", delay_seconds=1.2)
        refund_key, params = key(), {"payment_intent": intent_id, "amount": 200}
        with pytest.raises(stripe.APIConnectionError):
            await impatient.v1.refunds.create_async(params=params, options={"idempotency_key": refund_key})
        effect = emulator.state.find("refund", payment_intent=intent_id)
        with pytest.raises(stripe.APIError) as in_use:
            await client.v1.refunds.create_async(params=params, options={"idempotency_key": refund_key})
        await asyncio.sleep(1.0)
        replay = await client.v1.refunds.create_async(params=params, options={"idempotency_key": refund_key})

    assert len(effect) == 1  # the timed-out request had already refunded
    assert in_use.value.error is not None
    assert (in_use.value.http_status, in_use.value.error.code) == (409, "idempotency_key_in_use")
    assert in_use.value.headers["stripe-should-retry"] == "true"
    assert replay.id == effect[0]["id"] and replay.amount == 200
    assert len(emulator.state.find("refund", payment_intent=intent_id)) == 1


async def test_an_idempotency_key_over_255_characters_is_refused_and_not_saved(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    too_long = "k" * 256
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await stripe_client.v1.checkout.sessions.create_async(
            params=session_params(), options={"idempotency_key": too_long}
        )
    longest = await stripe_client.v1.checkout.sessions.create_async(
        params=session_params(), options={"idempotency_key": "k" * 255}
    )
    assert caught.value.http_status == 400 and "255" in str(caught.value)
    assert longest.status == "open"
    assert not any(scope[1] == too_long for scope in stripe_emulator.state.idempotency)


async def test_a_get_ignores_the_idempotency_key(
    stripe_client: stripe.StripeClient, stripe_emulator: StripeEmulator
) -> None:
    session = await stripe_client.v1.checkout.sessions.create_async(params=session_params())
    read_key = f"read:{uuid.uuid4().hex}"
    before = await stripe_client.v1.checkout.sessions.retrieve_async(
        session.id, options={"idempotency_key": read_key}
    )
    stripe_emulator.pay(session.id)
    after = await stripe_client.v1.checkout.sessions.retrieve_async(
        session.id, options={"idempotency_key": read_key}
    )
    assert (before.status, after.status) == ("open", "complete")


# --- Stripe-shaped errors and the SDK's typed exceptions -------------------------------------------


async def _unknown_parameter(client: stripe.StripeClient, emulator: StripeEmulator) -> None:
    await client.v1.checkout.sessions.create_async(params=session_params(colour="red"))


async def _missing_object(client: stripe.StripeClient, emulator: StripeEmulator) -> None:
    await client.v1.refunds.retrieve_async("re_doesnotexist")


async def _reused_key(client: stripe.StripeClient, emulator: StripeEmulator) -> None:
    options: Any = {"idempotency_key": "reused"}
    await client.v1.checkout.sessions.create_async(params=session_params(), options=options)
    await client.v1.checkout.sessions.create_async(params=session_params(locale="fr"), options=options)


async def _live_key(client: stripe.StripeClient, emulator: StripeEmulator) -> None:
    async with emulator.sdk("sk_live_not_here") as live:
        await live.v1.balance.retrieve_async()


def _faulted(status: int) -> Callable[[stripe.StripeClient, StripeEmulator], Awaitable[None]]:
    async def call(client: stripe.StripeClient, emulator: StripeEmulator) -> None:
        emulator.inject_fault("/v1/issuing/cards*", status=status)
        await client.v1.issuing.cards.list_async()

    return call


async def _unrecognised_url(client: stripe.StripeClient, emulator: StripeEmulator) -> None:
    await client.raw_request_async("get", "/v1/coupons")


@pytest.mark.parametrize(
    ("make_error", "exception", "status", "error_type", "code"),
    [
        (_unknown_parameter, stripe.InvalidRequestError, 400, "invalid_request_error", "parameter_unknown"),
        (_missing_object, stripe.InvalidRequestError, 404, "invalid_request_error", "resource_missing"),
        (_reused_key, stripe.IdempotencyError, 400, "idempotency_error", None),
        (_live_key, stripe.AuthenticationError, 401, "invalid_request_error", None),
        (_faulted(402), stripe.CardError, 402, "card_error", "card_declined"),
        (_faulted(403), stripe.PermissionError, 403, "invalid_request_error", None),
        (_faulted(429), stripe.RateLimitError, 429, "invalid_request_error", "rate_limit"),
        (_faulted(500), stripe.APIError, 500, "api_error", None),
        (_faulted(503), stripe.APIError, 503, "api_error", None),
        (_unrecognised_url, stripe.InvalidRequestError, 404, "invalid_request_error", None),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
async def test_every_error_is_stripe_shaped_and_raises_the_sdks_exception(
    make_stripe_emulator: MakeEmulator,
    make_error: Callable[[stripe.StripeClient, StripeEmulator], Awaitable[None]],
    exception: type[stripe.StripeError],
    status: int,
    error_type: str,
    code: str | None,
) -> None:
    emulator = make_stripe_emulator()
    async with emulator.sdk() as client:
        with pytest.raises(stripe.StripeError) as caught:
            await make_error(client, emulator)

    error = caught.value
    body = error.json_body["error"]
    assert type(error) is exception and error.error is not None
    assert (error.http_status, body["type"], error.error.code) == (status, error_type, code)
    assert {"type", "code", "message", "param"} <= set(body) and body["message"]
    if code:
        assert body["doc_url"] == f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    if error.request_id:  # every /v1 endpoint names its request in the error (not the unknown-URL 404)
        assert body["request_log_url"].endswith(f"/logs/{error.request_id}")
    if exception is stripe.CardError:
        assert body["decline_code"] == "generic_decline"


async def test_a_fault_applies_to_its_next_calls_only(make_stripe_emulator: MakeEmulator) -> None:
    emulator = make_stripe_emulator()
    armed = emulator.inject_fault("/v1/balance", method="GET", status=503, count=2)
    async with emulator.sdk() as client:
        outcomes = []
        for _ in range(3):
            try:
                await client.v1.balance.retrieve_async()
                outcomes.append(200)
            except stripe.APIError as exc:
                outcomes.append(exc.http_status or 0)
        await client.v1.checkout.sessions.create_async(params=session_params())  # other paths unaffected

    assert armed["remaining"] == 2 and outcomes == [503, 503, 200]
    assert httpx.get(f"{emulator.url}/_sandbox/faults").json()["data"] == []


@pytest.mark.parametrize(
    ("fault", "param"),
    [
        ({"path": "/v1/refunds", "status": 418}, "status"),
        ({"path": "refunds", "status": 500}, "path"),
        ({"path": "/v1/refunds"}, "status"),
        ({"path": "/v1/refunds", "status": 500, "count": 0}, "count"),
        ({"path": "/v1/refunds", "status": 500, "colour": "red"}, "colour"),
        ({"path": "/v1/refunds", "delay_seconds": -1}, "delay_seconds"),
    ],
)
def test_a_malformed_fault_is_refused_naming_the_field(
    stripe_emulator: StripeEmulator, fault: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{stripe_emulator.url}/_sandbox/faults", json=fault)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert stripe_emulator.state.faults == []
