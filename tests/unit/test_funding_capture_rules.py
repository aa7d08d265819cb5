"""Manual capture: what order.delivered asks of the funding service, what Stripe allows, who is told."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from esim_common.order_states import OrderStatus
from funding.domain import (
    CAPTURE_RETRY_MAX_SECONDS,
    CaptureFailureRecord,
    CaptureStep,
    IntentCapture,
    capture_deadline,
    capture_failure_record,
    capture_refusal_reason,
    capture_retry_delay,
    capture_step,
    intent_capture,
)
from notify.domain import customer_is_told, operator_is_alerted

S = OrderStatus


@pytest.mark.parametrize("capture_status", [None, "captured", "failed"])
@pytest.mark.parametrize("status", list(OrderStatus))
def test_an_automatic_capture_order_never_needs_a_capture(status, capture_status):
    assert capture_step(capture_method="automatic", status=status, capture_status=capture_status) is (
        CaptureStep.NOT_REQUIRED
    )


def test_a_delivered_manual_order_is_captured_until_a_capture_is_recorded():
    assert (
        capture_step(capture_method="manual", status=S.DELIVERED, capture_status=None) is CaptureStep.CAPTURE
    )
    # A recorded failure is tried again, so an operator can re-drive the message from the DLQ.
    assert (
        capture_step(capture_method="manual", status=S.DELIVERED, capture_status="failed")
        is CaptureStep.CAPTURE
    )
    assert (
        capture_step(capture_method="manual", status=S.DELIVERED, capture_status="captured")
        is CaptureStep.DONE
    )


@pytest.mark.parametrize("status", [s for s in OrderStatus if s is not S.DELIVERED])
def test_a_manual_order_that_is_not_delivered_is_never_captured(status):
    assert (
        capture_step(capture_method="manual", status=status, capture_status=None) is CaptureStep.NOT_DELIVERED
    )


@pytest.mark.parametrize(
    ("intent_status", "expected"),
    [
        ("requires_capture", IntentCapture.CAPTURE),
        ("succeeded", IntentCapture.ALREADY_CAPTURED),
        ("processing", IntentCapture.WAIT),
        ("canceled", IntentCapture.REFUSED),
        ("requires_payment_method", IntentCapture.REFUSED),
        ("requires_action", IntentCapture.REFUSED),
    ],
)
def test_only_an_authorised_intent_is_captured(intent_status, expected):
    assert intent_capture(intent_status) is expected


def test_a_refusal_names_why_the_authorisation_is_gone():
    assert capture_refusal_reason("canceled", "automatic") == "authorisation_canceled_automatic"
    assert capture_refusal_reason("canceled", None) == "authorisation_canceled_unknown"
    assert capture_refusal_reason("requires_payment_method", None) == "payment_intent_requires_payment_method"


def test_a_capture_failure_alerts_the_operator_and_does_not_tell_the_customer_their_order_failed():
    assert operator_is_alerted("capture") and not customer_is_told("capture")
    assert customer_is_told("funding") and not operator_is_alerted("funding")


PAID = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def test_the_capture_is_retried_until_a_day_before_the_hold_lapses():
    # Stripe said when the hold ends: that wins over our 7-day assumption (some holds are shorter).
    capture_before = PAID + timedelta(days=5)
    assert capture_deadline(capture_before=capture_before, authorised_at=PAID) == PAID + timedelta(days=4)
    # Stripe did not answer: 7 days from the authorisation.
    assert capture_deadline(capture_before=None, authorised_at=PAID) == PAID + timedelta(days=6)


def test_a_capture_backs_off_from_one_second_and_stops_at_the_deadline():
    deadline = PAID + timedelta(days=6)
    delays = [capture_retry_delay(n, now=PAID, deadline=deadline) for n in (1, 2, 3, 4, 10, 10_000)]
    assert delays == [1.0, 2.0, 4.0, 8.0, CAPTURE_RETRY_MAX_SECONDS, CAPTURE_RETRY_MAX_SECONDS]
    assert capture_retry_delay(3, now=deadline - timedelta(seconds=1), deadline=deadline) == 4.0
    assert capture_retry_delay(1, now=deadline, deadline=deadline) is None
    assert capture_retry_delay(1, now=deadline + timedelta(days=1), deadline=deadline) is None


@pytest.mark.parametrize(
    ("capture_method", "capture_status", "recorded", "expected"),
    [
        ("manual", None, None, CaptureFailureRecord.NEW),
        # The failure path ran before for this very failure (its order.failed was not published): no
        # second alert.
        ("manual", "failed", "authorisation_canceled_automatic", CaptureFailureRecord.UNCHANGED),
        # A re-drive that fails for another reason is news.
        ("manual", "failed", "retries_exhausted", CaptureFailureRecord.NEW),
        ("manual", "captured", None, CaptureFailureRecord.CAPTURED),
        ("automatic", None, None, CaptureFailureRecord.NOT_MANUAL),
    ],
)
def test_a_capture_failure_is_new_only_when_it_changes_what_is_recorded(
    capture_method, capture_status, recorded, expected
):
    assert (
        capture_failure_record(
            capture_method=capture_method,
            capture_status=capture_status,
            recorded_reason=recorded,
            reason="authorisation_canceled_automatic",
        )
        is expected
    )
