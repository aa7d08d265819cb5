"""Stripe list objects with `limit` / `starting_after` / `ending_before` cursor pagination."""

from __future__ import annotations

from typing import Any

from .api import Call
from .coerce import as_int, opt_int, opt_str

DEFAULT_LIMIT = 10
MAX_LIMIT = 100


def paginate(call: Call, items: list[dict[str, Any]], url: str) -> dict[str, Any]:
    """`items` newest first, as Stripe lists them; a `created` filter (where the endpoint takes one)
    applies before the cursor, as at Stripe."""
    items = created_within(call.params, items)
    limit = opt_int(call.params, "limit", minimum=1) or DEFAULT_LIMIT
    limit = min(limit, MAX_LIMIT)
    ids = [item["id"] for item in items]
    after = opt_str(call.params, "starting_after")
    before = opt_str(call.params, "ending_before")
    if after in ids:
        items = items[ids.index(after) + 1 :]
        page = items[:limit]
    elif before in ids:
        items = items[: ids.index(before)]
        page = items[-limit:]
    else:
        page = items[:limit]
    return {
        "object": "list",
        "data": [call.render(item) for item in page],
        "has_more": len(items) > len(page),
        "url": url,
    }


_CREATED_BOUNDS = {
    "gt": lambda created, bound: created > bound,
    "gte": lambda created, bound: created >= bound,
    "lt": lambda created, bound: created < bound,
    "lte": lambda created, bound: created <= bound,
}


def created_within(params: dict[str, Any], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stripe's `created` list filter: an exact unix time, or a range `created[gte]=...&created[lt]=...`.
    The SDK's params TypedDict has already refused any other key (`params.check_params`)."""
    value = params.get("created")
    if value is None or value == "":
        return items
    if not isinstance(value, dict):
        exact = as_int(value, "created")
        return [item for item in items if item["created"] == exact]
    bounds = [(_CREATED_BOUNDS[key], as_int(bound, f"created[{key}]")) for key, bound in value.items()]
    return [item for item in items if all(test(item["created"], bound) for test, bound in bounds)]
