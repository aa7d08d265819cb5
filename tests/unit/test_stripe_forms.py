"""The emulator's decoder for Stripe's form encoding (`a[b][0][c]=x`, `expand[]=y`)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
import stripe
from stripe._encode import _api_encode

from esim_sandbox.stripe_emulator.forms import FormError, decode_pairs, parse_body


def test_flat_pairs_stay_strings() -> None:
    assert decode_pairs([("amount", "1500"), ("currency", "usd")]) == {"amount": "1500", "currency": "usd"}


def test_brackets_nest_hashes() -> None:
    decoded = decode_pairs([("payment_intent_data[metadata][transaction_id]", "t1"), ("metadata[a]", "b")])
    assert decoded == {"payment_intent_data": {"metadata": {"transaction_id": "t1"}}, "metadata": {"a": "b"}}


def test_indexed_keys_become_a_list_of_hashes_in_index_order() -> None:
    decoded = decode_pairs(
        [
            ("line_items[1][quantity]", "2"),
            ("line_items[0][quantity]", "1"),
            ("line_items[0][price_data][currency]", "usd"),
        ]
    )
    assert decoded == {
        "line_items": [{"quantity": "1", "price_data": {"currency": "usd"}}, {"quantity": "2"}]
    }


def test_empty_brackets_append_scalars() -> None:
    assert decode_pairs([("expand[]", "number"), ("expand[]", "cvc")]) == {"expand": ["number", "cvc"]}


def test_empty_brackets_start_a_new_hash_when_the_key_repeats() -> None:
    decoded = decode_pairs(
        [
            ("limits[][amount]", "5"),
            ("limits[][interval]", "all_time"),
            ("limits[][amount]", "7"),
        ]
    )
    assert decoded == {"limits": [{"amount": "5", "interval": "all_time"}, {"amount": "7"}]}


def test_non_contiguous_numeric_keys_stay_a_hash() -> None:
    assert decode_pairs([("metadata[7]", "x")]) == {"metadata": {"7": "x"}}
    assert decode_pairs([("metadata[01]", "x")]) == {"metadata": {"01": "x"}}


def test_an_empty_value_is_kept_because_it_means_unset() -> None:
    assert parse_body(b"metadata=&description=") == {"metadata": "", "description": ""}


def test_a_key_used_as_value_and_hash_is_refused() -> None:
    with pytest.raises(FormError):
        decode_pairs([("metadata", "x"), ("metadata[a]", "b")])
    with pytest.raises(FormError):
        decode_pairs([("metadata[a]", "b"), ("metadata", "x")])


@pytest.mark.parametrize("key", ["a]b", "a[b", "[a]", "a[b]c"])
def test_malformed_keys_are_refused_with_the_key_as_param(key: str) -> None:
    with pytest.raises(FormError) as caught:
        decode_pairs([(key, "1")])
    assert caught.value.param == key


def test_url_encoding_is_undone() -> None:
    assert parse_body(b"success_url=https%3A%2F%2Fshop.test%2Fok%3Fs%3D%7BCHECKOUT_SESSION_ID%7D") == {
        "success_url": "https://shop.test/ok?s={CHECKOUT_SESSION_ID}"
    }


def test_a_body_that_is_not_utf8_is_a_form_error() -> None:
    with pytest.raises(FormError):
        parse_body(b"name=\xff")


def test_what_the_official_sdk_encodes_decodes_back_to_the_same_structure() -> None:
    params = {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {"currency": "usd", "unit_amount": 1500, "product_data": {"name": "eSIM 5GB"}},
                "quantity": 1,
            }
        ],
        "payment_intent_data": {"metadata": {"transaction_id": "txn_1"}, "capture_method": "manual"},
        "expand": ["payment_intent"],
        "spending_controls": {"spending_limits": [{"amount": 10, "interval": "all_time"}]},
    }
    body = urlencode(list(_api_encode(params))).encode()
    assert parse_body(body) == {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": "1500",
                    "product_data": {"name": "eSIM 5GB"},
                },
                "quantity": "1",
            }
        ],
        "payment_intent_data": {"metadata": {"transaction_id": "txn_1"}, "capture_method": "manual"},
        "expand": ["payment_intent"],
        "spending_controls": {"spending_limits": [{"amount": "10", "interval": "all_time"}]},
    }
    assert stripe.VERSION.startswith("16.")  # the encoder above is private; re-check it on SDK upgrades
