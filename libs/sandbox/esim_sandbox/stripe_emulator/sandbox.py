"""Control routes under `/_sandbox/`: pay a Checkout Session, configure webhooks, inspect events.

- `GET  /_sandbox/checkout/{id}`: the hosted page a session's `url` points at (a Pay button).
- `POST /_sandbox/checkout/sessions/{id}/pay`: the customer pays; answers
  `{"session", "payment_intent", "event_ids"}` (or, with `?redirect=true` as the page's form sends,
  303 to the success_url). Optional JSON body `{"email": ...}`.
- `GET|POST /_sandbox/webhook_endpoints`: read / set
  `{"url", "secret", "enabled_events", "issuing_authorization_url"}` (only the fields given change).
- `GET  /_sandbox/events[?type=...]`: every event with its delivery attempts.
- `GET  /_sandbox/health`: liveness for compose files and scripts.
"""

from __future__ import annotations

import html
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from . import checkout
from .control import control_route, field, read_json
from .errors import StripeApiError
from .state import StripeState


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
    return await get_webhook_endpoint(request)


async def list_events(request: Request) -> dict[str, Any]:
    state: StripeState = request.app.state.stripe
    records = state.events_of(request.query_params.get("type"))
    return {"object": "list", "data": [record.summary() for record in records]}


async def health(request: Request) -> dict[str, Any]:
    return {"ok": True}


def routes() -> list[Route]:
    return [
        control_route("/_sandbox/checkout/{session}", checkout_page, method="GET"),
        control_route("/_sandbox/checkout/sessions/{session}/pay", pay_session, method="POST"),
        control_route("/_sandbox/webhook_endpoints", get_webhook_endpoint, method="GET"),
        control_route("/_sandbox/webhook_endpoints", set_webhook_endpoint, method="POST"),
        control_route("/_sandbox/events", list_events, method="GET"),
        control_route("/_sandbox/health", health, method="GET"),
    ]
