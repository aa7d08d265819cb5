"""Dead-letter endpoints of the admin API, behind the same bearer guard as the rest of it:

    GET  /api/admin/dead-letters                    every DLQ: depth, consumers, origin queue, and
                                                    its history: counts, last error, last at (null,
                                                    with `history_available: false`, while the
                                                    database is away: the depths still answer)
    GET  /api/admin/dead-letters/{queue}?limit=n    peek at the oldest n (nothing is taken away)
    POST /api/admin/dead-letters/{queue}/replay     back to the work queue, attempts reset
    POST /api/admin/dead-letters/{queue}/discard    dropped, each recorded in `operator_actions`

The token is checked before anything else (the queue name, the query, the body); the rules and their
ordering (audit, publish, then ack) are in `reconcile.dead_letters`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel

from esim_common.logging import bind_transaction_id
from esim_common.publisher import PublishFailed, publish_raw
from esim_common.service import ServiceContext
from esim_common.topology import ConsumerQueue
from reconcile import dead_letters
from reconcile.admin import DATABASE_ERRORS, admin_guard, json_body
from reconcile.dead_letters import AuditEntry, DeadLetter, Settled, find_dead_letter_queue, origin_queue
from reconcile.dlq_audit import record_operator_actions
from reconcile.dlq_broker import BrokerUnavailable, DeadLetterBroker, QueueCounts, QueueMissing
from reconcile.dlq_schemas import (
    DEFAULT_PEEK_LIMIT,
    MAX_PEEK_LIMIT,
    DeadLetterQueuesResponse,
    DeadLetterQueueSummary,
    DeadLetterView,
    DiscardRequest,
    DiscardResponse,
    PeekResponse,
    ReplayRequest,
    ReplayResponse,
)
from reconcile.history_repository import DeadLetterStats, dead_letter_stats
from reconcile.schemas import ErrorResponse

log = logging.getLogger("esim.reconcile.dlq")

# 500 ids of up to 200 characters and a note fit; anything larger is not a dead-letter request.
MAX_BODY_BYTES = 128 * 1024

# The list's default window for recent dead letters: a day, what an on-call shift looks back over.
DEFAULT_RECENT_HOURS = 24
MAX_RECENT_HOURS = 90 * 24


class AuditUnavailable(Exception):
    """The audit rows could not be written; nothing was acked."""


Responses = dict[int | str, dict[str, Any]]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_UNAUTHORIZED: Responses = {status.HTTP_401_UNAUTHORIZED: _error("No valid bearer token.")}
_UNKNOWN_QUEUE: Responses = {
    status.HTTP_404_NOT_FOUND: _error("Not a DLQ of this topology; the answer lists them.")
}
_BROKER_UNAVAILABLE: Responses = {
    status.HTTP_503_SERVICE_UNAVAILABLE: _error(
        "The broker is unavailable. (A database outage is no 503 here: the depths are listed with "
        "`history_available: false` and the history fields null.)"
    )
}
_UNAVAILABLE: Responses = {
    status.HTTP_503_SERVICE_UNAVAILABLE: _error(
        "The broker or the database is unavailable; no dead letter was removed (a replay may already "
        "have put copies of some on the work queue: harmless, consumers check the order's state). "
        "Try again."
    )
}
_BAD_BODY: Responses = {
    status.HTTP_413_CONTENT_TOO_LARGE: _error("Request body too large."),
    status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Not a valid request; the error says why."},
}


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The body is read by a dependency (after the token check), so it is documented by hand."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


@contextlib.contextmanager
def _unavailable_as_503() -> Iterator[None]:
    """Foreign failures, mapped at one boundary. Each one happened before any ack, or during the
    acks (then what was not acked is still in the DLQ): replaying or discarding again is safe, as a
    copy delivered twice finds its order past that step (consumers look at the order's state first)."""
    try:
        yield
    except QueueMissing as exc:
        log.error("DLQ not declared on the broker", extra={"queue": str(exc)})
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="the queue is not declared on the broker"
        ) from exc
    except BrokerUnavailable as exc:
        log.warning("broker unavailable for a dead-letter request", extra={"error": str(exc)})
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="the broker is unavailable") from exc
    except PublishFailed as exc:
        log.warning("replay not confirmed by the broker", extra={"error": str(exc)})
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the work queue did not confirm the replay; nothing was removed from the DLQ, but "
            "copies of the messages before the failure may already be on the work queue (a retry "
            "publishes them again: harmless, consumers check the order's state first)",
        ) from exc
    except AuditUnavailable as exc:
        log.error("audit trail not written", extra={"error": str(exc)})
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the audit trail could not be written; nothing was published or removed from the DLQ",
        ) from exc


