"""Parameter checks derived from the installed SDK's TypedDicts."""

from __future__ import annotations

import pytest
from stripe.params import RefundCreateParams
from stripe.params.checkout import SessionCreateParams
from stripe.params.issuing import CardCreateParams, CardUpdateParams

from esim_sandbox.stripe_emulator.errors import ParamError
from esim_sandbox.stripe_emulator.params import accepted_names, check_params

VALID_SESSION = {
    "mode": "payment",
    "line_items": [
        {
            "price_data": {"currency": "usd", "unit_amount": "1500", "product_data": {"name": "eSIM"}},
            "quantity": "1",
        }
    ],
    "payment_intent_data": {"metadata": {"transaction_id": "t"}, "capture_method": "manual"},
    "metadata": {"any_key_at_all": "x"},
    "expand": ["payment_intent"],
}


def rejection(params: dict, spec: type) -> ParamError:
    with pytest.raises(ParamError) as caught:
        check_params(params, spec)
    return caught.value


def test_the_names_come_from_the_sdk_not_a_hand_list() -> None:
    names = accepted_names(SessionCreateParams)
    assert {"line_items", "payment_intent_data", "client_reference_id", "expires_at"} <= names
    # RequestOptions keys are mixed into the SDK's create params but travel as headers, never as params.
    assert not names & {"api_key", "idempotency_key", "stripe_account", "headers"}


def test_a_valid_checkout_session_passes() -> None:
    check_params(VALID_SESSION, SessionCreateParams)


def test_an_unknown_top_level_name_is_parameter_unknown() -> None:
    error = rejection({**VALID_SESSION, "idempotency_key": "k"}, SessionCreateParams)
    assert (error.status, error.code, error.param) == (400, "parameter_unknown", "idempotency_key")
    assert error.message == "Received unknown parameter: idempotency_key"


def test_an_unknown_nested_name_is_reported_with_its_full_path() -> None:
    line_item = {
        "price_data": {"currency": "usd", "unit_amount": "1", "product_dat": {"name": "x"}},
        "quantity": "1",
    }
    error = rejection({"line_items": [line_item]}, SessionCreateParams)
    assert (error.code, error.param) == ("parameter_unknown", "line_items[0][price_data][product_dat]")


def test_a_missing_required_nested_name_is_parameter_missing() -> None:
    params = {
        "currency": "usd",
        "type": "virtual",
        "spending_controls": {"spending_limits": [{"amount": "5"}]},
    }
    error = rejection(params, CardCreateParams)
    assert (error.code, error.param) == (
        "parameter_missing",
        "spending_controls[spending_limits][0][interval]",
    )


def test_required_top_level_names_come_from_the_sdk() -> None:
    assert rejection({"type": "virtual"}, CardCreateParams).param == "currency"


def test_a_closed_enum_is_enforced_and_an_open_one_is_not() -> None:
    # cancellation_reason is Literal['lost', 'stolen'] in the SDK; refund reason is Literal[...] | str.
    error = rejection({"status": "canceled", "cancellation_reason": "bored"}, CardUpdateParams)
    assert error.param == "cancellation_reason" and "lost" in error.message
    check_params({"payment_intent": "pi_1", "reason": "anything"}, RefundCreateParams)


def test_metadata_takes_any_keys_and_empty_string_unsets_anything() -> None:
    check_params({"payment_intent": "pi_1", "metadata": {"whatever": "1", "other": ""}}, RefundCreateParams)
    check_params({"payment_intent": "pi_1", "metadata": ""}, RefundCreateParams)
