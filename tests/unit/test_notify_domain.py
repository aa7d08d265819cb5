"""Notify's decisions: which emails an event calls for and the facts that go in them."""

from __future__ import annotations

from functools import partial
from urllib.parse import parse_qs, urlsplit

import pytest

from esim_common.order_states import OrderStatus
from notify import domain
from notify.domain import DeliveryDecision, RefundOutcome
from notify.rendering import phrase


def test_only_a_provisioned_order_is_emailed_and_a_delivered_one_is_only_announced_again():
    decisions = {status: domain.delivery_decision(status) for status in OrderStatus}
    assert decisions.pop(OrderStatus.PROVISIONED) is DeliveryDecision.SEND
    assert decisions.pop(OrderStatus.DELIVERED) is DeliveryDecision.ANNOUNCE
    assert set(decisions.values()) == {DeliveryDecision.SKIP}


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (OrderStatus.REFUNDED, RefundOutcome.REFUNDED),
        (OrderStatus.NEEDS_ATTENTION, RefundOutcome.INVESTIGATING),
        (OrderStatus.PAYMENT_FAILED, RefundOutcome.NOT_CHARGED),
        (OrderStatus.REFUND_PENDING, RefundOutcome.PENDING),
    ],
)
def test_the_failure_email_says_what_happened_to_the_money_from_the_order_status(status, outcome):
    assert domain.refund_outcome(status) is outcome


def test_a_released_authorisation_is_not_called_a_refund():
    """Manual capture: compensation cancelled the hold (refund_status canceled); nothing was charged."""
    assert domain.refund_outcome(OrderStatus.REFUNDED, "canceled") is RefundOutcome.RELEASED
    assert domain.refund_outcome(OrderStatus.REFUNDED, "succeeded") is RefundOutcome.REFUNDED
    assert domain.refund_outcome(OrderStatus.REFUNDED, "pending") is RefundOutcome.REFUNDED


def test_a_failed_refund_or_email_alerts_the_operator_and_a_failed_email_is_not_followed_by_another():
    assert [
        s for s in ("payment", "funding", "purchase", "delivery", "refund") if domain.operator_is_alerted(s)
    ] == [
        "delivery",
        "refund",
    ]
    assert not domain.customer_is_told("delivery")
    assert domain.customer_is_told("refund") and domain.customer_is_told("funding")


def test_activation_data_for_manual_entry_comes_from_the_smdp_address_and_code():
    data = domain.activation_data(" smdp.example.com ", "ABC-123")
    assert (data.smdp_address, data.activation_code, data.lpa) == (
        "smdp.example.com",
        "ABC-123",
        "LPA:1$smdp.example.com$ABC-123",
    )


def test_a_whole_lpa_string_in_the_activation_code_is_split_for_manual_entry():
    data = domain.activation_data(None, "LPA:1$rsp.example.net$MATCHING-ID")
    assert (data.smdp_address, data.activation_code, data.lpa) == (
        "rsp.example.net",
        "MATCHING-ID",
        "LPA:1$rsp.example.net$MATCHING-ID",
    )


def test_missing_activation_data_is_refused():
    with pytest.raises(ValueError):
        domain.activation_data("smdp.example.com", None)


def test_the_apple_link_carries_the_lpa_string_and_encodes_what_would_break_the_url():
    link = domain.apple_setup_link("LPA:1$smdp.example.com$A&B #1")
    assert link.startswith(
        "https://esimsetup.apple.com/esim_qrcode_provisioning?carddata=LPA:1$smdp.example.com$"
    )
    assert parse_qs(urlsplit(link).query) == {"carddata": ["LPA:1$smdp.example.com$A&B #1"]}


def test_every_attempt_at_one_email_has_the_same_message_id_and_odd_ids_are_hashed():
    first = domain.message_id("txn-1", "esim_delivery", "eSIM Shop <esim@shop.example>")
    assert (
        first
        == domain.message_id("txn-1", "esim_delivery", "esim@shop.example")
        == "<esim_delivery.txn-1@shop.example>"
    )
    odd = domain.message_id("../a b>c", "order_failed", "nobody")
    assert (
        odd.startswith("<order_failed.") and odd.endswith("@localhost>") and " " not in odd and "/" not in odd
    )


def test_a_transaction_id_that_could_leave_the_qr_directory_gets_no_file_name():
    assert domain.plain_file_name("txn-1") == "txn-1.png"
    assert domain.plain_file_name("../../etc/passwd") is None
    assert domain.plain_file_name(".hidden") is None