def dlq_admin_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter(prefix="/api/admin", tags=["dead letters"])
    require_admin = admin_guard(ctx)
    broker = DeadLetterBroker(ctx.settings.amqp_url)
    topology = ctx.topology

    def work_queue_of(queue: str) -> ConsumerQueue:
        work = find_dead_letter_queue(topology, queue)
        if work is None:
            valid = ", ".join(q.dlq for q in topology.queues)
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, detail=f"no such dead-letter queue; the valid ones are: {valid}"
            )
        return work

    async def publish(letter: DeadLetter, queue: str, headers: dict[str, Any]) -> None:
        await publish_raw(
            ctx.broker,
            letter.body,
            exchange=None,  # the default exchange delivers straight to the named work queue
            routing_key=queue,
            message_id=letter.message_id,
            correlation_id=letter.correlation_id,
            headers=headers,
        )

    async def record(entries: Sequence[AuditEntry]) -> None:
        try:
            await record_operator_actions(ctx.pool, entries)
        except DATABASE_ERRORS as exc:  # the messages stay where they are
            raise AuditUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def read_history(names: Sequence[str], since: datetime) -> dict[str, DeadLetterStats] | None:
        """None while the database is away: the list must still show the DLQs filling up during the
        very incident that fills them."""
        try:
            return await dead_letter_stats(ctx.pool, names, since=since)
        except DATABASE_ERRORS as exc:
            log.warning(
                "dead-letter history unavailable, listing the depths without it",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
            return None

    @router.get(
        "/dead-letters",
        dependencies=[Depends(require_admin)],
        responses={**_UNAUTHORIZED, **_BROKER_UNAVAILABLE},
    )
    async def list_dead_letters(
        recent_hours: Annotated[
            int, Query(ge=1, le=MAX_RECENT_HOURS, description="Window of `dead_lettered_recent`.")
        ] = DEFAULT_RECENT_HOURS,
    ) -> DeadLetterQueuesResponse:
        """Every DLQ of the topology with its depth, read by passive declares (no message is touched),
        and its history from reconcile's observation copies: how many were dead-lettered (all time and
        recently), the latest error and when. Every message's error and id is in the peek. While the
        database is away the history fields are null and `history_available` is false."""
        now = datetime.now(UTC)
        names = [q.dlq for q in topology.queues]
        with _unavailable_as_503():
            counts = await broker.counts(names)
        history = await read_history(names, now - timedelta(hours=recent_hours))
        queues = [_summary(q, counts.get(q.dlq), history) for q in topology.queues]
        return DeadLetterQueuesResponse(
            generated_at=now,
            total=sum(q.depth or 0 for q in queues),
            recent_hours=recent_hours,
            history_available=history is not None,
            queues=queues,
        )

    @router.get(
        "/dead-letters/{queue}",
        dependencies=[Depends(require_admin)],
        responses={**_UNAUTHORIZED, **_UNKNOWN_QUEUE, **_UNAVAILABLE},
    )
    async def peek_dead_letters(
        queue: str,
        limit: Annotated[int, Query(ge=1, le=MAX_PEEK_LIMIT, description="How many, oldest first.")] = (
            DEFAULT_PEEK_LIMIT
        ),
    ) -> PeekResponse:
        """The oldest `limit` dead letters with their error, headers and a redacted body preview.

        Nothing is taken: they are fetched unacked on a private connection and returned when it
        closes. While the peek runs they are in flight (not in the depth, not seen by another peek
        or replay); afterwards they carry the `redelivered` flag, and before RabbitMQ 4.3 an
        incremented `x-delivery-count` (shown as `delivery_count`: on RabbitMQ 4.0 to 4.2 a DLQ
        without the `delivery-limit: -1` policy drops a message whose count passes 20)."""
        work = work_queue_of(queue)
        with _unavailable_as_503():
            peeked = await dead_letters.peek(broker.hold, work, limit)
        return PeekResponse(
            queue=work.dlq,
            depth=peeked.depth,
            messages=[
                DeadLetterView.of(letter, origin_queue(work, letter.headers)) for letter in peeked.letters
            ],
        )

    @router.post(
        "/dead-letters/{queue}/replay",
        dependencies=[Depends(require_admin)],
        responses={**_UNAUTHORIZED, **_UNKNOWN_QUEUE, **_BAD_BODY, **_UNAVAILABLE},
        openapi_extra=_body_schema(ReplayRequest),
    )
    async def replay_dead_letters(
        queue: str,
        body: Annotated[ReplayRequest, Depends(json_body(ReplayRequest, max_bytes=MAX_BODY_BYTES))],
    ) -> ReplayResponse:
        """Put dead letters back on the work queue their DLQ belongs to (an `x-esim-origin-queue`
        naming another queue is ignored) with the same message id and body and a fresh attempt count,
        so they get every retry tier again.

        Each message is first recorded in `operator_actions` (`dlq_replay`, status `attempted`); if
        that fails, nothing is published or removed (503). Each copy is then confirmed by the broker
        before the DLQ copy is acked: a failure or crash in between leaves a duplicate, never a loss
        (consumers are idempotent by order state: each handler looks at the order's state first). If
        any publish fails, nothing is removed from the DLQ (503)."""
        work = work_queue_of(queue)
        with _unavailable_as_503():
            settled = await dead_letters.replay(
                broker.hold,
                work,
                message_ids=body.message_ids,
                limit=body.limit,
                note=body.note,
                now=datetime.now(UTC),
                publish=publish,
                record=record,
            )
        _log_settled("dead letter replayed", work.dlq, settled)
        return ReplayResponse(
            queue=work.dlq,
            replayed=len(settled.letters),
            replayed_message_ids=[letter.message_id for letter in settled.letters],
            origin_queues=list(settled.origins),
            not_found=list(settled.not_found),
            scanned=settled.scanned,
        )

    @router.post(
        "/dead-letters/{queue}/discard",
        dependencies=[Depends(require_admin)],
        responses={**_UNAUTHORIZED, **_UNKNOWN_QUEUE, **_BAD_BODY, **_UNAVAILABLE},
        openapi_extra=_body_schema(DiscardRequest),
    )
    async def discard_dead_letters(
        queue: str,
        body: Annotated[DiscardRequest, Depends(json_body(DiscardRequest, max_bytes=MAX_BODY_BYTES))],
    ) -> DiscardResponse:
        """Drop the named dead letters for good. Each one — id, queue, headers and whole body — is
        first written to `operator_actions` with the note, then acked; if the audit write fails,
        nothing is removed (503)."""
        work = work_queue_of(queue)
        with _unavailable_as_503():
            settled = await dead_letters.discard(
                broker.hold, work, message_ids=body.message_ids, note=body.note, record=record
            )
        _log_settled("dead letter discarded", work.dlq, settled, note=body.note)
        return DiscardResponse(
            queue=work.dlq,
            discarded=len(settled.letters),
            discarded_message_ids=[letter.message_id for letter in settled.letters],
            not_found=list(settled.not_found),
            scanned=settled.scanned,
        )

    return router


def _summary(
    work: ConsumerQueue, counts: QueueCounts | None, history: Mapping[str, DeadLetterStats] | None
) -> DeadLetterQueueSummary:
    """`history` None: it could not be read, so the counts are null (unknown), not 0."""
    stats = history.get(work.dlq) if history is not None else None
    count_if_known = None if history is None else 0
    return DeadLetterQueueSummary(
        queue=work.dlq,
        origin_queue=work.name,
        depth=counts.ready if counts else None,
        consumers=counts.consumers if counts else None,
        dead_lettered_total=stats.total if stats else count_if_known,
        dead_lettered_recent=stats.recent if stats else count_if_known,
        last_error=stats.last_error if stats else None,
        last_at=stats.last_at if stats else None,
        last_message_id=stats.last_message_id if stats else None,
        last_transaction_id=stats.last_transaction_id if stats else None,
    )


def _log_settled(what: str, dlq: str, settled: Settled, **facts: Any) -> None:
    for letter in settled.letters:
        with bind_transaction_id(letter.transaction_id):
            log.info(what, extra={"queue": dlq, "message_id": letter.message_id, **facts})
    if settled.not_found:
        log.info(f"{what}: ids not found", extra={"queue": dlq, "not_found": list(settled.not_found)})
