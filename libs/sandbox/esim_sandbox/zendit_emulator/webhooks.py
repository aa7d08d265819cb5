"""Zendit's purchase webhooks, configured the way its console does: one URL and one custom header.

    POST   /_sandbox/webhook            {"url", "header", "secret", "intermediate"=false}
                                        checks the URL with HEAD first, as the console does (without
                                        the custom header), and refuses it (400) unless that answers
                                        2xx; then POSTs each purchase whose status changes to DONE or
                                        FAILED (every change with "intermediate": true)
    DELETE /_sandbox/webhook            stop sending
    GET    /_sandbox/webhook            the configuration (the header's name, never its value) and
                                        every delivery with its attempts
    POST   /_sandbox/webhook/lies       {"count"=1, "status"="DONE"}: the next `count` deliveries claim
                                        `status` (with made-up activation data for DONE) whatever the
                                        purchase really is; a receiver must re-fetch, never trust
    POST   /_sandbox/webhook/send/{id}  deliver purchase `id` now, as a Zendit retry would (lies apply)

The body is the purchase exactly as `GET /v1/esim/purchases/{id}` shows it when the change is seen.
Purchases advance lazily in `ZenditState`; while a webhook is configured a ticker advances them every
TICK_SECONDS so that changes happen (and are sent) without anyone polling. The state notes which
purchases changed since the last tick (`ZenditState.status_changes`), so a tick costs what changed, not
every purchase ever made. Several steps inside one tick are seen as one change: final statuses are
never missed, intermediate ones may be. Zendit's retry schedule is not published; a delivery that gets
no 2xx is retried after RETRY_DELAYS_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .http import BadRequest, error_response, read_json_object, state_of
from .state import FINAL, STEPS, ZenditState

logger = logging.getLogger("esim_sandbox.zendit_emulator")

# Fine enough that a DONE is sent within ~0.1 s of when the purchase clock reaches it.
TICK_SECONDS = 0.1
# Short, like the Stripe emulator's: a failing receiver shows retries without slowing tests much.
RETRY_DELAYS_SECONDS = (0.2, 0.5, 1.0, 2.0)
DELIVERY_TIMEOUT_SECONDS = 5.0
CHECK_TIMEOUT_SECONDS = 5.0
STATUSES = frozenset({"ACCEPTED", *STEPS, *FINAL})
_USER_AGENT = "Zendit-Webhooks/1.0 (esim-sandbox)"


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    header: str
    secret: str
    intermediate: bool = False


@dataclass
class Lie:
    status: str
    remaining: int


@dataclass(slots=True)
class Delivery:
    transaction_id: str
    status: str  # what the body claims
    actual_status: str  # what GET would have said at that moment
    lie: bool
    outcome: str = "pending"  # pending | delivered | failed
    attempts: list[int | str] = field(default_factory=list)  # HTTP status or error name per attempt

    def view(self) -> dict[str, Any]:
        return {
            "transactionId": self.transaction_id,
            "status": self.status,
            "actualStatus": self.actual_status,
            "lie": self.lie,
            "outcome": self.outcome,
            "attempts": list(self.attempts),
        }


class WebhookUnreachable(Exception):
    pass


class WebhookSender:
    """Watches the state's purchases and delivers their changes to the configured URL."""

    def __init__(self, state: ZenditState) -> None:
        self.state = state
        self.config: WebhookConfig | None = None
        self.lies: list[Lie] = []
        self.deliveries: list[Delivery] = []
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        # Created on first use so it belongs to the server's event loop.
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    async def configure(self, config: WebhookConfig) -> None:
        """Check the URL like the console (HEAD, no custom header), then start sending changes."""
        try:
            response = await self._http().head(
                config.url, headers={"User-Agent": _USER_AGENT}, timeout=CHECK_TIMEOUT_SECONDS
            )
        except httpx.HTTPError as exc:
            raise WebhookUnreachable(f"HEAD {config.url} failed: {type(exc).__name__}") from None
        if not response.is_success:
            raise WebhookUnreachable(f"HEAD {config.url} answered {response.status_code}")
        self.state.watch_statuses()  # only changes from now on are sent
        self.config = config
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    def disable(self) -> None:
        self.config = None
        self.state.unwatch_statuses()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.tick()
            except Exception:  # a sandbox bug must not stop later deliveries silently
                logger.exception("zendit webhook tick failed")

    def tick(self) -> None:
        """Send every purchase whose status changed since the last tick (finals only, unless asked)."""
        config = self.config
        if config is None:
            return
        for transaction_id, status in self.state.status_changes():
            if status in FINAL or config.intermediate:
                self.send(transaction_id)

    def send(self, transaction_id: str) -> Delivery | None:
        """Deliver the purchase as it is now (or as a pending lie says); None if not configured."""
        config = self.config
        body = self.state.purchase_view(transaction_id)
        if config is None or body is None:
            return None
        actual = str(body["status"])
        lie = next((lie for lie in self.lies if lie.remaining > 0), None)
        if lie is not None:
            lie.remaining -= 1
            body = _lying_body(body, lie.status)
        delivery = Delivery(transaction_id, str(body["status"]), actual, lie is not None)
        self.deliveries.append(delivery)
        task = asyncio.get_running_loop().create_task(self._deliver(delivery, body, config))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return delivery

    async def _deliver(self, delivery: Delivery, body: dict[str, Any], config: WebhookConfig) -> None:
        headers = {config.header: config.secret, "User-Agent": _USER_AGENT}
        for delay in (0.0, *RETRY_DELAYS_SECONDS):
            await asyncio.sleep(delay)
            try:
                response = await self._http().post(
                    config.url, json=body, headers=headers, timeout=DELIVERY_TIMEOUT_SECONDS
                )
            except httpx.HTTPError as exc:
                delivery.attempts.append(type(exc).__name__)
                continue
            delivery.attempts.append(response.status_code)
            if response.is_success:
                delivery.outcome = "delivered"
                return
        delivery.outcome = "failed"
        logger.warning(
            "zendit webhook failed transaction_id=%s attempts=%d",
            delivery.transaction_id,
            len(delivery.attempts),
        )

    async def aclose(self) -> None:
        self.disable()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def view(self) -> dict[str, Any]:
        config = self.config
        return {
            "configured": config is not None,
            "url": config.url if config else None,
            "header": config.header if config else None,  # its value is a secret: never shown
            "intermediate": config.intermediate if config else None,
            "lies": [vars(lie).copy() for lie in self.lies if lie.remaining > 0],
            "deliveries": [delivery.view() for delivery in self.deliveries],
        }


