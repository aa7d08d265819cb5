"""Events: create them, sign them like Stripe, deliver them in the background with a few retries.

`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "{t}.{raw body}")>`; each attempt is signed
afresh, as Stripe does, so a slow retry is not rejected for an old timestamp.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx

from . import payment_objects
from .ids import new_id, now
from .render import render
from .state import DeliveryAttempt, EventRecord, StripeState

logger = logging.getLogger("esim_sandbox.stripe_emulator")

# Pauses between delivery attempts: live Stripe retries for days; tests wait a few seconds at most, so
# five attempts over ~3.7 s show retry behaviour without slowing a failing test much.
RETRY_DELAYS_SECONDS = (0.2, 0.5, 1.0, 2.0)
DELIVERY_TIMEOUT_SECONDS = 5.0
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
    """Creates events in `state.events` and delivers them to the configured endpoint."""

    def __init__(self, state: StripeState) -> None:
        self._state = state
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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
        """Record an event (with a snapshot of `data_object`) and start delivering it; returns the event."""
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
            task = asyncio.get_running_loop().create_task(self._deliver(record, url, endpoint.secret))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return event

    async def _deliver(self, record: EventRecord, url: str, secret: str) -> None:
        body = encode(record.event)
        for delay in (0.0, *RETRY_DELAYS_SECONDS):
            await asyncio.sleep(delay)
            response = await self._post(record, url, body, secret, timeout_seconds=DELIVERY_TIMEOUT_SECONDS)
            if response is not None and response.is_success:
                record.status = "delivered"
                record.event["pending_webhooks"] = 0
                logger.info(
                    "webhook_delivered event_id=%s type=%s attempts=%d",
                    record.event["id"],
                    record.event["type"],
                    len(record.attempts),
                )
                return
        record.status = "failed"
        logger.warning(
            "webhook_failed event_id=%s type=%s attempts=%d",
            record.event["id"],
            record.event["type"],
            len(record.attempts),
        )

    async def _post(
        self, record: EventRecord, url: str, body: bytes, secret: str, *, timeout_seconds: float
    ) -> httpx.Response | None:
        """One signed POST, recorded as an attempt; None when no HTTP answer came back."""
        headers = {**_HEADERS, "Stripe-Signature": sign(body, secret)}
        try:
            response = await self._http().post(url, content=body, headers=headers, timeout=timeout_seconds)
        except httpx.TimeoutException:
            record.attempts.append(DeliveryAttempt(at=time.time(), status_code=None, error="timeout"))
            return None
        except httpx.HTTPError as exc:
            record.attempts.append(
                DeliveryAttempt(at=time.time(), status_code=None, error=type(exc).__name__)
            )
            return None
        record.attempts.append(DeliveryAttempt(at=time.time(), status_code=response.status_code, error=None))
        return response

    async def ask_realtime(self, url: str, authorization: dict[str, Any]) -> tuple[bool, str]:
        """Send `issuing_authorization.request` synchronously and return (approved, reason)."""
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
        record = EventRecord(event=event, url=url)
        self._state.events.append(record)
        response = await self._post(
            record, url, encode(event), self._state.webhook.secret, timeout_seconds=REALTIME_TIMEOUT_SECONDS
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
