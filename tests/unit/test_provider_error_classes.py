"""Every provider error lands on the right side of transient/permanent, which decides a message's fate."""

import pytest

from esim_common.errors import FailPermanently, PermanentError, RetryLater, TransientError
from esim_common.providers.stripe import StripePermanentError, StripeSignatureError, StripeTransientError
from esim_common.providers.topup_gateway import TopupDeclined, TopupGatewayError, TopupGatewayUnavailable
from esim_common.providers.zendit import (
    ZenditNotFound,
    ZenditPermanentError,
    ZenditTransientError,
    ZenditUnauthorized,
)

TRANSIENT = [
    StripeTransientError("rate limited", operation="create_refund", http_status=429),
    ZenditTransientError("503", status_code=503, error_code="SYSTEM_UNAVAILABLE"),
    TopupGatewayUnavailable("gateway 502", status_code=502),
    RetryLater("later"),
]
PERMANENT = [
    StripePermanentError("declined", operation="create_refund", http_status=402, code="card_declined"),
    StripeSignatureError("bad signature", operation="construct_event"),
    ZenditPermanentError("bad", status_code=400, error_code="INVALID_REQUEST"),
    ZenditNotFound("gone", status_code=404, error_code="NOT_FOUND"),
    ZenditUnauthorized("who", status_code=401, error_code="NOT_AUTHORIZED"),
    TopupDeclined("declined", reason="CARD_DECLINED", status_code=402),
    FailPermanently("offer_disabled"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_provider_errors_are_retried(error):
    assert isinstance(error, TransientError) and not isinstance(error, PermanentError)


@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
def test_permanent_provider_errors_take_the_failure_path_with_a_short_reason(error):
    assert isinstance(error, PermanentError) and not isinstance(error, TransientError)
    assert error.reason and " " not in error.reason and len(error.reason) <= 64


def test_reasons_name_the_provider_and_its_code():
    assert StripePermanentError("x", operation="o", code="card_declined").reason == "stripe_card_declined"
    assert ZenditNotFound("x", status_code=404, error_code="NOT_FOUND").reason == "zendit_not_found"


def test_an_ambiguous_topup_outcome_is_neither_so_it_is_dead_lettered_for_a_person():
    error = TopupGatewayError("gateway credited 4000 USD, asked 5000 USD")
    assert not isinstance(error, TransientError | PermanentError)
