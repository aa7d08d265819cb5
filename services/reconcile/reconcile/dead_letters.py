"""Dead letters: what sits in each `<queue>.dlq`, and moving messages out of it without losing any.

A DLQ holds messages a consumer gave up on (see `esim_common.consumer`): our headers say why
(`x-esim-last-error`), when (`x-esim-failed-at`) and from where (`x-esim-origin-queue`). An operator
looks at them (peek), puts them back on their work queue once the cause is fixed (replay), or drops
them with a note (discard). Every message is *held* — taken with `basic.get` and no ack on a private
channel — while we decide; whatever is not acked goes back to the DLQ when that channel closes, so a
peek, a refused request or a crash in the middle never loses a message.

    replay:  hold → audit (committed, "attempted") → publish each copy to its work queue (confirmed) → ack
    discard: hold → audit (committed, with the full body) → ack the DLQ copies

The audit row comes first so that no copy ever reaches a work queue unrecorded: a replay row means
"attempted", and the message leaving the DLQ is what shows it went through. A failure or crash between
the publish and the ack leaves the message on both queues: a duplicate, which is harmless because
consumers are idempotent by order state (each handler looks at the order's state before acting, so a
second delivery for an order already past that step changes nothing). Acking first could lose it.

Side effects of holding (peek included), all documented in the README:
- the messages are invisible (in flight) to the list, the depth gauge and a concurrent peek or replay
  until the request ends; the depth from a passive declare counts only messages not in flight;
- a returned message comes back with the `redelivered` flag set; quorum queues before RabbitMQ 4.3
  also increment its `x-delivery-count` header, and may deliver it in a different order.

This module holds the rules (plain functions) and the use cases over two ports: `Hold` (the broker,
`reconcile.dlq_broker`) and `Publish`/`Record` (given by the router). No AMQP or SQL in here.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
    OBSERVER_ATTEMPT_HEADER,
    ORIGIN_QUEUE_HEADER,
    ConsumerQueue,
    Topology,
)

log = logging.getLogger("esim.reconcile.dlq")

# Set on a replayed message: when, and how often (a message replayed again and again is a bug to fix,
# not a message to replay once more).
REPLAYED_AT_HEADER = "x-esim-replayed-at"
REPLAY_COUNT_HEADER = "x-esim-replays"

# Set by a quorum queue on a redelivered message: how often it was returned (a peek returns it too).
DELIVERY_COUNT_HEADER = "x-delivery-count"
# Headers the broker writes when it dead-letters or returns a message; they describe the last trip,
# not the next one, so a replayed copy starts without them.
BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", DELIVERY_COUNT_HEADER)
# Our failure headers: a replayed copy starts from attempt 1 and the full retry tiers again. The
# dead-letter stamp (`x-esim-dead-letter-*`) is kept: replayed from the observer's own DLQ, a copy is
# still recorded as the dead letter it was; a consumer that dead-letters it again stamps it anew.
FAILURE_HEADERS = (
    ATTEMPT_HEADER,
    OBSERVER_ATTEMPT_HEADER,
    LAST_ERROR_HEADER,
    FAILED_AT_HEADER,
    ORIGIN_QUEUE_HEADER,
)

DLQ_SUFFIX = ".dlq"
# Enough of a body to recognise the event; the audit row of a discard keeps the whole body.
BODY_PREVIEW_CHARS = 500
# Finding messages by id means holding everything in front of them. A DLQ deeper than this is an
# incident to drain with `all` (oldest first) rather than by ids; ids further back report not found.
MAX_SCAN = 5000

REPLAY_ACTION = "dlq_replay"
DISCARD_ACTION = "dlq_discard"
# A replay row is written before the publish: it records the attempt, not the outcome.
REPLAY_ATTEMPTED = "attempted"


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
    def delivery_count(self) -> int | None:
        """Returns counted by the broker (quorum queues): on RabbitMQ 4.0 to 4.2 a DLQ without the
        `delivery-limit: -1` policy drops the message once this passes 20 (see the README)."""
        try:
            return int(self.headers[DELIVERY_COUNT_HEADER])
        except (KeyError, TypeError, ValueError):
            return None

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


def origin_queue(work: ConsumerQueue, headers: Mapping[str, Any]) -> str:
    """Where a dead letter of `work.dlq` goes back to: always the queue the DLQ belongs to. Each work
    queue dead-letters into its own DLQ, so an origin header naming another queue is wrong (or forged),
    and following it would hand the event to a consumer that never subscribed to it: ignored, logged."""
    named = _text_header(headers, ORIGIN_QUEUE_HEADER)
    if named is not None and named != work.name:
        log.warning(
            "origin header names another queue; using the DLQ's own work queue",
            extra={"queue": work.dlq, "origin_header": redact(named[:200]), "origin_queue": work.name},
        )
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


def _jsonb_text(text: str) -> str:
    """Postgres `jsonb` refuses U+0000 in a string: a NUL byte from a poison message would make the
    audit write (and so the discard) fail for good."""
    return text.replace("\x00", "\ufffd")


def json_safe(value: Any) -> Any:
    """A header value as JSON (x-death holds tables, lists and timestamps), strings redacted."""
    if isinstance(value, Mapping):
        return {_jsonb_text(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        return _jsonb_text(redact(value.decode("utf-8", "replace")))
    if isinstance(value, str):
        return _jsonb_text(redact(value))
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return _jsonb_text(redact(str(value)))


def body_preview(body: bytes, *, limit: int = BODY_PREVIEW_CHARS) -> str:
    """The start of the body as text, redacted before it is cut (a cut must not split a secret)."""
    text = redact(body.decode("utf-8", "replace"))
    return text if len(text) <= limit else f"{text[:limit]}…"


@dataclass(frozen=True)
class StoredBody:
    """A body as kept in the audit table (and served back by the order timeline): always redacted
    text, never raw bytes, with the SHA-256 of the bytes to tell which message it was."""

    text: str
    encoding: str  # "utf-8", or "latin-1" for a body that is not UTF-8 (every byte read as one char)
    redacted: bool  # something was replaced (a secret, or a NUL byte): `text` is not the whole body
    sha256: str


def stored_body(body: bytes) -> StoredBody:
    """Redacted text of the body. A body that is not UTF-8 is read as latin-1 (every byte is a
    character, so a card number next to a stray byte is still seen by `redact`) rather than kept as
    base64, which no redaction can look into."""
    try:
        text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = body.decode("latin-1"), "latin-1"
    safe = _jsonb_text(redact(text))
    return StoredBody(safe, encoding, redacted=safe != text, sha256=hashlib.sha256(body).hexdigest())


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
    """What was done to which message. A discard keeps the whole body (redacted), so nothing is
    silently lost; a replay is recorded before its publish, hence marked as an attempt."""
    detail: dict[str, Any] = {
        "queue": dlq,
        "message_id": letter.message_id,
        "correlation_id": letter.correlation_id,
        "headers": json_safe(dict(letter.headers)),
    }
    if origin is not None:
        detail["origin_queue"] = origin
    if action == REPLAY_ACTION:
        detail["status"] = REPLAY_ATTEMPTED
    if action == DISCARD_ACTION:
        body = stored_body(letter.body)
        detail |= {
            "body": body.text,
            "body_encoding": body.encoding,
            "body_redacted": body.redacted,
            "body_sha256": body.sha256,
        }
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
    work: ConsumerQueue,
    *,
    message_ids: Sequence[str] | None,
    limit: int,
    note: str | None,
    now: datetime,
    publish: Publish,
    record: Record,
) -> Settled:
    """Record the chosen dead letters as attempted, publish each to its work queue (confirmed), then
    ack the DLQ copies. A failed audit write publishes nothing; anything raised before the acks leaves
    the DLQ as it was (copies already confirmed stay on the work queue: duplicates, not losses)."""
    async with hold(work.dlq, MAX_SCAN if message_ids is not None else limit) as held:
        selection = select(held.letters, message_ids=message_ids, limit=limit)
        chosen = [held.letters[i] for i in selection.chosen]
        targets = [origin_queue(work, letter.headers) for letter in chosen]
        await record(
            [
                audit_entry(REPLAY_ACTION, work.dlq, letter, note=note, origin=target)
                for letter, target in zip(chosen, targets, strict=True)
            ]
        )
        for letter, target in zip(chosen, targets, strict=True):
            await publish(letter, target, replay_headers(letter.headers, replayed_at=now))
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
