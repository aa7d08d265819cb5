"""What happens to a message when a handler lets a provider error escape: the consumer's fate table.

These run the real `handle_delivery` with a recording router in place of the broker, so they show the
routing decision; the broker tests in tests/integration show the tiers and DLQs themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import pytest

from esim_common.consumer import handle_delivery
from esim_common.errors import CheckAgainLater, FailPermanently, RetryLater
from esim_common.events import OrderPaid
from esim_common.money import Money
from esim_common.providers.stripe import StripePermanentError, StripeSignatureError, StripeTransientError
from esim_common.providers.topup_gateway import TopupDeclined, TopupGatewayError, TopupGatewayUnavailable
from esim_common.providers.zendit import ZenditNotFound, ZenditTransientError, ZenditUnauthorized
from esim_common.topology import ATTEMPT_HEADER, ConsumerQueue

EVENT = OrderPaid(
    transaction_id="txn_1", offer_id="ESIM-US-7D-1GB", price=Money(1299, "USD"), payment_intent_id="pi"
)


@dataclass
class FakeMessage:
    body: bytes
    headers: dict = field(default_factory=dict)
    message_id: str = "m1"
    correlation_id: str = "txn_1"


@dataclass
class RecordingRouter:
    queue: ConsumerQueue = field(default_factory=lambda: ConsumerQueue("funding.order-paid", ("order.paid",)))
    retry_delays: tuple[int, ...] = (1, 3, 10)
    moves: list[str] = field(default_factory=list)

    async def to_retry_tier(self, message, attempt, exc) -> None:
        self.moves.append(f"retry:{self.retry_delays[attempt - 1]}s")

    async def to_dlq(self, message, exc) -> None:
        self.moves.append("dlq")


async def deliver(
    error: BaseException, *, attempt: int = 1, dead_letter_after_failure: bool = False
) -> tuple[str, list[str], list[str]]:
    router = RecordingRouter()
    hook_calls: list[str] = []

    async def handler(event: OrderPaid) -> None:
        raise error

    async def on_failure(event: OrderPaid, reason: str) -> None:
        hook_calls.append(reason)

    outcome = await handle_delivery(
        FakeMessage(EVENT.model_dump_json().encode(), {ATTEMPT_HEADER: attempt}),
        event_type=OrderPaid,
        handler=handler,
        router=router,
        on_failure=on_failure,
        dead_letter_after_failure=dead_letter_after_failure,
    )
    return outcome, router.moves, hook_calls


TRANSIENT = [
    StripeTransientError("rate limited", operation="create_refund", http_status=429),
    ZenditTransientError("503", status_code=503, error_code="SYSTEM_UNAVAILABLE"),
    TopupGatewayUnavailable("gateway 502", status_code=502),
    RetryLater("later"),
]
PERMANENT = [
    (
        StripePermanentError("declined", operation="create_refund", code="card_declined"),
        "stripe_card_declined",
    ),
    (StripeSignatureError("bad signature", operation="construct_event"), "stripe_request_refused"),
    (ZenditNotFound("gone", status_code=404, error_code="NOT_FOUND"), "zendit_not_found"),
    (ZenditUnauthorized("who", status_code=401, error_code="NOT_AUTHORIZED"), "zendit_not_authorized"),
    (TopupDeclined("declined", reason="CARD_DECLINED", status_code=402), "CARD_DECLINED"),
    (FailPermanently("offer_disabled"), "offer_disabled"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
async def test_a_transient_provider_error_goes_to_the_first_retry_tier(error):
    assert await deliver(error) == ("retried", ["retry:1s"], [])


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
async def test_a_transient_error_after_the_last_tier_compensates_and_dead_letters(error):
    assert await deliver(error, attempt=4) == ("dead_lettered", ["dlq"], ["retries_exhausted"])


@pytest.mark.parametrize(("error", "reason"), PERMANENT, ids=lambda e: type(e).__name__)
async def test_a_permanent_provider_error_takes_the_failure_path_with_its_reason(error, reason):
    assert await deliver(error) == ("failed_permanently", [], [reason])


async def test_a_permanent_failure_can_also_be_dead_lettered_after_its_failure_hook_ran():
    """For a failure hook that can only log (an operator alert that could not be emailed)."""
    outcome = await deliver(FailPermanently("email_rejected_550"), dead_letter_after_failure=True)
    assert outcome == ("dead_lettered", ["dlq"], ["email_rejected_550"])


async def test_an_ambiguous_topup_outcome_is_dead_lettered_for_a_person_without_compensating():
    error = TopupGatewayError("gateway credited 4000 USD, asked 5000 USD")
    assert await deliver(error) == ("dead_lettered", ["dlq"], [])


async def test_work_not_finished_yet_is_checked_again_later_without_using_an_attempt():
    router = RecordingRouter()
    parked: list[float] = []

    async def park(message, delay_seconds):
        parked.append(delay_seconds)
        return 3

    router.check_again_later = park

    async def handler(event: OrderPaid) -> None:
        raise CheckAgainLater(5)

    outcome = await handle_delivery(
        FakeMessage(EVENT.model_dump_json().encode(), {ATTEMPT_HEADER: 4}),
        event_type=OrderPaid,
        handler=handler,
        router=router,
        on_failure=None,
    )
    assert (outcome, parked, router.moves) == ("deferred", [5], [])


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.PostgresConnectionError("gone"),
        asyncpg.QueryCanceledError("lock timeout"),
        ConnectionResetError(),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_database_outage_is_retried_not_dead_lettered_as_a_bug(error):
    assert await deliver(error) == ("retried", ["retry:1s"], [])
    assert await deliver(error, attempt=4) == ("dead_lettered", ["dlq"], ["retries_exhausted"])