def test_a_display_name_loses_line_breaks_and_control_characters():
    assert (
        domain.display_name("Ada\r\nBcc: evil@example.com\x00 Lovelace")
        == "AdaBcc: evil@example.com Lovelace"
    )


# ------------------------------------------------------------------------------------ the plan line

PLAN_WORDS = partial(phrase, "plan")


@pytest.mark.parametrize(
    ("data_mb", "unlimited", "days", "line"),
    [
        (1_000, False, 7, "1 GB · 7 days (OFFER-1)"),
        (500, False, 7, "500 MB · 7 days (OFFER-1)"),
        (1_500, False, 30, "1.5 GB · 30 days (OFFER-1)"),
        (2_010, False, 1, "2.01 GB · 1 day (OFFER-1)"),
        (20_000, False, 30, "20 GB · 30 days (OFFER-1)"),
        (None, True, 30, "Unlimited data · 30 days (OFFER-1)"),
        (0, True, None, "Unlimited data (OFFER-1)"),
        (5_000, None, None, "5 GB (OFFER-1)"),
        (None, None, 10, "10 days (OFFER-1)"),
    ],
)
def test_the_plan_line_says_what_the_plan_gives(data_mb, unlimited, days, line):
    assert (
        domain.plan_line(
            "OFFER-1", data_mb=data_mb, unlimited=unlimited, duration_days=days, words=PLAN_WORDS
        )
        == line
    )


@pytest.mark.parametrize(
    ("data_mb", "unlimited", "days"), [(None, None, None), (0, False, 0), (None, False, None)]
)
def test_an_order_that_does_not_say_what_its_plan_gives_shows_only_the_plan_id(data_mb, unlimited, days):
    """Orders from before migration 0006 have no offer facts."""
    assert (
        domain.plan_line(
            "OFFER-1", data_mb=data_mb, unlimited=unlimited, duration_days=days, words=PLAN_WORDS
        )
        == "OFFER-1"
    )


def test_gigabytes_are_decimal_and_exact():
    assert [domain.decimal_gb(mb) for mb in (1_000, 1_500, 1_250, 1_001, 100_000)] == [
        "1",
        "1.5",
        "1.25",
        "1.001",
        "100",
    ]


# ------------------------------------------------------------------------------------ operator alerts


def test_each_alert_kind_has_its_own_template():
    assert domain.alert_template("wallet_short") == "operator_low_balance"
    assert domain.alert_template("needs_attention") == "operator_needs_attention"
    assert set(domain.ALERT_TEMPLATES.values()) < set(domain.TEMPLATES)


def test_a_setting_in_seconds_reads_in_its_largest_whole_unit():
    assert [domain.duration_text(s) for s in (21_600, 86_400, 5_400, 90, 10, 3_601)] == [
        "6 h",
        "1 d",
        "90 min",
        "90 s",
        "10 s",
        "3601 s",
    ]


def test_alert_facts_named_like_activation_or_card_data_are_never_shown():
    facts = {
        "zendit_transaction_id": "z-1",
        "orders_waiting": "3",
        "activation_code": "K2-SECRET",
        "lpa": "LPA:1$x$y",
        "smdpAddress": "smdp.example.com",
        "card_number": "4242424242424242",
        "cardLast4": "4242",
        "qr_code_url": "https://signed.example/qr.png",
        "api_key": "k",
        "company": "kept: 'pan' inside a word is no card",
    }
    assert domain.operator_facts(facts) == [
        ("company", "kept: 'pan' inside a word is no card"),
        ("orders_waiting", "3"),
        ("zendit_transaction_id", "z-1"),
    ]


@pytest.mark.parametrize(
    ("waited", "delay"),
    [(0, 1.0), (9.9, 1.0), (10, 3.0), (59, 3.0), (60, 10.0), (3599, 10.0), (3600, None), (86400, None)],
)
def test_an_email_the_relay_did_not_take_waits_with_a_backoff_until_the_give_up_age(waited, delay):
    assert domain.email_retry_delay(waited, 3600) == delay


@pytest.mark.parametrize(
    ("reason", "recorded"),
    [
        ("email_rejected_550", "email_failed: email_rejected_550"),
        ("smtp_unavailable", "email_failed: smtp_unavailable"),
        ("smtp_certificate_invalid", "email_failed: smtp_certificate_invalid"),
        ("retries_exhausted", "email_failed: retries_exhausted"),
        ("activation_data_missing", "activation_data_missing"),
    ],
)
def test_a_delivery_failure_says_email_failed_only_when_the_email_failed(reason, recorded):
    assert domain.delivery_failure_reason(reason) == recorded
