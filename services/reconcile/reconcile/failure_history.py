"""What reconcile keeps of failures, as rules without I/O: a row per dead letter and per failed order.

A consumer that gives up on a message copies it to `<queue>.dlq` through the dead-letter exchange, which
also hands a copy to `reconcile.dead-letters` (see `esim_common.topology`). Reconcile turns that copy into
a `dead_letter_events` row and acks it; the DLQ's own message is never touched, so an operator replays or
discards it as before. The row is keyed by (DLQ, message id, the consumer's failed-at stamp): the same
copy delivered twice is one row, the same message dead-lettered again after a replay is a second one.

The row is read from the consumer's dead-letter stamp (`x-esim-dead-letter-*`), which the observer's own
retries and DLQ copy and a replay from the observer's DLQ leave alone: a copy recorded late is recorded
as it was dead-lettered, not as the observer last failed. A copy without the stamp (a consumer of an
earlier build) is read from the failure headers, which those hops rewrite.

Not in the history: messages the broker dead-letters by itself (a DLQ copy that was not confirmed, the
delivery limit) and those an older publisher still sends through the default exchange. They skip the
dead-letter exchange; the DLQ depth (passive declare) still counts them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from esim_common.logging import redact
from esim_common.topology import (
    DEAD_LETTER_ATTEMPT_HEADER,
    DEAD_LETTER_ERROR_HEADER,
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTERED_AT_HEADER,
    ORIGIN_QUEUE_HEADER,
    ROUTING_KEY_HEADER,
    Topology,
)
from reconcile.dead_letters import DeadLetter

# The column bounds of deploy/migrations/0009_failure_history.sql.
MAX_ERROR_CHARS = 500
MAX_ID_CHARS = 200
MAX_NAME_CHARS = 255
MAX_EVENT_TYPE_CHARS = 100
MAX_COPY_KEY_CHARS = 100


class UnattributedDeadLetter(Exception):
    """An observation copy naming no observed DLQ (forged or foreign): dead-lettered itself, for a person,
    rather than counted under a made-up queue (the metric's label set stays the topology's DLQs)."""


@dataclass(frozen=True)
class DeadLetterRecord:
    queue: str
    event_id: str
    copy_key: str
    routing_key: str | None
    event_type: str | None
    transaction_id: str | None
    error: str | None
    attempt: int
    dead_lettered_at: datetime


def observed_dead_letter_queues(topology: Topology) -> frozenset[str]:
    """The DLQs whose copies reach the observer (every one but the observers' own)."""
    return frozenset(q.dlq for q in topology.queues if not q.observes_dead_letters)


def record_of(letter: DeadLetter, observed: Collection[str], *, received_at: datetime) -> DeadLetterRecord:
    """The history row for one observation copy. Raises `UnattributedDeadLetter`."""
    failed_at = _header(letter, DEAD_LETTERED_AT_HEADER) or letter.failed_at
    error = _header(letter, DEAD_LETTER_ERROR_HEADER) or letter.last_error
    return DeadLetterRecord(
        queue=dead_letter_queue_of(letter, observed),
        event_id=_bounded(letter.message_id, MAX_ID_CHARS)
        or f"sha256:{hashlib.sha256(letter.body).hexdigest()}",
        copy_key=_bounded(failed_at, MAX_COPY_KEY_CHARS) or "",
        routing_key=_bounded(_header(letter, ROUTING_KEY_HEADER), MAX_NAME_CHARS),
        event_type=_bounded(letter.event_type, MAX_EVENT_TYPE_CHARS),
        transaction_id=_bounded(letter.transaction_id, MAX_ID_CHARS),
        # The consumer redacted it already; a header from anywhere else is redacted here.
        error=_bounded(redact(error) if error else None, MAX_ERROR_CHARS),
        # As the consumer counts (`attempt_of`): a message never retried carries no attempt header.
        attempt=_int_header(letter, DEAD_LETTER_ATTEMPT_HEADER) or letter.attempt or 1,
        dead_lettered_at=_parse_time(failed_at) or received_at,
    )


def dead_letter_queue_of(letter: DeadLetter, observed: Collection[str]) -> str:
    """The DLQ a copy is about: the stamp's, else the origin queue's DLQ (an unstamped copy, before the
    observer dead-lettered it itself), else the routing key it was published with (first delivery)."""
    stamped = _header(letter, DEAD_LETTER_QUEUE_HEADER)
    origin = _header(letter, ORIGIN_QUEUE_HEADER)
    for candidate in (stamped, f"{origin}.dlq" if origin else None, letter.routing_key):
        if candidate is not None and candidate in observed:
            return candidate
    raise UnattributedDeadLetter(
        f"names no observed DLQ (stamp {redact(str(stamped))[:100]!r}, origin "
        f"{redact(str(origin))[:100]!r}, routing key {redact(str(letter.routing_key))[:100]!r})"
    )


def _header(letter: DeadLetter, name: str) -> str | None:
    value = letter.headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _int_header(letter: DeadLetter, name: str) -> int | None:
    try:
        return int(letter.headers[name])
    except (KeyError, TypeError, ValueError):
        return None


def _bounded(text: str | None, limit: int) -> str | None:
    """Cut to the column's bound; Postgres text refuses U+0000, which a poison message may carry."""
    if not text:
        return None
    return text.replace("\x00", "\ufffd")[:limit]


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
