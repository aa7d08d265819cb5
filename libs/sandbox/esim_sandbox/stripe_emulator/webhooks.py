"""Events: create them, sign them like Stripe, deliver them in the background with retries.

`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "{t}.{raw body}")>`; each attempt is signed
afresh with the endpoint's current secret, as Stripe does, so a slow retry is not rejected for an old
timestamp. Every delivery of an event sends the same bytes (a snapshot taken when it was created).
How events go out (duplicates, order, delay, retries, hold) is `state.delivery`: see `delivery`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import httpx

from . import payment_objects
from .delivery import (
    DELIVERY_TIMEOUT_SECONDS,
    RETRY_DELAYS_SECONDS,
    DeliverySettings,
    copy_timestamps,
    delivery_order,
)
from .errors import StripeApiError
from .ids import new_id, now
from .render import render
from .state import DeliveryAttempt, EventRecord, StripeState

logger = logging.getLogger("esim_sandbox.stripe_emulator")

__all__ = ["DELIVERY_TIMEOUT_SECONDS", "RETRY_DELAYS_SECONDS", "Webhooks", "encode", "sign"]

# Stripe waits about 2 s for a real-time authorisation answer before applying the default decision.
REALTIME_TIMEOUT_SECONDS = 2.0
_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
}


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header value for `payload`."""
    timestamp = now() if timestamp is None else timestamp
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def encode(event: dict[str, Any]) -> bytes:
    # Stripe sends pretty-printed JSON; receivers must verify the raw bytes, never a re-serialisation.
    return json.dumps(event, indent=2).encode()


