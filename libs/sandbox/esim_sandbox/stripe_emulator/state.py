"""The emulator's in-memory world: objects by id, balances, events, idempotency records, test controls.

One `StripeState` per app (`app.state.stripe`); nothing lives at module level, so two emulators in one
process never share anything. Handlers run on the server's event loop and mutate state without awaiting
in between, except where a lock says otherwise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from .delivery import DeliverySettings
from .errors import no_such
from .faults import Fault

DEFAULT_WEBHOOK_SECRET = "whsec_sandbox"  # noqa: S105 - a well-known sandbox value, not a credential
# $10,000 of Issuing float: enough for any demo or test run, small enough to reason about.
DEFAULT_ISSUING_FLOAT = 1_000_000
DEFAULT_CURRENCY = "usd"
# Stripe prunes idempotency keys once they are at least 24 hours old; a reused key then runs anew.
IDEMPOTENCY_TTL_SECONDS = 24 * 60 * 60


@dataclass
class WebhookEndpoint:
    url: str | None
    secret: str
    # Like a Stripe endpoint's `enabled_events`: "*" means every type.
    enabled_events: list[str] = field(default_factory=lambda: ["*"])

    def accepts(self, event_type: str) -> bool:
        return "*" in self.enabled_events or event_type in self.enabled_events


@dataclass
class DeliveryAttempt:
    at: float
    status_code: int | None
    error: str | None
    # Which delivery of the event this attempt belongs to: 0 the original, then duplicates and resends.
    delivery: int = 0


@dataclass
class EventRecord:
    """An event and what happened when we tried to deliver it (observable via /_sandbox/events)."""

    event: dict[str, Any]
    url: str | None
    attempts: list[DeliveryAttempt] = field(default_factory=list)
    status: str = "pending"  # pending | held | delivered | failed | no_endpoint
    deliveries: int = 0  # deliveries started (original, duplicates, resends)
    in_flight: int = 0  # deliveries still retrying
    body: bytes = field(default=b"", repr=False)  # the exact bytes every delivery sends

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.event["id"],
            "type": self.event["type"],
            "created": self.event["created"],
            "event": self.event,
            "delivery": {
                "url": self.url,
                "status": self.status,
                "attempts": [
                    {"at": a.at, "status_code": a.status_code, "error": a.error, "delivery": a.delivery}
                    for a in self.attempts
                ],
            },
        }


@dataclass(frozen=True)
class CardSecret:
    """Full PAN and CVC: kept apart from the card object so nothing renders them by accident."""

    number: str = field(repr=False)
    cvc: str = field(repr=False)


@dataclass
class IdempotentResult:
    """The first response for an idempotency key; `status is None` while the first request runs."""

    fingerprint: str
    method: str
    path: str
    request_id: str
    created_at: float  # time.monotonic()
    status: int | None = None
    body: bytes = b""


@dataclass
class StripeState:
    api_key: str | None
    api_version: str
    webhook: WebhookEndpoint
    issuing_auth_webhook_url: str | None
    issuing_available: dict[str, int]
    # The real-time authorisation endpoint's own signing secret (Stripe configures it in the Issuing
    # settings, apart from the webhook endpoint); None: the webhook endpoint's secret.
    issuing_auth_webhook_secret: str | None = None
    payments_available: dict[str, int] = field(default_factory=dict)
    payments_pending: dict[str, int] = field(default_factory=dict)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Bookkeeping that is not part of any Stripe object (a session's payment_intent_data, a card's
    # payment count), keyed by object id so it never leaks into a response.
    private: dict[str, dict[str, Any]] = field(default_factory=dict)
    card_secrets: dict[str, CardSecret] = field(default_factory=dict)
    cards_by_number: dict[str, str] = field(default_factory=dict)
    # `/_sandbox/issuing/next_card`: the number and CVC the next created card gets (once), for canaries.
    next_card_secret: CardSecret | None = None
    events: list[EventRecord] = field(default_factory=list)
    # Keyed by (API key, Idempotency-Key): Stripe scopes keys to the account and mode of the API key.
    idempotency: dict[tuple[str, str], IdempotentResult] = field(default_factory=dict)
    idempotency_ttl_seconds: float = IDEMPOTENCY_TTL_SECONDS
    # Test controls (/_sandbox/webhook_delivery, /_sandbox/faults): how events go out, which calls fail.
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    held: list[list[EventRecord]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    # Serialises authorisations: a decision awaits the real-time webhook between checking the float
    # and holding it, and two concurrent requests must not both spend the same money.
    authorization_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def issuing_authorization_secret(self) -> str:
        """What `issuing_authorization.request` is signed with."""
        if self.issuing_auth_webhook_secret is None:
            return self.webhook.secret
        return self.issuing_auth_webhook_secret

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.objects[obj["id"]] = obj
        return obj

    def private_of(self, object_id: str) -> dict[str, Any]:
        return self.private.setdefault(object_id, {})

    def get(self, object_type: str, object_id: str, *, param: str | None = None) -> dict[str, Any]:
        """The stored object, or Stripe's `resource_missing` (404 from a path, 400 from a parameter)."""
        obj = self.objects.get(object_id)
        if obj is None or obj["object"] != object_type:
            raise no_such(object_type, object_id, param=param)
        return obj

    def find(self, object_type: str, **equal: Any) -> list[dict[str, Any]]:
        """Objects of a type whose fields equal the given values, newest first (Stripe's list order)."""
        found = [
            obj
            for obj in self.objects.values()
            if obj["object"] == object_type and all(obj.get(key) == value for key, value in equal.items())
        ]
        return found[::-1]  # dicts keep insertion order, which is creation order

    def event_record(self, event_id: str) -> EventRecord:
        for record in self.events:
            if record.event["id"] == event_id:
                return record
        raise no_such("event", event_id)

    def events_of(self, event_type: str | None = None) -> list[EventRecord]:
        return [record for record in self.events if event_type is None or record.event["type"] == event_type]
