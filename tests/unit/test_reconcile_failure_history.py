"""Failure-history rules without a broker or database: which DLQ an observation copy is about, what its
row keeps (redacted, bounded, keyed so a redelivery is one row), the dead-letter bindings that keep the
observer out of a loop, the raw consumer's fates, the failures summary and `esimctl failures`; the
dead-letter stamp, which the observer's own hops and a replay leave alone, and the list's degraded
answer without the history."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from pamqp.commands import Basic
from prometheus_client import REGISTRY

from esim_common.consumer import MessageRouter, dead_letter_stamp, handle_raw_delivery
from esim_common.errors import FailPermanently, RetryLater
from esim_common.publisher import EVENT_TYPE_HEADER
from esim_common.topology import (
    ATTEMPT_HEADER,
    DEAD_LETTER_ERROR_HEADER,
    FAILED_AT_HEADER,
    LAST_ERROR_HEADER,
    OBSERVER_ATTEMPT_HEADER,
    ORIGIN_QUEUE_HEADER,
    ROUTING_KEY_HEADER,
    ConsumerQueue,
    esim_topology,
)
from reconcile.cli import main as esimctl
from reconcile.dead_letters import DeadLetter, replay_headers
from reconcile.failure_admin import STEPS, summarise
from reconcile.failure_history import (
    UnattributedDeadLetter,
    observed_dead_letter_queues,
    record_of,
)
from reconcile.handlers import DeadLetterHistory
from reconcile.history_repository import StepFailures

TOPOLOGY = esim_topology(prefix="t1.")
WORK = TOPOLOGY.queue("funding.order-paid")
OBSERVER = TOPOLOGY.queue("reconcile.dead-letters")
OBSERVED = observed_dead_letter_queues(TOPOLOGY)
RECEIVED = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
FAILED_AT = "2026-11-30T11:59:58.123456+00:00"
PAN = "4242424242424242"


def copy(
    *,
    message_id: str | None = "evt-1",
    routing_key: str | None = None,
    body: bytes = b'{"transaction_id": "txn_1"}',
    **headers: Any,
) -> DeadLetter:
    """An observation copy as a consumer of an earlier build sent it (no stamp), first delivery
    (routing key = the DLQ)."""
    base: dict[str, Any] = {
        ORIGIN_QUEUE_HEADER: WORK.name,
        LAST_ERROR_HEADER: "KeyError: 'bug'",
        FAILED_AT_HEADER: FAILED_AT,
        ATTEMPT_HEADER: 4,
        ROUTING_KEY_HEADER: "order.paid",
        EVENT_TYPE_HEADER: "OrderPaid",
    }
    return DeadLetter(
        message_id=message_id,
        correlation_id="txn_corr",
        routing_key=WORK.dlq if routing_key is None else routing_key,
        redelivered=False,
        headers={k: v for k, v in {**base, **headers}.items() if v is not None},
        body=body,
    )


def test_a_copy_becomes_one_row_about_its_work_queues_dlq():
    record = record_of(copy(), OBSERVED, received_at=RECEIVED)
    assert record.queue == WORK.dlq
    assert (record.event_id, record.copy_key, record.routing_key, record.event_type) == (
        "evt-1",
        FAILED_AT,
        "order.paid",
        "OrderPaid",
    )
    assert (record.transaction_id, record.error, record.attempt) == ("txn_1", "KeyError: 'bug'", 4)
    assert record.dead_lettered_at == datetime.fromisoformat(FAILED_AT)


def stamped(**headers: Any) -> DeadLetter:
    """An observation copy as `to_dlq` sends it now: the failure headers and the dead-letter stamp."""
    return copy(**dead_letter_stamp(WORK, "KeyError: 'bug'", FAILED_AT, 4), **headers)


ORIGINAL = record_of(stamped(), OBSERVED, received_at=RECEIVED)


def test_the_stamp_outranks_failure_headers_the_observers_own_hops_rewrote():
    """The observer retried (its error in the last-error header) and dead-lettered the copy itself."""
    rewritten = stamped(
        **{
            ORIGIN_QUEUE_HEADER: OBSERVER.name,
            LAST_ERROR_HEADER: "ConnectionResetError: database away",
            FAILED_AT_HEADER: "2026-11-30T12:30:00+00:00",
            OBSERVER_ATTEMPT_HEADER: 4,
        }
    )
    assert record_of(rewritten, OBSERVED, received_at=RECEIVED) == ORIGINAL
    assert ORIGINAL.error == "KeyError: 'bug'" and ORIGINAL.queue == WORK.dlq and ORIGINAL.attempt == 4


def test_a_copy_replayed_from_the_observers_own_dlq_is_recorded_as_the_dead_letter_it_was():
    in_observer_dlq = stamped(
        **{
            ORIGIN_QUEUE_HEADER: OBSERVER.name,
            LAST_ERROR_HEADER: "UndefinedTableError: relation does not exist",
            FAILED_AT_HEADER: "2026-11-30T12:30:00+00:00",
        }
    )
    headers = replay_headers(in_observer_dlq.headers, replayed_at=RECEIVED)
    assert ORIGIN_QUEUE_HEADER not in headers and ATTEMPT_HEADER not in headers  # as for any replay
    replayed = DeadLetter(
        message_id="evt-1",
        correlation_id="txn_corr",
        routing_key=OBSERVER.name,  # the replay goes straight to the observer's work queue
        redelivered=False,
        headers=headers,
        body=in_observer_dlq.body,
    )
    assert record_of(replayed, OBSERVED, received_at=RECEIVED) == ORIGINAL


def test_a_replay_resets_the_observers_attempts_too():
    headers = replay_headers(
        {OBSERVER_ATTEMPT_HEADER: 361, DEAD_LETTER_ERROR_HEADER: "kept"}, replayed_at=RECEIVED
    )
    assert OBSERVER_ATTEMPT_HEADER not in headers and headers[DEAD_LETTER_ERROR_HEADER] == "kept"


class CapturingBroker:
    """Confirms every publish and keeps its arguments."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    async def publish(self, body: bytes, **properties: Any) -> Basic.Ack:
        self.published.append(properties)
        return Basic.Ack()


