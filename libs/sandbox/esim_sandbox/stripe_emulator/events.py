"""`GET /v1/events[/{id}]`: the events the emulator created, as Stripe lists them (newest first)."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route
from stripe.params import EventListParams, EventRetrieveParams

from .api import Call, api_route
from .coerce import as_str_list
from .lists import paginate


async def retrieve_event(call: Call) -> dict[str, Any]:
    return call.state.event_record(call.path["event"]).event


async def list_events(call: Call) -> dict[str, Any]:
    types = as_str_list(call.params.get("types"), "types") or as_str_list(call.params.get("type"), "type")
    events = [
        record.event
        for record in reversed(call.state.events)
        # Real-time authorisation requests are answered inline and never listed by Stripe.
        if record.event["type"] != "issuing_authorization.request"
        and (not types or _matches(record.event["type"], types))
    ]
    return paginate(call, events, "/v1/events")


def _matches(event_type: str, patterns: list[str]) -> bool:
    # Stripe accepts `type=checkout.session.*` wildcards.
    return any(event_type == p or (p.endswith("*") and event_type.startswith(p[:-1])) for p in patterns)


def routes() -> list[Route]:
    return [
        api_route("/v1/events", list_events, method="GET", spec=EventListParams),
        api_route("/v1/events/{event}", retrieve_event, method="GET", spec=EventRetrieveParams),
    ]