def _lying_body(body: dict[str, Any], status: str) -> dict[str, Any]:
    """The purchase as a forged or buggy notification would claim it."""
    lied = {**body, "status": status}
    lied.pop("error", None)
    lied.pop("confirmation", None)
    if status == "DONE":
        lied["confirmation"] = {
            "iccid": "8900000000000000000",
            "smdpAddress": "smdp.lie.invalid",
            "activationCode": "NOT-FROM-ZENDIT",
            "externalReferenceId": "",
            "redemptionInstructions": "",
        }
    elif status == "FAILED":
        lied["error"] = {"code": "PRODUCT_UNAVAILABLE", "message": "Made up", "description": ""}
    return lied


# ------------------------------------------------------------------------------------- control routes


def sender_of(request: Request) -> WebhookSender:
    sender: WebhookSender = request.app.state.zendit_webhooks
    return sender


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{name} is required", {name: "required"})
    return value.strip()


async def _guarded(handler: Any, request: Request) -> Response:
    try:
        response: Response = await handler(request)
        return response
    except BadRequest as exc:
        return error_response(400, message=exc.message, fields=exc.fields)


async def _configure(request: Request) -> Response:
    body = await read_json_object(request)
    url = _string(body, "url")
    if not url.startswith(("http://", "https://")):
        raise BadRequest("url must be an http(s) URL", {"url": "invalid"})
    intermediate = body.get("intermediate", False)
    if not isinstance(intermediate, bool):
        raise BadRequest("intermediate must be a boolean", {"intermediate": "invalid"})
    config = WebhookConfig(url, _string(body, "header"), _string(body, "secret"), intermediate)
    try:
        await sender_of(request).configure(config)
    except WebhookUnreachable as exc:
        raise BadRequest(f"webhook URL check failed: {exc}", {"url": "unreachable"}) from None
    return JSONResponse(sender_of(request).view())


async def configure(request: Request) -> Response:
    return await _guarded(_configure, request)


async def disable(request: Request) -> Response:
    sender_of(request).disable()
    return JSONResponse(sender_of(request).view())


async def show(request: Request) -> Response:
    return JSONResponse(sender_of(request).view())


async def _add_lies(request: Request) -> Response:
    body = await read_json_object(request)
    count, status = body.get("count", 1), body.get("status", "DONE")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise BadRequest("count must be an integer >= 1", {"count": "invalid"})
    if status not in STATUSES:
        raise BadRequest(f"status must be one of {sorted(STATUSES)}", {"status": "invalid"})
    lie = Lie(status=str(status), remaining=count)
    sender_of(request).lies.append(lie)
    return JSONResponse(vars(lie))


async def add_lies(request: Request) -> Response:
    return await _guarded(_add_lies, request)


async def send_now(request: Request) -> Response:
    sender = sender_of(request)
    if sender.config is None:
        return error_response(400, message="no webhook configured")
    transaction_id = request.path_params["transaction_id"]
    if state_of(request).purchase_view(transaction_id) is None:
        return error_response(404, message="Transaction not found")
    delivery = sender.send(transaction_id)
    return JSONResponse(delivery.view() if delivery else {})


ROUTES = [
    Route("/webhook", configure, methods=["POST"]),
    Route("/webhook", disable, methods=["DELETE"]),
    Route("/webhook", show, methods=["GET"]),
    Route("/webhook/lies", add_lies, methods=["POST"]),
    Route("/webhook/send/{transaction_id}", send_now, methods=["POST"]),
]