@dataclass
class DeliveredMessage:
    headers: dict[str, Any]
    body: bytes = b"{}"
    message_id: str = "evt-1"
    correlation_id: str = "txn_1"


async def dead_lettered_headers(queue: ConsumerQueue, headers: dict[str, Any]) -> dict[str, Any]:
    broker = CapturingBroker()
    router = MessageRouter(broker, queue, (1, 3, 10), dead_letter_exchange=TOPOLOGY.dead_letter_exchange)
    await router.to_dlq(DeliveredMessage(headers), RuntimeError("failed again"))
    [published] = broker.published
    return published["headers"]


async def test_the_observers_retry_counts_in_its_own_header_and_waits_the_longest_tier_past_the_last():
    broker = CapturingBroker()
    router = MessageRouter(broker, OBSERVER, (1, 3, 10), dead_letter_exchange=TOPOLOGY.dead_letter_exchange)
    await router.to_retry_tier(DeliveredMessage({ATTEMPT_HEADER: 4}), 361, ConnectionError("away"))
    [published] = broker.published
    assert published["routing_key"] == OBSERVER.retry_tier(10)
    assert published["headers"][OBSERVER_ATTEMPT_HEADER] == 362
    assert published["headers"][ATTEMPT_HEADER] == 4, "the observed message's own count is left alone"


async def test_a_replayed_message_that_fails_again_is_stamped_anew_a_new_dead_letter():
    earlier = dead_letter_stamp(WORK, "KeyError: 'bug'", FAILED_AT, 4)
    headers = await dead_lettered_headers(WORK, {**earlier, ATTEMPT_HEADER: 2})
    record = record_of(copy(**headers), OBSERVED, received_at=RECEIVED)
    assert (record.queue, record.error, record.attempt) == (WORK.dlq, "RuntimeError: failed again", 2)
    assert record.copy_key != FAILED_AT, "same key: the second dead-lettering would count as a redelivery"


async def test_the_observers_own_dlq_copy_keeps_the_stamp_of_the_dead_letter_it_could_not_record():
    original = dict(stamped().headers)
    headers = await dead_lettered_headers(OBSERVER, {**original, OBSERVER_ATTEMPT_HEADER: 361})
    assert headers[ORIGIN_QUEUE_HEADER] == OBSERVER.name, "its DLQ view shows the observer's failure"
    assert headers[LAST_ERROR_HEADER] == "RuntimeError: failed again"
    assert {k: v for k, v in headers.items() if k.startswith("x-esim-dead-letter")} == {
        k: v for k, v in original.items() if k.startswith("x-esim-dead-letter")
    }


