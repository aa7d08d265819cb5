"""Stripe list objects with `limit` / `starting_after` / `ending_before` cursor pagination."""

from __future__ import annotations

from typing import Any

from .api import Call
from .coerce import opt_int, opt_str

DEFAULT_LIMIT = 10
MAX_LIMIT = 100


def paginate(call: Call, items: list[dict[str, Any]], url: str) -> dict[str, Any]:
    """`items` newest first, as Stripe lists them."""
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
