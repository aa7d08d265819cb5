"""Control routes under `/_sandbox/`: pay a Checkout Session, configure webhooks, inspect events, faults.

- `GET  /_sandbox/checkout/{id}`: the hosted page a session's `url` points at (a Pay button).
- `POST /_sandbox/checkout/sessions/{id}/pay`: the customer pays; answers
  `{"session", "payment_intent", "event_ids"}` (or, with `?redirect=true` as the page's form sends,
  303 to the success_url). Optional JSON body `{"email": ...}`.
- `GET|POST /_sandbox/webhook_endpoints`: read / set `{"url", "secret", "enabled_events",
  "issuing_authorization_url", "issuing_authorization_secret"}` (only the fields given change;
  `"issuing_authorization_secret": null` signs real-time authorisations with `secret` again, the default).
- `GET  /_sandbox/events[?type=...]`: every event with its delivery status and every attempt
  (`{"at", "status_code", "error", "delivery"}`; `delivery` 0 is the original, then duplicates/resends).
- `POST /_sandbox/events/{id}/redeliver`: one more signed delivery to the current endpoint, now;
  answers `{"event_id", "attempt"}`.
- `GET|POST|DELETE /_sandbox/webhook_delivery`: read / change (only the fields given) / reset how events
  go out: `{"duplicates": int, "order": "concurrent"|"created"|"reversed", "delay_seconds": float,
  "retry_schedule_seconds": [float, ...], "timeout_seconds": float, "hold": bool}` (see `delivery`).
  GET also lists `held_event_ids`.
- `POST /_sandbox/webhook_delivery/release`: send held events; body `{"event_ids": [...]}` sends just
  those, one after another in that order (otherwise every held action as it came). Answers `{"released"}`.
- `GET|POST|DELETE /_sandbox/faults`: list / arm / clear injected API faults,
  e.g. `{"path": "/v1/refunds", "method": "POST", "count": 2, "status": 500}` (see `faults`).
- `POST /_sandbox/issuing/next_card`: `{"number", "cvc"}` — the next Issuing card created gets this
  number (13-19 digits, Luhn-valid, not issued yet) and CVC (3-4 digits), once; tests use it for a
  canary card they can search logs and dumps for. Answers `{"armed": true, "last4"}` (never the number
  or CVC). `DELETE` disarms it.
- `GET  /_sandbox/health`: liveness for compose files and scripts.
"""

from __future__ import annotations

import html
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from . import checkout, delivery, faults
from .control import control_route, field, read_json
from .errors import StripeApiError
from .ids import is_luhn_valid
from .state import CardSecret, StripeState
from .webhooks import Webhooks


async def checkout_page(request: Request) -> Response:
    state: StripeState = request.app.state.stripe
    session = state.get("checkout.session", request.path_params["session"])
    amount = f"{session['amount_total'] / 100:.2f} {session['currency'].upper()}"
    action = f"/_sandbox/checkout/sessions/{html.escape(session['id'])}/pay?redirect=true"
    page = (
        "<!doctype html><title>Sandbox Checkout</title>"
        f"<h1>Pay {html.escape(amount)}</h1>"
        f"<p>Session {html.escape(session['id'])} is {session['status']}.</p>"
        f'<form method="post" action="{action}"><button type="submit">Pay with test card 4242</button></form>'
    )
    return HTMLResponse(page)


async def pay_session(request: Request) -> Response | dict[str, Any]:
    state: StripeState = request.app.state.stripe
    session = state.get("checkout.session", request.path_params["session"])
    redirect = request.query_params.get("redirect") == "true"
    body = {} if redirect else await read_json(request, required=False)
    result = checkout.pay(
        state, request.app.state.webhooks, session, email=field(body, "email", str, required=False)
    )
    if redirect and session["success_url"]:
        # Stripe fills the {CHECKOUT_SESSION_ID} template when it sends the customer back.
        target = session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"])
        return RedirectResponse(target, status_code=303)
    return result