def test_after_the_observers_own_retry_the_origin_header_still_names_the_dlq():
    """A retry tier hands the copy back under the observer's name; the header keeps the DLQ."""
    record = record_of(copy(routing_key=OBSERVER.name), OBSERVED, received_at=RECEIVED)
    assert record.queue == WORK.dlq


def test_without_an_origin_header_the_routing_key_names_the_dlq():
    record = record_of(copy(**{ORIGIN_QUEUE_HEADER: None}), OBSERVED, received_at=RECEIVED)
    assert record.queue == WORK.dlq


@pytest.mark.parametrize(
    ("origin", "routing_key"),
    [("elsewhere", "elsewhere.dlq"), (OBSERVER.name, OBSERVER.dlq), (None, OBSERVER.name)],
    ids=["foreign", "the-observers-own", "nothing"],
)
def test_a_copy_naming_no_observed_dlq_is_refused_not_counted_under_a_made_up_label(origin, routing_key):
    with pytest.raises(UnattributedDeadLetter):
        record_of(
            copy(routing_key=routing_key, **{ORIGIN_QUEUE_HEADER: origin}), OBSERVED, received_at=RECEIVED
        )


def test_the_same_message_dead_lettered_again_after_a_replay_is_a_new_row_key():
    first = record_of(copy(), OBSERVED, received_at=RECEIVED)
    again = record_of(copy(), OBSERVED, received_at=datetime(2027, 1, 1, tzinfo=UTC))
    later = record_of(copy(**{FAILED_AT_HEADER: "2026-11-30T13:00:00+00:00"}), OBSERVED, received_at=RECEIVED)
    key = lambda r: (r.queue, r.event_id, r.copy_key)  # noqa: E731
    assert key(first) == key(again), "the same copy redelivered"
    assert key(first) != key(later), "a second dead-lettering"


def test_without_a_failed_at_stamp_the_time_is_when_reconcile_saw_it():
    for stamp in (None, "not a time", "2026-11-30T11:59:58"):  # missing, garbage, no time zone
        record = record_of(copy(**{FAILED_AT_HEADER: stamp}), OBSERVED, received_at=RECEIVED)
        assert record.dead_lettered_at == RECEIVED
    assert record_of(copy(**{FAILED_AT_HEADER: None}), OBSERVED, received_at=RECEIVED).copy_key == ""


def test_a_message_never_retried_was_dead_lettered_at_attempt_1():
    record = record_of(copy(**{ATTEMPT_HEADER: None}), OBSERVED, received_at=RECEIVED)
    assert record.attempt == 1


def test_a_message_without_an_id_is_keyed_by_its_body():
    body = b"\x00not json"
    record = record_of(copy(message_id=None, body=body), OBSERVED, received_at=RECEIVED)
    assert record.event_id == f"sha256:{hashlib.sha256(body).hexdigest()}"
    assert record.transaction_id == "txn_corr"  # no transaction id in the body: the correlation id


def test_the_error_is_redacted_bounded_and_free_of_nul_bytes():
    error = f"card {PAN} refused\x00" + "x" * 2000
    record = record_of(copy(**{LAST_ERROR_HEADER: error.encode()}), OBSERVED, received_at=RECEIVED)
    assert record.error is not None
    assert PAN not in record.error and "\x00" not in record.error and len(record.error) == 500


def test_every_dlq_is_bound_to_itself_and_the_observer_to_every_dlq_but_its_own():
    bindings = set(TOPOLOGY.dead_letter_bindings())
    for queue in TOPOLOGY.queues:
        assert (queue.dlq, queue.dlq) in bindings
    observed = {key for name, key in bindings if name == OBSERVER.name}
    assert observed == {q.dlq for q in TOPOLOGY.queues if q is not OBSERVER}
    assert OBSERVER.dlq not in observed, "its own dead letters would come back to it forever"
    assert OBSERVED == observed
    assert TOPOLOGY.dead_letter_exchange == "t1.esim.dead-letters"


@dataclass
class RecordingRouter:
    queue: ConsumerQueue = OBSERVER
    retry_delays: tuple[int, ...] = (1, 3, 10)
    moves: list[str] = field(default_factory=list)

    async def to_retry_tier(self, message, attempt, exc) -> None:
        self.moves.append(f"retry:{self.retry_delays[min(attempt, 3) - 1]}s")

    async def to_dlq(self, message, exc) -> None:
        self.moves.append("dlq")


