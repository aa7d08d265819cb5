"""Dead letters: what sits in each `<queue>.dlq`, and moving messages out of it without losing any.

A DLQ holds messages a consumer gave up on (see `esim_common.consumer`): our headers say why
(`x-esim-last-error`), when (`x-esim-failed-at`) and from where (`x-esim-origin-queue`). An operator
looks at them (peek), puts them back on their work queue once the cause is fixed (replay), or drops
them with a note (discard). Every message is *held* — taken with `basic.get` and no ack on a private
channel — while we decide; whatever is not acked goes back to the DLQ when that channel closes, so a
peek, a refused request or a crash in the middle never loses a message.

    replay:  hold → publish each chosen copy to its work queue (confirmed) → audit → ack the DLQ copies
    discard: hold → audit (committed, with the full body) → ack the DLQ copies

A crash between the publish and the ack leaves the message on both queues: a duplicate, which is
harmless because consumers are idempotent by event id. The reverse order could lose it.

Side effects of holding (peek included), all documented in the README:
- the messages are invisible (in flight) to the list, the depth gauge and a concurrent peek or replay
  until the request ends; the depth from a passive declare counts only messages not in flight;
- a returned message comes back with the `redelivered` flag set; quorum queues before RabbitMQ 4.3
  also increment its `x-delivery-count` header, and may deliver it in a different order.

This module holds the rules (plain functions) and the use cases over two ports: `Hold` (the broker,
`reconcile.dlq_broker`) and `Publish`/`Record` (given by the router). No AMQP or SQL in here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from esim_common.logging import redact
from esim_common.publisher import EVENT_TYPE_HEADER
from esim_common.topology import (
    ATTEMPT_HEADER,
    FAILED_AT_HEADER,
    LAST_ERROR_HEADER,
    ORIGIN_QUEUE_HEADER,
    ConsumerQueue,
    Topology,
)

# Set on a replayed message: when, and how often (a message replayed again and again is a bug to fix,
# not a message to replay once more).
REPLAYED_AT_HEADER = "x-esim-replayed-at"
REPLAY_COUNT_HEADER = "x-esim-replays"

# Headers the broker writes when it dead-letters or returns a message; they describe the last trip,
# not the next one, so a replayed copy starts without them.
BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
# Our failure headers: a replayed copy starts from attempt 1 and the full retry tiers again.
FAILURE_HEADERS = (ATTEMPT_HEADER, LAST_ERROR_HEADER, FAILED_AT_HEADER, ORIGIN_QUEUE_HEADER)

DLQ_SUFFIX = ".dlq"
# Enough of a body to recognise the event; the audit row of a discard keeps the whole body.
BODY_PREVIEW_CHARS = 500
# Finding messages by id means holding everything in front of them. A DLQ deeper than this is an
# incident to drain with `all` (oldest first) rather than by ids; ids further back report not found.
MAX_SCAN = 5000

REPLAY_ACTION = "dlq_replay"
DISCARD_ACTION = "dlq_discard"


@dataclass(frozen=True)
class DeadLetter:
    """One message as read from a DLQ (its AMQP properties and body), not yet settled."""

    message_id: str | None
    correlation_id: str | None
    routing_key: str | None
    redelivered: bool
    headers: Mapping[str, Any]
    body: bytes

    @property
    def attempt(self) -> int | None:
        try:
            return int(self.headers[ATTEMPT_HEADER])
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def last_error(self) -> str | None:
        return _text_header(self.headers, LAST_ERROR_HEADER)

    @property
    def failed_at(self) -> str | None:
        return _text_header(self.headers, FAILED_AT_HEADER)

    @property
    def event_type(self) -> str | None:
        return _text_header(self.headers, EVENT_TYPE_HEADER)

    @property
    def transaction_id(self) -> str | None:
        """The order it is about: from the body (our events carry it), else the correlation id."""
        found = _json_body(self.body).get("transaction_id")
        return found if isinstance(found, str) and found else self.correlation_id


def _text_header(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:  # not JSON (a poison message): nothing to read from it
        return {}
    return parsed if isinstance(parsed, dict) else {}


# --- which queue


def dead_letter_queues(topology: Topology) -> dict[str, ConsumerQueue]:
    """Every DLQ of the topology, by name, with the work queue it belongs to."""
    return {queue.dlq: queue for queue in topology.queues}


def find_dead_letter_queue(topology: Topology, name: str) -> ConsumerQueue | None:
    """The work queue whose DLQ is `name` (with or without the topology's prefix), or None."""
    queues = dead_letter_queues(topology)
    return queues.get(name) or queues.get(f"{topology.prefix}{name}")


def origin_queue(topology: Topology, work: ConsumerQueue, headers: Mapping[str, Any]) -> str:
    """Where a dead letter of `work.dlq` goes back to: the queue named in its origin header when that
    is a work queue of this topology (a header can never send a message elsewhere), else the queue the
    DLQ belongs to (a message the broker dead-lettered itself carries no header)."""
    named = _text_header(headers, ORIGIN_QUEUE_HEADER)
    if named is not None and named in {queue.name for queue in topology.queues}:
        return named
    return work.name


# --- what a replayed copy carries


def replay_headers(headers: Mapping[str, Any], *, replayed_at: datetime) -> dict[str, Any]:
    """The headers of a replayed copy: no failure or broker trip headers (so the consumer counts
    attempts from 1 again), the event's own headers kept, and a replay stamp and count added."""
    kept = {
        name: value
        for name, value in headers.items()
        if name not in FAILURE_HEADERS and not name.startswith(BROKER_HEADERS)
    }
    try:
        replays = int(headers.get(REPLAY_COUNT_HEADER, 0)) + 1
    except (TypeError, ValueError):
        replays = 1
    return {**kept, REPLAYED_AT_HEADER: replayed_at.isoformat(), REPLAY_COUNT_HEADER: replays}


# --- what a person sees


def json_safe(value: Any) -> Any:
    """A header value as JSON (x-death holds tables, lists and timestamps), strings redacted."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


def body_preview(body: bytes, *, limit: int = BODY_PREVIEW_CHARS) -> str:
    """The start of the body as text, redacted before it is cut (a cut must not split a secret)."""
    text = redact(body.decode("utf-8", "replace"))
    return text if len(text) <= limit else f"{text[:limit]}…"


@dataclass(frozen=True)
class StoredBody:
    """A body as kept in the audit table: text when it is UTF-8 (redacted), base64 otherwise."""

    text: str
    encoding: str  # "utf-8" | "base64"
    redacted: bool


def stored_body(body: bytes) -> StoredBody:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return StoredBody(base64.b64encode(body).decode("ascii"), "base64", redacted=False)
    safe = redact(text)
    return StoredBody(safe, "utf-8", redacted=safe != text)


# --- which messages


@dataclass(frozen=True)
class Selection:
    """The held messages chosen (indexes, queue order) and the requested ids that were not there."""

    chosen: tuple[int, ...]
    not_found: tuple[str, ...]


def select(letters: Sequence[DeadLetter], *, message_ids: Sequence[str] | None, limit: int) -> Selection:
    """By ids: every held copy of each id (a crash between copy and ack can leave two, and both must
    go); ids not held are reported. Without ids: the oldest `limit` messages."""
    if message_ids is None:
        return Selection(tuple(range(min(limit, len(letters)))), ())
    wanted = set(message_ids)
    chosen = tuple(i for i, letter in enumerate(letters) if letter.message_id in wanted)
    seen = {letters[i].message_id for i in chosen}
    return Selection(chosen, tuple(i for i in dict.fromkeys(message_ids) if i not in seen))


# --- audit


@dataclass(frozen=True)
class AuditEntry:
    """One row of `operator_actions`."""

    action: str
    transaction_id: str | None
    detail: dict[str, Any]
    note: str | None


def audit_entry(
    action: str, dlq: str, letter: DeadLetter, *, note: str | None, origin: str | None = None
) -> AuditEntry:
    """What was done to which message. A discard keeps the whole body, so nothing is silently lost."""
    detail: dict[str, Any] = {
        "queue": dlq,
        "message_id": letter.message_id,
        "correlation_id": letter.correlation_id,
        "headers": json_safe(dict(letter.headers)),
    }
    if origin is not None:
        detail["origin_queue"] = origin
    if action == DISCARD_ACTION:
        body = stored_body(letter.body)
        detail |= {"body": body.text, "body_encoding": body.encoding, "body_redacted": body.redacted}
    transaction_id = letter.transaction_id
    return AuditEntry(action, transaction_id[:200] if transaction_id else None, detail, note)


# --- use cases over ports


class Held(Protocol):
    """Messages held from one DLQ: `depth` counted before taking them; `ack` settles some for good."""

    @property
    def depth(self) -> int: ...

    @property
    def letters(self) -> Sequence[DeadLetter]: ...

    async def ack(self, indexes: Sequence[int]) -> None: ...


Hold = Callable[[str, int], AbstractAsyncContextManager[Held]]  # (dlq name, at most) → held messages
Publish = Callable[[DeadLetter, str, dict[str, Any]], Awaitable[None]]  # letter, queue, headers
Record = Callable[[Sequence[AuditEntry]], Awaitable[None]]


@dataclass(frozen=True)
class Peeked:
    depth: int
    letters: Sequence[DeadLetter]


@dataclass(frozen=True)
class Settled:
    """What a replay or discard did: the messages settled (queue order) and the ids not found."""

    letters: list[DeadLetter] = field(default_factory=list)
    not_found: tuple[str, ...] = ()
    scanned: int = 0
    origins: tuple[str, ...] = ()


async def peek(hold: Hold, work: ConsumerQueue, limit: int) -> Peeked:
    """The oldest `limit` dead letters, all returned to the DLQ when the hold ends."""
    async with hold(work.dlq, limit) as held:
        return Peeked(held.depth, list(held.letters))


async def replay(
    hold: Hold,
    topology: Topology,
    work: ConsumerQueue,
    *,
    message_ids: Sequence[str] | None,
    limit: int,
    note: str | None,
    now: datetime,
    publish: Publish,
    record: Record,
) -> Settled:
    """Publish the chosen dead letters to their work queue (each confirmed), record them, then ack
    the DLQ copies. Anything raised before the acks leaves the DLQ as it was."""
    async with hold(work.dlq, MAX_SCAN if message_ids is not None else limit) as held:
        selection = select(held.letters, message_ids=message_ids, limit=limit)
        chosen = [held.letters[i] for i in selection.chosen]
        targets = [origin_queue(topology, work, letter.headers) for letter in chosen]
        for letter, target in zip(chosen, targets, strict=True):
            await publish(letter, target, replay_headers(letter.headers, replayed_at=now))
        await record(
            [
                audit_entry(REPLAY_ACTION, work.dlq, letter, note=note, origin=target)
                for letter, target in zip(chosen, targets, strict=True)
            ]
        )
        await held.ack(selection.chosen)
        return Settled(chosen, selection.not_found, len(held.letters), tuple(dict.fromkeys(targets)))


async def discard(
    hold: Hold, work: ConsumerQueue, *, message_ids: Sequence[str], note: str, record: Record
) -> Settled:
    """Record the named dead letters (whole body) in the audit table, then ack them. A failed audit
    write leaves the DLQ as it was; a crash after it leaves a row for a message still there."""
    async with hold(work.dlq, MAX_SCAN) as held:
        selection = select(held.letters, message_ids=message_ids, limit=len(held.letters))
        chosen = [held.letters[i] for i in selection.chosen]
        await record([audit_entry(DISCARD_ACTION, work.dlq, letter, note=note) for letter in chosen])
        await held.ack(selection.chosen)
        return Settled(chosen, selection.not_found, len(held.letters))