async def get_webhook_endpoint(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    return {
        "url": state.webhook.url,
        "secret": state.webhook.secret,
        "enabled_events": state.webhook.enabled_events,
        "issuing_authorization_url": state.issuing_auth_webhook_url,
        "issuing_authorization_secret": state.issuing_authorization_secret,
    }


async def set_webhook_endpoint(request: Request) -> dict[str, Any]:
    """Change only the fields given; `"url": null` stops delivery."""
    state: StripeState = request.app.state.stripe
    body = await read_json(request)
    if "url" in body:
        state.webhook.url = field(body, "url", str, required=False)
    if "secret" in body:
        state.webhook.secret = field(body, "secret", str)
    if "enabled_events" in body:
        events = field(body, "enabled_events", list)
        if not all(isinstance(item, str) for item in events):
            raise StripeApiError(400, "enabled_events must be a list of event types.", param="enabled_events")
        state.webhook.enabled_events = events
    if "issuing_authorization_url" in body:
        state.issuing_auth_webhook_url = field(body, "issuing_authorization_url", str, required=False)
    if "issuing_authorization_secret" in body:
        secret = field(body, "issuing_authorization_secret", str, required=False)
        if secret == "":
            raise StripeApiError(
                400, "issuing_authorization_secret must not be empty.", param="issuing_authorization_secret"
            )
        state.issuing_auth_webhook_secret = secret
    return await get_webhook_endpoint(request)


async def list_events(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    records = state.events_of(request.query_params.get("type"))
    return {"object": "list", "data": [record.summary() for record in records]}


async def redeliver_event(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    webhooks: Webhooks = request.app.state.webhooks
    record = state.event_record(request.path_params["event"])
    attempt = await webhooks.redeliver(record)
    return {
        "event_id": record.event["id"],
        "attempt": {
            "at": attempt.at,
            "status_code": attempt.status_code,
            "error": attempt.error,
            "delivery": attempt.delivery,
        },
    }


async def get_webhook_delivery(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    held = [record.event["id"] for records in state.held for record in records]
    return {**state.delivery.to_json(), "held_event_ids": held}


async def set_webhook_delivery(request: Request) -> dict[str, Any]:
    """Change only the fields given; events already on their way keep the settings they left with."""
    state: StripeState = request.app.state.stripe
    state.delivery = delivery.updated(state.delivery, await read_json(request))
    return await get_webhook_delivery(request)


async def reset_webhook_delivery(request: Request) -> dict[str, Any]:
    """Back to the defaults; held events stay held until released."""
    state: StripeState = request.app.state.stripe
    state.delivery = delivery.DeliverySettings()
    return await get_webhook_delivery(request)


async def release_held_events(request: Request) -> dict[str, Any]:
    webhooks: Webhooks = request.app.state.webhooks
    body = await read_json(request, required=False)
    event_ids = field(body, "event_ids", list, required=False)
    if event_ids is not None and not all(isinstance(item, str) for item in event_ids):
        raise StripeApiError(400, "event_ids must be a list of event ids.", param="event_ids")
    released = webhooks.release(event_ids)
    return {"released": [record.event["id"] for record in released]}


async def list_faults(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    return {"object": "list", "data": [fault.to_json() for fault in state.faults]}


async def add_fault(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    fault = faults.parse(await read_json(request))
    state.faults.append(fault)
    return fault.to_json()


async def clear_faults(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    state.faults.clear()
    return await list_faults(request)


async def arm_next_card(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    body = await read_json(request)
    number, cvc = field(body, "number", str), field(body, "cvc", str)
    # The messages name the rule, never the value: this route exists to handle secrets.
    if not (13 <= len(number) <= 19 and is_luhn_valid(number)):
        raise StripeApiError(400, "number must be 13-19 digits passing the Luhn check.", param="number")
    if number in state.cards_by_number:
        raise StripeApiError(400, "A card with this number was already issued.", param="number")
    if not (cvc.isdigit() and 3 <= len(cvc) <= 4):
        raise StripeApiError(400, "cvc must be 3 or 4 digits.", param="cvc")
    state.next_card_secret = CardSecret(number=number, cvc=cvc)
    return {"armed": True, "last4": number[-4:]}


async def disarm_next_card(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    state.next_card_secret = None
    return {"armed": False, "last4": None}


async def health(request: Request) -> dict[str, Any]:
    return {"ok": True}


def routes() -> list[Route]:
    return [
        control_route("/_sandbox/checkout/{session}", checkout_page, method="GET"),
        control_route("/_sandbox/checkout/sessions/{session}/pay", pay_session, method="POST"),
        control_route("/_sandbox/webhook_endpoints", get_webhook_endpoint, method="GET"),
        control_route("/_sandbox/webhook_endpoints", set_webhook_endpoint, method="POST"),
        control_route("/_sandbox/events", list_events, method="GET"),
        control_route("/_sandbox/events/{event}/redeliver", redeliver_event, method="POST"),
        control_route("/_sandbox/webhook_delivery", get_webhook_delivery, method="GET"),
        control_route("/_sandbox/webhook_delivery", set_webhook_delivery, method="POST"),
        control_route("/_sandbox/webhook_delivery", reset_webhook_delivery, method="DELETE"),
        control_route("/_sandbox/webhook_delivery/release", release_held_events, method="POST"),
        control_route("/_sandbox/faults", list_faults, method="GET"),
        control_route("/_sandbox/faults", add_fault, method="POST"),
        control_route("/_sandbox/faults", clear_faults, method="DELETE"),
        control_route("/_sandbox/issuing/next_card", arm_next_card, method="POST"),
        control_route("/_sandbox/issuing/next_card", disarm_next_card, method="DELETE"),
        control_route("/_sandbox/health", health, method="GET"),
    ]
