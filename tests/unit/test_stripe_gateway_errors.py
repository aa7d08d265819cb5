"""Our Stripe client's error boundary and card-detail hygiene (no network)."""

from __future__ import annotations

import pytest
import stripe

from esim_common.providers.stripe import (
    CardDetails,
    StripeGateway,
    StripePermanentError,
    StripeSignatureError,
    StripeTransientError,
    translate_error,
)
from esim_sandbox.stripe_emulator import sign

NUMBER, CVC = "4000123412341234", "987"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (stripe.APIConnectionError("connection refused"), StripeTransientError),
        (stripe.RateLimitError("slow down", http_status=429), StripeTransientError),
        (stripe.APIError("boom", http_status=500), StripeTransientError),
        (stripe.APIError("key in use", http_status=409), StripeTransientError),
        (stripe.APIError("no body", http_status=None), StripeTransientError),
        (stripe.APIError("teapot", http_status=418), StripePermanentError),
        (
            stripe.InvalidRequestError(
                "No such payment_intent", "id", code="resource_missing", http_status=404
            ),
            StripePermanentError,
        ),
        (stripe.CardError("declined", None, "card_declined", http_status=402), StripePermanentError),
        (stripe.AuthenticationError("bad key", http_status=401), StripePermanentError),
        (stripe.PermissionError("nope", http_status=403), StripePermanentError),
        (stripe.IdempotencyError("other params", http_status=400), StripePermanentError),
        (stripe.SignatureVerificationError("bad sig", "t=1,v1=x"), StripePermanentError),
    ],
)
def test_each_sdk_error_is_classified_transient_or_permanent(error: stripe.StripeError, kind: type) -> None:
    translated = translate_error("create_refund", error)
    assert type(translated) is kind
    assert translated.operation == "create_refund" and translated.http_status == error.http_status


def test_the_translated_error_keeps_code_and_param_for_decisions() -> None:
    error = stripe.InvalidRequestError(
        "Received unknown parameter: bogus", "bogus", code="parameter_unknown", http_status=400
    )
    translated = translate_error("create_refund", error)
    assert (translated.code, translated.param) == ("parameter_unknown", "bogus")
    assert "parameter_unknown" in str(translated) and "bogus" in str(translated)


def test_card_like_digits_in_a_stripe_message_are_redacted() -> None:
    error = stripe.CardError(f"card {NUMBER} was declined", None, "card_declined", http_status=402)
    assert NUMBER not in str(translate_error("charge", error))


def test_card_details_never_show_number_or_cvc() -> None:
    details = CardDetails(card_id="ic_1", number=NUMBER, cvc=CVC, exp_month=3, exp_year=2031, last4="1234")
    for text in (repr(details), str(details), f"{details}", f"{[details]}"):
        assert NUMBER not in text and CVC not in text
        assert "1234" in text and "03/2031" in text


async def test_construct_event_accepts_any_configured_secret_during_rotation() -> None:
    gateway = StripeGateway(api_key="sk_test_x", api_base="http://127.0.0.1:9")
    payload = (
        b'{"id": "evt_1", "object": "event", "type": "checkout.session.completed", "created": 1,'
        b' "livemode": false, "api_version": "x", "data": {"object": {"id": "cs_1"}}}'
    )
    header = sign(payload, "whsec_new")
    try:
        event = gateway.construct_event(payload, header, ["whsec_old", "whsec_new"])
        assert (event.id, event.type, event.data_object) == (
            "evt_1",
            "checkout.session.completed",
            {"id": "cs_1"},
        )
        with pytest.raises(StripeSignatureError):
            gateway.construct_event(payload, header, ["whsec_old"])
        with pytest.raises(StripeSignatureError):
            gateway.construct_event(payload.replace(b"cs_1", b"cs_2"), header, ["whsec_new"])
        with pytest.raises(StripeSignatureError):
            gateway.construct_event(payload, sign(payload, "whsec_new", timestamp=1), ["whsec_new"])
    finally:
        await gateway.aclose()


async def test_an_account_without_issuing_has_a_zero_float_instead_of_crashing(monkeypatch):
    gateway = StripeGateway(api_key="sk_test_x", api_base="http://127.0.0.1:9")

    async def answer(operation, request):
        request.close()  # never sent
        return stripe.Balance.construct_from({"object": "balance", "available": [], "pending": []}, "k")

    monkeypatch.setattr(gateway, "_call", answer)
    assert await gateway.issuing_available_balance("USD") == 0


async def test_a_card_stripe_will_not_reveal_is_a_permanent_error_not_a_crash(monkeypatch):
    gateway = StripeGateway(api_key="sk_test_x", api_base="http://127.0.0.1:9")

    async def answer(operation, request):
        request.close()
        return stripe.issuing.Card.construct_from(
            {"id": "ic_1", "object": "issuing.card", "last4": "4242"}, "k"
        )

    monkeypatch.setattr(gateway, "_call", answer)
    with pytest.raises(StripePermanentError, match="no card details"):
        await gateway.reveal_card("ic_1")