class Webhooks:
    """Creates events in `state.events` and delivers them to the configured endpoint.

    Events one task emits in one go (one request, one payment: no `await` in between) form one
    *action*; `state.delivery` decides how each action goes out (see `delivery`).
    """

    def __init__(self, state: StripeState) -> None:
        self._state = state
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._actions: dict[asyncio.Task[Any] | None, list[EventRecord]] = {}

    def _http(self) -> httpx.AsyncClient:
        # Created on first use so it belongs to the server's event loop, not the caller's.
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def emit(
        self,
        event_type: str,
        data_object: dict[str, Any],
        *,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        previous_attributes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record an event (with a snapshot of `data_object`) and queue its delivery; returns the event."""
        endpoint = self._state.webhook
        event = payment_objects.event(
            event_id=new_id("evt_"),
            created=now(),
            event_type=event_type,
            data_object=render(self._state, data_object),
            api_version=self._state.api_version,
            pending_webhooks=1,
            request_id=request_id,
            idempotency_key=idempotency_key,
            previous_attributes=previous_attributes,
        )
        url = endpoint.url if endpoint.accepts(event_type) else None
        record = EventRecord(event=event, url=url)
        self._state.events.append(record)
        if url is None:
            event["pending_webhooks"] = 0
            record.status = "no_endpoint"
        else:
            task = asyncio.current_task()
            if task not in self._actions:
                # Runs once the emitting task yields to the loop, i.e. after every event of this action.
                self._actions[task] = []
                asyncio.get_running_loop().call_soon(self._end_action, task)
            self._actions[task].append(record)
        # Stripe sends a snapshot: every delivery of this event, however late, carries these bytes.
        record.body = encode(event)
        return event

    def _end_action(self, task: asyncio.Task[Any] | None) -> None:
        records = self._actions.pop(task)
        settings = self._state.delivery
        if settings.hold:
            for record in records:
                record.status = "held"
            self._state.held.append(records)
            return
        self._spawn(self._deliver_action(records, settings))

    def release(self, event_ids: list[str] | None = None) -> list[EventRecord]:
        """Send held events: every held action as it came, or the given events one after another."""
        settings = replace(self._state.delivery, hold=False)
        if event_ids is None:
            actions, self._state.held = self._state.held, []
            for records in actions:
                self._start(records, settings)
            return [record for records in actions for record in records]
        held = {record.event["id"]: record for records in self._state.held for record in records}
        for event_id in event_ids:
            if event_id not in held:
                raise StripeApiError(400, f"Event {event_id} is not held.", param="event_ids")
        if len(set(event_ids)) != len(event_ids):
            raise StripeApiError(400, "event_ids lists an event twice.", param="event_ids")
        chosen = [held[event_id] for event_id in event_ids]
        remaining = [[r for r in records if r not in chosen] for records in self._state.held]
        self._state.held = [records for records in remaining if records]
        self._start(chosen, replace(settings, order="created"))
        return chosen

    def _start(self, records: list[EventRecord], settings: DeliverySettings) -> None:
        for record in records:
            record.status = "pending"
        self._spawn(self._deliver_action(records, settings))

    async def redeliver(self, record: EventRecord) -> DeliveryAttempt:
        """One more signed delivery of an event to the current endpoint, now (the dashboard's Resend)."""
        url = self._state.webhook.url
        if url is None:
            raise StripeApiError(400, "No webhook endpoint is configured to redeliver to.")
        delivery = record.deliveries
        record.deliveries += 1
        response, attempt = await self._attempt(
            record, url, timeout_seconds=self._state.delivery.timeout_seconds, delivery=delivery
        )
        if response is not None and response.is_success:
            self._delivered(record)
        return attempt

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_action(self, records: list[EventRecord], settings: DeliverySettings) -> None:
        if settings.delay_seconds:
            await asyncio.sleep(settings.delay_seconds)
        for record in delivery_order(records, settings.order):
            answered = []
            for timestamp in copy_timestamps(now(), 1 + settings.duplicates):
                first_answer = asyncio.Event()
                answered.append(first_answer)
                self._spawn(self._deliver(record, settings, timestamp=timestamp, answered=first_answer))
            if settings.order != "concurrent":
                # The next event leaves only once this one's first attempt was answered: a certain order.
                await asyncio.gather(*(event.wait() for event in answered))

    async def _deliver(
        self, record: EventRecord, settings: DeliverySettings, *, timestamp: int, answered: asyncio.Event
    ) -> None:
        """One delivery: attempts on the retry schedule until a 2xx, each one signed when it is sent."""
        assert record.url is not None
        delivery = record.deliveries
        record.deliveries += 1
        record.in_flight += 1
        succeeded = False
        try:
            for attempt, pause in enumerate((0.0, *settings.retry_schedule_seconds)):
                await asyncio.sleep(pause)
                response, _ = await self._attempt(
                    record,
                    record.url,
                    timeout_seconds=settings.timeout_seconds,
                    delivery=delivery,
                    timestamp=timestamp if attempt == 0 else None,
                )
                answered.set()
                if response is not None and response.is_success:
                    succeeded = True
                    break
        finally:
            answered.set()
            record.in_flight -= 1
        if succeeded:
            self._delivered(record)
        elif record.in_flight == 0 and record.status != "delivered":
            record.status = "failed"
            logger.warning(
                "webhook_failed event_id=%s type=%s attempts=%d",
                record.event["id"],
                record.event["type"],
                len(record.attempts),
            )

    def _delivered(self, record: EventRecord) -> None:
        first = record.status != "delivered"
        record.status = "delivered"
        record.event["pending_webhooks"] = 0
        if first:
            logger.info(
                "webhook_delivered event_id=%s type=%s attempts=%d",
                record.event["id"],
                record.event["type"],
                len(record.attempts),
            )

    async def _attempt(
        self,
        record: EventRecord,
        url: str,
        *,
        timeout_seconds: float,
        delivery: int = 0,
        timestamp: int | None = None,
        secret: str | None = None,
    ) -> tuple[httpx.Response | None, DeliveryAttempt]:
        """One signed POST of the event's bytes, recorded as an attempt; no response when none came back.
        Signed with `secret`, by default the webhook endpoint's current one."""
        body = record.body or encode(record.event)
        key = self._state.webhook.secret if secret is None else secret
        headers = {**_HEADERS, "Stripe-Signature": sign(body, key, timestamp)}
        response: httpx.Response | None = None
        try:
            response = await self._http().post(url, content=body, headers=headers, timeout=timeout_seconds)
            attempt = DeliveryAttempt(time.time(), response.status_code, None, delivery)
        except httpx.TimeoutException:
            attempt = DeliveryAttempt(time.time(), None, "timeout", delivery)
        except httpx.HTTPError as exc:
            attempt = DeliveryAttempt(time.time(), None, type(exc).__name__, delivery)
        record.attempts.append(attempt)
        return response, attempt

    async def ask_realtime(self, url: str, authorization: dict[str, Any]) -> tuple[bool, str]:
        """Send `issuing_authorization.request` synchronously and return (approved, reason). Signed with
        the real-time endpoint's own secret; one attempt, no retry: Stripe decides without us instead."""
        event = payment_objects.event(
            event_id=new_id("evt_"),
            created=now(),
            event_type="issuing_authorization.request",
            data_object=authorization,
            api_version=self._state.api_version,
            pending_webhooks=1,
            request_id=None,
            idempotency_key=None,
        )
        record = EventRecord(event=event, url=url, body=encode(event))
        self._state.events.append(record)
        record.deliveries += 1
        response, _ = await self._attempt(
            record,
            url,
            timeout_seconds=REALTIME_TIMEOUT_SECONDS,
            secret=self._state.issuing_authorization_secret,
        )
        approved, reason = _realtime_decision(response, record)
        record.status = "delivered" if response is not None and response.status_code == 200 else "failed"
        event["pending_webhooks"] = 0
        return approved, reason


def _realtime_decision(response: httpx.Response | None, record: EventRecord) -> tuple[bool, str]:
    """Approve only on HTTP 200 with `{"approved": true}` and a `Stripe-Version` header, as Stripe does."""
    if response is None:
        return False, "webhook_timeout" if record.attempts[-1].error == "timeout" else "webhook_error"
    if response.status_code != 200 or not response.headers.get("Stripe-Version"):
        return False, "webhook_error"
    try:
        answer = response.json()
    except ValueError:
        return False, "webhook_error"
    if isinstance(answer, dict) and answer.get("approved") is True:
        return True, "webhook_approved"
    return False, "webhook_declined"