@dataclass
class FakeMessage:
    headers: dict = field(default_factory=dict)


async def settle(error: BaseException | None, attempt: int | None = None) -> tuple[str, list[str]]:
    """The observer's fate for a copy of a message whose own retries ran out (its attempt header: 4)."""
    router = RecordingRouter()

    async def handler(message) -> None:
        if error is not None:
            raise error

    headers = {ATTEMPT_HEADER: 4} | ({} if attempt is None else {OBSERVER_ATTEMPT_HEADER: attempt})
    outcome = await handle_raw_delivery(
        FakeMessage(headers), handler=handler, router=router, database_outage_attempts=360
    )
    return outcome, router.moves


@pytest.mark.parametrize(
    ("error", "attempt", "expected"),
    [
        (None, None, ("ok", [])),
        (RetryLater("briefly away"), None, ("retried", ["retry:1s"])),
        (ConnectionError("database away"), None, ("retried", ["retry:1s"])),
        (ConnectionError("database away"), 3, ("retried", ["retry:10s"])),
        (RetryLater("briefly away"), 4, ("dead_lettered", ["dlq"])),
        (UnattributedDeadLetter("names no DLQ"), None, ("dead_lettered", ["dlq"])),
        (FailPermanently("nothing to compensate"), None, ("dead_lettered", ["dlq"])),
    ],
    ids=["ok", "transient", "db-blip", "db-down", "exhausted", "unattributed", "permanent"],
)
async def test_the_observer_counts_its_own_retries_not_the_observed_messages(error, attempt, expected):
    assert await settle(error, attempt) == expected


@pytest.mark.parametrize(
    "error",
    [asyncpg.PostgresConnectionError("gone"), asyncpg.CannotConnectNowError("starting"), ConnectionError()],
    ids=lambda e: type(e).__name__,
)
async def test_a_database_outage_is_waited_out_every_10s_before_the_observer_gives_up(error):
    assert await settle(error, 4) == ("retried", ["retry:10s"])
    assert await settle(error, 360) == ("retried", ["retry:10s"])
    assert await settle(error, 361) == ("dead_lettered", ["dlq"])


def test_every_observed_dlq_is_counted_from_0_once_the_observer_exists():
    """Otherwise increase() misses the first dead letter after a restart (the series starts at 1)."""
    topology = esim_topology(prefix=f"u-{uuid.uuid4().hex[:8]}.")
    DeadLetterHistory(SimpleNamespace(topology=topology))
    for dlq in observed_dead_letter_queues(topology):
        assert REGISTRY.get_sample_value("esim_dead_letters_total", {"queue": dlq}) == 0.0


def test_the_failures_summary_lists_every_step_in_order_zero_or_not():
    last = datetime(2026, 11, 30, tzinfo=UTC)
    found = {"refund": StepFailures("refund", 2, "refund_failed", last, "txn_9")}
    steps = summarise(found)
    assert [s.step for s in steps] == list(STEPS)
    refund = next(s for s in steps if s.step == "refund")
    assert (refund.failures, refund.last_reason, refund.last_at, refund.last_transaction_id) == (
        2,
        "refund_failed",
        last,
        "txn_9",
    )
    assert all(s.failures == 0 and s.last_reason is None for s in steps if s.step != "refund")


@pytest.mark.parametrize(
    ("argv", "path", "query"),
    [
        (["failures"], "/api/admin/failures", {"since_hours": "24"}),
        (["failures", "--since-hours", "72"], "/api/admin/failures", {"since_hours": "72"}),
        (["dlq", "list"], "/api/admin/dead-letters", {"recent_hours": "24"}),
        (["dlq", "list", "--recent-hours", "1"], "/api/admin/dead-letters", {"recent_hours": "1"}),
    ],
)
def test_esimctl_failures_and_dlq_list_ask_for_their_window(monkeypatch, argv, path, query):
    monkeypatch.setenv("ADMIN_API_TOKEN", "admin-token-for-tests-0123456789")
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    assert esimctl(argv, transport=httpx.MockTransport(answer)) == 0
    assert [(r.method, r.url.path, dict(r.url.params)) for r in seen] == [("GET", path, query)]
