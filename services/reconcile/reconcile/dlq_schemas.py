"""Request and response models of the dead-letter endpoints (they are their OpenAPI documentation)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from reconcile.dead_letters import DeadLetter, body_preview, json_safe

DEFAULT_PEEK_LIMIT = 20
MAX_PEEK_LIMIT = 100
DEFAULT_REPLAY_LIMIT = 100
# One request publishes each message with its own confirm; a bigger batch is another request.
MAX_REPLAY_LIMIT = 1000
MAX_IDS = 500

MessageId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
# operator_actions.note holds 1 to 500 characters.
# No NUL character: Postgres text cannot store one (it came back as a 500; now a 422).
Note = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500, pattern=r"^[^\x00]*$")
]


class DeadLetterQueueSummary(BaseModel):
    queue: str = Field(description="The DLQ's name, as in the RabbitMQ management UI.")
    origin_queue: str = Field(description="The work queue its messages came from and are replayed to.")
    depth: int | None = Field(
        description="Messages waiting (in flight ones, e.g. being peeked right now, not counted); "
        "null when the queue is not declared on the broker."
    )
    consumers: int | None = Field(
        description="Consumers attached. Should be 0: a consumer on a DLQ takes dead letters away."
    )
    dead_lettered_total: int | None = Field(
        None,
        description="Dead letters recorded for this DLQ since the history began, replayed or discarded "
        "ones included. Only copies a consumer made: a message the broker dead-lettered by itself (its "
        "copy unconfirmed, the delivery limit) or one from a publisher older than the dead-letter "
        "exchange is in `depth` but not here. Null (like every history field) while the history "
        "cannot be read: see `history_available`.",
    )
    dead_lettered_recent: int | None = Field(
        None, description="The same, over the last `recent_hours` hours."
    )
    last_error: str | None = Field(
        None, description="The latest recorded dead letter's error (redacted, at most 500 chars)."
    )
    last_at: datetime | None = Field(None, description="When the latest recorded one was dead-lettered.")
    last_message_id: str | None = Field(None, description="Its message id (for peek, replay, discard).")
    last_transaction_id: str | None = Field(None, description="The order it was about.")


class DeadLetterQueuesResponse(BaseModel):
    generated_at: datetime
    total: int = Field(description="Dead letters over every DLQ.")
    recent_hours: int = Field(description="The window of each queue's `dead_lettered_recent`.")
    history_available: bool = Field(
        description="False while the database is away: the depths are listed, every history field "
        "(`dead_lettered_*`, `last_*`) is null."
    )
    queues: list[DeadLetterQueueSummary]


class DeadLetterView(BaseModel):
    message_id: str | None = Field(description="The event id: what `replay` and `discard` select by.")
    transaction_id: str | None = Field(description="The order it is about.")
    event_type: str | None
    origin_queue: str = Field(description="Where `replay` sends it: always the DLQ's own work queue.")
    routing_key: str | None = Field(description="The routing key it reached the DLQ with.")
    last_error: str | None = Field(description="Why the consumer gave up (redacted, at most 500 chars).")
    failed_at: str | None = Field(description="When it was dead-lettered (ISO 8601).")
    attempt: int | None = Field(description="Our attempt counter when it was dead-lettered.")
    delivery_count: int | None = Field(
        description="The broker's `x-delivery-count`: how often the message was returned to the DLQ "
        "(each peek returns it; before RabbitMQ 4.3 that counts). On RabbitMQ 4.0 to 4.2 a quorum "
        "queue drops a message past 20 unless the `delivery-limit: -1` policy applies to DLQs."
    )
    redelivered: bool = Field(
        description="Set once a message was delivered before: an earlier peek or replay attempt sets it."
    )
    headers: dict[str, Any] = Field(description="Every header, strings redacted.")
    body_preview: str = Field(description="The start of the body, redacted.")
    body_bytes: int

    @classmethod
    def of(cls, letter: DeadLetter, origin_queue: str) -> DeadLetterView:
        return cls(
            message_id=letter.message_id,
            transaction_id=letter.transaction_id,
            event_type=letter.event_type,
            origin_queue=origin_queue,
            routing_key=letter.routing_key,
            last_error=letter.last_error,
            failed_at=letter.failed_at,
            attempt=letter.attempt,
            delivery_count=letter.delivery_count,
            redelivered=letter.redelivered,
            headers=json_safe(dict(letter.headers)),
            body_preview=body_preview(letter.body),
            body_bytes=len(letter.body),
        )


class PeekResponse(BaseModel):
    queue: str
    depth: int = Field(description="Messages waiting when the peek started.")
    messages: list[DeadLetterView] = Field(description="The oldest ones, in queue order; all still there.")


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_ids: list[MessageId] | None = Field(
        None,
        min_length=1,
        max_length=MAX_IDS,
        description="Replay every copy of these messages (ids from the peek).",
    )
    all: bool = Field(False, description="Replay the oldest `limit` messages instead of named ones.")
    limit: int = Field(DEFAULT_REPLAY_LIMIT, ge=1, le=MAX_REPLAY_LIMIT, description="With `all`.")
    note: Note | None = Field(None, description="Why; kept in the audit table.")

    @model_validator(mode="after")
    def _one_selection(self) -> Self:
        if (self.message_ids is not None) == self.all:
            raise ValueError('say which messages: either "message_ids": [...] or "all": true, not both')
        return self


class ReplayResponse(BaseModel):
    queue: str
    replayed: int = Field(description="Messages published to their work queue and removed from the DLQ.")
    replayed_message_ids: list[str | None]
    origin_queues: list[str] = Field(description="Where they went.")
    not_found: list[str] = Field(
        description="Requested ids not in the DLQ: already settled, being peeked, or further back than "
        "the first 5000 messages."
    )
    scanned: int = Field(description="Messages looked at.")


class DiscardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_ids: list[MessageId] = Field(min_length=1, max_length=MAX_IDS, description="Ids from the peek.")
    note: Note = Field(description="Why they are dropped; required, kept in the audit table.")


class DiscardResponse(BaseModel):
    queue: str
    discarded: int = Field(description="Messages removed; each is kept, with its body, in the audit table.")
    discarded_message_ids: list[str | None]
    not_found: list[str]
    scanned: int
